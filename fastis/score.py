"""``fastis.score``: the per-sample gradient-norm upper bound of Katharopoulos & Fleuret.

Runs the op ``fastis::softmax_xent`` (``fastis.ops``): the Triton kernel
(``fastis._triton.softmax_xent``) for CUDA tensors, the native library (``fastis._native``)
for CPU tensors when it is built, the plain-torch path (``fastis.reference``) elsewhere and
for float64 (the backend that ``FASTIS_BACKEND`` selects).
"""

import torch

from fastis._checks import bool_arg, check_logits_target, check_rows, index_arg
from fastis.class_weight import apply_class_weight, check_class_weight
from fastis.constants import IGNORE_INDEX
from fastis.ops import _direct, _softmax_xent_kernel, _SoftmaxXent, softmax_xent


def score(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    features: torch.Tensor | None = None,
    bias: bool = True,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Per-sample importance score: the norm of the loss gradient w.r.t. the logits.

    For ``p = softmax(z_i)`` and target distribution ``t_i`` (one-hot ``e_{y_i}``, smoothed
    ``(1 - e) t + e / C``, or given probabilities), the score is ``G_i = ||p - t_i||_2``
    (exactly ``||sum(t_i) p - t_i||``, the gradient of ``-<t_i, log p>``), computed stably in
    float32 in one pass over the logits: it keeps full relative precision as ``p_y -> 1``.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, float32/bfloat16/float16 (computed in
            float32), or float64 (computed in float64, by the plain-torch path). Any strides.
        target: class indices ``[N]`` / ``[B, T]`` (int64, int32 or uint8), or class
            probabilities shaped like ``logits`` (soft targets; ``ignore_index`` does not
            apply; any real values are accepted, as in ``F.cross_entropy``).
        features: optional ``[N, D]`` / ``[B, T, D]`` inputs of a final ``nn.Linear`` that
            produced the logits. The score is then that layer's exact per-sample gradient
            norm ``G_i * sqrt(||h_i||^2 + bias)``. For sequences it is
            ``sqrt(sum_t G_bt^2 (||h_bt||^2 + bias))``: the norm of the per-token weight
            gradients taken together; it equals the true norm for ``T = 1`` and bounds the
            norm of their sum by a factor ``sqrt(T)`` (the sum itself does not factor).
        bias: whether that layer has a bias.
        weight: optional per-class weights ``[C]``, as ``F.cross_entropy``'s ``weight``:
            the score is then the gradient norm of the class-weighted loss (``|w_y| G_i``
            for class indices without smoothing; ``||T p - t'||`` with ``t'_c = w_c t_c``
            otherwise).
        ignore_index: rows (tokens) with this target score 0.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.

    An unbatched ``[C]`` input (with a 0-d class index, or ``[C]`` probabilities) gives a
    0-d score, as ``F.cross_entropy`` accepts it.

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
    logits, target, unbatched = unsqueeze_unbatched(logits, target)
    check_logits_target(logits, target, label_smoothing)
    ignore_index = index_arg("ignore_index", ignore_index)
    bias = bool_arg("bias", bias)
    if features is not None:
        features = features[None] if unbatched and isinstance(features, torch.Tensor) else features
        check_rows("features", features, logits, trailing=True)
    if weight is not None:
        check_class_weight(weight, logits)
    if target.dtype == torch.uint8:
        target = target.long()
    eps, factor = float(label_smoothing), None
    # (detached only where needed: each op costs microseconds in a small model's step)
    logits = logits.detach() if logits.requires_grad else logits
    target = target.detach() if target.requires_grad else target
    if weight is None and features is None:
        # (nothing here requires grad: no grad-mode switch, a few microseconds a call)
        g = row_scores(logits, target, ignore_index, eps)
        if logits.dim() == 3:
            g = sequence_norm(g, logits)
        if g.dtype != torch.float32:
            g = g.float()
        return g[0] if unbatched else g
    with torch.no_grad():
        if weight is not None:
            target, eps, factor, _ = apply_class_weight(logits, target, weight, ignore_index, eps)
        g = row_scores(logits, target, ignore_index, eps)
        if factor is not None:
            g = g * factor.abs()
        if features is not None:
            g = scale_by_features(g, features.detach(), bias)
        g = sequence_norm(g, logits).float()
    return g[0] if unbatched else g


def row_scores(logits, target, ignore_index: int, eps: float) -> torch.Tensor:
    """Per-row scores ``[N]`` / ``[B, T]`` of the op ``fastis::softmax_xent``: in plain
    eager mode the registered kernel itself (the op's dispatcher costs tens of microseconds
    a call), the op elsewhere (under ``torch.compile``, dispatch modes, tensor subclasses),
    and under ``torch.func`` transforms the op's ``autograd.Function`` (its vmap rule)."""
    if torch._C._are_functorch_transforms_active():  # torch.func.vmap: its batching rule
        return _SoftmaxXent.apply(logits, target, ignore_index, eps, True)[1]
    kernel = _direct(logits, softmax_xent, _softmax_xent_kernel)
    return kernel(logits, target, ignore_index, eps, True)[1]


def unsqueeze_unbatched(logits, target):
    """An unbatched ``[C]`` input (target ``[]``, or ``[C]`` probabilities) as one row."""
    if (
        isinstance(logits, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and logits.dim() == 1
        and target.dim() == (1 if target.is_floating_point() else 0)
    ):
        return logits[None], target[None], True
    return logits, target, False


def scale_by_features(g: torch.Tensor, features: torch.Tensor, bias: bool) -> torch.Tensor:
    """``g * sqrt(||h||^2 + 1)`` (``bias``) or ``g * ||h||``, in the wider of the two dtypes."""
    dtype = torch.promote_types(g.dtype, torch.promote_types(features.dtype, torch.float32))
    h = torch.linalg.vector_norm(features.to(dtype), dim=-1)
    g = g.to(dtype)
    return g * torch.sqrt(h * h + 1.0) if bias else g * h


def sequence_norm(g: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token scores ``[B, T]`` to per-sequence ``sqrt(sum_t g^2)`` ``[B]``; rows as they
    are for ``[N, C]`` logits."""
    return torch.linalg.vector_norm(g, dim=1) if logits.dim() == 3 else g
