"""Alias tables on the GPU: parallel construction, one-row-per-draw sampling, one-shot draws.

Construction is the closed form of ``fastis._alias_torch`` (read its docstring first): with
``q = N w / W``, deficits ``d = max(1 - q, 0)`` and excesses ``e = max(q - 1, 0)``, the
table is two prefix sums and two sorted searches per item. Two kernels:

1. ``_alias_scan_kernel``: one pass over the weights: the block-local inclusive float64
   scans of ``d`` and ``e``, and each block's totals. The launcher turns
   the (N / BLOCK) block totals into exclusive offsets and block end values with a few
   small torch ops (``_block_values``).
2. ``_alias_fill_kernel``: per item, ``probs = w / W`` (written here rather than in pass 1:
   reading float32 weights again moves 4 bytes where reading back float64 ``probs`` would
   move 8); the global prefix values are ``local + offset``; a
   light item searches ``H`` for its heavy partner, a heavy item searches ``A`` for its
   remainder and ``H`` for the next heavy item. Every item is independent: the split method
   of Hubschle-Schneider & Sanders with one piece per item (no sequential sweep at all).

Draws (``_alias_sample_kernel``) read one table row each. Randomness is Philox keyed by a
seed that ``torch.randint(generator=...)`` writes on the device: no host synchronisation,
and the torch generator advances. Per draw, 64 bits choose the bucket (modulo bias
N / 2^64) and 53 bits the coin. The stream is fixed by that definition: draw ``i`` of a
launch takes ``tl.randint4x(seed, i)`` (Philox4x32-10, counter ``(i_lo, i_hi, 0, 0)``, key
the two halves of ``seed = torch.randint(0, 2^62, (1,), generator=g)``), so the tests
reproduce it outside the kernel and check the kernels index for index.

``_icdf_kernel`` is the one-shot draw of ``n`` from a small fresh ``w`` (``B`` of a few
thousand): one launch scans ``w`` in float64 and finds, per draw, the first positive
item whose prefix sum passes its target (an inverse CDF without a stored cumulative sum).

Parallel scans round each position in its own association, so a zero increment can move a
prefix sum by an ulp: the construction makes its prefix sums exactly flat there
(``_flat_scan``, ``_value``), and the one-shot kernel only ever picks positive items.
"""

import torch
import triton
import triton.language as tl

from fastis._alias_torch import allocate

# -- kernels ---------------------------------------------------------------------------------


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _flat_scan(x, idx):
    # Inclusive prefix sums of x >= 0 that move only where x > 0. tl.cumsum is a parallel
    # scan: each position is rounded in its own association, so a zero increment can move
    # the sum by an ulp, which would let the searches pick a light item as an alias target
    # (see fastis._alias_torch._flat). Each position takes the sum at the last positive
    # increment at or before it (an exact integer max-scan and an in-register gather).
    c = tl.cumsum(x, 0)
    last = tl.associative_scan(tl.where(x > 0.0, idx, -1), 0, _max)
    return tl.where(last >= 0, tl.gather(c, tl.maximum(last, 0), 0), 0.0)


@triton.jit
def _alias_scan_kernel(
    # pointers
    W, Total, A, H, BlockA, BlockH,
    # sizes
    N,
    # meta-parameters
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    offs = pid * BLOCK + idx
    mask = offs < N
    # q = (w / W) * N in float64, bit for bit as the fill kernel computes it
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float64)
    q = (w / tl.load(Total)) * N
    # classify on the rounded q, as the fill kernel does: with FMA contraction q - 1 may be
    # computed from the exact product, which is > 0 for some q that round to exactly 1
    light = q <= 1.0
    d = tl.where(mask & light, tl.maximum(1.0 - q, 0.0), 0.0)
    e = tl.where(light, 0.0, tl.maximum(q - 1.0, 0.0))
    # block-local inclusive prefix sums, flat at zero increments; a value of exactly 0
    # means "no increment yet in this block". The block's total is its last value.
    a = _flat_scan(d, idx)
    h = _flat_scan(e, idx)
    tl.store(A + offs, a, mask=mask)
    tl.store(H + offs, h, mask=mask)
    is_last = idx == BLOCK - 1
    tl.store(BlockA + pid, tl.sum(tl.where(is_last, a, 0.0), 0))
    tl.store(BlockH + pid, tl.sum(tl.where(is_last, h, 0.0), 0))


