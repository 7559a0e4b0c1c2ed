"""The chunked torch path of ``fastis.linear_cross_entropy``: the CPU path and the fallback.

The logits ``z = h W^T + c`` (``h`` ``[N, D]``, ``W`` ``[V, D]``, ``c`` ``[V]``) are formed
a block at a time and never for all ``N`` rows: the extra memory is a few blocks of about
``_CHUNK_ELEMENTS`` elements (one block's logits and the temporaries of the softmax over
them), plus, for 16-bit inputs, one float32 copy of ``W`` (and of ``c``), whatever ``N``.

- Forward, per tile of rows x classes (``tiles``): per row the running statistics of the
  one-sweep formulas of ``fastis.reference`` (the max and the sums of the softmax over the
  other classes, the target logit), merged across the tiles of a row as a kernel merges
  its blocks; then the loss, the score and the log-sum-exp ``lse_i``, the one number per
  row that backward keeps.
- Backward, per tile: the logits again, then ``dz = (p - t) * s_i`` with
  ``p = exp(z - lse)``, ``t`` the (smoothed) one-hot target and ``s_i`` the incoming
  gradient of row ``i``'s loss (the sample weight and the reduction's factor, times the
  upstream gradient); ``dh += dz W``, ``dW += dz^T h``, ``dc += sum_i dz_i``, accumulated
  in float32 (float64 for float64 inputs).

Everything is computed in float32 from 16-bit inputs (``h`` and ``W`` are upcast before the
product), so a bfloat16 layer gets float32 logits, not logits rounded to bfloat16.
"""

import torch

# A tile of logits holds about this many elements (8 MiB in float32): large enough for an
# efficient matrix product, small enough that the softmax's few passes over it stay near
# the last-level cache.
_CHUNK_ELEMENTS = 1 << 21
# Tiles span at least this many rows (when there are as many), and fewer classes when the
# vocabulary is large (see ``tiles``).
_TILE_ROWS = 1024
# ``linear_xent_fused``'s chunk spans all classes and ``_FUSED_ROWS`` rows, fewer where that
# would exceed ``_FUSED_CHUNK_ELEMENTS`` elements (64 MiB in float32; V > 65,536); with
# fewer than ``_FUSED_MIN_ROWS`` rows (V > 262,144) it recomputes instead: its products
# contract over the chunk's rows, and run too slowly below that. Measured on the CPU
# (bench/results/linear_cross_entropy_cpu.md): 256 rows faster than 128 or 512 at V = 32k.
_FUSED_ROWS = 256
_FUSED_CHUNK_ELEMENTS = 1 << 24
_FUSED_MIN_ROWS = 64


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, w: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """``h W^T + c`` for a tile: rows ``h`` ``[n, D]``, classes ``w`` ``[C, D]``, in ``w``'s
    (compute) dtype."""
    h = h.to(w.dtype)
    return torch.mm(h, w.T) if c is None else torch.addmm(c, h, w.T)


