"""Input validation shared by the public functions.

Only shapes, dtypes and devices are checked here (no tensor values), so these checks cost
no synchronisation and ``torch.compile`` traces through them. Value checks that need the
data (class indices in range) run inside the op, on CPU tensors only.
"""

import math
import operator

import torch

from fastis.constants import INDEX_DTYPES

_INT64 = (-(2**63), 2**63 - 1)


def check_logits_target(logits, target, label_smoothing) -> None:
    """Validates the ``(logits, target)`` pair of ``score`` / ``cross_entropy``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, C] or [B, T, C], got shape {tuple(logits.shape)}")
    if not (logits.is_cpu and target.is_cpu) and target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft (floating) target must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
    elif target.dtype in INDEX_DTYPES:
        if target.shape != logits.shape[:-1]:
            raise ValueError(
                f"target of class indices must have shape {tuple(logits.shape[:-1])} "
                f"for logits of shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
    else:
        raise TypeError(
            f"target must hold int64/int32/uint8 class indices or floating probabilities, "
            f"got {target.dtype}"
        )
    float_arg("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def float_arg(name: str, value) -> float:
    """``value`` as a Python ``float`` (a real number, not a bool or a string; not NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def index_arg(name: str, value) -> int:
    """A class index option (``ignore_index``): a Python int in the int64 range."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def bool_arg(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_rows(name: str, tensor, logits, *, rows=None, trailing: bool = False) -> None:
    """Checks that ``tensor`` has one entry (``trailing``: one vector) per row of ``logits``
    (or per entry of ``rows``, a leading shape of the logits)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    if not (tensor.is_cpu and logits.is_cpu) and tensor.device != logits.device:
        raise ValueError(f"{name} is on {tensor.device} but logits on {logits.device}")
    rows = tuple(logits.shape[:-1] if rows is None else rows)
    got = tuple(tensor.shape[:-1]) if trailing else tuple(tensor.shape)
    if got != rows or (trailing and tensor.dim() != len(rows) + 1):
        want = f"{rows + ('D',)}" if trailing else f"{rows}"
        raise ValueError(
            f"{name} must have shape {want} for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(tensor.shape)}"
        )


def int_arg(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` (anything with ``__index__``, not a bool), at least ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        bound = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value
