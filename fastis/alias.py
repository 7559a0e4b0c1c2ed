"""Weighted sampling with replacement: ``AliasTable`` (one table, many draws) and ``sample``.

Walker's alias method: ``N`` weights become two arrays, ``prob`` and ``alias``; a draw picks
a bucket ``i`` uniformly, keeps it with probability ``prob[i]`` and otherwise takes
``alias[i]``: O(1) per draw, one table row read. The table is built in O(N) work with no
sequential sweep (``fastis._alias_torch`` has the math, ``fastis._triton.alias`` the
kernels), in float64, past torch.multinomial's 2^24 categories.

Which implementation runs is ``fastis._backend.use_triton``'s choice (``FASTIS_BACKEND``):
Triton for CUDA tensors, the plain-torch path otherwise.

Synchronisation: on CUDA, building an ``AliasTable`` checks the weights' values with one
host synchronisation (documented, once per table); drawing never synchronises, and neither
does ``sample`` (it checks shapes and dtypes only; see its docstring for what values it
does not check on CUDA).
"""

import math
import operator

import torch

from fastis import _alias_torch
from fastis._backend import use_triton

# ``sample``'s choice of method (see its docstring; bench/test_bench_alias.py measures it).
# CPU: the inverse CDF (a float64 cumsum, then one binary search per draw, ~60 ns at
# N = 2^10 to ~140 ns at 2^18 as the searches leave the cache) against a table (a build of
# ~40 ns per category, then ~16 ns per draw): measured crossovers n ~ 2.6 N at N = 2^10,
# 0.5 N at 2^14, 0.3 N at 2^18 (bench/results/alias_cpu.md). Table from n >= N / 4 + 2048.
CPU_TABLE_MIN_DRAWS = (4, 2048)  # (1 / slope, offset)
# Triton: one fused launch (scan + count, no stored CDF) for small fresh distributions.
FUSED_MAX_CATEGORIES = 2**14
FUSED_MAX_WORK = 2**26  # n * N comparisons


def _method(triton: bool, num: int, n: int) -> str:
    """``sample``'s method for ``n`` draws from ``num`` categories: fused, icdf or table."""
    if triton:
        if num <= FUSED_MAX_CATEGORIES and n * num <= FUSED_MAX_WORK:
            return "fused"
        return "table" if n > num else "icdf"
    inv_slope, offset = CPU_TABLE_MIN_DRAWS
    return "table" if n >= num // inv_slope + offset else "icdf"


def _triton_alias():
    # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
    from fastis._triton import alias

    return alias


