"""The ``torch.library`` ops behind ``fastis.linear_cross_entropy``.

All are ``custom_op`` s with fake implementations, so ``torch.compile(fullgraph=True)``
treats each as one opaque call (it never sees, and never fuses into, an ``[N, V]`` logits
tensor). Their default body is the chunked torch path (``fastis.reference_linear``); the
kernel registered for CPU and CUDA first checks the class indices of CPU
tensors (the one host read, and only where it costs no synchronisation), then reads the
backend once per call (``fastis._backend.kernel_backend``): for CUDA tensors the Triton
kernels (``fastis._triton.linear_xent`` forward, ``fastis._triton.linear_xent_grad``
backward), for CPU tensors and with ``FASTIS_BACKEND=torch`` the torch path. float64 always
takes the torch path (the kernels accumulate in float32).

- ``linear_xent(hidden, weight, bias, target, ignore_index, label_smoothing,
  compute_score)``: ``(loss, lse, score)`` per row of ``hidden`` ``[N, D]``; differentiable
  through ``loss`` w.r.t. ``hidden``, ``weight`` and ``bias``.
- ``linear_xent_grad(hidden, weight, bias, target, lse, grad_loss, ignore_index,
  label_smoothing, hidden_grad, weight_grad, bias_grad)``: its backward, which recomputes
  the logits chunk by chunk from the saved ``lse`` (nothing of size ``V`` per row is kept
  between forward and backward). It has no autograd formula of its own: a double backward
  raises.
- ``linear_xent_fused(hidden, weight, bias, target, row_weight, count, ignore_index,
  label_smoothing, compute_score, hidden_grad, weight_grad, bias_grad)``: the loss reduced
  to a scalar (``sum_i row_weight_i loss_i``, over ``count`` for a mean) with, in the same
  sweep, its gradients (``reference_linear.linear_xent_fused``: three ``N x D x V``
  products where the two ops above take four); differentiable through the scalar w.r.t.
  ``hidden``, ``weight``, ``bias`` and ``row_weight``, its backward
  ``linear_xent_scale`` only multiplies the stored gradients by the incoming scalar (also
  without an autograd formula: a double backward raises here too). The torch path only
  (CPU, float64, ``FASTIS_BACKEND=torch``): ``grads_in_forward`` decides, in
  ``fastis.linear``.

Through ``linear_xent`` the sample weights and the reduction are plain torch ops on the
per-row losses outside the op (``fastis.linear``), so autograd gives ``sample_weight`` its
gradient and the op sees only the per-row factor ``grad_loss``; ``linear_xent_fused`` takes
them in (``row_weight`` is the weights' per-row factor, computed outside, so autograd takes
``sample_weight``'s gradient on from ``row_weight``'s). There is no eager
``autograd.Function`` shortcut (as ``fastis.ops`` has): the custom-op layer's tens of
microseconds are nothing next to the ``N x D x V`` products of a call.
"""

import os

import torch

from fastis import reference_linear
from fastis._backend import kernel_backend
from fastis.ops import check_target_range


def _use_triton(hidden: torch.Tensor) -> bool:
    """The one backend decision of a call (float64 never takes the kernels)."""
    return hidden.dtype != torch.float64 and kernel_backend(hidden) == "triton"


def _check_values(hidden, weight, target, ignore_index) -> None:
    # reads the values: CPU tensors only (on CUDA it would synchronise; such rows get a NaN
    # loss and gradient instead, and nothing is read out of bounds)
    if hidden.device.type == "cpu":
        check_target_range(target, weight.shape[0], ignore_index)


# --------------------------------------------------------------------------------------
# fastis::linear_xent: per-row loss, log-sum-exp and score


