"""Nested training inputs: a tensor, or a tuple / list / dict of them (one leading row each).

The samplers take whatever a ``DataLoader`` yields (``x``, ``(x, mask)``, a Hugging Face
``{"input_ids": ..., "attention_mask": ...}``) and must cut rows out of it without knowing
its layout. One walker, ``map_tensors``, applies a function to every tensor leaf and keeps
the structure; the rest are one-liners on top of it.
"""

from collections.abc import Callable

import torch


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj):
    """``obj`` with ``fn`` applied to every tensor in it (tuples, lists and dicts are walked
    recursively and rebuilt with the same type; ``None`` stays ``None``).

    Raises:
        TypeError: a leaf that is neither a tensor nor ``None``.
    """
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    raise TypeError(
        f"inputs and targets must be tensors (or tuples/lists/dicts of tensors), got "
        f"{type(obj).__name__}"
    )


def first_tensor(obj) -> torch.Tensor | None:
    """The first tensor of ``obj`` in walking order (``None`` when it holds none)."""
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for o in items:
        t = first_tensor(o)
        if t is not None:
            return t
    return None


def num_rows(obj) -> int:
    """The leading size of ``obj``'s first tensor: the number of rows of the batch."""
    if isinstance(obj, torch.Tensor) and obj.dim():  # the common case, without the walk
        return obj.shape[0]
    t = first_tensor(obj)
    if t is None:
        raise TypeError(
            f"inputs and targets must be tensors (or tuples/lists/dicts of tensors), got "
            f"{type(obj).__name__}"
        )
    if t.dim() == 0:
        raise ValueError("inputs and targets must have a leading batch dimension")
    return t.shape[0]


def device_of(obj) -> torch.device:
    """The device of ``obj``'s first tensor (the CPU when it holds none)."""
    t = first_tensor(obj)
    return torch.device("cpu") if t is None else t.device


def take_rows(obj, pos: torch.Tensor):
    """Rows ``pos`` (int64 ``[n]``) of every tensor in ``obj``, moved to each one's device."""
    if isinstance(obj, torch.Tensor) and obj.device == pos.device:  # the common case
        return obj.index_select(0, pos)
    return map_tensors(lambda t: t.index_select(0, pos.to(t.device, non_blocking=True)), obj)


def slice_rows(obj, start: int, stop: int):
    """Rows ``start:stop`` of every tensor in ``obj`` (views, no copy)."""
    return map_tensors(lambda t: t[start:stop], obj)
