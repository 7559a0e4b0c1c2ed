"""Backward of the fused last layer: ``dh``, ``dW``, ``dc`` from recomputed logit tiles.

One program per tile of ``BLOCK_N`` rows x ``BLOCK_V`` classes (the grid covers all
``N x V`` tiles, so there is work for every SM even when ``N`` is small):

1. form the tile of logits ``z = h W^T + c`` exactly as forward did (``logit_tile``);
2. ``dz = s_i (p - t)`` with ``p = exp(z - lse_i)`` from the row's saved log-sum-exp,
   ``t = (1 - eps) e_y + eps / V`` and ``s_i`` the incoming gradient of row ``i``'s loss
   (sample weight, reduction factor and upstream gradient in one number); ignored rows 0;
3. walk the hidden dimension again in blocks of ``BLOCK_D`` and add the tile's share of
   ``dh[rows, d] += dz W[cls, d]`` and ``dW[cls, d] += dz^T h[rows, d]`` (and
   ``dc[cls] += sum_rows dz``) into float32 buffers with atomic adds.

Why this scheme: nothing of size ``V`` per row is ever written (no ``[N, V]`` nor
``[N, V-chunk]`` buffer, unlike a chunked cuBLAS backward), the logits are formed once
per tile (a split by output blocks of ``D`` would form them ``D / BLOCK_D`` times), and
both gradients come from the same ``dz`` while it is in registers. The price is the float32
atomics: each element of ``dh`` receives ``V / BLOCK_V`` adds and each of ``dW``
``N / BLOCK_N`` (the order of the adds, hence the last bits, varies from run to run), and
for 16-bit inputs a float32 ``[V, D]`` buffer for ``dW`` (converted once at the end).

Precision of the products: float32 inputs use IEEE float32 products throughout, as forward.
bfloat16 inputs round ``dz`` (relative error ``2^-9``) to bfloat16 for the tensor-core
products, as ``h`` and ``W`` already are; float16 inputs would lose small ``dz`` (which
carries the ``1 / n`` of a mean) to float16's range, so they keep ``dz`` in float32 and
multiply in TF32 (``2^-11``; float16 operands are exact in it).
"""

import torch
import triton
import triton.language as tl

from fastis._backend import interpreting
from fastis._triton.linear_xent import logit_tile
from fastis._triton.rows import class_index