@torch.library.custom_op("fastis::linear_xent", mutates_args=())
def linear_xent(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_score: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, score)`` ``[N]`` for the logits ``hidden @ weight.T + bias``, float32
    (float64 for float64 inputs); ``score`` is empty unless ``compute_score``."""
    return reference_linear.linear_xent(
        hidden,
        weight,
        bias,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        compute_score=compute_score,
    )


@linear_xent.register_kernel(("cpu", "cuda"))
def _(hidden, weight, bias, target, ignore_index, label_smoothing, compute_score):
    _check_values(hidden, weight, target, ignore_index)
    if _use_triton(hidden):
        # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
        from fastis._triton import linear_xent as kernel

        loss, lse, score = kernel.linear_xent(
            hidden, weight, bias, target, ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )  # fmt: skip
        return loss, lse, score if compute_score else loss.new_empty(0)
    return reference_linear.linear_xent(
        hidden,
        weight,
        bias,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        compute_score=compute_score,
    )


@linear_xent.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, compute_score):
    dtype = reference_linear.compute_dtype(hidden)
    loss = hidden.new_empty(hidden.shape[:1], dtype=dtype)
    return (
        loss,
        torch.empty_like(loss),
        torch.empty_like(loss) if compute_score else loss.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, _ = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1])
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, grad_lse, grad_score):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dh, dw, db = linear_xent_grad(
        hidden,
        weight,
        bias,
        target,
        lse,
        grad_loss,
        ctx.ignore_index,
        ctx.label_smoothing,
        needs[0],
        needs[1],
        needs[2],
    )
    return (
        dh if needs[0] else None,
        dw if needs[1] else None,
        db if needs[2] else None,
        None,
        None,
        None,
        None,
    )


linear_xent.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# fastis::linear_xent_grad: the backward


@torch.library.custom_op("fastis::linear_xent_grad", mutates_args=())
def linear_xent_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` of ``sum_i grad_loss_i * loss_i``, in the
    inputs' dtypes; each has no rows unless asked for (``grad_bias`` also without a bias)."""
    return reference_linear.linear_xent_grad(
        hidden,
        weight,
        bias,
        target,
        lse,
        grad_loss,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        hidden_grad=hidden_grad,
        weight_grad=weight_grad,
        bias_grad=bias_grad,
    )


@linear_xent_grad.register_kernel(("cpu", "cuda"))
def _(
    hidden,
    weight,
    bias,
    target,
    lse,
    grad_loss,
    ignore_index,
    label_smoothing,
    hidden_grad,
    weight_grad,
    bias_grad,
):
    run = reference_linear.linear_xent_grad
    if _use_triton(hidden):
        from fastis._triton.linear_xent_grad import linear_xent_grad as run

        grad_loss, lse = grad_loss.float(), lse.float().contiguous()
    return run(
        hidden,
        weight,
        bias,
        target,
        lse,
        grad_loss,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        hidden_grad=hidden_grad,
        weight_grad=weight_grad,
        bias_grad=bias_grad,
    )


@linear_xent_grad.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    lse,
    grad_loss,
    ignore_index,
    label_smoothing,
    hidden_grad,
    weight_grad,
    bias_grad,
):
    N, D = hidden.shape
    V = weight.shape[0]
    bias_grad = bias_grad and bias is not None
    return (
        hidden.new_empty(N if hidden_grad else 0, D),
        weight.new_empty(V if weight_grad else 0, D),
        hidden.new_empty(V if bias_grad else 0, dtype=(hidden if bias is None else bias).dtype),
    )


# --------------------------------------------------------------------------------------
# fastis::linear_xent_fused: the reduced loss with its gradients formed in forward


def grads_in_forward(hidden, weight, bias, reduction: str) -> bool:
    """Whether ``linear_cross_entropy`` forms its gradients in forward (``linear_xent_fused``):
    a reduction to a scalar (``'mean'`` / ``'sum'``: each row's factor is then known in
    forward), grad mode on, a gradient wanted for ``hidden``, ``weight`` or ``bias``, and
    the torch path (the Triton kernels keep their forward and their recomputing backward).
    Elsewhere ``linear_xent`` and its backward ``linear_xent_grad``."""
    return (
        reduction in ("mean", "sum")
        and torch.is_grad_enabled()
        and (
            hidden.requires_grad
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
        )
        and _torch_path(hidden)
    )


def _torch_path(hidden: torch.Tensor) -> bool:
    """``not _use_triton(hidden)`` from the device, the dtype and ``FASTIS_BACKEND`` alone, so
    that ``torch.compile`` traces it (``kernel_backend`` may load the native library)."""
    mode = os.environ.get("FASTIS_BACKEND", "auto").lower()
    if hidden.dtype == torch.float64 or mode in ("torch", "native"):
        return True
    return mode == "auto" and not hidden.is_cuda


