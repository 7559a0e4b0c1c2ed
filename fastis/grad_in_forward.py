"""Cross-entropy whose gradient is formed in the forward pass.

``GradInForward`` (an ``autograd.Function``) runs the fused kernel once with the gradient
written out, scaled by each row's factor in the reduction (``w_i``, and ``1 / n`` for a
mean), and its backward only multiplies that by the incoming gradient. Two users:

- the in-place mode (``cross_entropy(..., inplace=True)``): the gradient goes over the
  logits (the mutating ops ``fastis::softmax_xent_`` and ``fastis::scale_rows_``, which
  cannot carry an autograd formula themselves), so no buffer is added at all;
- the CPU's eager path on the native library (``grads_in_forward``): the gradient goes into
  a buffer shaped like the logits, as torch's own cross-entropy keeps its log-softmax for
  backward. One kernel call in all, against a forward and a backward call through
  ``fastis.ops``: at the demo's 128 x 10 the Python, autograd and ctypes overhead of the
  second call costs more than the kernels themselves. Its backward is still differentiable
  (``create_graph=True`` runs the ops of ``fastis.ops`` from the saved logits), and the
  graph may be backpropagated twice.
"""

import torch
import torch.autograd.forward_ad as forward_ad

from fastis import reference
from fastis.ops import (
    EagerFunction,
    check_values,
    count_rows,
    dispatch_modes,
    kernels_for,
    launch_rows,
    out_dtype,
    row_scale,
    softmax_xent,
    softmax_xent_grad,
)


def grads_in_forward(logits: torch.Tensor, target: torch.Tensor):
    """The native library (``fastis._native``) when ``cross_entropy`` forms the gradient in
    forward into a buffer (``GradInForward``), else None: eager mode, float32 CPU logits on
    the native library, a gradient wanted for the logits and none for the target, no
    forward-mode AD, no ``torch.func`` transform. Elsewhere the gradient is formed in
    backward (16-bit logits too: there the stored gradient would be rounded twice when the
    incoming gradient is not 1)."""
    if not (
        type(logits) is torch.Tensor
        and logits.requires_grad
        and logits.dtype == torch.float32
        and logits.is_cpu
        and logits.shape[-1] > 0
        and not target.requires_grad
        and torch.is_grad_enabled()
        and forward_ad._current_level < 0
        and not torch.compiler.is_compiling()
        and not dispatch_modes()
        and not torch._C._are_functorch_transforms_active()  # torch.func: the op's path
    ):
        return None
    kernels = kernels_for(logits)
    return kernels if kernels is not None and kernels.__name__ == "fastis._native" else None


# --------------------------------------------------------------------------------------
# the in-place ops


