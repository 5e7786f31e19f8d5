"""The HTTP layer: OpenAI schemas, routes, streaming, errors."""
