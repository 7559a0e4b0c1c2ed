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
host synchronisation (documented, once per table), and so does ``load_state_dict``;
drawing never synchronises, and neither does ``sample`` (it checks shapes and dtypes only;
see its docstring for what values it does not check on CUDA).

As ``torch.multinomial`` does: ``n`` is a Python int, a batch of ``R = 0`` rows gives empty
``[0, n]`` draws, meta tensors give meta results of the right shapes.
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


def _triton_for(weights: torch.Tensor) -> bool:
    """True where the Triton kernels run: 1-D tables and draws that ``use_triton`` sends
    there. Meta tensors (shapes only) always take the torch path, which handles them."""
    return weights.dim() == 1 and not weights.is_meta and use_triton(weights)


def _builder(weights: torch.Tensor):
    """The table builder for ``weights``."""
    return _triton_alias().build if _triton_for(weights) else _alias_torch.build


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
    if weights.shape[-1] == 0:
        raise ValueError(
            f"weights must hold at least one category, got shape {tuple(weights.shape)}"
        )
    if check_values:
        _check_values(weights.detach())


def _check_values(w: torch.Tensor, total: torch.Tensor | None = None) -> None:
    """ValueError for NaN, inf, negative or all-zero weights, or a float64 sum overflow.

    One ``min`` (NaN propagates), the float64 sum (``total``, when the caller has it) and
    one synchronisation on CUDA; naming the problem and its index runs only on failure.
    Meta tensors and batches of no rows have no values to check.
    """
    if w.is_meta or w.numel() == 0:
        return
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


# The most draws one call can return: int64 indices (and float64 probabilities) whose byte
# count still fits torch's int64 storage size.
MAX_DRAWS = (2**63 - 1) // 8


