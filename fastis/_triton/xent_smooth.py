"""Cross-entropy and score for class-index targets with label smoothing ``e > 0``.

The target distribution is ``t = (1 - e) e_y + e / C``. Sweep 1 keeps, over the columns
``j != y``, the running max ``m`` and ``s = sum exp(z_j - m)``, and the plain sum of all
logits; with ``S = s + exp(z_y - m)``:

    loss = m + log S - (1 - e) z_y - (e / C) sum_j z_j,
    grad_y = e (1 - 1/C) - s / S,    grad_j = p_j - e / C  (j != y),

``1 - p_y = s / S`` summed from the other classes (exact as ``p_y -> 1``). The score
``||p - t||`` has no one-pass form that does not cancel, so sweep 2 sums the squares of the
gradient entries (and writes ``grad_scale[r] * grad`` when asked).
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
def _xent_smooth_kernel(
    # pointers
    Logits, Target, Loss, Score, Grad, GradScale,
    # sizes
    n_rows, T, C, ignore_index, label_smoothing,
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
    eps = label_smoothing

    # The class index; only active rows (not ignored, index in [0, C)) read logits.
    target_rows = Target + b * stride_tb + t * stride_tt
    y, ignored, in_range, active = class_index(target_rows, row_mask, C, ignore_index)
    z_y = tl.load(logit_rows + y * stride_lc, mask=active, other=0.0).to(tl.float32)

    # Sweep 1: m, s over the other columns, the sum of all logits, NaN / +inf counted.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_undefined = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = active[:, None] & (c < C)[None, :]
        z = load_logits(logit_rows, c, mask, stride_lc)
        n_undefined += count_undefined(z)
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=1)
        m, alpha, e = online_max(m, tl.where(c[None, :] == y[:, None], float("-inf"), z))
        s = s * alpha + tl.sum(e, axis=1)

    # Row statistics, all relative to m so that nothing overflows.
    m = tl.where(m == float("-inf"), z_y, m)  # C == 1, or every other class at -inf
    log_s = tl.log(s)
    log_S = logaddexp(log_s, z_y - m)
    lse = m + log_S
    grad_y = eps * (1 - 1 / C) - tl.exp(log_s - log_S)
    # No softmax with a NaN or +inf logit, or with every logit at -inf (torch: NaN too).
    nan_row = (n_undefined > 0) | (m == float("-inf")) | ~in_range

    # Sweep 2: the gradient entries p_j - e / C, squared and summed for the score.
    if WRITE_GRAD:
        scale = tl.load(GradScale + rows * stride_s, mask=row_mask, other=0.0).to(tl.float32)
        # ignored rows get 0 (their entries below are finite: nothing was loaded), NaN rows NaN
        scale = tl.where(ignored, 0.0, tl.where(nan_row, float("nan"), scale))
        grad_rows = Grad + b * stride_gb + t * stride_gt
    squares = grad_y * grad_y
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        col_mask = (c < C)[None, :]
        is_y = c[None, :] == y[:, None]
        mask = active[:, None] & col_mask
        z = load_logits(logit_rows, c, mask, stride_lc)
        g = tl.where(mask & ~is_y, tl.exp((z - m[:, None]) - log_S[:, None]) - eps / C, 0.0)
        squares += tl.sum(g * g, axis=1)
        if WRITE_GRAD:
            g = tl.where(is_y, grad_y[:, None], g)
            tl.store(
                grad_rows[:, None] + c[None, :] * stride_gc,
                (g * scale[:, None]).to(Grad.dtype.element_ty),
                mask=row_mask[:, None] & col_mask,
            )

    loss = tl.where(nan_row, float("nan"), lse - (1 - eps) * z_y - eps / C * z_sum)
    score = tl.where(nan_row, float("nan"), tl.sqrt(squares))
    tl.store(Loss + rows, tl.where(ignored, 0.0, loss), mask=row_mask)
    tl.store(Score + rows, tl.where(ignored, 0.0, score), mask=row_mask)


def xent_smooth(logits, target, *, ignore_index, label_smoothing, grad=None, grad_scale=None):
    """Launches ``_xent_smooth_kernel``: ``softmax_xent`` for class indices, smoothed.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, any strides, float16/bfloat16/float32.
        target: ``[N]`` / ``[B, T]`` integer class indices, any strides.
        ignore_index: rows with this target get 0 everywhere.
        label_smoothing: ``e`` in ``(0, 1]``.
        grad: optional output shaped like ``logits`` (may be ``logits`` itself).
        grad_scale: optional per-row factor for ``grad``, ``[n_rows]`` (or one for all).

    Returns:
        ``(loss, score)``, float32, shaped ``logits.shape[:-1]``.
    """
    scalars = (ignore_index, float(label_smoothing))
    return launch_rows(_xent_smooth_kernel, logits, target, 1, scalars, grad, grad_scale)
