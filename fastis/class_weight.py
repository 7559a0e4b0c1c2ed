"""torch's per-class ``weight=`` of ``F.cross_entropy``, as the fused op sees it.

With class weights ``w_c``, torch's loss of a row is ``-sum_c w_c t_c log p_c`` for the
(smoothed) target distribution ``t`` of the row, and its ``'mean'`` divides by
``sum_i w_{y_i}`` over the non-ignored rows (by the number of rows for soft targets). The
gradient w.r.t. the logits is ``T p - t'`` with ``t'_c = w_c t_c`` and ``T = sum(t')``, so
the score of the weighted loss is ``||T p - t'||``. Two cases:

- class indices without smoothing: ``t' = w_y e_y``, a per-row factor ``w_{y_i}`` on the
  loss, the gradient and the score (no change to the kernel's input);
- smoothed class indices, or soft targets: the dense ``t'`` ``[..., C]``, handed to the
  op as a soft target (a ``[rows, C]`` buffer: meant for the small ``C`` where class
  weights are used).
"""

import torch

from fastis.ops import check_target_range


def check_class_weight(weight, logits: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.device != logits.device:
        raise ValueError(f"weight is on {weight.device} but logits on {logits.device}")
    if tuple(weight.shape) != (logits.shape[-1],):
        raise ValueError(
            f"weight must have shape ({logits.shape[-1]},), one weight per class, got "
            f"{tuple(weight.shape)}"
        )


def apply_class_weight(logits, target, weight, ignore_index: int, label_smoothing: float):
    """``(target, label_smoothing, row_factor, total)`` for the op.

    ``row_factor`` (``logits.shape[:-1]``, or None) multiplies the per-row loss and score;
    ``total`` is the mean's denominator under torch's rule (a 0-d tensor).
    """
    C = logits.shape[-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = weight.to(dtype)
    if target.is_floating_point():
        t = target.to(dtype)
        if label_smoothing:
            t = (1 - label_smoothing) * t + label_smoothing / C
        rows = float(logits.shape[:-1].numel())
        return t * w, 0.0, None, torch.full((), rows, dtype=dtype, device=logits.device)
    if logits.device.type == "cpu":
        check_target_range(target, C, ignore_index)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < C)
    y = torch.where(in_range, target, 0).long()
    w_y = torch.where(ignored, 0.0, w[y])
    total = w_y.sum()
    if not label_smoothing:
        # a class index out of range gets a NaN factor: its row is NaN, as without weights
        return target, 0.0, torch.where(in_range | ignored, w_y, float("nan")), total
    eps = label_smoothing
    dense = (eps / C) * w.expand(*target.shape, C)
    dense = dense + torch.nn.functional.one_hot(y, C).to(dtype) * ((1 - eps) * w_y)[..., None]
    dense = torch.where(ignored[..., None], 0.0, dense)
    dense = torch.where((in_range | ignored)[..., None], dense, float("nan"))
    return dense, 0.0, None, total