@torch.library.custom_op("fastis::linear_xent_fused", mutates_args=())
def linear_xent_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    row_weight: torch.Tensor | None,
    count: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    compute_score: bool,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """``(total, loss, lse, score, grad_hidden, grad_weight, grad_bias)``.

    ``total = sum_i row_weight_i * loss_i`` (over ``count`` when given: a mean), a scalar
    in the compute dtype, exactly as ``fastis.loss.reduce_rows`` forms it from ``loss``;
    ``loss``, ``lse``, ``score`` as ``linear_xent``; the gradients of ``total`` (those asked
    for; the others with no rows) in the compute dtype. Differentiable through ``total``
    w.r.t. ``hidden``, ``weight``, ``bias`` and ``row_weight``: backward scales the stored
    gradients by the incoming one (``linear_xent_scale``)."""
    _check_values(hidden, weight, target, ignore_index)
    dtype = reference_linear.compute_dtype(hidden)
    scale = torch.ones(hidden.shape[0], dtype=dtype, device=hidden.device)
    if row_weight is not None:
        scale = scale * row_weight
    if count is not None:
        scale = scale / count
    loss, lse, score, dh, dw, db = reference_linear.linear_xent_fused(
        hidden, weight, bias, target, scale, ignore_index=ignore_index,
        label_smoothing=label_smoothing, compute_score=compute_score,
        hidden_grad=hidden_grad, weight_grad=weight_grad, bias_grad=bias_grad,
    )  # fmt: skip
    total = (loss if row_weight is None else loss * row_weight).sum()
    if count is not None:
        total = total / count
    return total, loss, lse, score, dh, dw, db


@linear_xent_fused.register_fake
def _(hidden, weight, bias, target, row_weight, count, ignore_index, label_smoothing,
      compute_score, hidden_grad, weight_grad, bias_grad):  # fmt: skip
    dtype = reference_linear.compute_dtype(hidden)
    (N, D), V = hidden.shape, weight.shape[0]
    loss = hidden.new_empty(N, dtype=dtype)
    return (
        loss.new_empty(()),
        loss,
        torch.empty_like(loss),
        torch.empty_like(loss) if compute_score else loss.new_empty(0),
        loss.new_empty(N if hidden_grad else 0, D),
        loss.new_empty(V if weight_grad else 0, D),
        loss.new_empty(V if bias_grad and bias is not None else 0),
    )


def _fused_setup_context(ctx, inputs, output):
    hidden, weight, bias, _, row_weight, count = inputs[:6]
    _, loss, _, _, dh, dw, db = output
    ctx.save_for_backward(hidden, weight, bias, count, loss, dh, dw, db)
    ctx.mark_non_differentiable(*output[1:])
    # the outputs other than the total get no gradient: no zeros shaped like them (one
    # would be [V, D])
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_total, *_):
    if grad_total is None:  # not materialised: no gradient reached the total
        return (None,) * 12
    hidden, weight, bias, count, loss, dh, dw, db = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # through an op without an autograd formula (taking the inputs, so that under
    # create_graph=True its outputs require grad): a double backward raises, as through
    # linear_xent_grad, instead of treating the stored gradients as constants
    dh, dw, db, d_row_weight = linear_xent_scale(
        grad_total, dh, dw, db, loss, count, hidden, weight, bias, needs[4]
    )
    return (
        dh if needs[0] else None,
        dw if needs[1] else None,
        db if needs[2] else None,
        None,
        d_row_weight if needs[4] else None,
        *([None] * 7),
    )


linear_xent_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


@torch.library.custom_op("fastis::linear_xent_scale", mutates_args=())
def linear_xent_scale(
    grad: torch.Tensor,
    grad_hidden: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    loss: torch.Tensor,
    count: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear_xent_fused``'s backward: ``grad`` (a scalar) times each stored gradient,
    rounded once to the dtype of ``hidden``, ``weight``, ``bias``; and the gradient
    ``grad * loss_i (/ count)`` of ``row_weight`` (no rows unless ``row_weight_grad``)."""
    bias_dtype = (hidden if bias is None else bias).dtype

    def scaled(g, dtype):
        return torch.mul(g, grad, out=torch.empty(g.shape, dtype=dtype, device=g.device))

    d_row_weight = loss * grad if row_weight_grad else loss.new_empty(0)
    if count is not None:
        d_row_weight = d_row_weight / count
    return (
        scaled(grad_hidden, hidden.dtype),
        scaled(grad_weight, weight.dtype),
        scaled(grad_bias, bias_dtype),
        d_row_weight,
    )


@linear_xent_scale.register_fake
def _(grad, grad_hidden, grad_weight, grad_bias, loss, count, hidden, weight, bias,
      row_weight_grad):  # fmt: skip
    bias_dtype = (hidden if bias is None else bias).dtype
    return (
        grad_hidden.new_empty(grad_hidden.shape, dtype=hidden.dtype),
        grad_weight.new_empty(grad_weight.shape, dtype=weight.dtype),
        grad_bias.new_empty(grad_bias.shape, dtype=bias_dtype),
        loss.new_empty(loss.shape if row_weight_grad else (0,)),
    )
