"""The engine: scheduling, batching, decoding. Knows nothing of HTTP."""
