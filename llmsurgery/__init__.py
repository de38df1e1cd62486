"""llmsurgery: model surgery and compression for causal language models."""

__version__ = "0.1.0"
