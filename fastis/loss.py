"""``fastis.cross_entropy``: importance-weighted cross-entropy with the score for free.

Runs the op ``fastis::softmax_xent`` and its backward ``fastis::softmax_xent_grad``
(``fastis.ops``): the Triton kernels (``fastis._triton.softmax_xent``) for CUDA tensors,
the native library (``fastis._native``) or the plain-torch path (``fastis.reference``) on
the CPU, the torch path for float64. The in-place mode, and float32 CPU logits on the
native library in eager mode, form the gradient in the forward call instead
(``fastis.grad_in_forward``).
"""

import math

import torch

from fastis._checks import bool_arg, check_logits_target, check_rows, index_arg
from fastis.class_weight import apply_class_weight, check_class_weight
from fastis.constants import IGNORE_INDEX, REDUCTIONS
from fastis.grad_in_forward import GradInForward, grads_in_forward
from fastis.ops import count_rows, softmax_xent_autograd
from fastis.score import sequence_norm, unsqueeze_unbatched


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    sample_weight: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    return_score: bool = False,
    inplace: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Cross-entropy weighted per sample, returning the importance score from the same pass.

    With per-row losses ``L_i`` (as ``F.cross_entropy(..., reduction='none')``) and weights
    ``w_i`` (e.g. the importance weights ``1 / (B g_i)`` of the paper):

    - ``'none'``: ``w_i L_i``, shaped like ``target``'s rows (``[N]``, or ``[B, T]`` per token
      with each sequence's weight applied to all its tokens);
    - ``'sum'``: ``sum_i w_i L_i``;
    - ``'mean'``: ``sum_i w_i L_i / n``, ``n`` the number of non-ignored rows (tokens):
      the estimator ``mean_i w_i L_i`` of the paper, *not* torch's division by the sum of
      class weights. All rows ignored gives NaN, as in torch. For sequences ``n`` counts
      tokens and so depends on the batch; for an exactly unbiased weighted estimate over
      sequences use ``'sum'`` and divide by a constant.

    The gradient w.r.t. ``logits`` is ``w_i (softmax(z_i) sum(t_i) - t_i)`` times the
    reduction's factor, with no host synchronisation anywhere. By default the fused kernel
    produces it in backward (one more read of the logits, one write of the gradient;
    nothing is kept between forward and backward but the logits), so the graph may be
    backpropagated twice and ``torch.compile`` sees pure ops; the backward is itself
    differentiable (``create_graph=True``: gradient penalties, Hessian-vector products) and
    forward-mode AD works in eager mode. Soft targets get a gradient too
    (``dloss / dt_j = -(1 - eps) log p_j``). With ``inplace=True`` the
    forward pass writes the gradient over the logits (one read, one write, no extra
    buffer) and backward only rescales it by the incoming gradient, skipping rows whose
    factor is exactly 1 on the device. ``sample_weight`` receives a gradient too when it
    requires one (``dloss / dw_i = L_i`` times the reduction's factor).

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, float32/bfloat16/float16 (computed in
            float32), or float64 (computed in float64 by the plain-torch path).
        target: class indices ``[N]`` / ``[B, T]`` (int64/int32/uint8), or class
            probabilities shaped like ``logits`` (soft targets: ``ignore_index`` does not
            apply, every row counts; any real values are accepted, as in torch).
        sample_weight: optional non-negative floating ``[N]`` (``[B]`` for sequences).
        weight: optional per-class weights ``[C]``, as ``F.cross_entropy``'s ``weight``
            (the same loss, and for ``'mean'`` torch's division by ``sum_i w_{y_i}`` over
            the non-ignored rows, by the number of rows for soft targets); combined with
            ``sample_weight``, ``'mean'`` is ``sum_i s_i w_{y_i} L_i / sum_i w_{y_i}``.
            With smoothing or soft targets the weighted target is formed densely
            (``[rows, C]``).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        ignore_index: rows (tokens) with this target have loss 0, gradient 0, score 0, and
            do not count in ``'mean'``.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        return_score: also return the detached per-sample score, identical to
            ``fastis.score(logits, target, ...)`` and computed in the same pass.
        inplace: overwrite ``logits`` with the gradient during the forward pass (only when
            nothing else reads the logits afterwards: autograd raises if another op saved
            them); a second backward through the graph, or a double backward, then raises.
            As torch's in-place ops, it refuses (``RuntimeError``) a leaf that requires grad
            or a view of one, logits whose elements share memory (expanded views), and an
            inference tensor outside inference mode. With 16-bit logits the stored
            gradient is rounded twice when the incoming gradient is not 1.

    Returns:
        ``loss`` (float32; float64 for float64 logits), or ``(loss, score)`` with ``score``
        float32 ``[N]`` / ``[B]``.

    Bad values: on CPU, class indices out of range and negative, NaN or infinite weights
    raise ``ValueError``; on CUDA and inside ``torch.compile`` (where checking would
    synchronise or break the graph) such rows get a NaN loss (and gradient), so that a sum
    or mean over them is NaN rather than quietly wrong.

    Example:
        >>> loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
        >>> loss.backward()
    """
    unbatched = False
    if not isinstance(logits, torch.Tensor) or logits.dim() == 1:
        logits, target, unbatched = unsqueeze_unbatched(logits, target)
    if unbatched and isinstance(sample_weight, torch.Tensor):
        sample_weight = sample_weight.reshape(1) if sample_weight.dim() == 0 else sample_weight
    check_logits_target(logits, target, label_smoothing)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    ignore_index = index_arg("ignore_index", ignore_index)
    return_score, inplace = bool_arg("return_score", return_score), bool_arg("inplace", inplace)
    if target.dtype == torch.uint8:
        target = target.long()
    kernels = None if inplace else grads_in_forward(logits, target)
    # there, with class indices and no class weights, the library checks the weights'
    # values in the loss's own call (GradInForward)
    library_checks = kernels is not None and weight is None and not target.is_floating_point()
    row_weight = None
    if sample_weight is not None:
        row_weight = _checked_weight(sample_weight, logits, check_values=not library_checks)
    eps, factor, ignored = float(label_smoothing), None, None
    if weight is not None:
        check_class_weight(weight, logits)
        if not target.is_floating_point() and eps:
            ignored = target == ignore_index  # the dense target below has no ignore rule
        target, eps, factor, count = apply_class_weight(logits, target, weight, ignore_index, eps)
        if factor is not None:
            row_weight = factor if row_weight is None else row_weight * factor
    else:  # a mean's count, out of place: after the op, which may read the class indices
        count = count_rows(target, logits, ignore_index) if inplace else None
    if ignored is not None:
        kernels = None
    if inplace or kernels is not None:
        if inplace:
            check_inplace(logits)
        loss, score = GradInForward.apply(
            logits, target, row_weight, reduction, ignore_index, eps, count, reduce_rows, kernels
        )
    else:
        loss, score, clean = softmax_xent_autograd(logits, target, ignore_index, eps, return_score)
        if weight is None and reduction == "mean":
            # where the op read the class indices and none is ignored, a mean divides by
            # the number of rows, with no counting op
            count = logits.shape[:-1].numel() if clean else count_rows(target, logits, ignore_index)
        if ignored is not None:
            loss = torch.where(ignored, 0.0, loss)
        loss = reduce_rows(loss, row_weight, reduction, count)
    if unbatched and reduction == "none":
        loss = loss[0]
    if not return_score:
        return loss
    if score.requires_grad:  # (GradInForward's is marked non-differentiable already)
        score = score.detach()
    if factor is not None:
        score = score * factor.abs()
    if logits.dim() == 3:
        score = sequence_norm(score, logits)
    if score.dtype != torch.float32:
        score = score.float()
    return loss, score[0] if unbatched else score


def reduce_rows(row_loss, weight, reduction, count):
    """Per-row losses times their weights, then ``'sum'`` / ``'mean'`` (over ``count``, a
    tensor or a Python number)."""
    if reduction == "none":
        return row_loss if weight is None else row_loss * weight
    if weight is None:
        total = row_loss.sum()
    elif row_loss.dim() == weight.dim() == 1:
        total = torch.dot(row_loss, weight)  # one op for the product and the sum
    else:
        total = (row_loss * weight).sum()
    if reduction == "sum":
        return total
    # a product with 1 / n when n is a Python number (a division by one costs more ops)
    return total / count if isinstance(count, torch.Tensor) else total * (1.0 / count)


def check_inplace(logits: torch.Tensor) -> None:
    """What torch's own in-place ops refuse: a leaf that requires grad (or a view of one),
    memory that overlaps itself (expanded views), an inference tensor outside inference
    mode."""
    base = logits._base if logits._base is not None else logits
    if logits.requires_grad and base.is_leaf:
        view = "a view of " if base is not logits else ""
        raise RuntimeError(
            f"fastis.cross_entropy(..., inplace=True) got {view}a leaf tensor that requires "
            "grad: writing the gradient over it would overwrite the parameter; pass the "
            "logits computed from it, or use inplace=False"
        )
    if (
        not torch.compiler.is_compiling()
        and logits.is_inference()
        and not torch.is_inference_mode_enabled()
    ):
        raise RuntimeError(
            "fastis.cross_entropy(..., inplace=True) on an inference tensor "
            "outside inference mode (torch refuses such in-place updates)"
        )
    if _may_overlap(logits):
        raise RuntimeError(
            "fastis.cross_entropy(..., inplace=True): the logits' elements share memory "
            f"(shape {tuple(logits.shape)}, strides {logits.stride()}, e.g. an expanded "
            "view); in-place writes would collide. Pass a tensor of distinct elements, or "
            "use inplace=False"
        )


def _may_overlap(t: torch.Tensor) -> bool:
    """False when the elements provably occupy distinct memory (each dimension, by
    increasing stride, steps past the extent of the smaller ones)."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def _checked_weight(
    weight: torch.Tensor, logits: torch.Tensor, *, check_values: bool = True
) -> torch.Tensor:
    """``weight`` ``[N]`` / ``[B]`` as a factor on the per-row losses ``[N]`` / ``[B, T]``;
    its values checked as ``weight_factor`` does unless ``check_values`` is False (where the
    loss's own kernel call checks them)."""
    sequences = logits.dim() == 3
    check_rows("sample_weight", weight, logits, rows=logits.shape[:1] if sequences else None)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weight = weight_factor(weight, dtype) if check_values else weight.to(dtype)
    return weight[:, None] if sequences else weight


def weight_factor(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checked ``sample_weight`` in ``dtype``: on the CPU (eager) a negative, NaN or
    infinite weight raises ``ValueError``; where the check would synchronise (CUDA,
    ``torch.compile``) such a weight becomes NaN, poisoning its row instead."""
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        # one reduction and one read: a NaN makes both ends NaN, failing both tests
        if weight.numel():
            lo, hi = torch.aminmax(weight)
            if not (lo.item() >= 0 and hi.item() < math.inf):
                value = weight[~((weight >= 0) & torch.isfinite(weight))][0].item()
                raise ValueError(f"sample_weight must be finite and non-negative, got {value}")
    else:
        weight = torch.where((weight >= 0) & torch.isfinite(weight), weight, float("nan"))
    return weight.to(dtype)
