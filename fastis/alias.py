"""Weighted sampling with replacement: ``AliasTable`` (one table, many draws) and ``sample``.

Walker's alias method: ``N`` weights become two arrays, ``prob`` and ``alias``; a draw picks
a bucket ``i`` uniformly, keeps it with probability ``prob[i]`` and otherwise takes
``alias[i]``: O(1) per draw, one table row read. The table is built in O(N) work with no
sequential sweep (``fastis._alias_torch`` has the math, ``fastis._triton.alias`` the
kernels), in float64, past torch.multinomial's 2^24 categories. A 2-D ``[R, N]`` input is a
batch of ``R`` distributions (one table per row, ``[R, n]`` draws); batches run the
plain-torch path on every backend (vectorised over rows, no host synchronisation).

Which implementation runs is ``fastis._backend.use_triton``'s choice (``FASTIS_BACKEND``):
Triton for CUDA tensors, the plain-torch path otherwise.

Synchronisation: on CUDA, building an ``AliasTable`` checks the weights' values with one
host synchronisation (documented, once per table); drawing never synchronises, and neither
does ``sample`` (it checks shapes and dtypes only; see its docstring for what values it
does not check on CUDA).
"""


import torch

from fastis import _alias_torch
from fastis._backend import use_triton
from fastis._checks import int_arg

# ``sample``'s choice of method (see its docstring; bench/test_bench_alias.py measures it).
# CPU: the inverse CDF (a float64 cumsum, then one binary search per draw, ~60 ns at
# N = 2^10 to ~140 ns at 2^18 as the searches leave the cache) against a table (a build of
# ~40 ns per category, then ~16 ns per draw): measured crossovers n ~ 2.6 N at N = 2^10,
# 0.5 N at 2^14, 0.3 N at 2^18 (bench/results/alias_cpu.md). Table from n >= N / 4 + 2048.
CPU_TABLE_MIN_DRAWS = (4, 2048)  # (1 / slope, offset)
# Triton: one fused launch (a float64 scan per block of draws, no stored CDF) for small fresh
# distributions (the b-of-B presample draw). Not yet timed on a GPU.
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


def _builder(weights: torch.Tensor):
    """The table builder for ``weights``: Triton for 1-D where ``use_triton`` says so."""
    if weights.dim() == 1 and use_triton(weights):
        return _triton_alias().build
    return _alias_torch.build


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
    if weights.dim() not in (1, 2):
        raise ValueError(
            f"weights must be 1-D [N] or a batch [R, N], got shape {tuple(weights.shape)}"
        )
    if weights.numel() == 0:
        raise ValueError(
            f"weights must hold at least one category (and row), got shape {tuple(weights.shape)}"
        )
    if check_values:
        _check_values(weights.detach())


def _check_values(w: torch.Tensor, total: torch.Tensor | None = None) -> None:
    """ValueError for NaN, inf, negative or all-zero weights, or a float64 sum overflow.

    One ``min`` (NaN propagates), the float64 sum (``total``, when the caller has it) and
    one synchronisation on CUDA; naming the problem and its index runs only on failure.
    """
    if total is None:
        total = w.sum(-1, dtype=torch.float64)
    if bool((w.min() >= 0) & (total > 0).all() & total.isfinite().all()):
        return
    if w.isnan().any():
        raise ValueError(f"weights must not contain NaN (first at index {_first(w.isnan())})")
    if w.isinf().any():
        raise ValueError(f"weights must be finite, got inf at index {_first(w.isinf())}")
    if (w < 0).any():
        i = _first(w < 0)
        value = w.reshape(-1)[i].item()
        raise ValueError(f"weights must be non-negative, got {value} at index {i}")
    if total.isinf().any():
        raise ValueError("the sum of weights overflows float64; rescale the weights")
    row = f" (row {_first(total == 0)})" if w.dim() == 2 else ""
    raise ValueError(f"weights must not all be zero{row} (no category can be drawn)")


def _first(mask: torch.Tensor) -> int:
    """Flat index of the first True."""
    return int(mask.reshape(-1).nonzero()[0, 0])


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the weights (table) on {device}")


