"""Cross-entropy and score for soft targets: a distribution over the classes per row.

With the given target ``u`` and label smoothing ``e`` (0 for none), the row's target is
``t = (1 - e) u + e / C``, whose total ``sum(t)`` is 1 for a distribution (any
non-negative row is accepted). Sweep 1 keeps the online max ``m`` and
``s = sum exp(z_j - m)`` over all columns, ``sum(t)`` and ``<t, z>``; then

    loss = sum(t) (m + log s) - <t, z>,    grad = sum(t) p - t,    score = ||grad||_2.

Sweep 2 sums the squares of the gradient for the score (and writes
``grad_scale[r] * grad`` when asked). Products are taken as written, as the reference
does: a ``-inf`` logit with ``t_j = 0`` makes ``<t, z>`` (and the loss) NaN, as in torch.
"""

import triton
import triton.language as tl

from fastis._triton.rows import (
    count_undefined,
    launch_rows,
    load_logits,
    online_max,
    row_coords,
)


@triton.jit
def _xent_soft_kernel(
    # pointers
    Logits, Target, Loss, Score, Grad, GradScale,
    # sizes
    n_rows, T, C, label_smoothing,
    # strides (stride_s: between the rows' factors, 0 for one factor shared by all rows)
    stride_lb, stride_lt, stride_lc,
    stride_tb, stride_tt, stride_tc,
    stride_gb, stride_gt, stride_gc, stride_s,
    # meta-parameters
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows, row_mask, b, t = row_coords(n_rows, T, BLOCK_N)
    logit_rows = Logits + b * stride_lb + t * stride_lt
    target_rows = Target + b * stride_tb + t * stride_tt
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    eps = label_smoothing

    # Sweep 1: m, s over all columns, sum(t) and <t, z>, NaN / +inf logits counted.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    tz_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_undefined = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = row_mask[:, None] & (c < C)[None, :]
        z = load_logits(logit_rows, c, mask, stride_lc)
        u = tl.load(target_rows[:, None] + c[None, :] * stride_tc, mask=mask, other=0.0)
        tgt = (1 - eps) * u.to(tl.float32) + eps / C
        n_undefined += count_undefined(z)
        t_sum += tl.sum(tl.where(mask, tgt, 0.0), axis=1)
        tz_sum += tl.sum(tl.where(mask, tgt * z, 0.0), axis=1)
        m, alpha, e = online_max(m, z)
        s = s * alpha + tl.sum(e, axis=1)

    log_s = tl.log(s)
    lse = m + log_s
    # No softmax with a NaN or +inf logit, or with every logit at -inf (torch: NaN too).
    nan_row = (n_undefined > 0) | (m == float("-inf"))

    # Sweep 2: the gradient sum(t) p - t, squared and summed for the score.
    if WRITE_GRAD:
        scale = tl.load(GradScale + rows * stride_s, mask=row_mask, other=0.0).to(tl.float32)
        scale = tl.where(nan_row, float("nan"), scale)
        grad_rows = Grad + b * stride_gb + t * stride_gt
    squares = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        col_mask = (c < C)[None, :]
        mask = row_mask[:, None] & col_mask
        z = load_logits(logit_rows, c, mask, stride_lc)
        u = tl.load(target_rows[:, None] + c[None, :] * stride_tc, mask=mask, other=0.0)
        tgt = (1 - eps) * u.to(tl.float32) + eps / C
        g = tl.where(mask, tl.exp((z - m[:, None]) - log_s[:, None]) * t_sum[:, None] - tgt, 0.0)
        squares += tl.sum(g * g, axis=1)
        if WRITE_GRAD:
            tl.store(
                grad_rows[:, None] + c[None, :] * stride_gc,
                (g * scale[:, None]).to(Grad.dtype.element_ty),
                mask=mask,
            )

    loss = tl.where(nan_row, float("nan"), t_sum * lse - tz_sum)
    tl.store(Loss + rows, loss, mask=row_mask)
    tl.store(Score + rows, tl.where(nan_row, float("nan"), tl.sqrt(squares)), mask=row_mask)


def xent_soft(logits, target, *, label_smoothing, grad=None, grad_scale=None):
    """Launches ``_xent_soft_kernel``: ``softmax_xent`` for soft targets.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, any strides, float16/bfloat16/float32.
        target: floating class probabilities shaped like ``logits``, any strides.
        label_smoothing: ``e`` in ``[0, 1]``.
        grad: optional output shaped like ``logits`` (may be ``logits`` itself).
        grad_scale: optional per-row factor for ``grad``, ``[n_rows]`` (or one for all).

    Returns:
        ``(loss, score)``, float32, shaped ``logits.shape[:-1]``.
    """
    return launch_rows(
        _xent_soft_kernel, logits, target, 2, (float(label_smoothing),), grad, grad_scale
    )
