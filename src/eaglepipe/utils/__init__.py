"""Small shared helpers: atomic writes, device choice, stage CLI plumbing."""
