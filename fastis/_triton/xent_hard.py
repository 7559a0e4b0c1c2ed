"""Cross-entropy and score for class-index targets, without label smoothing.

One sweep over each row gives both (``fastis.reference``'s stable formulas): over the
columns ``j != y`` only, the running max ``m``, ``s = sum exp(z_j - m)`` and
``q = sum exp(2 (z_j - m))``; with ``S = s + exp(z_y - m)``,

    loss = log S - (z_y - m),    score = ||p - e_y|| = sqrt(s^2 + q) / S,

and ``1 - p_y = s / S`` is summed from the other classes, so it stays exact as
``p_y -> 1``. A second sweep, only when the gradient is wanted, writes
``grad_scale[r] * (p - e_y)``.
"""

import triton
import triton.language as tl

from fastis._triton.rows import (
    class_index,
    count_undefined,
    launch_rows,
    load_logits,
    logaddexp,
    online_max,
    row_coords,
)


@triton.jit
def _xent_hard_kernel(
    # pointers
    Logits, Target, Loss, Score, Grad, GradScale,
    # sizes
    n_rows, T, C, ignore_index,
    # strides (stride_s: between the rows' factors, 0 for one factor shared by all rows)
    stride_lb, stride_lt, stride_lc,
    stride_tb, stride_tt,
    stride_gb, stride_gt, stride_gc, stride_s,
    # meta-parameters
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows, row_mask, b, t = row_coords(n_rows, T, BLOCK_N)
    logit_rows = Logits + b * stride_lb + t * stride_lt
    cols = tl.arange(0, BLOCK_C).to(tl.int64)

    # The class index; only active rows (not ignored, index in [0, C)) read logits.
    target_rows = Target + b * stride_tb + t * stride_tt
    y, ignored, in_range, active = class_index(target_rows, row_mask, C, ignore_index)
    z_y = tl.load(logit_rows + y * stride_lc, mask=active, other=0.0).to(tl.float32)

    # Sweep 1: m, s, q over the other columns; NaN / +inf anywhere counted on the side.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    q = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_undefined = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = active[:, None] & (c < C)[None, :]
        z = load_logits(logit_rows, c, mask, stride_lc)
        n_undefined += count_undefined(z)
        z = tl.where(c[None, :] == y[:, None], float("-inf"), z)
        m, alpha, e = online_max(m, z)
        s = s * alpha + tl.sum(e, axis=1)
        q = q * alpha * alpha + tl.sum(e * e, axis=1)

    # Row statistics, all relative to m so that nothing overflows.
    m = tl.where(m == float("-inf"), z_y, m)  # C == 1, or every other class at -inf
    d = z_y - m
    log_s = tl.log(s)
    log_S = logaddexp(log_s, d)
    # No softmax with a NaN or +inf logit, or with every logit at -inf (torch: NaN too).
    nan_row = (n_undefined > 0) | (m == float("-inf")) | ~in_range
    loss = tl.where(nan_row, float("nan"), log_S - d)
    # the score sqrt(s^2 + q) / S in logs, as S may overflow (s, q < C do not)
    score = tl.where(nan_row, float("nan"), tl.exp(0.5 * tl.log(s * s + q) - log_S))
    tl.store(Loss + rows, tl.where(ignored, 0.0, loss), mask=row_mask)
    tl.store(Score + rows, tl.where(ignored, 0.0, score), mask=row_mask)

    # Sweep 2: grad = scale * (p - e_y), p_y's entry as -(1 - p_y) = -s / S; p_j is
    # exp((z_j - m) - log S), not exp(z_j - lse): m + log S would round away log S at |m| >> 1
    if WRITE_GRAD:
        scale = tl.load(GradScale + rows * stride_s, mask=row_mask, other=0.0).to(tl.float32)
        # ignored rows get 0 (their p below is exactly 0: nothing was loaded), NaN rows NaN
        scale = tl.where(ignored, 0.0, tl.where(nan_row, float("nan"), scale))
        grad_y = -tl.exp(log_s - log_S)
        grad_rows = Grad + b * stride_gb + t * stride_gt
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            col_mask = (c < C)[None, :]
            z = load_logits(logit_rows, c, active[:, None] & col_mask, stride_lc)
            g = tl.where(
                c[None, :] == y[:, None], grad_y[:, None], tl.exp((z - m[:, None]) - log_S[:, None])
            )
            tl.store(
                grad_rows[:, None] + c[None, :] * stride_gc,
                (g * scale[:, None]).to(Grad.dtype.element_ty),
                mask=row_mask[:, None] & col_mask,
            )


def xent_hard(logits, target, *, ignore_index, grad=None, grad_scale=None):
    """Launches ``_xent_hard_kernel``: ``softmax_xent`` for class indices, no smoothing.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, any strides, float16/bfloat16/float32.
        target: ``[N]`` / ``[B, T]`` integer class indices, any strides.
        ignore_index: rows with this target get 0 everywhere.
        grad: optional output shaped like ``logits`` (may be ``logits`` itself).
        grad_scale: optional per-row factor for ``grad``, ``[n_rows]`` (or one for all).

    Returns:
        ``(loss, score)``, float32, shaped ``logits.shape[:-1]``.
    """
    return launch_rows(_xent_hard_kernel, logits, target, 1, (ignore_index,), grad, grad_scale)
