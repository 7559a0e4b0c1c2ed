"""``fastis.score``: the per-sample gradient-norm upper bound of Katharopoulos & Fleuret."""

import torch

from fastis._checks import check_logits_target, check_rows
from fastis._ops import loss_and_score


def score(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    features: torch.Tensor | None = None,
    bias: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Per-sample importance score: the norm of the loss gradient w.r.t. the logits.

    For ``p = softmax(z_i)`` and target distribution ``t_i`` (one-hot ``e_{y_i}``, smoothed
    ``(1 - e) t + e / C``, or given probabilities), the score is ``G_i = ||p - t_i||_2``
    (exactly ``||sum(t_i) p - t_i||``, the gradient of ``-<t_i, log p>``), computed stably in
    float32 in one pass over the logits: it keeps full relative precision as ``p_y -> 1``.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, float32/bfloat16/float16 (float64 accepted).
            Any strides.
        target: class indices ``[N]`` / ``[B, T]`` (int64 or int32), or class probabilities
            shaped like ``logits`` (soft targets; ``ignore_index`` does not apply).
        features: optional ``[N, D]`` / ``[B, T, D]`` inputs of a final ``nn.Linear`` that
            produced the logits. The score is then that layer's exact per-sample gradient
            norm ``G_i * sqrt(||h_i||^2 + bias)``. For sequences it is
            ``sqrt(sum_t G_bt^2 (||h_bt||^2 + bias))``: the norm of the per-token weight
            gradients taken together; it equals the true norm for ``T = 1`` and bounds the
            norm of their sum by a factor ``sqrt(T)`` (the sum itself does not factor).
        bias: whether that layer has a bias.
        ignore_index: rows (tokens) with this target score 0.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.

    Returns:
        float32 scores ``[N]`` (``[B]`` for sequences: ``sqrt(sum_t G_bt^2)`` over the
        non-ignored tokens), on the logits' device, without gradient.

    Bad values: on CPU a class index outside ``[0, C)`` raises ``ValueError``; on CUDA,
    where checking would synchronise, such a row scores NaN (nothing is read out of
    bounds). A NaN logit, a ``+inf`` logit, or a target logit that is NaN/``+inf`` gives a
    NaN score; ``-inf`` logits are masked classes (probability 0), as in ``torch.softmax``.

    Example:
        >>> logits = model(x)
        >>> loss = torch.nn.functional.cross_entropy(logits, y)
        >>> g = fastis.score(logits, y)   # importance of each example in the batch
    """
    check_logits_target(logits, target, label_smoothing)
    if features is not None:
        check_rows("features", features, logits, trailing=True)
    with torch.no_grad():
        _, g = loss_and_score(logits.detach(), target.detach(), ignore_index,
                              float(label_smoothing), need_loss=False)
        if features is not None:
            h = torch.linalg.vector_norm(features.detach(), dim=-1, dtype=torch.float32)
            g = g * torch.sqrt(h * h + 1.0) if bias else g * h
        if logits.dim() == 3:
            g = torch.linalg.vector_norm(g, dim=1)
    return g.float()