def _probs_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class AliasTable:
    """Walker alias table over ``N`` categories: build once, draw many times in O(1) each.

    Built from 1-D non-negative floating ``weights`` (any device; float16/bfloat16/float32/
    float64; ``N`` from 1 to 2^31 - 1 and beyond where memory allows), on the weights'
    device; or from a batch ``[R, N]``: one table per row, ``sample(n)`` then returns
    ``[R, n]`` (the plain-torch path on every backend). Sums and the table are float64:
    the table's implied distribution, ``(prob[k] + sum_{i: alias[i] = k} (1 - prob[i])) / N``,
    equals ``w_k / sum(w)`` to float64 rounding of prefix sums (relative error
    ~ N * 2^-53 at worst, for the heaviest items; measured 1.1e-8 at N = 2^26 with weights
    over 30 orders of magnitude). Items of weight 0 are never drawn.

    Args:
        weights: ``[N]`` (or ``[R, N]``) floating, non-negative, finite, not all zero (per
            row). Integer weights are refused (``TypeError``); convert with
            ``weights.double()``. Checked with one host synchronisation on CUDA (at build
            time only).

    Attributes:
        probs: ``[N]`` (``[R, N]``) float64, the normalised probabilities ``w / sum(w)``.
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
        reuse = (
            self.prob is not None
            and self.prob.shape == weights.shape
            and self.prob.device == weights.device
        )
        out = {}
        if reuse:
            out = dict(out_prob=self.prob, out_alias=self.alias, out_probs=self.probs)
        self.prob, self.alias, self.probs = _builder(weights)(weights.detach(), **out)
        return self

    def __len__(self) -> int:
        """N, the number of categories (per row)."""
        return self.prob.shape[-1]

    @property
    def num_categories(self) -> int:
        """N, the number of categories (per row)."""
        return self.prob.shape[-1]

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
            ``idx``: int64 ``[n]`` (``[R, n]`` for a batch) on the table's device; with
            ``return_probs``, ``(idx, p)`` with ``p`` float64 of ``idx``'s shape, the
            normalised probabilities of the drawn categories. No host synchronisation.
        """
        n = int_arg("n", n, minimum=0)
        _check_generator(generator, self.device)
        if self.prob.dim() == 1 and use_triton(self.prob):
            idx = _triton_alias().sample_table(self.prob, self.alias, n, generator)
        else:
            idx = _alias_torch.sample_table(self.prob, self.alias, n, generator)
        if return_probs:
            return idx, self.probs.gather(-1, idx)
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
            if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
                raise ValueError(f"state_dict[{name!r}] must be a 1-D or 2-D tensor")
        n = prob.shape[-1]
        if prob.numel() == 0 or probs.shape != prob.shape or alias.shape != prob.shape:
            raise ValueError(
                f"state_dict tensors must share one non-empty shape (length), got probs "
                f"{tuple(probs.shape)}, prob {tuple(prob.shape)}, alias {tuple(alias.shape)}"
            )
        if prob.dtype != torch.float64 or probs.dtype != torch.float64:
            raise TypeError(
                f"state_dict['prob'] and ['probs'] must be float64, got {prob.dtype}, {probs.dtype}"
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
        rows = f"rows={p.shape[0]}, " if p.dim() == 2 else ""
        positive = int((p > 0).sum(-1).min())
        ess = float((1.0 / (p * p).sum(-1)).min())
        return (
            f"AliasTable({rows}num_categories={len(self)}, device={self.device}, "
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
    on every run of the same kind. A batch ``[R, N]`` draws ``n`` per row with the torch
    path's methods (on every device; no kernels yet).

    Args:
        weights: ``[N]`` or ``[R, N]`` floating, non-negative, finite, not all zero (per
            row; integer weights are refused with ``TypeError``). On CPU, bad values raise
            ``ValueError``. On CUDA the values are not checked (that would synchronise):
            with negative, NaN or infinite weights, or all zeros, the indices are in
            ``[0, N)`` but meaningless and the probabilities NaN, inf or negative. Use
            ``AliasTable`` for a checked build.
        n: number of draws, ``>= 0``.
        generator: a ``torch.Generator`` on the weights' device (default: the device's
            default generator); it advances.
        return_probs: also return the normalised probability of each drawn index, what
            importance weights ``1 / (N p)`` are made from.

    Returns:
        ``idx`` int64 ``[n]`` (``[R, n]``); with ``return_probs``, ``(idx, p)`` with ``p`` of
        dtype ``promote_types(weights.dtype, float32)`` and ``idx``'s shape.

    Example:
        >>> scores = torch.rand(384)
        >>> idx, p = fastis.sample(scores, 128, return_probs=True)
        >>> weights = 1.0 / (384 * p)
    """
    _check_weights(weights, check_values=False)
    n = int_arg("n", n, minimum=0)
    _check_generator(generator, weights.device)
    w = weights.detach()
    num = w.shape[-1]
    check = not w.is_cuda  # values are checked off CUDA only (a check would synchronise)
    triton = w.dim() == 1 and use_triton(w)
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
        table.prob, table.alias, table.probs = _builder(w)(w)
        idx, p = table.sample(n, generator=generator, return_probs=True)
    else:
        c = _alias_torch.cdf(w)
        total = c[..., -1:]
        if check:
            _check_values(w, total=total.squeeze(-1))
        idx = _alias_torch.sample_cdf(c, n, generator)
        p = w.gather(-1, idx).double() / total
    return (idx, p.to(_probs_dtype(w.dtype))) if return_probs else idx
