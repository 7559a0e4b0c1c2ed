"""``grad[r] *= scale[r]`` in place: the backward pass of a gradient computed in forward.

Rows whose factor is exactly 1 (the usual ``loss.backward()`` of a sum) are not touched:
decided on the device, so the caller never synchronises to skip the work.
"""

import triton
import triton.language as tl

from fastis._triton.rows import launch_config, row_coords, strides3


@triton.jit
def _scale_rows_kernel(
    # pointers
    Grad, Scale,
    # sizes
    n_rows, T, C,
    # strides (stride_s: between the rows' factors, 0 for one factor shared by all rows)
    stride_gb, stride_gt, stride_gc, stride_s,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows, row_mask, b, t = row_coords(n_rows, T, BLOCK_N)
    scale = tl.load(Scale + rows * stride_s, mask=row_mask, other=1.0).to(tl.float32)
    todo = row_mask & (scale != 1.0)
    grad_rows = Grad + b * stride_gb + t * stride_gt
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

    Returns:
        ``grad``.
    """
    n_rows, C = grad.shape[:-1].numel(), grad.shape[-1]
    if n_rows == 0:
        return grad
    scale = scale.reshape(-1).float()
    stride_s = 0 if scale.numel() == 1 else 1
    scale = scale.contiguous() if stride_s else scale
    grid, block_n, block_c, num_warps = launch_config(n_rows, C)
    _scale_rows_kernel[grid](
        grad, scale, n_rows, grad.shape[1] if grad.dim() == 3 else 1, C,
        *strides3(grad, 2), stride_s,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return grad
