"""The ``torch.library`` op behind ``fastis.score`` and ``fastis.cross_entropy``.

``fastis::softmax_xent`` is a ``custom_op`` with a fake implementation, so ``torch.compile``
(``fullgraph=True``) treats it as one opaque call on every device. Its body picks the
backend (``fastis._backend``): the Triton kernel (``fastis._triton.softmax_xent``) or the
plain-torch path (``fastis.reference``).
"""

import torch

from fastis import reference
from fastis._backend import use_triton


@torch.library.custom_op("fastis::softmax_xent", mutates_args=())
def softmax_xent(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, score, grad)`` per row; ``grad`` is empty unless ``compute_grad``."""
    if not logits.is_cuda and not target.is_floating_point():
        check_target_range(target, logits.shape[-1], ignore_index)
    if use_triton(logits):
        from fastis._triton import softmax_xent as kernel

        grad = torch.empty_like(logits) if compute_grad else None
        loss, score = kernel.softmax_xent(logits, target, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, grad=grad)
    else:
        loss, score, grad = reference.softmax_xent(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
            compute_grad=compute_grad)
        loss, score = loss.float(), score.float()
    return loss, score, grad if compute_grad else logits.new_empty(0)


@softmax_xent.register_fake
def _(logits, target, ignore_index, label_smoothing, compute_grad):
    rows = logits.shape[:-1]
    loss = logits.new_empty(rows, dtype=torch.float32)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, torch.empty_like(loss), grad


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
