"""``fastis.linear_cross_entropy``: the last layer, the weighted loss and the score in one op.

Runs the op ``fastis::linear_xent`` and its backward ``fastis::linear_xent_grad``
(``fastis.linear_ops``). For CUDA tensors they launch the Triton kernels
(``fastis._triton.linear_xent`` forward, ``fastis._triton.linear_xent_grad`` backward),
which form the logits tile by tile in registers; for CPU tensors, float64 and with
``FASTIS_BACKEND=torch`` the chunked torch path (``fastis.reference_linear``), which forms
them a block of rows x classes at a time. Neither holds the logits of the whole batch.
"""

import torch

from fastis._checks import bool_arg, float_arg, index_arg
from fastis.constants import IGNORE_INDEX, INDEX_DTYPES, REDUCTIONS
from fastis.linear_ops import grads_in_forward, linear_xent, linear_xent_fused
from fastis.loss import cross_entropy, reduce_rows, weight_factor
from fastis.ops import count_rows
from fastis.score import scale_by_features, sequence_norm

SCORES = ("logits", "features")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    return_score: bool = False,
    score: str = "logits",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""``fastis.cross_entropy(hidden @ weight.T + bias, target, ...)`` without the logits.

    The logits ``z = h W^T + c`` of a final ``nn.Linear`` (or a tied embedding) are formed a
    chunk at a time, in float32, and never held for the whole batch: on the CPU the extra
    memory is one chunk of logits (256 rows by ``V``, at most 64 MiB) or a few tiles of them
    (8 MiB each), not ``[N, V]``; on CUDA one tile per program in registers; plus float32
    accumulators for the gradients (``[N, D]`` and, for 16-bit weights, ``[V, D]``). The
    gradients are ``dh = dz W``, ``dW = dz^T h`` and ``dc = sum dz``, accumulated in
    float32, with ``dz = w_i (p_i - t_i)`` times the reduction's factor. On the torch path
    (CPU), for ``'mean'`` and ``'sum'`` with a gradient wanted for ``hidden``, ``weight``
    or ``bias``, they are formed in forward from the chunk's logits and kept (float32
    ``[N, D]``, ``[V, D]``, ``[V]`` until backward, which only multiplies them by the
    incoming gradient): three ``N x D x V`` products in all, as the naive composition.
    Elsewhere (``'none'``, no gradient, the CUDA kernels) forward keeps one number per row,
    the log-sum-exp, and backward forms the logits again, chunk by chunk: four products.
    No host synchronisation (besides the class-index range check on CPU tensors).

    The loss, reductions, ignore rule, smoothing and score are those of
    ``fastis.cross_entropy``: ``'none'`` gives ``w_i L_i`` per row (``[B, T]`` per token),
    ``'sum'`` their sum, ``'mean'`` their sum over the number of non-ignored rows (tokens).

    Args:
        hidden: ``[N, D]`` or ``[B, T, D]``, float32/bfloat16/float16 (computed in
            float32), or float64 (computed in float64).
        weight: ``[V, D]`` (``V >= 1``), ``hidden``'s dtype and device.
        target: class indices ``[N]`` / ``[B, T]`` (int64/int32/uint8). Soft targets are
            not supported.
        bias: optional ``[V]``, ``hidden``'s dtype.
        sample_weight: optional non-negative floating weights per row ``[N]``; for
            sequences per sequence ``[B]`` or per token ``[B, T]``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        ignore_index: rows (tokens) with this target have loss 0, gradient 0, score 0, and
            do not count in ``'mean'``.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        return_score: also return the detached per-example score from the same pass.
        score: ``'logits'``: ``G_i = ||p_i - t_i||``, as ``fastis.score(z, target)``;
            ``'features'``: the exact norm of the last layer's per-example weight (and bias)
            gradient, ``G_i sqrt(||h_i||^2 + 1)`` (``G_i ||h_i||`` without ``bias``), as
            ``fastis.score(z, target, features=hidden, bias=bias is not None)``. For
            sequences both are reduced per sequence as ``fastis.score`` documents:
            ``sqrt(sum_t G_bt^2)``, and for ``'features'`` the bound
            ``sqrt(sum_t G_bt^2 (||h_bt||^2 + 1))``.

    Returns:
        ``loss`` (float32; float64 for float64 inputs), or ``(loss, score)`` with ``score``
        float32 ``[N]`` / ``[B]``.

    Gradients flow to ``hidden``, ``weight``, ``bias`` and ``sample_weight``
    (``dloss / dw_i = L_i`` times the reduction's factor); not a second time (no double
    backward). Bad values: on CPU, class indices out of range and negative, NaN or infinite
    weights raise ``ValueError``; on CUDA and inside ``torch.compile`` such rows get a NaN
    loss instead.

    Example:
        >>> h = model.body(x)                       # [B, T, D]
        >>> loss, g = fastis.linear_cross_entropy(
        ...     h, model.lm_head.weight, y, return_score=True, score="features")
        >>> loss.backward()
    """
    _check_inputs(hidden, weight, target, bias)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    ignore_index = index_arg("ignore_index", ignore_index)
    return_score = bool_arg("return_score", return_score)
    eps = float_arg("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    factor = None if sample_weight is None else _checked_weight(sample_weight, hidden)
    if target.dtype == torch.uint8:
        target = target.long()
    rows = hidden.shape[:-1]
    if torch._C._are_functorch_transforms_active():
        loss, g = _materialised(
            hidden, weight, bias, target, factor, reduction, ignore_index, eps, return_score
        )
    elif grads_in_forward(hidden, weight, bias, reduction):
        loss, g = _fused(
            hidden, weight, bias, target, factor, reduction, ignore_index, eps, return_score
        )
    else:
        loss, g = _recomputing(
            hidden, weight, bias, target, factor, reduction, ignore_index, eps, return_score
        )
    if not return_score:
        return loss
    g = g.detach().view(rows)
    if score == "features":
        g = scale_by_features(g, hidden.detach(), bias is not None)
    return loss, sequence_norm(g, hidden).float()


def _materialised(hidden, weight, bias, target, factor, reduction, ignore_index, eps, return_score):
    """``(loss, score)`` under ``torch.func`` transforms (``grad``, ``vmap``: per-sample
    gradients), which refuse the custom ops' autograd: the logits formed whole and
    ``fastis.cross_entropy`` over their rows (the same loss, reductions and score)."""
    rows = hidden.shape[:-1]
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    row_weight = None if factor is None else factor.expand(rows).reshape(-1)
    out = cross_entropy(
        logits,
        target.reshape(-1),
        sample_weight=row_weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=eps,
        return_score=return_score,
    )
    loss, g = out if return_score else (out, None)
    return (loss.view(rows) if reduction == "none" else loss), g


def _recomputing(hidden, weight, bias, target, factor, reduction, ignore_index, eps, return_score):
    """``(loss, score)`` through ``linear_xent``: per-row losses, reduced here (autograd
    gives ``sample_weight`` its gradient), the gradients formed in backward."""
    rows = hidden.shape[:-1]
    loss, _, g = linear_xent(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        target.reshape(-1),
        ignore_index,
        eps,
        return_score,
    )
    count = count_rows(target, hidden, ignore_index) if reduction == "mean" else None
    return reduce_rows(loss.view(rows), factor, reduction, count), g


def _fused(hidden, weight, bias, target, factor, reduction, ignore_index, eps, return_score):
    """``(loss, score)`` through ``linear_xent_fused``: the reduced loss, its gradients
    formed in forward (each row's factor ``w_i`` (``/ n``) is known there), backward only
    scales them by the incoming gradient."""
    rows = hidden.shape[:-1]
    count = count_rows(target, hidden, ignore_index) if reduction == "mean" else None
    row_weight = None if factor is None else factor.expand(rows).reshape(-1)
    out = linear_xent_fused(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        target.reshape(-1),
        row_weight,
        count,
        ignore_index,
        eps,
        return_score,
        hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    )
    return out[0], out[3]


def _check_inputs(hidden, weight, target, bias) -> None:
    """Shapes, dtypes and devices only (no values: no synchronisation, traceable)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)}")
    D = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(
            f"weight must have shape [V, D] = [V, {D}] for hidden of shape "
            f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one class (V >= 1), got {tuple(weight.shape)}")
    _same_kind("weight", weight, hidden)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape [V] = [{weight.shape[0]}] for weight of shape "
                f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        _same_kind("bias", bias, hidden)
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden on {hidden.device}")
    if target.is_floating_point():
        raise TypeError(
            "linear_cross_entropy takes class indices as target; soft (floating) targets "
            f"are not supported, got {target.dtype}"
        )
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must hold int64/int32/uint8 class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(hidden.shape[:-1])} for hidden of shape "
            f"{tuple(hidden.shape)}, got {tuple(target.shape)}"
        )


def _same_kind(name, tensor, hidden) -> None:
    if tensor.dtype != hidden.dtype:
        raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {tensor.dtype}")
    if tensor.device != hidden.device:
        raise ValueError(f"{name} is on {tensor.device} but hidden on {hidden.device}")


def _checked_weight(weight, hidden) -> torch.Tensor:
    """``sample_weight`` ``[N]`` / ``[B]`` / ``[B, T]`` as a factor on the per-row losses."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"sample_weight must be a tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"sample_weight must be floating point, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"sample_weight is on {weight.device} but hidden on {hidden.device}")
    rows = tuple(hidden.shape[:-1])
    allowed = (rows,) if hidden.dim() == 2 else (rows[:1], rows)
    if tuple(weight.shape) not in allowed:
        want = " or ".join(str(list(s)) for s in allowed)
        raise ValueError(
            f"sample_weight must have shape {want} for hidden of shape "
            f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    weight = weight_factor(
        weight, torch.float64 if hidden.dtype == torch.float64 else torch.float32
    )
    return weight[:, None] if weight.dim() == 1 and hidden.dim() == 3 else weight
