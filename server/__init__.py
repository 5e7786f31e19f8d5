"""An OpenAI-compatible inference server for multilingual causal LMs."""

__version__ = "0.1.0"
