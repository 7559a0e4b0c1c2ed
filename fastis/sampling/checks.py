"""Argument and checkpoint validation shared by the samplers.

A loaded ``state_dict`` is checked as strictly as constructor arguments: every value a
sampler restores goes through one of these (type, range, shape, dtype), so a corrupt
checkpoint fails at ``load_state_dict`` with the offending key named, never later.
"""

import math

import torch

from fastis._checks import int_arg

SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts (non-negative)


def seed_arg(value) -> int:
    """A seed in ``[0, 2^64 - 1]``, the range of ``torch.Generator.manual_seed``."""
    value = int_arg("seed", value, minimum=0)
    if value > SEED_RANGE[1]:
        raise ValueError(f"seed must be in [0, 2**64 - 1], got {value}")
    return value


def dataset_size(data_source) -> int:
    """``N``: ``data_source`` itself if an int, else its ``len`` (at least 1)."""
    if isinstance(data_source, bool):
        raise TypeError("data_source must be a sized data set or an int, got a bool")
    if isinstance(data_source, int):
        return int_arg("data_source", data_source)
    try:
        n = len(data_source)
    except TypeError:
        raise TypeError(
            f"data_source must be a sized (map-style) data set or an int, got "
            f"{type(data_source).__name__}"
        ) from None
    if n < 1:
        raise ValueError(f"data_source must hold at least one example, got length {n}")
    return n


def check_scores(scores, n: int, who: str, *, detach: bool = True) -> torch.Tensor:
    """``scores`` (detached unless ``detach=False``), after checking it is a floating
    tensor of shape ``[n]``."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{who} must be a tensor of [{n}] scores, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{who} must be floating point, got {scores.dtype}")
    if tuple(scores.shape) != (n,):
        raise ValueError(
            f"{who} must have shape ({n},), one score per row, got {tuple(scores.shape)}"
        )
    return scores.detach() if detach else scores


# --------------------------------------------------------------------------------------
# checkpoints


def check_header(state_dict, kind: str, version: int, keys, config: dict) -> None:
    """The envelope of a sampler's ``state_dict``: a dict of the right kind and version,
    with every key, saved from the same configuration."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if state_dict.get("kind") != kind:
        raise ValueError(f"state_dict is from a {state_dict.get('kind')!r}, not a {kind!r}")
    if state_dict.get("version") != version:
        raise ValueError(
            f"state_dict has version {state_dict.get('version')!r}, expected {version}"
        )
    missing = sorted(set(keys) - set(state_dict))
    if missing:
        raise ValueError(f"state_dict is missing {missing}")
    saved = state_dict["config"]
    if not isinstance(saved, dict):
        raise TypeError(f"state_dict['config'] must be a dict, got {type(saved).__name__}")
    diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: saved {a!r} vs this {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"state_dict is from another configuration ({text})")


def state_int(state: dict, key: str, lo: int = 0, hi: int | None = None) -> int:
    """``state[key]`` as an int in ``[lo, hi]`` (``hi=None``: no upper bound)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"state_dict[{key!r}] must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"state_dict[{key!r}] must be in [{lo}, {hi}], got {value}")
    return value


def state_float(state: dict, key: str, lo: float = 0.0, *, nan: bool = False) -> float:
    """``state[key]`` as a finite float ``>= lo`` (a float, or an int; NaN only if ``nan``)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"state_dict[{key!r}] must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isnan(value) and nan) and not (math.isfinite(value) and value >= lo):
        raise ValueError(f"state_dict[{key!r}] must be finite and >= {lo}, got {value}")
    return value


def state_tensor(
    state: dict,
    key: str,
    shape: tuple,
    dtype: torch.dtype,
    *,
    check_values: bool = True,
    nan: bool = False,
) -> torch.Tensor:
    """``state[key]``, a tensor of ``shape`` and ``dtype`` whose values are finite and
    non-negative (``nan``: or NaN; ``check_values=False``: not checked, e.g. booleans),
    as a CPU clone."""
    t = state[key]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"state_dict[{key!r}] must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"state_dict[{key!r}] must have shape {tuple(shape)}, got {tuple(t.shape)}"
        )
    t = t.detach().cpu().clone()
    if check_values:
        ok = torch.isfinite(t) & (t >= 0)
        if nan:
            ok |= torch.isnan(t)
        if not bool(ok.all()):
            raise ValueError(f"state_dict[{key!r}] must be finite and non-negative")
    return t


def cpu_generator_state(state) -> torch.Tensor:
    """A CPU ``torch.Generator``'s saved state (a uint8 tensor), checked by loading it."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise TypeError("state_dict['generator'] must be a CPU generator's uint8 state")
    probe = torch.Generator()
    try:
        probe.set_state(state.cpu())
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"state_dict['generator'] is not a generator state: {e}") from None
    return probe.get_state()
