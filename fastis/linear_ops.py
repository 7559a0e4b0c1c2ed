"""The ``torch.library`` ops behind ``fastis.linear_cross_entropy``.

Both are ``custom_op`` s with fake implementations, so ``torch.compile(fullgraph=True)``
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

The sample weights and the reduction are plain torch ops on the per-row losses outside the
op (``fastis.linear``), so autograd gives ``sample_weight`` its gradient and the op sees
only the per-row factor ``grad_loss``. There is no eager ``autograd.Function`` shortcut (as
``fastis.ops`` has): the custom-op layer's tens of microseconds are nothing next to the two
``N x D x V`` products of a call.
"""

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