def linear_xent(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    compute_score: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of the logits ``hidden @ weight.T + bias``, tile by tile.

    Over the tiles of a chunk of rows (``tiles``), per row: the target logit ``z_y`` and,
    over the other classes only, the running max ``m``, ``s = sum exp(z_j - m)`` and
    ``q = sum exp(2 (z_j - m))`` (rescaled as ``m`` grows), as ``fastis.reference`` and the
    kernels do in one row. With ``S = s + exp(z_y - m)``: ``lse = m + log S``,
    ``loss = log S - (z_y - m)`` (smoothed: ``lse - (1 - eps) z_y - eps / V sum_j z_j``),
    ``G = sqrt(s^2 + q) / S``; with smoothing ``G^2 = (eps (1 - 1/V) - s / S)^2 +
    sum_{j != y} (p_j - eps / V)^2``, the sum expanded in ``s`` and ``q`` (exact to float32
    rounding of its largest term).

    Args:
        hidden: ``[N, D]`` floating.
        weight: ``[V, D]``, ``hidden``'s dtype.
        bias: ``[V]`` or ``None``.
        target: ``[N]`` integer class indices.
        ignore_index, label_smoothing: as in ``fastis.cross_entropy``.
        compute_score: also return the score ``G_i = ||p_i - t_i||``.

    Returns:
        ``(loss, lse, score)``, ``[N]`` each in float32 (float64 for float64 inputs); the
        score is empty unless ``compute_score``. Ignored rows get loss and score 0; rows
        with a class index outside ``[0, V)``, a NaN or a ``+inf`` logit NaN (and a NaN
        ``lse``, so that their gradient is NaN too).
    """
    dtype = compute_dtype(hidden)
    w = weight.to(dtype)
    c = None if bias is None else bias.to(dtype)
    N, V = hidden.shape[0], weight.shape[0]
    loss = torch.empty(N, dtype=dtype, device=hidden.device)
    lse = torch.empty_like(loss)
    score = torch.empty_like(loss) if compute_score else loss.new_empty(0)
    R, C = tiles(N, V)
    for i in range(0, N, R):
        h = hidden[i : i + R].to(dtype)
        stats = _RowStats(target[i : i + R], V, label_smoothing, compute_score, dtype)
        for j in range(0, V, C):
            stats.update(_logits(h, w[j : j + C], None if c is None else c[j : j + C]), j)
        out = stats.finish(target[i : i + R] == ignore_index)
        loss[i : i + R], lse[i : i + R] = out[0], out[1]
        if compute_score:
            score[i : i + R] = out[2]
    return loss, lse, score


class _RowStats:
    """The running per-row statistics of ``linear_xent`` over one chunk of rows."""

    def __init__(self, target, V, eps, compute_score, dtype):
        self.V, self.eps, self.compute_score = V, eps, compute_score
        self.target = target
        self.in_range = (target >= 0) & (target < V)
        zeros = torch.zeros(target.shape, dtype=dtype, device=target.device)
        self.m = torch.full_like(zeros, float("-inf"))
        self.s, self.q, self.z_y, self.z_sum = zeros, zeros, zeros, zeros

    def update(self, z, c0):
        """Takes in the tile ``z`` ``[n, C]`` of classes ``c0 .. c0 + C``, leaving over it
        ``exp(z - base)`` (0 at the target); returns ``base`` ``[n]``, the running max of
        the other classes so far (0 while it is ``-inf``)."""
        t = self.target
        here = self.in_range & (t >= c0) & (t < c0 + z.shape[1])  # the target is in the tile
        y = torch.where(here, t - c0, 0).long()[:, None]
        z_t = z.gather(1, y).squeeze(1)
        self.z_y = torch.where(here, z_t, self.z_y)
        if self.eps:
            self.z_sum = self.z_sum + z.sum(1)
        # the other classes only: the target's entry to -inf
        z = z.scatter_(1, y, torch.where(here, float("-inf"), z_t)[:, None])
        m = torch.maximum(self.m, z.amax(1))  # NaN and +inf propagate: such rows are NaN
        base = torch.where(m == float("-inf"), 0.0, m)  # no -inf - -inf
        alpha = torch.exp(self.m - base)
        e = z.sub_(base[:, None]).exp_()
        self.s = self.s * alpha + e.sum(1)
        if self.compute_score:
            self.q = self.q * (alpha * alpha) + torch.linalg.vector_norm(e, dim=1).square()
        self.m = m
        return base

    def finish(self, ignored):
        """``(loss, lse, score)`` of the chunk (``score`` ``None`` unless asked for). Keeps
        ``log_s``, ``log_S`` and ``bad`` (the rows whose loss is NaN) for ``grad_from_exp``."""
        V, eps = self.V, self.eps
        z_y = self.z_y
        m = torch.where(self.m == float("-inf"), z_y, self.m)  # V == 1, or all others -inf
        d = z_y - m
        log_s = torch.log(self.s)
        log_S = torch.logaddexp(log_s, d)
        lse = m + log_S
        loss = lse - (1 - eps) * z_y - eps / V * self.z_sum if eps else log_S - d
        bad = ~self.in_range | ~(m < float("inf")) | ~(z_y < float("inf"))  # NaN, +inf
        self.log_s, self.log_S, self.bad = log_s, log_S, bad
        score = None
        if self.compute_score:
            inv_S = torch.exp(-log_S)  # S itself may overflow
            if eps:
                e = eps / V
                grad_y = eps * (1 - 1 / V) - torch.exp(log_s - log_S)
                others = self.q * inv_S * inv_S - 2 * e * torch.exp(log_s - log_S) + (V - 1) * e * e
                score = torch.sqrt(grad_y * grad_y + others.clamp_min(0.0))
            else:
                score = torch.hypot(self.s, torch.sqrt(self.q)) * inv_S
            score = score.masked_fill_(bad, float("nan")).masked_fill_(ignored, 0.0)
        loss = loss.masked_fill_(bad, float("nan")).masked_fill_(ignored, 0.0)
        return loss, lse.masked_fill_(bad, float("nan")), score

    def row_factor(self, scale, ignored):
        """``scale`` ``[n]`` for ``grad_from_exp`` (after ``finish``): NaN on the rows whose
        loss is NaN, 0 on ignored rows."""
        scale = torch.where(self.bad, float("nan"), scale.to(self.s.dtype))
        return torch.where(ignored, 0.0, scale)

    def grad_from_exp(self, e, c0, base, lse, factor, ignored):
        """``factor_i * (p_i - t_i)`` on the tile of classes ``c0 .. c0 + C``, written over
        ``e = exp(z - base)`` ``[n, C]``, what ``update`` left of it (after ``finish``,
        which gave ``lse``).

        ``p_j = e_j exp(base - lse)`` off the target; the target's entry is set to
        ``eps (1 - 1/V) - s / S`` (``p_y - 1 = -s / S``: no cancellation as ``p_y -> 1``).
        ``factor`` from ``row_factor``: rows whose loss is NaN get NaN, ignored rows 0
        (even with non-finite logits), as ``grad_logits``.
        """
        V, eps, t = self.V, self.eps, self.target
        dz = e.mul_((factor * torch.exp(base - lse))[:, None])
        if eps:
            dz = dz.sub_((factor * (eps / V))[:, None])
        here = self.in_range & (t >= c0) & (t < c0 + e.shape[1])  # the target is in the tile
        y = torch.where(here, t - c0, 0).long()[:, None]
        grad_y = factor * (eps * (1 - 1 / V) - torch.exp(self.log_s - self.log_S))
        dz = dz.scatter_(1, y, torch.where(here, grad_y, dz.gather(1, y).squeeze(1))[:, None])
        return dz.masked_fill_(ignored[:, None], 0.0)


def grad_logits(
    z: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    V: int,
    c0: int = 0,
) -> torch.Tensor:
    """``scale_i * (p_i - t_i)`` on one tile ``z`` ``[n, C]`` (the classes ``c0 .. c0 + C``
    of ``V``), written over ``z``.

    ``p = exp(z - lse)``; ``t = (1 - eps) e_y + eps / V``. Ignored rows get 0 (even with
    non-finite logits), class indices outside ``[0, V)`` NaN rows, as in
    ``fastis.reference.cross_entropy_grad``.
    """
    eps = label_smoothing
    in_range = (target >= 0) & (target < V)
    ignored = target == ignore_index
    here = in_range & (target >= c0) & (target < c0 + z.shape[1])  # the target is in the tile
    y = torch.where(here, target - c0, 0).long()[:, None]
    p = z.sub_(lse[:, None]).exp_()
    if eps:
        p = p.sub_(eps / V)
    p = p.scatter_add_(1, y, (here.to(p.dtype) * (eps - 1.0))[:, None])  # in p's dtype
    scale = torch.where(in_range, scale.to(z.dtype), float("nan"))
    scale = torch.where(ignored, 0.0, scale)
    return p.mul_(scale[:, None]).masked_fill_(ignored[:, None], 0.0)


def tiles(N: int, V: int) -> tuple[int, int]:
    """``(rows, classes)`` of one tile of logits: at least ``_TILE_ROWS`` rows (or all ``N``),
    as many classes as the budget then allows. Three products per tile contract over ``D``,
    over the tile's classes and over its rows: none of the three is short, unlike a chunk
    of few rows that spans all of a large vocabulary."""
    R = max(1, min(N, max(_CHUNK_ELEMENTS // max(V, 1), _TILE_ROWS)))
    return R, max(1, min(V, _CHUNK_ELEMENTS // R))


def linear_xent_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    hidden_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``linear_xent``: gradients of ``sum_i grad_loss_i * loss_i``.

    Works on tiles of ``tiles(N, V)`` rows x classes (the saved ``lse`` makes each tile's
    ``p`` independent of the others): per tile ``dz``, then ``dh[rows] += dz W[classes]``,
    ``dW[classes] += dz^T h[rows]``, ``dc[classes] += sum dz``.

    Args:
        hidden, weight, bias, target: as given to ``linear_xent``.
        lse: ``[N]``, the log-sum-exp that ``linear_xent`` returned.
        grad_loss: ``[N]``, the gradient w.r.t. each row's loss.
        hidden_grad, weight_grad, bias_grad: which gradients to form (the others are
            returned with no rows, and their products skipped).

    Returns:
        ``(grad_hidden [N, D], grad_weight [V, D], grad_bias [V])`` in the dtypes of
        ``hidden``, ``weight`` and ``bias``, each accumulated in float32 (float64 for
        float64 inputs); with no rows where not asked for (``grad_bias`` also without a
        bias).
    """
    dh, dw, db = _recomputed_grads(
        hidden, weight, bias, target, lse, grad_loss, ignore_index, label_smoothing,
        hidden_grad, weight_grad, bias_grad,
    )  # fmt: skip
    return (
        dh.to(hidden.dtype),
        dw.to(weight.dtype),
        db.to(hidden.dtype if bias is None else bias.dtype),
    )


def _grad_buffers(hidden, weight, bias, hidden_grad, weight_grad, bias_grad):
    """Zeroed ``dh`` ``[N, D]``, ``dW`` ``[V, D]``, ``dc`` ``[V]`` in the compute dtype, each
    with no rows where not asked for: distinct empty tensors (an op's outputs must not
    alias)."""
    dtype, device = compute_dtype(hidden), hidden.device
    N, D = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(N if hidden_grad else 0, D, dtype=dtype, device=device)
    dw = torch.zeros(V if weight_grad else 0, D, dtype=dtype, device=device)
    db = torch.zeros(V if bias_grad and bias is not None else 0, dtype=dtype, device=device)
    return dh, dw, db


def _recomputed_grads(hidden, weight, bias, target, lse, grad_loss, ignore_index,
                      label_smoothing, hidden_grad, weight_grad, bias_grad):  # fmt: skip
    """``linear_xent_grad``'s gradients, in the compute dtype."""
    dtype = compute_dtype(hidden)
    w = weight.to(dtype)
    c = None if bias is None else bias.to(dtype)
    dh, dw, db = _grad_buffers(hidden, weight, bias, hidden_grad, weight_grad, bias_grad)
    bias_grad = db.numel() > 0
    N, D = hidden.shape
    V = weight.shape[0]
    R, C = tiles(N, V)
    for i in range(0, N, R):
        h = hidden[i : i + R].to(dtype)
        t, row_lse, scale = target[i : i + R], lse[i : i + R], grad_loss[i : i + R]
        for j in range(0, V, C):
            w_j = w[j : j + C]
            z = _logits(h, w_j, None if c is None else c[j : j + C])
            dz = grad_logits(z, t, row_lse, scale, ignore_index, label_smoothing, V, j)
            if hidden_grad:
                dh[i : i + R].addmm_(dz, w_j)
            if weight_grad:
                dw[j : j + C].addmm_(dz.T, h)
            if bias_grad:
                db[j : j + C] += dz.sum(0)
    return dh, dw, db


def fused_rows(N: int, V: int) -> int:
    """Rows per chunk of ``linear_xent_fused``: ``_FUSED_ROWS``, or as many as
    ``_FUSED_CHUNK_ELEMENTS`` allows when each row spans all ``V`` classes (at least one,
    at most ``N``)."""
    return max(1, min(N, _FUSED_ROWS, _FUSED_CHUNK_ELEMENTS // max(V, 1)))


def linear_xent_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    compute_score: bool = False,
    hidden_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
) -> tuple[torch.Tensor, ...]:
    """``linear_xent`` and the gradients of ``sum_i grad_loss_i * loss_i`` in one sweep.

    For a reduction to a scalar the factor of each row's loss (its weight, over the count
    for a mean) is known in forward, up to the incoming gradient that backward multiplies
    in; so the gradients can be formed where the logits are, and not recomputed. Per chunk
    of ``fused_rows(N, V)`` rows, each spanning all ``V`` classes (the chunk's ``[n, V]``
    logits are the one large buffer): ``z = h W^T + c`` in one product; the row
    statistics of ``linear_xent`` over it as one tile, which leave ``exp(z - base)``;
    then over the same buffer ``dz = grad_loss_i * (p_i - t_i)``
    (``p = exp(z - base) exp(base - lse)``: no second exponential), and
    ``dh[rows] = dz W``, ``dW += dz^T h[rows]``,
    ``dc += sum dz``: three ``n x D x V`` products per chunk, where ``linear_xent`` then
    ``linear_xent_grad`` take four. The chunk needs rows enough for efficient products
    (``dW += dz^T h`` contracts over them); with fewer than ``_FUSED_MIN_ROWS`` (a large
    ``V`` under the budget) it runs those two instead, tile by tile.

    Returns:
        ``(loss, lse, score, grad_hidden [N, D], grad_weight [V, D], grad_bias [V])``: the
        first three as ``linear_xent``; the gradients as ``linear_xent_grad`` but in the
        compute dtype (float32; float64 for float64 inputs), so that backward's scaling
        rounds once to the inputs' dtype.
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    R = fused_rows(N, V)
    if R < min(N, _FUSED_MIN_ROWS):
        loss, lse, score = linear_xent(
            hidden, weight, bias, target, ignore_index=ignore_index,
            label_smoothing=label_smoothing, compute_score=compute_score,
        )  # fmt: skip
        grads = _recomputed_grads(
            hidden, weight, bias, target, lse, grad_loss, ignore_index, label_smoothing,
            hidden_grad, weight_grad, bias_grad,
        )  # fmt: skip
        return loss, lse, score, *grads
    dtype = compute_dtype(hidden)
    w = weight.to(dtype)
    c = None if bias is None else bias.to(dtype)
    loss = torch.empty(N, dtype=dtype, device=hidden.device)
    lse = torch.empty_like(loss)
    score = torch.empty_like(loss) if compute_score else loss.new_empty(0)
    dh, dw, db = _grad_buffers(hidden, weight, bias, hidden_grad, weight_grad, bias_grad)
    buffer = torch.empty(R, V, dtype=dtype, device=hidden.device)
    for i in range(0, N, R):
        h = hidden[i : i + R].to(dtype)
        n, t = h.shape[0], target[i : i + R]
        z = buffer[:n]
        if c is None:
            torch.mm(h, w.T, out=z)
        else:
            torch.addmm(c, h, w.T, out=z)
        # the chunk as one tile: a few large ops (with several threads, each op's join
        # costs more than the passes it would save in cache), exp(z - base) left over it
        stats = _RowStats(t, V, label_smoothing, compute_score, dtype)
        base = stats.update(z, 0)
        ignored = t == ignore_index
        out = stats.finish(ignored)
        loss[i : i + R], lse[i : i + R] = out[0], out[1]
        if compute_score:
            score[i : i + R] = out[2]
        factor = stats.row_factor(grad_loss[i : i + R], ignored)
        dz = stats.grad_from_exp(z, 0, base, out[1], factor, ignored)
        if dh.numel():
            torch.mm(dz, w, out=dh[i : i + R])
        if dw.numel():
            dw.addmm_(dz.T, h)
        if db.numel():
            db += dz.sum(0)
    return loss, lse, score, dh, dw, db
