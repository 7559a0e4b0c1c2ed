"""``fastis.cross_entropy``: importance-weighted cross-entropy with the score for free."""

import torch

from fastis._checks import check_logits_target, check_rows
from fastis._ops import softmax_xent

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
    reduction's factor; it is produced by the fused kernel in backward (one read of the
    logits, one write of the gradient) with no host synchronisation. ``sample_weight``
    receives a gradient too when it requires one (``dloss / dw_i = L_i`` times that factor).

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
    loss, score, _ = softmax_xent(logits, target, ignore_index, float(label_smoothing), False)
    if sample_weight is not None:
        loss = loss * _checked_weight(sample_weight, logits)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / count_rows(target, logits, ignore_index)
    if not return_score:
        return loss
    score = score.detach()
    if logits.dim() == 3:
        score = torch.linalg.vector_norm(score, dim=1)
    return loss, score.float()


def count_rows(target: torch.Tensor, logits: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of rows (tokens) that count in a mean, as a tensor (no synchronisation)."""
    if target.is_floating_point():
        return torch.tensor(float(logits.shape[:-1].numel()), device=logits.device)
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