def _draws_arg(n, rows: int) -> int:
    """``n`` as a Python int in ``[0, MAX_DRAWS / rows]``. Tensors are refused, as
    ``torch.multinomial``'s ``num_samples`` is an int: reading a CUDA tensor would
    synchronise, and a shape that depends on tensor data does not trace."""
    if isinstance(n, torch.Tensor):
        raise TypeError(f"n must be a Python int, got a tensor ({n!r}); pass int(n)")
    n = int_arg("n", n, minimum=0)
    if n * max(rows, 1) > MAX_DRAWS:
        per_row = f" per row for {rows} rows" if rows > 1 else ""
        raise ValueError(
            f"n = {n} draws{per_row} is too many: the output would overflow a tensor's "
            f"storage size (at most {MAX_DRAWS} elements of 8 bytes)"
        )
    return n


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
    ``[R, n]`` (the plain-torch path on every backend; ``R = 0`` gives an empty table).
    Sums and the table are float64: the table's implied distribution,
    ``(prob[k] + sum_{i: alias[i] = k} (1 - prob[i])) / N``, equals ``w_k / sum(w)`` to
    float64 rounding of prefix sums (relative error ~ N * 2^-53 at worst, for the heaviest
    items; measured 1.1e-8 at N = 2^26 with weights over 30 orders of magnitude). Items of
    weight 0 are never drawn. Meta weights give a table of meta tensors (shapes and dtypes
    only), whose draws are meta tensors of the right shape.

    Args:
        weights: ``[N]`` (or ``[R, N]``) floating, non-negative, finite, not all zero (per
            row). Integer and bool weights are refused (``TypeError``), as by
            ``torch.multinomial``; convert with ``weights.double()``. Checked with one host
            synchronisation on CUDA (at build time only).

    Attributes:
        probs: ``[N]`` (``[R, N]``) float64, the normalised probabilities ``w / sum(w)``.
        prob: ``[N]`` float64, the probability of keeping bucket ``i``.
        alias: ``[N]`` int32 (int64 past 2^31 - 1 items), the bucket's other item.

    These tensors, and those ``state_dict()`` returns, are the table's own buffers (live
    references, as ``torch.nn.Module.state_dict`` returns): ``rebuild`` with the same shape
    and device overwrites them in place. Clone them to keep a snapshot.

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

    @classmethod
    def _from_parts(
        cls, prob: torch.Tensor, alias: torch.Tensor, probs: torch.Tensor, *, check: bool = False
    ) -> "AliasTable":
        """A table holding these tensors (not copied); ``check`` validates them first, as
        ``load_state_dict`` does (one host synchronisation on CUDA)."""
        if check:
            _check_state(prob, alias, probs)
        table = cls.__new__(cls)
        table.prob, table.alias, table.probs = prob, alias, probs
        return table

    def rebuild(self, weights: torch.Tensor) -> "AliasTable":
        """Rebuilds from new ``weights`` (checked as the constructor checks them; on an error
        the table is unchanged). With the same shape and device the table's buffers are
        reused, so tensors taken earlier from ``probs``, ``prob``, ``alias`` or
        ``state_dict()`` then hold the new table. Returns ``self``."""
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
            n: number of draws, a Python int ``>= 0`` (tensors are refused: ``TypeError``).
            generator: a ``torch.Generator`` on the table's device (default: that device's
                default generator). Same seed, same indices (per backend); it advances.
            return_probs: also return ``probs[idx]``.

        Returns:
            ``idx``: int64 ``[n]`` (``[R, n]`` for a batch) on the table's device; with
            ``return_probs``, ``(idx, p)`` with ``p`` float64 of ``idx``'s shape, the
            normalised probabilities of the drawn categories. No host synchronisation.
        """
        rows = self.prob.shape[0] if self.prob.dim() == 2 else 1
        n = _draws_arg(n, rows)
        _check_generator(generator, self.device)
        if _triton_for(self.prob):
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
        return AliasTable._from_parts(
            self.prob.to(device), self.alias.to(device), self.probs.to(device)
        )

    def state_dict(self) -> dict:
        """``{"probs", "prob", "alias"}``: the table's own tensors (live references, see the
        class docstring; a reload does not rebuild)."""
        return {"probs": self.probs, "prob": self.prob, "alias": self.alias}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads (copies) a ``state_dict()``, validated as the constructor validates weights:
        keys, shapes, dtypes, devices, the index range of ``alias``, ``prob`` in [0, 1],
        and ``probs`` equal, to float64 rounding, to the distribution ``prob`` and
        ``alias`` imply (so it is non-negative, finite and normalised). ``ValueError`` or
        ``TypeError`` otherwise, and the table is unchanged. One host synchronisation on
        CUDA."""
        missing = {"probs", "prob", "alias"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        probs, prob, alias = state_dict["probs"], state_dict["prob"], state_dict["alias"]
        _check_state(prob, alias, probs)
        self.probs, self.prob, self.alias = probs.clone(), prob.clone(), alias.clone()

    def __repr__(self) -> str:
        p = self.probs
        rows = f"rows={p.shape[0]}, " if p.dim() == 2 else ""
        head = f"AliasTable({rows}num_categories={len(self)}, device={self.device}"
        if p.is_meta or p.numel() == 0:
            return head + ")"
        positive = int((p > 0).sum(-1).min())
        ess = float((1.0 / (p * p).sum(-1)).min())
        return (
            f"{head}, positive={positive}, max_prob={float(p.max()):.4g}, effective_size={ess:.4g})"
        )


def _check_state(prob, alias, probs) -> None:
    """Validates a table's parts (``load_state_dict``). The implied distribution
    ``m_k = (prob[k] + sum_{i: alias[i] = k} (1 - prob[i])) / N`` (one scatter-add) must
    match ``probs`` within the builders' float64 rounding, ``|m - probs| <= rtol probs``
    with ``rtol = 4e-14 + N 2^-46`` (4x the bound the tests hold the builders to): exact
    for weight-0 items, and false for NaN, negative or unnormalised ``probs``."""
    for name, t in (("probs", probs), ("prob", prob), ("alias", alias)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
            raise ValueError(f"state_dict[{name!r}] must be a 1-D or 2-D tensor")
    n = prob.shape[-1]
    if n == 0 or probs.shape != prob.shape or alias.shape != prob.shape:
        raise ValueError(
            f"state_dict tensors must share one shape (length) of at least one category, "
            f"got probs {tuple(probs.shape)}, prob {tuple(prob.shape)}, alias {tuple(alias.shape)}"
        )
    if prob.dtype != torch.float64 or probs.dtype != torch.float64:
        raise TypeError(
            f"state_dict['prob'] and ['probs'] must be float64, got {prob.dtype}, {probs.dtype}"
        )
    if alias.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state_dict['alias'] must be int32 or int64, got {alias.dtype}")
    if not (probs.device == prob.device == alias.device):
        raise ValueError("state_dict tensors must be on one device")
    if prob.is_meta or prob.numel() == 0:
        return
    in_range = ((alias >= 0) & (alias < n)).all() & ((prob >= 0) & (prob <= 1)).all()
    implied = prob.clone().scatter_add_(-1, alias.clamp(0, n - 1).long(), 1.0 - prob) / n
    diff = (implied - probs).abs()
    rtol = 4 * (1e-14 + 32 * n * 2.0**-53)
    ok = ((diff <= rtol * probs) & probs.isfinite()).all()
    if bool(in_range & ok):  # the one synchronisation
        return
    if not bool(in_range):
        raise ValueError(
            "state_dict['alias'] or ['prob'] is out of range (alias in [0, N), prob in "
            "[0, 1], not NaN)"
        )
    k = _first(~((diff <= rtol * probs) & probs.isfinite()))
    raise ValueError(
        f"state_dict['probs'] does not match the distribution that prob and alias imply "
        f"(at index {k}: probs {probs.reshape(-1)[k].item()!r}, implied "
        f"{implied.reshape(-1)[k].item()!r}); probs must be non-negative, finite and sum to 1"
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
    on every run of the same kind; where it picks a table, the indices are those of
    ``AliasTable(weights).sample(n)`` with the same generator state. A batch ``[R, N]``
    draws ``n`` per row with the torch path's methods (on every device; no kernels yet);
    ``R = 0`` rows give empty ``[0, n]`` results, as ``torch.multinomial`` does. Meta
    weights give meta results of the right shapes and dtypes.

    Args:
        weights: ``[N]`` or ``[R, N]`` floating (float16, bfloat16, float32, float64),
            non-negative, finite, not all zero (per row; ``N >= 1``). Integer and bool
            weights are refused with ``TypeError``, as by ``torch.multinomial``. On CPU,
            bad values raise ``ValueError``. On CUDA the values are not checked (that would
            synchronise): with negative, NaN or infinite weights, or all zeros, the indices
            are in ``[0, N)`` but meaningless and the probabilities NaN, inf or negative. Use
            ``AliasTable`` for a checked build.
        n: number of draws, a Python int ``>= 0`` (as ``torch.multinomial``'s
            ``num_samples``; tensors are refused with ``TypeError``, and a count whose
            output would overflow a tensor's storage with ``ValueError``).
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
    n = _draws_arg(n, weights.shape[0] if weights.dim() == 2 else 1)
    _check_generator(generator, weights.device)
    w = weights.detach()
    # values are checked off CUDA only (a check would synchronise)
    idx, p = sample_unchecked(w, n, generator, check=not w.is_cuda)
    return (idx, p.to(_probs_dtype(w.dtype))) if return_probs else idx


def sample_unchecked(w: torch.Tensor, n: int, generator, *, check: bool):
    """``sample(w, n, generator=generator, return_probs=True)`` without its argument
    checks (``w`` detached, ``n`` a valid count, ``generator`` on ``w``'s device: the
    caller's to ensure) and with the value check only when ``check``; ``p`` is float64
    where the table or the inverse CDF drew, in ``_probs_dtype`` where the fused kernel
    did. The same method, the same random numbers and the same indices as ``sample``.

    For a caller that has already validated its weights (``ImportanceSampler``'s draw
    checks its scores for the fallback, and substitutes uniform weights for bad ones):
    the checks are a dozen small operations, about as many as the draw itself."""
    num = w.shape[-1]
    triton = _triton_for(w)
    method = _method(triton, num, n)
    if method == "fused":
        if check:
            _check_values(w)
        return _triton_alias().sample_icdf(w, n, generator, _probs_dtype(w.dtype))
    if method == "table":
        if check:
            _check_values(w)
        table = AliasTable._from_parts(*_builder(w)(w))
        return table.sample(n, generator=generator, return_probs=True)
    c = _alias_torch.cdf(w)
    total = _alias_torch.last(c)
    if check:
        _check_values(w, total=total.squeeze(-1))
    idx = _alias_torch.sample_cdf(c, n, generator, total)
    return idx, w.gather(-1, idx).double() / total
