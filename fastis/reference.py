"""Plain-torch implementations: the CPU path, and the oracle the kernels are tested against.

Each function here computes exactly what its Triton kernel computes, with the same
numerically careful formulas, in float32 (float64 when given float64 inputs, which is how
the tests build their ground truth).
"""

import torch

# Rows per chunk are chosen so that one chunk's float temporaries stay near this many
# elements (8 MiB in float32): the several passes of the torch path then stay in the
# last-level cache, and it never needs more than a few such buffers beyond its output.
_CHUNK_ELEMENTS = 1 << 21


def softmax_xent(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    compute_grad: bool = False,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy, gradient-norm score and (optionally) gradient w.r.t. the logits.

    Args:
        logits: ``[..., C]`` floating.
        target: ``[...]`` integer class indices, or ``[..., C]`` floating class
            probabilities (soft targets; ``ignore_index`` does not apply to them).
        ignore_index: rows with this target get loss 0, score 0 and a zero gradient.
        label_smoothing: ``e`` in ``[0, 1]``; the target becomes ``(1 - e) t + e / C``.
        compute_grad: also return ``grad_scale_i * dloss_i / dlogits_i``.
        grad_scale: optional per-row factor for the gradient, shaped ``[...]``.

    Returns:
        ``(loss, score, grad)``: ``loss`` and ``score`` shaped ``[...]`` in float32 (float64
        for float64 logits); ``grad`` shaped like ``logits`` in its dtype, or ``None``.
        With ``t`` the (smoothed) target distribution, ``T = sum(t)``, ``p = softmax(z)``:
        ``loss = T * logsumexp(z) - <t, z>``, ``grad = T p - t``, ``score = ||grad||_2``.
        Integer targets outside ``[0, C)`` (other than ``ignore_index``) give NaN rows;
        range *errors* are raised by the public functions, not here.
    """
    rows = logits.shape[:-1]
    C = logits.shape[-1]
    if C == 0:  # no class to be right about: a row counts only if ignored (or soft)
        return _no_classes(logits, target, ignore_index, compute_grad)
    z = logits.reshape(-1, C)
    t = target.reshape(-1, C) if target.is_floating_point() else target.reshape(-1)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(z.shape[0], dtype=compute, device=z.device)
    score = torch.empty_like(loss)
    grad = torch.empty(z.shape, dtype=z.dtype, device=z.device) if compute_grad else None
    step = max(1, _CHUNK_ELEMENTS // max(C, 1))
    scale = grad_scale.reshape(-1) if grad_scale is not None else None
    if 0 < z.shape[0] <= step:  # one chunk: no output buffers to fill (small batches)
        loss, score, grad = _rows(
            z.to(compute),
            t,
            ignore_index,
            label_smoothing,
            compute_grad,
            None if scale is None else scale.to(compute),
        )
        return (
            loss.view(rows),
            score.view(rows),
            grad.to(z.dtype).view(logits.shape) if compute_grad else None,
        )
    for i in range(0, z.shape[0], step):
        out = _rows(
            z[i : i + step].to(compute),
            t[i : i + step],
            ignore_index,
            label_smoothing,
            compute_grad,
            None if scale is None else scale[i : i + step].to(compute),
        )
        loss[i : i + step], score[i : i + step] = out[0], out[1]
        if compute_grad:
            grad[i : i + step] = out[2]
    return (loss.view(rows), score.view(rows), grad.view(logits.shape) if compute_grad else None)


def score_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    clean: bool = False,
    log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The score of ``softmax_xent`` for class indices without smoothing, in few ops.

    ``G = hypot(1 - p_y, ||p_{j != y}||)`` with ``1 - p_y = sum_{j != y} p_j`` (a sum of
    positive terms, never a difference, so it keeps full relative precision as
    ``p_y -> 1``), from ``p = exp(log_softmax(z))``, exponentiated in float64, where the
    squares of probabilities down to ``e^-350`` neither underflow nor lose digits. About
    seven small ops on a chunk of rows, against some twenty for the one-pass formula of
    ``_rows``, which the small batches of a CPU step feel; the numbers agree to float32
    rounding (``log p`` errs by about ``eps |log p|``, as ``_rows``'s ``log S`` does).

    Args:
        logits: ``[..., C]`` floating, ``C >= 1``.
        target: ``[...]`` integer class indices.
        ignore_index: rows with this target score 0.
        clean: the caller knows every target is in ``[0, C)`` and none is
            ``ignore_index`` (the per-row masks are then skipped).
        log_probs: ``log_softmax(logits)`` ``[rows, C]`` in the compute dtype, when the
            caller has it (the loss's, detached): one op fewer, the same numbers.

    Returns:
        ``[...]`` float32 scores (float64 for float64 logits). A NaN or ``+inf`` logit, an
        all ``-inf`` row and a class index out of range give NaN.
    """
    rows, C = logits.shape[:-1], logits.shape[-1]
    out = torch.float64 if logits.dtype == torch.float64 else torch.float32
    t = target.reshape(-1)
    y = (t if clean else torch.where((t >= 0) & (t < C), t, 0)).long()[:, None]
    if log_probs is None:
        log_probs = torch.log_softmax(logits.reshape(-1, C).to(out), -1)
    # a copy even for float64 (log_probs may be the loss's, saved for its backward)
    p = log_probs.to(torch.float64, copy=True).exp_()
    # p with the target entry zeroed: its sum is 1 - p_y, its norm that of the others
    p = p.scatter_(1, y, 0.0)
    score = torch.hypot(p.sum(-1), torch.linalg.vector_norm(p, dim=-1)).to(out)
    if not clean:
        score = score.masked_fill_((t < 0) | (t >= C), float("nan"))
        score = score.masked_fill_(t == ignore_index, 0.0)
    return score.view(rows)


def cross_entropy_score_rows(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, clean: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross_entropy_rows, score_rows)`` of CPU logits and *checked* class indices
    (all in ``[0, C)`` or ``ignore_index``; ``clean``: none ignored), without smoothing:
    one ``log_softmax`` serves both (torch's cross-entropy is ``log_softmax`` and
    ``nll_loss``, so the loss and its autograd are the same). The loss is differentiable;
    the score is not."""
    C = logits.shape[-1]
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, C).to(compute)
    t = target.reshape(-1).long()
    if not clean:
        z = torch.where((t == ignore_index)[:, None], 0.0, z)
    log_p = torch.log_softmax(z, -1)
    loss = torch.nn.functional.nll_loss(log_p, t, reduction="none", ignore_index=ignore_index)
    score = score_rows(z, t, ignore_index=ignore_index, clean=clean, log_probs=log_p.detach())
    # 0 * NaN is NaN: the rows with a NaN or +inf logit (fastis's rule for +inf)
    loss = loss.add(score, alpha=0)
    return loss.view(logits.shape[:-1]), score.view(logits.shape[:-1])


def _no_classes(logits, target, ignore_index, compute_grad):
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.shape[:-1]
    if target.is_floating_point():
        loss = torch.zeros(rows, dtype=compute, device=logits.device)
    else:
        loss = torch.where(target == ignore_index, 0.0, float("nan")).to(compute)
    return loss, loss.clone(), torch.empty_like(logits) if compute_grad else None


def _rows(z, target, ignore_index, eps, compute_grad, scale):
    """``softmax_xent`` on one chunk of rows ``z`` ``[n, C]``, already in the compute dtype."""
    C = z.shape[-1]
    if target.is_floating_point():
        t = target.to(z.dtype)
        if eps:
            t = (1 - eps) * t + eps / C
        lse = torch.logsumexp(z, dim=-1)
        total = t.sum(-1)
        grad = torch.softmax(z, dim=-1) * total[:, None] - t
        loss = total * lse - (t * z).sum(-1)
        score = torch.linalg.vector_norm(grad, dim=-1)
        if compute_grad and scale is not None:
            grad = grad * scale[:, None]
        return loss, score, grad if compute_grad else None

    ignored = target == ignore_index
    in_range = (target >= 0) & (target < C)
    y = torch.where(in_range, target, 0).long()[:, None]
    z_y = z.gather(1, y).squeeze(1)
    # Everything is taken relative to the largest *other* logit m, and 1 - p_y is summed
    # from the other classes, never formed as a difference: stays exact as p_y -> 1.
    e = z.scatter(1, y, float("-inf"))
    m = e.amax(-1)
    m = torch.where(m == float("-inf"), z_y, m)  # C == 1, or every other class at -inf
    e = e.sub_(m[:, None]).exp_()  # exp(z_j - m), 0 at the target
    s = e.sum(-1)
    log_s = s.log()
    log_S = torch.logaddexp(log_s, z_y - m)  # log sum_j exp(z_j - m)
    if eps:
        grad_y = eps * (1 - 1 / C) - torch.exp(log_s - log_S)  # eps (1 - 1/C) - (1 - p_y)
        # e becomes p_j - eps / C for j != y, then the gradient with its exact y entry
        grad = e.mul_(torch.exp(-log_S)[:, None]).sub_(eps / C).scatter_(1, y, grad_y[:, None])
        score = torch.linalg.vector_norm(grad, dim=-1)
        loss = m + log_S - (1 - eps) * z_y - eps / C * z.sum(-1)
    else:
        # ||p - onehot(y)|| = sqrt((1 - p_y)^2 + sum_{j != y} p_j^2) = hypot(s, ||e||) / S,
        # with s, ||e|| <= C (no overflow) and 1 / S = exp(-log_S) (S itself may overflow)
        score = torch.hypot(s, torch.linalg.vector_norm(e, dim=-1)).mul_(torch.exp(-log_S))
        loss = log_S - (z_y - m)
        if compute_grad:
            one_minus_p_y = torch.exp(log_s - log_S)
            grad = e.mul_(torch.exp(-log_S)[:, None]).scatter_(1, y, -one_minus_p_y[:, None])
    # A target logit of NaN or +inf has no softmax (torch gives NaN too).
    bad = ~(in_range & (z_y < float("inf")))
    loss = loss.masked_fill_(bad, float("nan")).masked_fill_(ignored, 0.0)
    score = score.masked_fill_(bad, float("nan")).masked_fill_(ignored, 0.0)
    if not compute_grad:
        return loss, score, None
    if scale is not None:
        grad = grad.mul_(torch.where(ignored, 0.0, scale)[:, None])
    grad = grad.masked_fill_(bad[:, None], float("nan")).masked_fill_(ignored[:, None], 0.0)
    return loss, score, grad


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    clean: bool = False,
) -> torch.Tensor:
    """The ``loss`` of ``softmax_xent`` alone, shaped ``logits.shape[:-1]``, differentiable.

    On the CPU this is torch's own fused cross-entropy (one call, the same numbers up to
    rounding; its autograd is the CPU path's gradient), with ``softmax_xent``'s rules: a
    ``+inf`` logit gives a NaN row (torch gives inf when it is not the target) and an
    ignored row a zero gradient even with NaN logits (torch's backward spreads the NaN).
    Elsewhere (a class index out of range would trip a device assertion there, where
    ``softmax_xent`` marks the row NaN) it is ``softmax_xent`` itself.

    ``clean`` (CPU only): the caller knows every class index is in ``[0, C)`` and none is
    ``ignore_index``, so there are no ignored rows to mask.
    """
    C = logits.shape[-1]
    if logits.device.type != "cpu" or C == 0:
        return softmax_xent(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing
        )[0]
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, C).to(compute)
    soft = target.is_floating_point()
    t = target.reshape(-1, C).to(compute) if soft else target.reshape(-1).long()
    if not soft and not clean:
        z = torch.where((t == ignore_index)[:, None], 0.0, z)
    loss = torch.nn.functional.cross_entropy(
        z, t, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    if z.shape[0]:
        undefined = z.detach().amax(-1) == float("inf")
        loss = loss + torch.where(undefined, float("nan"), 0.0)  # NaN, gradient unchanged
    return loss.view(logits.shape[:-1])


def target_distribution(logits, target, ignore_index: int, label_smoothing: float):
    """``(p, t, total, valid)`` for the differentiable formulas (double backward, jvp).

    ``p = softmax(z)`` and ``t`` the (smoothed) target distribution, ``[..., C]`` in float32
    (float64 for float64 logits); ``total = sum(t)`` and ``valid`` (not ignored) ``[..., 1]``.
    Class indices out of range give NaN rows, as in ``softmax_xent``.
    """
    C = logits.shape[-1]
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.to(compute), -1)
    eps = label_smoothing
    if target.is_floating_point():
        t = target.to(compute)
        if eps:
            t = (1 - eps) * t + eps / C
        return p, t, t.sum(-1, keepdim=True), torch.ones_like(p[..., :1], dtype=torch.bool)
    valid = (target != ignore_index)[..., None]
    in_range = ((target >= 0) & (target < C))[..., None]
    y = torch.where(in_range[..., 0], target, 0).long()
    t = torch.nn.functional.one_hot(y, C).to(compute)
    if eps:
        t = (1 - eps) * t + eps / C
    total = torch.where(in_range | ~valid, 1.0, float("nan")).to(compute)
    return p, t, total, valid


def cross_entropy_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    grad_scale: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``grad_scale[r] * dloss_r / dlogits_r`` from torch's softmax, in the logits' dtype.

    The torch path's backward: a handful of ops (``softmax(z) T - t``), what
    ``F.cross_entropy``'s backward computes, where ``softmax_xent(compute_grad=True)``
    takes some thirty to keep ``1 - p_y`` exact. The target entry is ``p_y - 1`` here, exact
    to float32 rounding in absolute terms (not relative, as ``p_y -> 1``). Ignored rows
    get 0, class indices out of range NaN rows, as in ``softmax_xent``.
    """
    C = logits.shape[-1]
    if C == 0:
        return torch.empty_like(logits)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.to(compute), -1)
    eps = label_smoothing
    scale = grad_scale.to(compute)[..., None]
    if target.is_floating_point():
        t = target.to(compute)
        if eps:
            t = (1 - eps) * t + eps / C
        return ((p * t.sum(-1, keepdim=True) - t) * scale).to(logits.dtype)
    if eps:
        p = p.sub_(eps / C)
    in_range = (target >= 0) & (target < C)
    y = torch.where(in_range, target, 0).long()[..., None]
    p = p.scatter_add_(-1, y, torch.full_like(p[..., :1], eps - 1.0))
    ignored = (target == ignore_index)[..., None]
    scale = torch.where(in_range[..., None] | ignored, scale, float("nan"))
    # where, not a product: an ignored row is 0 even when its logits are NaN
    return torch.where(ignored, 0.0, p.mul_(scale)).to(logits.dtype)
