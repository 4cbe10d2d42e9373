"""OpenAI- and SGLang-compatible HTTP server over the native engine (aiohttp)."""