@triton.jit
def _passes(v, x, STRICT: tl.constexpr):
    if STRICT:
        return v > x
    else:
        return v >= x


@triton.jit
def _value(Loc, m, off, prev, mask):
    # G[m], the global prefix value at m in a block with offset `off`: Loc[m] + off once the
    # block has had an increment (Loc[m] != 0), else `prev`, the value where the previous
    # increment left it (so that a prefix sum is exactly flat across block boundaries too).
    loc = tl.load(Loc + m, mask=mask, other=0.0)
    return tl.where(loc != 0.0, loc + off, prev)


@triton.jit
def _search(
    Loc, Off, Prev, End, scale, x, active, N, n_blocks, block_steps,
    BLOCK: tl.constexpr, IN_STEPS: tl.constexpr, STRICT: tl.constexpr,
):  # fmt: skip
    # First m in [0, N) with G[m] * scale > x (STRICT) or >= x, N if none (G: _value).
    # Two levels, so that most steps touch small, cached arrays: first the block whose end
    # value End[b] passes, then the element inside it. Inactive lanes load nothing. G is
    # nondecreasing up to ulp-sized dips at tiny increments; a binary search still returns
    # a position where G steps over x, i.e. one with a positive increment.
    lo = tl.zeros(x.shape, tl.int64)
    hi = lo + n_blocks
    for _ in range(block_steps):
        go = active & (lo < hi)
        mid = lo + (hi - lo) // 2
        ok = _passes(tl.load(End + mid, mask=go, other=0.0) * scale, x, STRICT)
        lo = tl.where(go & (~ok), mid + 1, lo)
        hi = tl.where(go & ok, mid, hi)
    found = active & (lo < n_blocks)
    off = tl.load(Off + lo, mask=found, other=0.0)
    prev = tl.load(Prev + lo, mask=found, other=0.0)
    # the answer is in [lo * BLOCK, end): the block's last element passes
    hi = tl.minimum(lo * BLOCK + BLOCK, N)
    lo = lo * BLOCK
    for _ in range(IN_STEPS):  # ceil(log2(BLOCK + 1))
        go = found & (lo < hi)
        mid = lo + (hi - lo) // 2
        ok = _passes(_value(Loc, mid, off, prev, go) * scale, x, STRICT)
        lo = tl.where(go & (~ok), mid + 1, lo)
        hi = tl.where(go & ok, mid, hi)
    return tl.where(found, lo, N)