@torch.library.custom_op("fastis::softmax_xent_", mutates_args=("logits",))
def softmax_xent_(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_xent`` with the scaled gradient written over ``logits``; ``(loss, score)``."""
    return _torch_softmax_xent_(logits, target, ignore_index, label_smoothing, grad_scale)


def _torch_softmax_xent_(
    logits, target, ignore_index, label_smoothing, grad_scale, clean: bool | None = None
):
    score = None
    if clean is not None and not label_smoothing and logits.shape[-1]:  # fastis.score's
        score = reference.score_rows(logits, target, ignore_index=ignore_index, clean=clean)
    loss, first_score, grad = reference.softmax_xent(
        logits,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        compute_grad=True,
        grad_scale=grad_scale,
    )
    logits.copy_(grad)
    return loss, first_score if score is None else score


@softmax_xent_.register_kernel(("cpu", "cuda"))
def _(logits, target, ignore_index, label_smoothing, grad_scale):
    kernels = kernels_for(logits)
    if kernels is None:
        clean = check_values(logits, target, ignore_index)
        return _torch_softmax_xent_(
            logits, target, ignore_index, label_smoothing, grad_scale, clean
        )
    scale = row_scale(grad_scale, kernels)
    return launch_rows(
        kernels, logits, target, ignore_index, label_smoothing, grad=logits, grad_scale=scale
    )


@softmax_xent_.register_fake
def _(logits, target, ignore_index, label_smoothing, grad_scale):
    loss = logits.new_empty(logits.shape[:-1], dtype=out_dtype(logits))
    return loss, torch.empty_like(loss)


@torch.library.custom_op("fastis::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """``grad[r] *= scale[r]`` in place (``scale`` per row, or one scalar)."""
    _torch_scale_rows_(grad, scale)


def _torch_scale_rows_(grad, scale):
    factor = scale.to(out_dtype(grad)).reshape(() if scale.numel() == 1 else grad.shape[:-1])
    grad.copy_(grad.to(factor.dtype) * (factor[..., None] if factor.dim() else factor))


@scale_rows_.register_kernel(("cpu", "cuda"))
def _(grad, scale):
    kernels = kernels_for(grad)
    if kernels is None:
        return _torch_scale_rows_(grad, scale)
    # rows whose factor is exactly 1 are left untouched, decided on the device
    kernels.scale_rows_(grad, scale)


@scale_rows_.register_fake
def _(grad, scale):
    return None


# --------------------------------------------------------------------------------------
# the autograd.Function


def _row_factor(logits, weight, reduction, count):
    """The gradient's factor per row in the reduction, ``w_i`` (or 1) over ``count`` for a
    mean, as ``_native.softmax_xent`` takes it: per row, one scalar, or None for 1."""
    if reduction == "mean":
        # products with 1 / count: a division by a Python number costs a few more ops
        if weight is None:
            scalar = not isinstance(count, torch.Tensor)
            return torch.full((), 1.0 / count) if scalar else 1.0 / count
        weight = weight * (1.0 / count)
    if weight is not None and weight.shape != logits.shape[:-1]:
        weight = weight.expand(logits.shape[:-1])  # [B, 1] per sequence
    return weight  # [N] or [B, T], or None (a factor of 1)


def _reduced(row_loss, weight, factor, reduction, count, reduce):
    """The forward's loss: ``reduce`` (``fastis.loss.reduce_rows``), in one op where the
    gradient's factor already holds the mean's weights (``w_i / n``, one row each) or
    every row counts (``count`` the number of rows)."""
    if reduction == "mean" and factor is not None and factor.shape == row_loss.shape:
        if row_loss.dim() == 1 and weight is not None:
            return torch.dot(row_loss, factor)
    if reduction == "mean" and weight is None and not isinstance(count, torch.Tensor):
        if count == row_loss.numel():
            return row_loss.mean()
    return reduce(row_loss, weight, reduction, count)


class GradInForward(EagerFunction):
    """``(loss, score)`` of ``cross_entropy`` with the gradient formed in forward, over the
    logits or into a buffer; backward rescales it by the incoming gradient.

    Positional arguments: ``logits, target, weight, reduction, ignore_index, eps, count,
    reduce, kernels``; ``weight`` the per-row factor (``[N]``, ``[B, T]`` or ``[B, 1]``) or
    None; ``count`` the mean's divisor (None: counted here, after the class indices are
    read; with class indices out of place, by the library in the same call as the loss,
    which then also checks the weights' values); ``reduce`` ``fastis.loss.reduce_rows``;
    ``kernels`` the module whose launcher writes the gradient into a buffer
    (``grads_in_forward``'s), or None for the in-place mode (over the logits, through the
    mutating op).
    """

    @staticmethod
    def forward(ctx, logits, target, weight, reduction, ignore_index, eps, count, reduce, kernels):
        inplace = kernels is None
        if inplace:
            factor = torch.ones(logits.shape[:-1], dtype=out_dtype(logits), device=logits.device)
            if weight is not None:
                factor = factor * weight
            if reduction == "mean":
                factor = factor / count
            row_loss, score = softmax_xent_(logits, target, ignore_index, eps, factor)
            grad = logits
            loss = _reduced(row_loss, weight, factor, reduction, count, reduce)
        elif count is None and not target.is_floating_point():
            # the whole loss in one library call, which also checks the weights' values and
            # the class indices and counts the rows of a mean
            grad = torch.empty_like(logits)
            loss, row_loss, score, count = kernels.xent_loss(
                logits,
                target,
                weight=weight,
                reduction=reduction,
                ignore_index=ignore_index,
                label_smoothing=eps,
                grad=grad,
            )
            if reduction == "none":
                loss = row_loss if weight is None else row_loss * weight
        else:
            clean = check_values(logits, target, ignore_index)
            if count is None and reduction == "mean":
                # every index read and in range, none ignored: the mean divides by N
                rows = logits.shape[:-1].numel()
                count = rows if clean else count_rows(target, logits, ignore_index)
            grad = torch.empty_like(logits)
            factor = _row_factor(logits, weight, reduction, count)
            row_loss, score = kernels.softmax_xent(
                logits,
                target,
                ignore_index=ignore_index,
                label_smoothing=eps,
                grad=grad,
                grad_scale=factor,
            )
            loss = _reduced(row_loss, weight, factor, reduction, count, reduce)
        # Not mark_dirty in the in-place mode: logits are often views (a [B, T, C] matmul
        # output), which autograd cannot rebase for a multi-output Function. The op bumps
        # their version counter, so any other op that saved them for backward raises there
        # instead of going wrong.
        count_t = count if isinstance(count, torch.Tensor) else None
        # the row losses only for the weights' gradient: ``reduction='none'`` may return
        # them as they are, and the caller may then update them in place
        if not ctx.needs_input_grad[2]:
            row_loss = None
        if inplace:
            ctx.save_for_backward(grad, row_loss, count_t)
        else:  # and what a double backward recomputes from
            ctx.save_for_backward(grad, row_loss, count_t, logits, target, weight)
        ctx.count = None if count_t is not None else count
        ctx.reduction, ctx.inplace, ctx.consumed = reduction, inplace, False
        ctx.ignore_index, ctx.label_smoothing = ignore_index, eps
        # a per-sequence weight [B, 1] collects its tokens' gradients
        ctx.per_sequence = weight is not None and weight.dim() == 2 and weight.shape[1] == 1
        ctx.mark_non_differentiable(score)
        return loss, score

    @staticmethod
    def backward(ctx, grad_loss, grad_score):
        if ctx.inplace:
            _check_inplace_backward(ctx)
        elif torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_loss)
        grad, row_loss, count = ctx.saved_tensors[:3]
        count = ctx.count if count is None else count
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = _weight_grad(ctx, row_loss, grad_loss, count)
        if ctx.inplace:
            scale_rows_(grad, grad_loss)
        elif _not_unit(grad_loss):
            # out of place: the buffer serves a second backward through the graph
            grad = grad * (grad_loss if grad_loss.dim() == 0 else grad_loss[..., None])
        # else (``loss.backward()``'s unit gradient) the buffer itself: autograd adds to a
        # gradient that is also held elsewhere out of place, so it stays intact for a
        # second backward
        return grad, None, grad_weight, None, None, None, None, None, None


def _not_unit(grad_loss: torch.Tensor) -> bool:
    """False for a CPU scalar gradient of exactly 1 (read on the host: no device to wait
    for); True otherwise, and while a backward is traced (compiled autograd)."""
    return (
        torch.compiler.is_compiling()
        or not grad_loss.is_cpu
        or grad_loss.dim() > 0
        or grad_loss.item() != 1.0
    )


def _weight_grad(ctx, row_loss, grad_loss, count):
    """``dloss / dw_i = L_i`` times the incoming gradient and the reduction's factor."""
    grad_weight = row_loss * grad_loss
    if ctx.reduction == "mean":
        grad_weight = grad_weight / count
    return grad_weight.sum(1, keepdim=True) if ctx.per_sequence else grad_weight


def _check_inplace_backward(ctx) -> None:
    if ctx.consumed:
        raise RuntimeError(
            "fastis.cross_entropy(..., inplace=True) was backpropagated twice: its "
            "gradient lives in the logits' memory and is consumed by the first backward; "
            "use inplace=False to retain the graph"
        )
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastis.cross_entropy(..., inplace=True) does not support double backward "
            "(create_graph=True): its gradient is precomputed in the forward pass; use "
            "inplace=False"
        )
    ctx.consumed = True


def _differentiable_backward(ctx, grad_loss):
    """``create_graph=True``: the gradients through the ops of ``fastis.ops`` from the saved
    logits (their formulas differentiate again), as the recomputing path gives them."""
    _, _, count, logits, target, weight = ctx.saved_tensors
    count = ctx.count if count is None else count
    ii, eps = ctx.ignore_index, ctx.label_smoothing
    rows = logits.shape[:-1]
    factor = grad_loss.expand(rows) if grad_loss.dim() == 0 else grad_loss
    if weight is not None:
        factor = factor * weight
    if ctx.reduction == "mean":
        factor = factor / count
    grad_logits = softmax_xent_grad(logits, target, ii, eps, factor.to(out_dtype(logits)))
    grad_weight = None
    if ctx.needs_input_grad[2]:
        row_loss, _ = softmax_xent(logits, target, ii, eps, False)
        grad_weight = _weight_grad(ctx, row_loss, grad_loss, count)
    return grad_logits, None, grad_weight, None, None, None, None, None, None
