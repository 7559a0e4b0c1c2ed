"""``fastis.cross_entropy``: importance-weighted cross-entropy with the score for free."""

import torch

from fastis._checks import check_logits_target, check_rows
from fastis._ops import loss_and_score, scale_rows_, softmax_xent_

REDUCTIONS = ("none", "mean", "sum")


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
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
    backpropagated twice and ``torch.compile`` sees pure ops. With ``inplace=True`` the
    forward pass writes the gradient over the logits (one read, one write, no extra
    buffer) and backward only rescales it by the incoming gradient, skipping rows whose
    factor is exactly 1 on the device. ``sample_weight`` receives a gradient too when it
    requires one (``dloss / dw_i = L_i`` times the reduction's factor).

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, float32/bfloat16/float16 (float64 accepted).
        target: class indices ``[N]`` / ``[B, T]`` (int64/int32), or class probabilities
            shaped like ``logits`` (soft targets: ``ignore_index`` does not apply, every row
            counts).
        sample_weight: optional non-negative floating ``[N]`` (``[B]`` for sequences).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        ignore_index: rows (tokens) with this target have loss 0, gradient 0, score 0, and
            do not count in ``'mean'``.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        return_score: also return the detached per-sample score, identical to
            ``fastis.score(logits, target, ...)`` and computed in the same pass.
        inplace: overwrite ``logits`` with the gradient during the forward pass (only when
            nothing else reads the logits afterwards: autograd raises if another op saved
            them); a second backward through the graph then raises. With 16-bit logits the
            stored gradient is rounded twice when the incoming gradient is not 1.

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
    check_logits_target(logits, target, label_smoothing)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    weight = None if sample_weight is None else _checked_weight(sample_weight, logits)
    if inplace:
        loss, score = _InplaceCrossEntropy.apply(logits, target, weight, reduction,
                                                 ignore_index, float(label_smoothing))
    else:
        loss, score = loss_and_score(logits, target, ignore_index, float(label_smoothing),
                                     need_score=return_score)
        count = count_rows(target, logits, ignore_index) if reduction == "mean" else None
        loss = _reduce(loss, weight, reduction, count)
    if not return_score:
        return loss
    score = score.detach()
    if logits.dim() == 3:
        score = torch.linalg.vector_norm(score, dim=1)
    return loss, score.float()


def _reduce(row_loss, weight, reduction, count):
    if weight is not None:
        row_loss = row_loss * weight
    if reduction == "sum":
        return row_loss.sum()
    if reduction == "mean":
        return row_loss.sum() / count
    return row_loss


class _InplaceCrossEntropy(torch.autograd.Function):
    """``cross_entropy(..., inplace=True)``: the gradient is computed in forward, over the
    logits, and only rescaled in backward."""

    @staticmethod
    def forward(ctx, logits, target, weight, reduction, ignore_index, label_smoothing):
        # the factor each row's gradient carries into backward: w_i, and 1/n for a mean
        factor = torch.ones(logits.shape[:-1], dtype=torch.float32, device=logits.device)
        if weight is not None:
            factor = factor * weight
        count = count_rows(target, logits, ignore_index)
        if reduction == "mean":
            factor = factor / count
        row_loss, score = softmax_xent_(logits, target, ignore_index, label_smoothing, factor)
        loss = _reduce(row_loss, weight, reduction, count)
        # Not mark_dirty: logits are often views (a [B, T, C] matmul output), which autograd
        # cannot rebase for a multi-output Function. The op bumps their version counter, so
        # any other op that saved them for backward raises there instead of going wrong.
        ctx.save_for_backward(logits, row_loss, count)
        ctx.reduction, ctx.sequences, ctx.consumed = reduction, logits.dim() == 3, False
        ctx.mark_non_differentiable(score)
        return loss, score

    @staticmethod
    def backward(ctx, grad_loss, grad_score):
        if ctx.consumed:
            raise RuntimeError(
                "fastis.cross_entropy(..., inplace=True) was backpropagated twice: its "
                "gradient lives in the logits' memory and is consumed by the first backward; "
                "use inplace=False to retain the graph")
        ctx.consumed = True
        grad, row_loss, count = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = row_loss * grad_loss
            if ctx.reduction == "mean":
                grad_weight = grad_weight / count
            if ctx.sequences:
                grad_weight = grad_weight.sum(1, keepdim=True)
        scale_rows_(grad, grad_loss)
        return grad, None, grad_weight, None, None, None


def count_rows(target: torch.Tensor, logits: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of rows (tokens) that count in a mean, as a tensor (no synchronisation)."""
    if target.is_floating_point():
        # a fill, not a host-to-device copy: stays capturable in a CUDA graph
        return torch.full((), float(logits.shape[:-1].numel()), device=logits.device)
    return (target != ignore_index).sum().float()


def _checked_weight(weight: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[N]`` / ``[B]`` as a factor on the per-row losses ``[N]`` / ``[B, T]``."""
    sequences = logits.dim() == 3
    check_rows("sample_weight", weight, logits, rows=logits.shape[:1] if sequences else None)
    valid = (weight >= 0) & torch.isfinite(weight)
    if not weight.is_cuda and not torch.compiler.is_compiling() and not valid.all():
        value = weight[~valid][0].item()
        raise ValueError(f"sample_weight must be finite and non-negative, got {value}")
    # where the check would synchronise, a bad weight poisons its row instead
    weight = torch.where(valid, weight, float("nan")).to(
        torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return weight[:, None] if sequences else weight
