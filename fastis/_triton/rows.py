"""Building blocks shared by the row-wise softmax cross-entropy kernels and launchers.

A row is one sample (``[N, C]`` logits) or one token (``[B, T, C]``): row ``r`` is
``(r // T, r % T)``, with ``T = 1`` for 2-D inputs, so one kernel reads both layouts with any
strides. Each program owns ``BLOCK_N`` rows and walks their ``C`` columns in blocks of
``BLOCK_C`` with an online maximum (one read of the logits per sweep).
"""

import torch
import triton
import triton.language as tl

# Largest block of columns a program holds at once; wider rows are walked in several blocks.
MAX_BLOCK_C = 4096
# Elements per tile (BLOCK_N x BLOCK_C) for rows narrower than that: several rows a program.
TILE = 2048


@triton.jit
def row_coords(n_rows, T, BLOCK_N: tl.constexpr):
    """This program's rows ``[BLOCK_N]`` (int64), their mask, and their ``(b, t)`` indices."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < n_rows, rows // T, rows % T


@triton.jit
def class_index(Target, row_mask, C, ignore_index):
    """The rows' class indices ``y`` (int64) at pointers ``Target``, and their masks.

    Returns ``(y, ignored, in_range, active)``: ``active`` rows are those whose logits are
    read (neither ignored nor outside ``[0, C)``). An index outside ``[0, C)`` names no
    class: its row becomes NaN, and ``y`` is never used there as an offset.
    """
    y = tl.load(Target, mask=row_mask, other=0).to(tl.int64)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < C)
    return y, ignored, in_range, row_mask & in_range & ~ignored


@triton.jit
def load_logits(logit_rows, c, mask, stride_lc):
    """The logits of columns ``c`` of the rows at ``logit_rows``, ``[BLOCK_N, BLOCK_C]``, in
    float32; masked-off places read as ``-inf`` (probability 0: they add nothing)."""
    z = tl.load(logit_rows[:, None] + c[None, :] * stride_lc, mask=mask, other=float("-inf"))
    return z.to(tl.float32)


@triton.jit
def online_max(m, z):
    """One block ``z`` ``[BLOCK_N, BLOCK_C]`` of an online softmax with running row max ``m``.

    Returns ``(m_new, alpha, e)``: the new row max, ``alpha = exp(m - m_new)`` (rescales a
    sum taken relative to the old max) and ``e = exp(z - m_new)``. NaN is not propagated
    into ``m`` (max reductions drop it): callers flag such rows with ``count_undefined``.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # a row with nothing above -inf yet keeps m = -inf; shifting by 0 avoids -inf - -inf
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(m - shift), tl.exp(z - shift[:, None])


@triton.jit
def count_undefined(z):
    """Per row of ``z``, how many values are NaN or ``+inf``: with any, softmax is undefined."""
    return tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), axis=1)


@triton.jit
def logaddexp(a, b):
    """``log(exp(a) + exp(b))`` for ``a, b`` not both ``-inf``, accurate when one is tiny."""
    hi = tl.maximum(a, b)
    x = tl.exp(tl.minimum(a, b) - hi)  # in [0, 1]
    # log1p(x): u = 1 + x is rounded, and x / (u - 1) undoes that rounding (Goldberg)
    u = 1.0 + x
    return hi + tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


def strides3(x, rank):
    """``(stride_b, stride_t[, stride_c])`` of ``x`` as ``[B, T(, C)]`` (``T = 1`` if 2-D)."""
    if x.dim() == rank + 1:  # [B, T(, C)]
        return x.stride()
    return (x.stride(0), 0) + x.stride()[1:]  # [N(, C)]


def launch_config(n_rows, C):
    """``(grid, BLOCK_N, BLOCK_C, num_warps)``: one fixed rule, no autotuning."""
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    block_n = min(triton.next_power_of_2(n_rows), max(1, TILE // block_c))
    num_warps = 4 if block_n * block_c <= TILE else 8
    return (triton.cdiv(n_rows, block_n),), block_n, block_c, num_warps


def launch_rows(kernel, logits, target, target_rank, scalars, grad, grad_scale):
    """Allocates ``(loss, score)`` and launches one of the row kernels, which share one
    argument list: pointers (logits, target, loss, score, grad, grad scale), sizes
    (``n_rows, T, C`` and then ``scalars``), strides (logits, target, grad, grad scale),
    ``WRITE_GRAD`` and the block sizes.

    Args:
        target_rank: 1 for class indices (``[N]`` / ``[B, T]``), 2 for soft targets.
        grad: optional output shaped like ``logits`` (may be ``logits`` itself).
        grad_scale: optional float32 factor per row for ``grad`` (any stride), or one
            factor for all rows.

    Returns:
        ``(loss, score)``, float32, shaped ``logits.shape[:-1]``.
    """
    loss = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    score = torch.empty_like(loss)
    n_rows, C = loss.numel(), logits.shape[-1]
    if n_rows == 0:
        return loss, score
    grid, block_n, block_c, num_warps = launch_config(n_rows, C)
    grad_ptr, scale_ptr, stride_g, stride_s = _grad_operands(logits, grad, grad_scale, loss)
    kernel[grid](
        logits, target, loss, score, grad_ptr, scale_ptr,
        n_rows, logits.shape[1] if logits.dim() == 3 else 1, C, *scalars,
        *strides3(logits, 2), *strides3(target, target_rank), *stride_g, stride_s,
        WRITE_GRAD=grad is not None, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return loss, score


def _grad_operands(logits, grad, grad_scale, placeholder):
    """The kernels' ``(Grad, GradScale, (stride_gb, stride_gt, stride_gc), stride_s)``.

    Without ``grad`` nothing is written and ``placeholder`` (any float32 tensor) stands in
    for both pointers. ``grad_scale`` holds one factor per row of ``logits`` (any strides)
    or one for all rows (``stride_s = 0``); without it the factor is 1. Shapes are checked
    here so that no kernel reads or writes out of bounds.
    """
    if grad is None:
        return placeholder, placeholder, (0, 0, 0), 0
    if grad.shape != logits.shape:
        raise ValueError(f"grad must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(grad.shape)}")  # fmt: skip
    if grad_scale is None:
        return grad, torch.ones(1, device=grad.device), strides3(grad, 2), 0
    n_rows = logits.shape[:-1].numel()
    if grad_scale.numel() not in (1, n_rows):
        raise ValueError(f"grad_scale must hold 1 or {n_rows} factors (one per row), "
                         f"got shape {tuple(grad_scale.shape)}")  # fmt: skip
    scale = grad_scale.reshape(-1)
    return grad, scale, strides3(grad, 2), scale.stride(0) if scale.numel() > 1 else 0
