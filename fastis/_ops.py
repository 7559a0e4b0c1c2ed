"""The ``torch.library`` op behind ``fastis.score`` and ``fastis.cross_entropy``.

``fastis::softmax_xent`` is a ``custom_op`` with a fake implementation, so ``torch.compile``
(``fullgraph=True``) treats it as one opaque call on every device. Its body picks the
backend (``fastis._backend``): the Triton kernel (``fastis._triton.softmax_xent``) or the
plain-torch path (``fastis.reference``).

Autograd: the op is differentiable w.r.t. ``logits`` through its per-row ``loss`` output.
The backward pass runs the same kernel again with ``compute_grad=True`` and the incoming
per-row gradient folded into ``grad_scale``: one more read of the logits and one write of
the gradient, no buffer kept between forward and backward but the logits themselves, and
no host synchronisation. The ``score`` output is not differentiable. ``loss_and_score`` is
what the public functions call: this op under ``torch.compile``, a lighter equivalent in
eager mode.
"""

import torch
import torch.nn.functional as F

from fastis import reference
from fastis._backend import use_triton


def _softmax_xent(logits, target, ignore_index, label_smoothing, compute_grad, grad_scale):
    """The body of ``fastis::softmax_xent``: picks the backend and runs it."""
    if not logits.is_cuda and not target.is_floating_point():
        check_target_range(target, logits.shape[-1], ignore_index)
    if use_triton(logits):
        from fastis._triton import softmax_xent as kernel

        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) \
            if compute_grad else None
        if grad_scale is not None:
            grad_scale = grad_scale.reshape(-1).float().contiguous()
        loss, score = kernel.softmax_xent(logits, target, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, grad=grad,
                                          grad_scale=grad_scale)
    else:
        loss, score, grad = reference.softmax_xent(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
            compute_grad=compute_grad, grad_scale=grad_scale)
    dtype = _out_dtype(logits)
    return (loss.to(dtype), score.to(dtype),
            grad if compute_grad else logits.new_empty(0))


@torch.library.custom_op("fastis::softmax_xent", mutates_args=())
def softmax_xent(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, score, grad)`` per row, shaped ``logits.shape[:-1]``, float32 (float64 for
    float64 logits); ``grad`` is ``grad_scale[r] * dloss_r / dlogits_r`` in the logits'
    dtype, or empty unless ``compute_grad``."""
    return _softmax_xent(logits, target, ignore_index, label_smoothing, compute_grad,
                         grad_scale)


@softmax_xent.register_fake
def _(logits, target, ignore_index, label_smoothing, compute_grad, grad_scale=None):
    loss = logits.new_empty(logits.shape[:-1], dtype=_out_dtype(logits))
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, torch.empty_like(loss), grad


def _out_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, compute_grad, _ = inputs
    if compute_grad:
        ctx.not_differentiable = True
        return
    ctx.not_differentiable = False
    ctx.save_for_backward(logits, target)
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing


def _backward(ctx, grad_loss, grad_score, grad_grad):
    if ctx.not_differentiable:
        raise RuntimeError("fastis::softmax_xent with compute_grad=True is not differentiable")
    logits, target = ctx.saved_tensors
    _, _, grad = softmax_xent(logits, target, ctx.ignore_index, ctx.label_smoothing, True,
                              grad_loss)
    return grad, None, None, None, None, None


softmax_xent.register_autograd(_backward, setup_context=_setup_context)


class _EagerSoftmaxXent(torch.autograd.Function):
    """``fastis::softmax_xent`` with the same autograd formula, minus the custom-op
    dispatcher, whose Python costs ~0.1 ms a call: small models feel that in every step."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing):
        loss, score, _ = _softmax_xent(logits, target, ignore_index, label_smoothing, False,
                                       None)
        ctx.save_for_backward(logits, target)
        ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
        ctx.mark_non_differentiable(score)
        return loss, score

    @staticmethod
    def backward(ctx, grad_loss, grad_score):
        logits, target = ctx.saved_tensors
        _, _, grad = _softmax_xent(logits, target, ctx.ignore_index, ctx.label_smoothing,
                                   True, grad_loss)
        return grad, None, None, None


