"""fastis: fast importance sampling for deep-learning training in PyTorch."""

from fastis.alias import AliasTable, sample
from fastis.loss import cross_entropy
from fastis.sampling import HistorySampler, ImportanceSampler
from fastis.score import score

__all__ = ["AliasTable", "HistorySampler", "ImportanceSampler", "cross_entropy", "sample", "score"]
__version__ = "0.1.0"
