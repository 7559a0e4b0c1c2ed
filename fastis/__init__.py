"""fastis: fast importance sampling for deep-learning training in PyTorch."""

from fastis.score import score

__all__ = ["score"]
__version__ = "0.1.0"
