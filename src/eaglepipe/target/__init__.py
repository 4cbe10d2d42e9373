"""The target model: fetching, conversion, metadata (target.json) and tiny test models."""
