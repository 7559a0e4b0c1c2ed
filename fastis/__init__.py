"""fastis: fast importance sampling for deep-learning training in PyTorch."""

from fastis.alias import AliasTable, sample
from fastis.linear import linear_cross_entropy
from fastis.loss import cross_entropy
from fastis.sampling import HistorySampler, ImportanceSampler, LRGain, MeasuredSwitch
from fastis.score import score

__all__ = [
    "AliasTable",
    "HistorySampler",
    "ImportanceSampler",
    "LRGain",
    "MeasuredSwitch",
    "cross_entropy",
    "linear_cross_entropy",
    "sample",
    "score",
]
__version__ = "0.1.0"