def loss_and_score(logits, target, ignore_index: int, label_smoothing: float,
                   need_loss: bool = True, need_score: bool = True):
    """Per-row ``(loss, score)``, ``loss`` differentiable w.r.t. ``logits``. On the CPU path,
    where neither is a by-product of the other, ``loss`` is ``None`` unless ``need_loss``
    and ``score`` is ``None`` unless ``need_score``.

    While ``torch.compile`` traces: the registered op. In eager mode: the same computation
    without the op's dispatcher; on CPU tensors, torch's own fused cross-entropy for the
    loss and its gradient (faster than any composition of torch ops, and the same numbers)
    and ``fastis.reference`` for the score. (Not on CUDA's torch path: torch's kernel
    asserts on a class index out of range, where fastis promises a NaN row.)
    """
    if torch.compiler.is_compiling():
        loss, score, _ = softmax_xent(logits, target, ignore_index, label_smoothing, False)
        return loss, score
    if logits.is_cuda or use_triton(logits):
        return _EagerSoftmaxXent.apply(logits, target, ignore_index, label_smoothing)
    if not target.is_floating_point():
        check_target_range(target, logits.shape[-1], ignore_index)
    C, dtype = logits.shape[-1], _out_dtype(logits)
    score = None
    if need_score:
        with torch.no_grad():
            _, score, _ = reference.softmax_xent(logits, target, ignore_index=ignore_index,
                                                 label_smoothing=label_smoothing)
        score = score.to(dtype)
    if not need_loss:
        return None, score
    flat_target = target.reshape(-1, C).to(dtype) if target.is_floating_point() else \
        target.reshape(-1).long()
    loss = F.cross_entropy(logits.reshape(-1, C).to(dtype), flat_target,
                           reduction="none", ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    return loss.view(logits.shape[:-1]), score


@torch.library.custom_op("fastis::softmax_xent_", mutates_args=("logits",))
def softmax_xent_(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_xent`` with the scaled gradient written over ``logits``; ``(loss, score)``."""
    if not logits.is_cuda and not target.is_floating_point():
        check_target_range(target, logits.shape[-1], ignore_index)
    if use_triton(logits):
        from fastis._triton import softmax_xent as kernel

        loss, score = kernel.softmax_xent(logits, target, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, grad=logits,
                                          grad_scale=grad_scale.reshape(-1).float().contiguous())
    else:
        loss, score, grad = reference.softmax_xent(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
            compute_grad=True, grad_scale=grad_scale)
        logits.copy_(grad)
    dtype = _out_dtype(logits)
    return loss.to(dtype), score.to(dtype)


@softmax_xent_.register_fake
def _(logits, target, ignore_index, label_smoothing, grad_scale):
    loss = logits.new_empty(logits.shape[:-1], dtype=_out_dtype(logits))
    return loss, torch.empty_like(loss)


@torch.library.custom_op("fastis::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """``grad[r] *= scale[r]`` in place (``scale`` per row, or one scalar); rows whose factor
    is 1 are left untouched on the Triton path."""
    if use_triton(grad):
        from fastis._triton import softmax_xent as kernel

        kernel.scale_rows_(grad, scale)
    else:
        factor = scale.float().reshape(() if scale.numel() == 1 else grad.shape[:-1])
        grad.copy_(grad.float() * (factor[..., None] if factor.dim() else factor))


@scale_rows_.register_fake
def _(grad, scale):
    return None


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises for class indices outside ``[0, C)`` other than ``ignore_index``.

    Reads the values, so it is only run on CPU tensors: on CUDA it would synchronise, and
    the kernels mark such rows NaN instead.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(
            f"target contains class index {value}, outside [0, {num_classes}) "
            f"and not ignore_index={ignore_index}"
        )