@triton.jit
def _linear_xent_grad_kernel(
    # pointers
    Hidden, Weight, Bias, Target, Lse, GradLoss, GradHidden, GradWeight, GradBias,
    # sizes
    N, D, V, ignore_index, eps,
    # strides (the float32 gradient buffers are contiguous)
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t, stride_l, stride_g,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    WRITE_DH: tl.constexpr,
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
    DOT_F32: tl.constexpr,  # operand tiles in float32 (float32 inputs; the interpreter)
    ROUND_DZ: tl.constexpr,  # dz rounded to the inputs' 16-bit dtype for the products
    PRECISION: tl.constexpr,  # of the dz products: "ieee" or "tf32"
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Tiles in groups of GROUP_N row tiles that walk the classes together: a group's
    # programs share the tiles of W they read (from L2) and spread their dW adds.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    v_tiles = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_tiles
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(n_tiles - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n

    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cls = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cls_mask = cls < V
    y, ignored, _, _ = class_index(Target + rows * stride_t, row_mask, V, ignore_index)
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
    scale = tl.load(GradLoss + rows * stride_l, mask=row_mask, other=0.0).to(tl.float32)

    # 1-2. the tile of logits, then dz = s (p - t); a NaN lse (a row with an undefined
    # softmax or a class index out of range) makes the row NaN, an ignored row is 0
    z = logit_tile(Hidden, Weight, Bias, rows, row_mask, cls, cls_mask, D,
                   stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                   HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_D)  # fmt: skip
    p = tl.exp(z - lse[:, None])
    t = tl.where(cls[None, :] == y[:, None], 1.0 - eps, 0.0) + eps / V
    live = (row_mask & ~ignored)[:, None] & cls_mask[None, :]
    dz = tl.where(live, (p - t) * scale[:, None], 0.0)
    if WRITE_DB:
        tl.atomic_add(GradBias + cls, tl.sum(dz, axis=0), mask=cls_mask, sem="relaxed")
    if ROUND_DZ:
        dz = dz.to(Hidden.dtype.element_ty)
        if DOT_F32:  # the interpreter: the rounded values, multiplied in float32
            dz = dz.to(tl.float32)

    # 3. this tile's share of dh and dW, a block of the hidden dimension at a time
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        d_mask = d < D
        if WRITE_DH:
            w = tl.load(
                Weight + cls[:, None] * stride_wv + d[None, :] * stride_wd,
                mask=cls_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if DOT_F32 or not ROUND_DZ:  # float16: with float32 dz, in TF32
                w = w.to(tl.float32)
            dh = tl.dot(dz, w, input_precision=PRECISION)
            tl.atomic_add(
                GradHidden + rows[:, None] * stride_g + d[None, :],
                dh,
                mask=row_mask[:, None] & d_mask[None, :],
                sem="relaxed",
            )
        if WRITE_DW:
            h = tl.load(
                Hidden + rows[:, None] * stride_hn + d[None, :] * stride_hd,
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if DOT_F32 or not ROUND_DZ:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz), h, input_precision=PRECISION)
            tl.atomic_add(
                GradWeight + cls[:, None] * stride_g + d[None, :],
                dw,
                mask=cls_mask[:, None] & d_mask[None, :],
                sem="relaxed",
            )


def grad_config(gpu: bool, dtype: torch.dtype, N: int, V: int, D: int) -> dict:
    """The meta-parameters of a launch: one fixed rule, no autotuning.

    On a GPU, tiles of 128 x 128 logits (bfloat16) or 128 x 64 (float16, float32: their
    float32 ``dz`` takes more registers) with 8 warps and blocks of 32 of the hidden
    dimension: the largest tiles whose ``z``, ``dz`` and two product blocks fit in the
    registers for sm_90 without spilling (``tests/test_kernels_compile.py`` prints them).
    Under the interpreter (``gpu`` False), and for small problems, tiles no larger than
    the problem (at least 16, ``tl.dot``'s minimum)."""
    if gpu:
        cap_n, cap_v, cap_d, warps = 128, 128 if dtype == torch.bfloat16 else 64, 32, 8
    else:
        cap_n, cap_v, cap_d, warps = 64, 64, 64, 4
    return {
        "BLOCK_N": min(cap_n, max(16, triton.next_power_of_2(N))),
        "BLOCK_V": min(cap_v, max(16, triton.next_power_of_2(V))),
        "BLOCK_D": min(cap_d, max(16, triton.next_power_of_2(D))),
        "GROUP_N": 8,
        "num_warps": warps,
    }


def linear_xent_grad(
    hidden,
    weight,
    bias,
    target,
    lse,
    grad_loss,
    *,
    ignore_index,
    label_smoothing,
    hidden_grad=True,
    weight_grad=True,
    bias_grad=True,
):
    """Launches ``_linear_xent_grad_kernel``: ``fastis.reference_linear.linear_xent_grad``
    for float32/bfloat16/float16 inputs.

    Args:
        hidden: ``[N, D]``, any strides.
        weight: ``[V, D]``, ``hidden``'s dtype, any strides.
        bias: ``[V]`` or ``None``.
        target: ``[N]`` integer class indices.
        lse: ``[N]`` float32, the log-sum-exp the forward kernel returned.
        grad_loss: ``[N]`` float32 (any stride, 0 included), the gradient of each row's loss.
        ignore_index, label_smoothing: as in ``fastis.cross_entropy``.
        hidden_grad, weight_grad, bias_grad: which gradients to form.

    Returns:
        ``(grad_hidden [N, D], grad_weight [V, D], grad_bias [V])`` in the dtypes of
        ``hidden``, ``weight`` and ``bias``; with no rows where not asked for (``grad_bias``
        also without a bias).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != D or tuple(target.shape) != (N,) or tuple(lse.shape) != (N,):
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}, target {tuple(target.shape)}, lse {tuple(lse.shape)}"
        )
    if tuple(grad_loss.shape) != (N,):
        raise ValueError(f"grad_loss must have shape ({N},), got {tuple(grad_loss.shape)}")
    bias_grad = bias_grad and bias is not None
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    # float32 accumulators (the atomics' targets), converted once at the end
    dh = torch.zeros(N if hidden_grad else 0, D, **f32)
    dw = torch.zeros(V if weight_grad else 0, D, **f32)
    db = torch.zeros(V if bias_grad else 0, **f32)
    if N and (hidden_grad or weight_grad or bias_grad):
        cfg = grad_config(hidden.is_cuda and not interpreting(), hidden.dtype, N, V, D)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(V, cfg["BLOCK_V"]),)
        fp32 = hidden.dtype == torch.float32
        _linear_xent_grad_kernel[grid](
            hidden, weight, dh if bias is None else bias, target, lse, grad_loss, dh, dw, db,
            N, D, V, ignore_index, float(label_smoothing),
            *hidden.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
            target.stride(0), grad_loss.stride(0), D,
            HAS_BIAS=bias is not None, WRITE_DH=hidden_grad, WRITE_DW=weight_grad,
            WRITE_DB=bias_grad, DOT_F32=fp32 or interpreting(),
            ROUND_DZ=hidden.dtype == torch.bfloat16,
            PRECISION="ieee" if fp32 else "tf32", **cfg,
        )  # fmt: skip
    return (
        dh.to(hidden.dtype),
        dw.to(weight.dtype),
        db.to(hidden.dtype if bias is None else bias.dtype),
    )
