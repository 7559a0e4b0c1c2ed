"""Forward of the fused last layer: loss, log-sum-exp and score per row, no logits buffer.

Each program owns ``BLOCK_N`` rows of ``h`` and walks the vocabulary in blocks of
``BLOCK_V`` classes: it forms that tile of logits ``z = h W^T + c`` in registers (a loop of
``tl.dot`` over ``D`` in blocks of ``BLOCK_D``, float32 accumulation; 16-bit products are
exact in float32) and folds it into the
rows' running statistics of ``fastis.reference``'s one-sweep formulas: the target logit
``z_y`` and, over the other classes only, the running max ``m``, ``s = sum exp(z_j - m)`` and
``q = sum exp(2 (z_j - m))``. With ``S = s + exp(z_y - m)``:

    lse = m + log S,   loss = log S - (z_y - m),   score = sqrt(s^2 + q) / S,

and with smoothing ``eps`` (``sum_j z_j`` kept too) ``loss = lse - (1 - eps) z_y -
eps / V sum_j z_j`` and ``score^2 = (eps (1 - 1/V) - s / S)^2 + q / S^2 - 2 (eps / V) s / S
+ (V - 1) (eps / V)^2``, as ``fastis.reference_linear``. Nothing of size ``V`` is written.
"""

import torch
import triton
import triton.language as tl

from fastis._backend import interpreting
from fastis._triton.rows import class_index, count_undefined, logaddexp, online_max


@triton.jit
def logit_tile(
    Hidden, Weight, Bias, rows, row_mask, cls, cls_mask, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The logits ``h W^T + c`` of rows ``rows`` x classes ``cls``, ``[BLOCK_N, BLOCK_V]``
    float32, accumulated over blocks of ``BLOCK_D`` of the hidden dimension (masked-off
    places hold ``c`` or 0). Forward and backward share it, so that backward forms the very
    logits whose log-sum-exp forward saved."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        h = tl.load(
            Hidden + rows[:, None] * stride_hn + d[None, :] * stride_hd,
            mask=row_mask[:, None] & (d < D)[None, :],
            other=0.0,
        )
        w = tl.load(
            Weight + cls[:, None] * stride_wv + d[None, :] * stride_wd,
            mask=cls_mask[:, None] & (d < D)[None, :],
            other=0.0,
        )
        if DOT_F32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        z = tl.dot(h, tl.trans(w), z, input_precision="ieee")
    if HAS_BIAS:
        z += tl.load(Bias + cls * stride_b, mask=cls_mask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _linear_xent_kernel(
    # pointers
    Hidden, Weight, Bias, Target, Loss, Lse, Score,
    # sizes
    N, D, V, ignore_index, eps,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    SMOOTH: tl.constexpr,
    DOT_F32: tl.constexpr,  # 16-bit products in float32 (Triton's interpreter needs it)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y, ignored, in_range, _ = class_index(Target + rows * stride_t, row_mask, V, ignore_index)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    q = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_undefined = tl.zeros([BLOCK_N], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cls = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cls_mask = cls < V
        z = logit_tile(Hidden, Weight, Bias, rows, row_mask, cls, cls_mask, D,
                       stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                       HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D)  # fmt: skip
        # classes past V read as -inf (probability 0); NaN / +inf counted on the side
        z = tl.where(cls_mask[None, :], z, float("-inf"))
        n_undefined += count_undefined(z)
        is_y = cls[None, :] == y[:, None]
        z_y += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        if SMOOTH:
            z_sum += tl.sum(tl.where(cls_mask[None, :], z, 0.0), axis=1)
        # the other classes only
        m, alpha, e = online_max(m, tl.where(is_y, float("-inf"), z))
        s = s * alpha + tl.sum(e, axis=1)
        q = q * alpha * alpha + tl.sum(e * e, axis=1)

    # Row statistics, all relative to m so that nothing overflows.
    m = tl.where(m == float("-inf"), z_y, m)  # V == 1, or every other class at -inf
    d = z_y - m
    log_s = tl.log(s)
    log_S = logaddexp(log_s, d)
    lse = m + log_S
    one_minus_p_y = tl.exp(log_s - log_S)
    inv_S = tl.exp(-log_S)  # S itself may overflow
    if SMOOTH:
        e = eps / V
        loss = lse - (1.0 - eps) * z_y - e * z_sum
        grad_y = eps * (1.0 - 1.0 / V) - one_minus_p_y
        others = q * inv_S * inv_S - 2.0 * e * one_minus_p_y + (V - 1) * e * e
        score = tl.sqrt(grad_y * grad_y + tl.maximum(others, 0.0))
    else:
        loss = log_S - d
        score = tl.sqrt(s * s + q) * inv_S
    # No softmax with a NaN or +inf logit, or with every logit at -inf (torch: NaN too).
    nan_row = (n_undefined > 0) | (m == float("-inf")) | ~in_range
    loss = tl.where(ignored, 0.0, tl.where(nan_row, float("nan"), loss))
    score = tl.where(ignored, 0.0, tl.where(nan_row, float("nan"), score))
    tl.store(Loss + rows, loss, mask=row_mask)
    tl.store(Lse + rows, tl.where(nan_row, float("nan"), lse), mask=row_mask)
    tl.store(Score + rows, score, mask=row_mask)


def linear_xent(hidden, weight, bias, target, *, ignore_index, label_smoothing):
    """Launches ``_linear_xent_kernel``: ``fastis.reference_linear.linear_xent`` with the
    score, for float32/bfloat16/float16 inputs.

    Args:
        hidden: ``[N, D]``, any strides.
        weight: ``[V, D]``, ``hidden``'s dtype, any strides.
        bias: ``[V]`` or ``None``.
        target: ``[N]`` integer class indices.
        ignore_index, label_smoothing: as in ``fastis.cross_entropy``.

    Returns:
        ``(loss, lse, score)``, ``[N]`` float32 each.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != D or tuple(target.shape) != (N,):
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}, target {tuple(target.shape)}"
        )
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse, score = torch.empty_like(loss), torch.empty_like(loss)
    if N == 0:
        return loss, lse, score
    # tl.dot wants blocks of at least 16; one fixed rule, no autotuning
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    block_v = min(64, max(16, triton.next_power_of_2(V)))
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    _linear_xent_kernel[(triton.cdiv(N, block_n),)](
        hidden, weight, loss if bias is None else bias, target, loss, lse, score,
        N, D, V, ignore_index, float(label_smoothing),
        *hidden.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
        target.stride(0),
        HAS_BIAS=bias is not None, SMOOTH=label_smoothing != 0.0,
        DOT_F32=hidden.dtype == torch.float32 or interpreting(),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
    )  # fmt: skip
    return loss, lse, score