def _check_weights(weights, *, check_values: bool) -> None:
    """Shape and dtype always; values (one host sync on CUDA) when ``check_values``."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(
            f"weights must be a floating-point tensor, got dtype {weights.dtype} "
            "(convert integer counts with weights.double())"
        )
    if weights.dim() != 1:
        if weights.dim() == 2:
            raise ValueError(
                f"weights must be 1-D [N]; batched [R, N] tables are not supported yet, got "
                f"shape {tuple(weights.shape)} (build one AliasTable per row)"
            )
        raise ValueError(f"weights must be 1-D [N], got shape {tuple(weights.shape)}")
    if weights.shape[0] == 0:
        raise ValueError("weights must hold at least one category, got an empty tensor")
    if check_values:
        _check_values(weights.detach())


def _check_values(w: torch.Tensor, total: torch.Tensor | None = None) -> None:
    """ValueError for NaN, inf, negative or all-zero weights, or a float64 sum overflow.

    One ``min`` (NaN propagates), the float64 sum (``total``, when the caller has it) and
    one synchronisation on CUDA; naming the problem and its index runs only on failure.
    """
    if total is None:
        total = w.sum(dtype=torch.float64)
    total = total.reshape(())
    if bool((w.min() >= 0) & (total > 0) & total.isfinite()):
        return
    if w.isnan().any():
        raise ValueError(f"weights must not contain NaN (first at index {_first(w.isnan())})")
    if w.isinf().any():
        raise ValueError(f"weights must be finite, got inf at index {_first(w.isinf())}")
    if (w < 0).any():
        i = _first(w < 0)
        raise ValueError(f"weights must be non-negative, got {w[i].item()} at index {i}")
    if math.isinf(float(total)):
        raise ValueError("the sum of weights overflows float64; rescale the weights")
    raise ValueError("weights must not all be zero (no category can be drawn)")


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _check_n(n) -> int:
    if isinstance(n, bool):
        raise TypeError(f"n must be an int, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int, got {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return n


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the weights (table) on {device}"
        )


def _probs_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class AliasTable:
    """Walker alias table over ``N`` categories: build once, draw many times in O(1) each.

    Built from 1-D non-negative floating ``weights`` (any device; float16/bfloat16/float32/
    float64; ``N`` from 1 to 2^31 - 1 and beyond where memory allows), on the weights'
    device. Sums and the table are float64: the table's implied distribution,
    ``(prob[k] + sum_{i: alias[i] = k} (1 - prob[i])) / N``, equals ``w_k / sum(w)`` to
    float64 rounding of prefix sums (relative error ~ N * 2^-53 at worst, for the heaviest
    items). Items of weight 0 are never drawn.

    Args:
        weights: ``[N]`` floating, non-negative, finite, not all zero. Integer weights are
            refused (``TypeError``); convert with ``weights.double()``. Checked with one
            host synchronisation on CUDA (at build time only).

    Attributes:
        probs: ``[N]`` float64, the normalised probabilities ``w / sum(w)``.
        prob: ``[N]`` float64, the probability of keeping bucket ``i``.
        alias: ``[N]`` int32 (int64 past 2^31 - 1 items), the bucket's other item.

    Memory: 20 bytes per category (probs, prob, alias), plus temporaries while building.

    Example:
        >>> table = AliasTable(torch.tensor([1.0, 2.0, 0.0, 5.0]))
        >>> g = torch.Generator().manual_seed(0)
        >>> idx = table.sample(1000, generator=g)   # int64 [1000], never 2
        >>> w = 1.0 / (len(table) * table.probs[idx])  # importance weights
    """

    def __init__(self, weights: torch.Tensor):
        self.probs: torch.Tensor | None = None
        self.prob: torch.Tensor | None = None
        self.alias: torch.Tensor | None = None
        self.rebuild(weights)

    def rebuild(self, weights: torch.Tensor) -> "AliasTable":
        """Rebuilds from new ``weights`` in place, reusing the buffers when N and the device
        are unchanged. Returns ``self``."""
        _check_weights(weights, check_values=True)
        n = weights.shape[0]
        reuse = (
            self.prob is not None
            and self.prob.shape[0] == n
            and self.prob.device == weights.device
        )
        out = {}
        if reuse:
            out = dict(out_prob=self.prob, out_alias=self.alias, out_probs=self.probs)
        builder = _triton_alias().build if use_triton(weights) else _alias_torch.build
        self.prob, self.alias, self.probs = builder(weights.detach(), **out)
        return self

    def __len__(self) -> int:
        return self.prob.shape[0]

    @property
    def num_categories(self) -> int:
        """N, the number of categories."""
        return self.prob.shape[0]

    @property
    def device(self) -> torch.device:
        return self.prob.device

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        return_probs: bool = False,
    ):
        """Draws ``n`` categories with replacement.

        Args:
            n: number of draws, ``>= 0``.
            generator: a ``torch.Generator`` on the table's device (default: that device's
                default generator). Same seed, same indices (per backend); it advances.
            return_probs: also return ``probs[idx]``.

        Returns:
            ``idx``: int64 ``[n]`` on the table's device; with ``return_probs``,
            ``(idx, p)`` with ``p`` float64 ``[n]``, the normalised probabilities of the
            drawn categories. No host synchronisation.
        """
        n = _check_n(n)
        _check_generator(generator, self.device)
        if use_triton(self.prob):
            idx = _triton_alias().sample_table(self.prob, self.alias, n, generator)
        else:
            idx = _alias_torch.sample_table(self.prob, self.alias, n, generator)
        if return_probs:
            return idx, self.probs[idx]
        return idx

    def to(self, device) -> "AliasTable":
        """This table on ``device`` (``self`` if already there; no rebuild)."""
        device = torch.device(device)
        if device == self.device:
            return self
        new = AliasTable.__new__(AliasTable)
        new.probs = self.probs.to(device)
        new.prob = self.prob.to(device)
        new.alias = self.alias.to(device)
        return new

    def state_dict(self) -> dict:
        """``{"probs", "prob", "alias"}``: the table's tensors (a reload does not rebuild)."""
        return {"probs": self.probs, "prob": self.prob, "alias": self.alias}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a ``state_dict()``, checking keys, shapes, dtypes and index range."""
        missing = {"probs", "prob", "alias"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        probs, prob, alias = state_dict["probs"], state_dict["prob"], state_dict["alias"]
        for name, t in (("probs", probs), ("prob", prob), ("alias", alias)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"state_dict[{name!r}] must be a 1-D tensor")
        n = prob.shape[0]
        if n == 0 or probs.shape[0] != n or alias.shape[0] != n:
            raise ValueError(
                f"state_dict tensors must share one non-zero length, got probs "
                f"{tuple(probs.shape)}, prob {tuple(prob.shape)}, alias {tuple(alias.shape)}"
            )
        if prob.dtype != torch.float64 or probs.dtype != torch.float64:
            raise TypeError(
                f"state_dict['prob'] and ['probs'] must be float64, got {prob.dtype}, "
                f"{probs.dtype}"
            )
        if alias.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"state_dict['alias'] must be int32 or int64, got {alias.dtype}")
        if not (probs.device == prob.device == alias.device):
            raise ValueError("state_dict tensors must be on one device")
        lo, hi = alias.aminmax()
        if int(lo) < 0 or int(hi) >= n or bool((prob < 0).any() | (prob > 1).any()):
            raise ValueError("state_dict['alias'] or ['prob'] is out of range")
        self.probs, self.prob, self.alias = probs.clone(), prob.clone(), alias.clone()

    def __repr__(self) -> str:
        p = self.probs
        positive = int((p > 0).sum())
        ess = float(1.0 / (p * p).sum())
        return (
            f"AliasTable(num_categories={len(self)}, device={self.device}, "
            f"positive={positive}, max_prob={float(p.max()):.4g}, "
            f"effective_size={ess:.4g})"
        )


def sample(
    weights: torch.Tensor,
    n: int,
    *,
    generator: torch.Generator | None = None,
    return_probs: bool = False,
):
    """Draws ``n`` indices with replacement, ``P(k) = w_k / sum(w)``, in one shot.

    Picks the fastest exact method for the shape (measured on the CPU, see
    ``bench/results/alias_cpu.md``); every method accumulates in float64 and never draws a
    weight-0 item:

    - torch path (CPU): an inverse CDF (float64 cumulative sum, one binary search per draw)
      when ``n < N / 4 + 2048``, else an ``AliasTable`` build and ``n`` O(1) draws;
    - Triton path (CUDA): for ``N <= 2^14`` and ``n N <= 2^26`` (the ``b``-of-``B``
      presample draw), one fused kernel (plus the launch that draws its seed); otherwise
      the inverse CDF on the device for ``n <= N``, else a table (the GPU thresholds
      are not yet measured).

    The rule depends only on ``(N, n)`` and the backend, so a seed gives the same indices
    on every run of the same kind.

    Args:
        weights: ``[N]`` floating, non-negative, finite, not all zero (integer weights are
            refused with ``TypeError``). On CPU, bad values raise ``ValueError``. On CUDA
            the values are not checked (that would synchronise): with negative, NaN or
            infinite weights, or all zeros, the indices are in ``[0, N)`` but meaningless
            and the probabilities NaN, inf or negative. Use ``AliasTable`` for a checked
            build.
        n: number of draws, ``>= 0``.
        generator: a ``torch.Generator`` on the weights' device (default: the device's
            default generator); it advances.
        return_probs: also return the normalised probability of each drawn index, what
            importance weights ``1 / (N p)`` are made from.

    Returns:
        ``idx`` int64 ``[n]``; with ``return_probs``, ``(idx, p)`` with ``p`` of dtype
        ``promote_types(weights.dtype, float32)``, shape ``[n]``.

    Example:
        >>> scores = torch.rand(384)
        >>> idx, p = fastis.sample(scores, 128, return_probs=True)
        >>> weights = 1.0 / (384 * p)
    """
    _check_weights(weights, check_values=False)
    n = _check_n(n)
    _check_generator(generator, weights.device)
    w = weights.detach()
    num = w.shape[0]
    check = not w.is_cuda  # values are checked off CUDA only (a check would synchronise)
    triton = use_triton(w)
    method = _method(triton, num, n)
    if method == "fused":
        if check:
            _check_values(w)
        idx, p = _triton_alias().sample_icdf(w, n, generator, _probs_dtype(w.dtype))
        return (idx, p) if return_probs else idx
    if method == "table":
        if check:
            _check_values(w)
        table = AliasTable.__new__(AliasTable)
        builder = _triton_alias().build if triton else _alias_torch.build
        table.prob, table.alias, table.probs = builder(w)
        idx, p = table.sample(n, generator=generator, return_probs=True)
    else:
        c = _alias_torch.cdf(w)
        if check:
            _check_values(w, total=c[-1])
        idx = _alias_torch.sample_cdf(c, n, generator)
        p = w[idx].double() / c[-1]
    return (idx, p.to(_probs_dtype(w.dtype))) if return_probs else idx
