"""Fused softmax cross-entropy rows: loss, gradient-norm score and (optionally) gradient.

One kernel serves ``fastis.score`` and ``fastis.cross_entropy``. Each program owns
``BLOCK_N`` rows and walks their columns in ``BLOCK_C`` blocks with an online max, so the
logits are read from memory once (a second sweep, for the gradient or for smoothed / soft
targets, re-reads the row while it is still in L2). The math is ``fastis.reference``'s.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_xent_kernel(
    # pointers
    Logits, Target, Loss, Score, Grad, GradScale,
    # sizes: row r is (r // T, r % T) of a [B, T, C] view ([N, C] is T = 1)
    n_rows, T, C, ignore_index, label_smoothing,
    # strides
    stride_lb, stride_lt, stride_lc,
    stride_tb, stride_tt, stride_tc,
    stride_gb, stride_gt, stride_gc,
    # meta-parameters
    SOFT: tl.constexpr,  # Target holds [.., C] probabilities instead of class indices
    SMOOTH: tl.constexpr,  # label_smoothing > 0
    WRITE_GRAD: tl.constexpr,  # store GradScale[r] * dloss_r/dlogits_r into Grad
    HAS_GRAD_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    b = rows // T
    t = rows % T
    logit_rows = Logits + b * stride_lb + t * stride_lt
    target_rows = Target + b * stride_tb + t * stride_tt
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    eps = label_smoothing

    if SOFT:
        active = row_mask
    else:
        y = tl.load(target_rows, mask=row_mask, other=ignore_index).to(tl.int64)
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < C)
        # Out-of-range targets are never used as an offset: their rows are skipped, marked NaN.
        active = row_mask & in_range
        z_y = tl.load(logit_rows + y * stride_lc, mask=active, other=0.0).to(tl.float32)

    # Sweep 1: online max m over the non-target columns, with s = sum exp(z - m),
    # q = sum exp(2 (z - m)); for soft targets also sum t and <t, z>; for smoothing sum z.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    q = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    tz_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = active[:, None] & (c < C)[None, :]
        z = tl.load(logit_rows[:, None] + c[None, :] * stride_lc, mask=mask,
                    other=float("-inf")).to(tl.float32)
        if SOFT:
            tgt = tl.load(target_rows[:, None] + c[None, :] * stride_tc, mask=mask,
                          other=0.0).to(tl.float32)
            t_sum += tl.sum(tgt, axis=1)
            tz_sum += tl.sum(tl.where(mask, tgt * z, 0.0), axis=1)
            z_other = z
        else:
            z_other = tl.where(c[None, :] == y[:, None], float("-inf"), z)
        if SMOOTH:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z_other, axis=1))
        # A row with nothing finite yet keeps m = -inf; shifting by 0 avoids -inf - -inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_shift)
        e = tl.exp(z_other - m_shift[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if not SOFT and not SMOOTH:
            q = q * alpha * alpha + tl.sum(e * e, axis=1)
        m = m_new

    # Row statistics, all relative to m so nothing overflows.
    if SOFT:
        log_S = tl.log(s)
        lse = m + log_S
        if SMOOTH:
            total = (1 - eps) * t_sum + eps
            loss = total * lse - (1 - eps) * tz_sum - eps / C * z_sum
        else:
            total = t_sum
            loss = total * lse - tz_sum
    else:
        m = tl.where(m == float("-inf"), z_y, m)  # C == 1, or all other classes at -inf
        d = z_y - m
        log_s = tl.log(s)
        hi = tl.maximum(log_s, d)
        log_S = hi + tl.log(1 + tl.exp(tl.minimum(log_s, d) - hi))  # logaddexp(log s, d)
        lse = m + log_S
        one_minus_p_y = tl.exp(log_s - log_S)  # summed over the other classes: exact as p_y -> 1
        if SMOOTH:
            grad_y = eps * (1 - 1 / C) - one_minus_p_y
            loss = lse - (1 - eps) * z_y - eps / C * z_sum
        else:
            grad_y = -one_minus_p_y
            loss = log_S - d
            # ||p - e_y|| = sqrt(s^2 + q) / S, evaluated in logs so that neither overflows
            score = tl.exp(0.5 * tl.log(s * s + q) - log_S)

    # Sweep 2, when needed: the gradient T p - t column by column (stored, and / or squared
    # and summed for the score where the one-pass formula would cancel).
    SQUARES: tl.constexpr = SOFT or SMOOTH
    if WRITE_GRAD or SQUARES:
        if WRITE_GRAD:
            grad_rows = Grad + b * stride_gb + t * stride_gt
            if HAS_GRAD_SCALE:
                scale = tl.load(GradScale + rows, mask=row_mask, other=0.0).to(tl.float32)
            else:
                scale = tl.full([BLOCK_N], 1.0, tl.float32)
            if not SOFT:
                # ignored rows get a zero gradient, rows with a bad target NaN
                scale = tl.where(ignored, 0.0, tl.where(in_range, scale, float("nan")))
        squares = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            col_mask = (c < C)[None, :]
            mask = active[:, None] & col_mask
            z = tl.load(logit_rows[:, None] + c[None, :] * stride_lc, mask=mask,
                        other=float("-inf")).to(tl.float32)
            p = tl.exp(z - lse[:, None])
            if SOFT:
                tgt = tl.load(target_rows[:, None] + c[None, :] * stride_tc, mask=mask,
                              other=0.0).to(tl.float32)
                if SMOOTH:
                    tgt = (1 - eps) * tgt + eps / C
                g = tl.where(mask, p * total[:, None] - tgt, 0.0)
                squares += tl.sum(g * g, axis=1)
            else:
                is_y = c[None, :] == y[:, None]
                if SMOOTH:
                    g = tl.where(mask, p - eps / C, 0.0)
                    squares += tl.sum(tl.where(is_y, 0.0, g * g), axis=1)
                else:
                    g = p
                g = tl.where(mask, tl.where(is_y, grad_y[:, None], g), 0.0)
            if WRITE_GRAD:
                out = g * scale[:, None]
                tl.store(grad_rows[:, None] + c[None, :] * stride_gc,
                         out.to(Grad.dtype.element_ty), mask=row_mask[:, None] & col_mask)
        if SOFT:
            score = tl.sqrt(squares)
        elif SMOOTH:
            score = tl.sqrt(squares + grad_y * grad_y)

    if not SOFT:
        # NaN or +inf at the target leave the softmax undefined (torch gives NaN as well).
        bad = (~in_range) | (z_y != z_y) | (z_y == float("inf"))
        loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss))
        score = tl.where(ignored, 0.0, tl.where(bad, float("nan"), score))
    tl.store(Loss + rows, loss, mask=row_mask)
    tl.store(Score + rows, score, mask=row_mask)


def _strides3(x, rank):
    """(stride_b, stride_t[, stride_c]) of ``x`` seen as [B, T(, C)], ``T = 1`` for 2-D logits."""
    if x.dim() == rank + 1:  # [B, T(, C)]
        return x.stride()
    return (x.stride(0), 0) + x.stride()[1:]  # [N(, C)]


def softmax_xent(logits, target, *, ignore_index=-100, label_smoothing=0.0, grad=None,
                 grad_scale=None):
    """Launches the kernel; same contract as ``fastis.reference.softmax_xent``.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, any strides, float16/bfloat16/float32/float64.
        target: ``[N]`` / ``[B, T]`` int32/int64 indices, or probabilities shaped like logits.
        grad: optional output shaped like ``logits`` (may be ``logits`` itself: each element
            is read before it is overwritten); receives ``grad_scale[r] * dloss_r/dz_r``.
        grad_scale: optional float32 ``[n_rows]`` contiguous per-row factor for ``grad``.

    Returns:
        ``(loss, score)``, float32, shaped ``logits.shape[:-1]``. No host synchronisation.
    """
    rows = logits.shape[:-1]
    C = logits.shape[-1]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    score = torch.empty_like(loss)
    n_rows = loss.numel()
    if n_rows == 0:
        return loss, score
    soft = target.is_floating_point()
    T = logits.shape[1] if logits.dim() == 3 else 1
    stride_l = _strides3(logits, 2)
    stride_t = _strides3(target, 2 if soft else 1) + ((0,) if not soft else ())
    stride_g = _strides3(grad, 2) if grad is not None else (0, 0, 0)

    block_c = min(triton.next_power_of_2(C), 4096)
    block_n = min(triton.next_power_of_2(n_rows), max(1, 2048 // block_c))
    tile = block_n * block_c
    num_warps = 4 if tile <= 2048 else (8 if tile <= 4096 else 16)
    grid = (triton.cdiv(n_rows, block_n),)
    _softmax_xent_kernel[grid](
        logits, target, loss, score,
        grad if grad is not None else loss, grad_scale if grad_scale is not None else loss,
        n_rows, T, C, ignore_index, float(label_smoothing),
        *stride_l, *stride_t, *stride_g,
        SOFT=soft, SMOOTH=label_smoothing > 0, WRITE_GRAD=grad is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return loss, score


@triton.jit
def _scale_rows_kernel(
    # pointers
    Grad, Scale,
    # sizes: row r is (r // T, r % T), as above
    n_rows, T, C,
    # strides (stride_s is 0 for one factor shared by all rows)
    stride_gb, stride_gt, stride_gc, stride_s,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    scale = tl.load(Scale + rows * stride_s, mask=row_mask, other=1.0).to(tl.float32)
    # rows whose factor is exactly 1 (the usual loss.backward()) are not touched at all:
    # decided on the device, so the caller never synchronises to skip the work
    todo = row_mask & (scale != 1.0)
    grad_rows = Grad + (rows // T) * stride_gb + (rows % T) * stride_gt
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        mask = todo[:, None] & (c < C)[None, :]
        ptrs = grad_rows[:, None] + c[None, :] * stride_gc
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (g * scale[:, None]).to(Grad.dtype.element_ty), mask=mask)


def scale_rows_(grad, scale):
    """``grad[r] *= scale[r]`` in place, skipping rows whose factor is 1, no host sync.

    Args:
        grad: ``[N, C]`` or ``[B, T, C]``, any strides.
        scale: one factor per row of ``grad`` (shaped ``grad.shape[:-1]``), or a scalar tensor.
    """
    C = grad.shape[-1]
    n_rows = grad.shape[:-1].numel()
    if n_rows == 0:
        return grad
    scale = scale.reshape(-1).float()
    stride_s = 0 if scale.numel() == 1 else 1
    scale = scale.contiguous() if stride_s else scale
    T = grad.shape[1] if grad.dim() == 3 else 1
    block_c = min(triton.next_power_of_2(C), 4096)
    block_n = min(triton.next_power_of_2(n_rows), max(1, 2048 // block_c))
    grid = (triton.cdiv(n_rows, block_n),)
    _scale_rows_kernel[grid](
        grad, scale, n_rows, T, C, *_strides3(grad, 2), stride_s,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4 if block_n * block_c <= 2048 else 8,
    )
    return grad
