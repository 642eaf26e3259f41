"""Measuring what compression lost and gained."""

from .perplexity import PerplexityResult, perplexity
from .size import ModelSize, checkpoint_bytes, model_size

__all__ = ["ModelSize", "PerplexityResult", "checkpoint_bytes", "model_size", "perplexity"]