@triton.jit
def _alias_fill_kernel(
    # pointers
    W, Total, A, H, OffA, OffH, PrevA, PrevH, EndA, EndH, ScaleH, Prob, Alias, Probs,
    # sizes
    N, n_blocks, block_steps,
    # meta-parameters
    BLOCK: tl.constexpr,
    IN_STEPS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = tl.load(W + offs, mask=mask, other=0.0).to(tl.float64) / tl.load(Total)
    tl.store(Probs + offs, p, mask=mask)
    q = p * N
    light = q <= 1.0
    heavy = mask & (~light)
    # global prefix values at k: H_k (rescaled so that H_N = A_N), A_{k-1} for lights
    off_a = tl.load(OffA + pid)
    prev_a = tl.load(PrevA + pid)
    scale_h = tl.load(ScaleH)
    off_h = tl.load(OffH + pid)
    prev_h = tl.load(PrevH + pid)
    h_k = _value(H, offs, off_h, prev_h, mask) * scale_h
    first = (offs % BLOCK) == 0
    a_prev = tl.where(first, prev_a, _value(A, offs - 1, off_a, prev_a, mask & (~first)))
    # a heavy item whose H does not rise above H_{k-1} (its excess vanished in the rounding)
    # is its own bucket: no search returns it (see fastis._alias_torch.build)
    h_prev = tl.where(first, prev_h, _value(H, offs - 1, off_h, prev_h, heavy & (~first)))
    tied = heavy & (h_k <= h_prev * scale_h)
    x = tl.where(light, a_prev, h_k)
    # partner: the first heavy item whose H exceeds x (next heavy for a heavy item)
    target = _search(
        H, OffH, PrevH, EndH, scale_h, x, mask, N, n_blocks, block_steps,
        BLOCK, IN_STEPS, True,
    )  # fmt: skip
    # heavy remainder r = 1 + H_k - A_i, i the first light with A_i >= H_k
    pos = _search(
        A, OffA, PrevA, EndA, 1.0, h_k, heavy, N, n_blocks, block_steps,
        BLOCK, IN_STEPS, False,
    )  # fmt: skip
    found = heavy & (pos < N)
    blk = pos // BLOCK
    a_at = _value(
        A, pos, tl.load(OffA + blk, mask=found, other=0.0),
        tl.load(PrevA + blk, mask=found, other=0.0), found,
    )  # fmt: skip
    r = tl.where(found & (~tied), tl.minimum(tl.maximum(1.0 + h_k - a_at, 0.0), 1.0), 1.0)
    tl.store(Prob + offs, tl.where(light, q, r), mask=mask)
    alias = tl.where((target < N) & (~tied), target, offs)
    tl.store(Alias + offs, alias.to(Alias.dtype.element_ty), mask=mask)


@triton.jit
def _uniform53(a, b):
    # float64 uniform on [0, 1) from 53 of the bits of two uint32
    return ((a >> 5).to(tl.float64) * 67108864.0 + (b >> 6).to(tl.float64)) * (
        1.0 / 9007199254740992.0
    )


@triton.jit
def _alias_sample_kernel(
    # pointers
    Prob, Alias, Seed, Out,
    # sizes
    n, N,
    # meta-parameters
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # four Philox words per draw: 64 bits of bucket, 53 bits of coin
    r0, r1, r2, r3 = tl.randint4x(tl.load(Seed), offs)
    bits = (r0.to(tl.uint64) << 32) | r1.to(tl.uint64)
    bucket = (bits % tl.to_tensor(N).to(tl.int64).to(tl.uint64)).to(tl.int64)
    coin = _uniform53(r2, r3)
    # one table row per draw
    p = tl.load(Prob + bucket, mask=mask, other=1.0)
    alias = tl.load(Alias + bucket, mask=mask, other=0).to(tl.int64)
    tl.store(Out + offs, tl.where(coin < p, bucket, alias), mask=mask)


@triton.jit
def _icdf_kernel(
    # pointers
    W, Seed, Out, ProbsOut,
    # sizes
    n, N,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n
    r0, r1, _, _ = tl.randint4x(tl.load(Seed), offs)
    u = _uniform53(r0, r1)
    cols = tl.arange(0, BLOCK_B)
    # pass 1: the total C_{N-1} (summed exactly as pass 2 sums) and the last positive item
    total = tl.zeros((), tl.float64)
    last = tl.full((), -1, tl.int64)
    for start in range(0, N, BLOCK_B):
        k = start + cols
        w = tl.load(W + k, mask=k < N, other=0.0).to(tl.float64)
        total = tl.max(total + tl.cumsum(w, 0), 0)
        last = tl.maximum(last, tl.max(tl.where(w > 0.0, k.to(tl.int64), -1), 0))
    target = u * total
    # pass 2: the drawn item is the first k with w_k > 0 and C_k > target. (Requiring
    # w_k > 0 keeps weight-0 items out even where the parallel tl.cumsum rounds a zero
    # increment up by an ulp.) Past the end (rounding): the last positive item.
    best = tl.full((BLOCK_N,), N, tl.int32)
    running = tl.zeros((), tl.float64)
    for start in range(0, N, BLOCK_B):
        k = start + cols
        w = tl.load(W + k, mask=k < N, other=0.0).to(tl.float64)
        c = running + tl.cumsum(w, 0)
        hit = (c[None, :] > target[:, None]) & (w > 0.0)[None, :]
        best = tl.minimum(best, tl.min(tl.where(hit, k[None, :], N), 1))
        running = tl.max(c, 0)
    idx = tl.where(best < N, best.to(tl.int64), last)
    p = tl.load(W + idx, mask=mask, other=0.0).to(tl.float64) / total
    tl.store(Out + offs, idx, mask=mask)
    tl.store(ProbsOut + offs, p.to(ProbsOut.dtype.element_ty), mask=mask)


# -- launchers -------------------------------------------------------------------------------

# Fixed configurations, chosen from an ahead-of-time sm_90 compile (registers per thread,
# no spills; `triton.compile(..., target=GPUTarget("cuda", 90, 32))` runs without a GPU):
# with Triton 3.9, scan 78, fill 54 (47 with int64 aliases), sample 42, one-shot 100
# (tests/test_alias.py recompiles them and bounds them). Not yet timed on a GPU.
SCAN_BLOCK = 1024  # also the granularity of the block offsets the searches use
SCAN_WARPS = 8
FILL_WARPS = 16  # the searches are latency-bound: many threads, 2 items each
SAMPLE_BLOCK = 1024
SAMPLE_WARPS = 8
ICDF_BLOCK_N = 32
ICDF_BLOCK_B = 128  # a [BLOCK_N, BLOCK_B] comparison tile per step
ICDF_WARPS = 8


def _seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A Philox seed drawn on ``device`` from the generator (advances it; no sync)."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)


def _block_values(total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the blocks' local totals: the exclusive offsets ``Off`` (a global value is
    ``local + Off[b]``), the value ``End[b]`` at each block's end and ``Prev[b] = End[b-1]``
    (0 for the first block). A block with no increment ends where the last block with one
    ended, computed with the kernel's own addition ``Off[L] + total[L]``, so that the prefix
    sums are exactly flat across blocks (see ``_value``)."""
    off = torch.zeros_like(total)
    torch.cumsum(total[:-1], 0, out=off[1:])
    idx = torch.arange(total.shape[0], device=total.device)
    last = torch.where(total != 0, idx, -1).cummax(0).values
    end = torch.where(last >= 0, (off + total).gather(0, last.clamp_min(0)), 0.0)
    prev = torch.zeros_like(end)
    prev[1:] = end[:-1]
    return off, prev, end


def build(
    weights: torch.Tensor,
    *,
    out_prob: torch.Tensor | None = None,
    out_alias: torch.Tensor | None = None,
    out_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``fastis._alias_torch.build`` (same outputs, same buffers reused)."""
    n = weights.shape[0]
    dev = weights.device
    w = weights.contiguous()
    total = torch.sum(w, dtype=torch.float64).reshape(1)
    n_blocks = triton.cdiv(n, SCAN_BLOCK)
    prob, alias, probs = allocate(weights.shape, dev, out_prob, out_alias, out_probs)
    a = torch.empty(n, dtype=torch.float64, device=dev)
    h = torch.empty(n, dtype=torch.float64, device=dev)
    block_a = torch.empty(n_blocks, dtype=torch.float64, device=dev)
    block_h = torch.empty(n_blocks, dtype=torch.float64, device=dev)
    _alias_scan_kernel[(n_blocks,)](
        w, total, a, h, block_a, block_h, n, BLOCK=SCAN_BLOCK, num_warps=SCAN_WARPS
    )
    off_a, prev_a, end_a = _block_values(block_a)
    off_h, prev_h, end_h = _block_values(block_h)
    # A_N / H_N (1 up to rounding; see fastis._alias_torch.build), on the device
    tot_a, tot_h = end_a[-1:], end_h[-1:]
    scale_h = torch.where(tot_h > 0, tot_a / tot_h, 1.0)
    _alias_fill_kernel[(n_blocks,)](
        w, total, a, h, off_a, off_h, prev_a, prev_h, end_a, end_h, scale_h, prob, alias, probs,
        n, n_blocks, n_blocks.bit_length(),
        BLOCK=SCAN_BLOCK, IN_STEPS=SCAN_BLOCK.bit_length(), num_warps=FILL_WARPS,
    )  # fmt: skip
    return prob, alias, probs


def sample_table(
    prob: torch.Tensor, alias: torch.Tensor, size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``size`` int64 draws from a table, one launch after the seed."""
    out = torch.empty(size, dtype=torch.int64, device=prob.device)
    if size == 0:
        return out
    seed = _seed(generator, prob.device)
    grid = (triton.cdiv(size, SAMPLE_BLOCK),)
    _alias_sample_kernel[grid](
        prob, alias, seed, out, size, prob.shape[0], BLOCK=SAMPLE_BLOCK, num_warps=SAMPLE_WARPS
    )
    return out


def sample_icdf(
    weights: torch.Tensor, size: int, generator: torch.Generator | None, probs_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot draw of ``size`` from small ``weights``: int64 indices, their probabilities."""
    dev = weights.device
    out = torch.empty(size, dtype=torch.int64, device=dev)
    probs = torch.empty(size, dtype=probs_dtype, device=dev)
    if size == 0:
        return out, probs
    seed = _seed(generator, dev)
    grid = (triton.cdiv(size, ICDF_BLOCK_N),)
    _icdf_kernel[grid](
        weights.contiguous(), seed, out, probs, size, weights.shape[0],
        BLOCK_N=ICDF_BLOCK_N, BLOCK_B=ICDF_BLOCK_B, num_warps=ICDF_WARPS,
    )  # fmt: skip
    return out, probs
