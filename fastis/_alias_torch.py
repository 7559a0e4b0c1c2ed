"""Plain-torch alias tables: the CPU path and the oracle of the Triton kernels.

Construction (no per-element loop). With ``q_k = N w_k / W`` (mean 1), item ``k`` is light
when ``q_k <= 1`` (deficit ``d_k = 1 - q_k``) and heavy otherwise (excess ``e_k = q_k - 1``).
Let ``A`` and ``H`` be the inclusive prefix sums of ``d`` and ``e`` over all items in index
order (float64; ``H`` rescaled so that ``H_N = A_N`` despite rounding). The sequential
sweep of Hubschle-Schneider & Sanders (each light bucket is topped up by the current heavy
item; a heavy item whose remainder falls to <= 1 becomes a bucket itself, topped up by the
next heavy item) has a closed form in these prefix sums:

- light ``k`` is topped up by the first heavy ``h`` with ``H_h > A_{k-1}``;
- heavy ``h`` keeps ``r_h = 1 + H_h - A_i`` where ``i`` is the first light with
  ``A_i >= H_h``, and is topped up by the next heavy (the first ``m`` with ``H_m > H_h``).

Every bucket's ``prob + (1 - prob) = 1`` goes to at most two items, and the mass of heavy
``h`` telescopes to ``r_h + (A_{i(h)} - A_{i(h')}) + (1 - r_{h'}) = 1 + H_h - H_{h'} = q_h``
(``h'`` the previous heavy).

Ties. A heavy item whose excess is lost in the rounding of ``H`` (``H_h <= H_{h'}``:
``e_h`` below half an ulp of ``H``, e.g. ``q_h = 1 + 1 ulp`` after a large excess) would be
topped up by nobody under these rules (the lights go to the first of equal ``H`` values,
the strict search skips it) and keep only ``r_h``, losing ``1 - r_h`` of its mass. It is a
bucket of its own instead (prob 1, alias itself): mass ``1 = q_h`` up to that rounding, and
its neighbours telescope over it since ``H_h = H_{h'}``. Nothing points at it: every
search returns a position where ``H`` rises.

So the whole table is two prefix sums and two sorted searches: the split method with one
piece per item. Where rounding leaves a bucket with no heavy item to point at (its deficit
is then rounding-sized) it points at itself.

The same closed form runs on any device (the searches are ``torch.searchsorted``); the
Triton path fuses it (``fastis._triton.alias``).
"""

import torch

# One draw needs a bucket (64 random bits, so the modulo bias is N / 2^63) and a coin
# (53 random bits, float64 uniform); the table stores ``prob`` in float64 so that items of
# tiny probability keep their mass (float32 would flush anything below 1e-38 to zero).
PROB_DTYPE = torch.float64


# Devices whose torch.cumsum is a sequential loop, so that adding 0.0 leaves a prefix sum
# bit-identical. A parallel scan (CUDA) associates every position differently and may move
# the sum by an ulp at a zero increment: a weight-0 item would then own an ulp-wide interval
# of the inverse CDF, and a light item could look heavy to the alias search. ``_flat``
# removes such steps.
SEQUENTIAL_SCAN_DEVICES = ("cpu",)


def _cumsum(x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
    """Inclusive prefix sums along the last dimension, and whether the scan was sequential
    (then exactly flat wherever the increment is 0).

    A function of its own so that a test can put a parallel scan here: every scan a CPU
    runs (torch's, numpy's) is sequential and never shows the rounding ``_flat`` removes,
    so without a GPU an emulated parallel scan is the only way to reach that code with the
    hazard present (on CUDA, the tests also run the real scan).
    """
    return torch.cumsum(x, -1, dtype=dtype), x.device.type in SEQUENTIAL_SCAN_DEVICES


def _flat(c: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``c`` where each position takes the value at the last position ``<=`` it at which
    ``step`` is True (0 before the first): a prefix sum moves only where its increment is
    positive. Not needed (not called) after a sequential scan."""
    idx = torch.arange(c.shape[-1], device=c.device).expand(c.shape)
    last = torch.where(step, idx, -1).cummax(-1).values
    return torch.where(last >= 0, c.gather(-1, last.clamp_min(0)), 0.0)


def _scan(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    c, sequential = _cumsum(x, dtype)
    return c if sequential else _flat(c, x > 0)


def index_dtype(n: int) -> torch.dtype:
    """Smallest index dtype that holds 0..n-1 (int32 up to 2^31 - 1 items)."""
    return torch.int32 if n <= 2**31 - 1 else torch.int64


def allocate(
    shape: torch.Size,
    device: torch.device,
    out_prob: torch.Tensor | None = None,
    out_alias: torch.Tensor | None = None,
    out_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A table's buffers for weights of ``shape`` (``[N]`` or ``[R, N]``): ``prob`` float64,
    ``alias`` ``index_dtype(N)`` and ``probs`` float64; each ``out_*`` given (a rebuild
    reuses the table's) is returned instead of a new one. Every builder allocates here."""

    def new(dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    return (
        new(PROB_DTYPE) if out_prob is None else out_prob,
        new(index_dtype(shape[-1])) if out_alias is None else out_alias,
        new(torch.float64) if out_probs is None else out_probs,
    )


def build(
    weights: torch.Tensor,
    *,
    out_prob: torch.Tensor | None = None,
    out_alias: torch.Tensor | None = None,
    out_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walker alias table of 1-D non-negative ``weights`` (not checked here).

    Returns ``prob`` (float64 ``[N]``), ``alias`` (int32, or int64 past 2^31 - 1 items) and
    ``probs = w / sum(w)`` (float64 ``[N]``): a draw picks bucket ``i`` uniformly and keeps
    it with probability ``prob[i]``, else takes ``alias[i]``. ``out_*`` are written in
    place when given (a rebuild reuses the table's buffers).

    On the CPU the lights and heavies are compacted and only the heavies search (``K``
    sorted searches into the ``L`` lights' prefix sums); the lights' partners then follow
    from one counting pass. On CUDA, and for a batch ``[R, N]`` (one table per row), it is
    ``build_dense`` (no data-dependent shapes). Meta weights give meta buffers of the
    table's shapes and dtypes (no values).
    """
    if weights.is_cuda or weights.is_meta or weights.dim() != 1:
        return build_dense(weights, out_prob=out_prob, out_alias=out_alias, out_probs=out_probs)
    n = weights.shape[0]
    dev = weights.device
    prob, alias, out_probs = allocate(weights.shape, dev, out_prob, out_alias, out_probs)
    w = weights.to(torch.float64)
    probs = torch.div(w, w.sum(), out=out_probs)
    del w
    q = probs * n
    light = q <= 1.0
    li = light.nonzero().squeeze(1)
    hi = light.logical_not_().nonzero().squeeze(1)
    del light
    prob.copy_(q)  # lights keep q; heavies are overwritten below
    n_light, n_heavy = li.shape[0], hi.shape[0]
    if n_heavy == 0 or n_light == 0:  # all q == 1 up to rounding: every bucket is its own
        alias.copy_(torch.arange(n, device=dev))
        prob.fill_(1.0)
        return prob, alias, probs
    a = torch.cumsum(q[li].neg_().add_(1.0), 0)  # A over the lights, in order
    h = torch.cumsum(q[hi].sub_(1.0), 0)  # H over the heavies
    del q
    # A_L = H_K exactly; rescale H so rounding does not land on the last heavy (build_dense)
    h.mul_(a[-1] / h[-1])
    # heavy h: pos = the first light with A >= H_h; it keeps r = 1 + H_h - A_pos
    pos = torch.searchsorted(a, h, right=False)
    found = pos < n_light
    r = torch.where(found, (1.0 + h - a[pos.clamp_max(n_light - 1)]).clamp_(0.0, 1.0), 1.0)
    # a heavy whose H does not rise above the previous heavy's is its own bucket (docstring)
    tied = torch.zeros(n_heavy, dtype=torch.bool, device=dev)
    tied[1:] = h[1:] <= h[:-1]
    prob[hi] = r.masked_fill_(tied, 1.0)
    del a, r, found
    # light j is topped up by heavy number #{h : pos_h < j} (the first with H_h > A_{j-1})
    counts = torch.bincount((pos + 1).clamp_max_(n_light), minlength=n_light + 1)[:n_light]
    rank = torch.cumsum(counts, 0)
    del counts, pos
    alias[li] = torch.where(rank < n_heavy, hi[rank.clamp_max_(n_heavy - 1)], li).to(alias.dtype)
    del rank
    # heavy h is topped up by the next heavy whose H is strictly larger (ties: rounding)
    step = torch.full((n_heavy,), n_heavy, dtype=torch.int64, device=dev)
    step[:-1] = torch.where(h[1:] > h[:-1], torch.arange(1, n_heavy, device=dev), n_heavy)
    nxt = step.flip(0).cummin(0).values.flip(0)
    nxt.masked_fill_(tied, n_heavy)
    alias[hi] = torch.where(nxt < n_heavy, hi[nxt.clamp_max_(n_heavy - 1)], hi).to(alias.dtype)
    return prob, alias, probs


def build_dense(
    weights: torch.Tensor,
    *,
    out_prob: torch.Tensor | None = None,
    out_alias: torch.Tensor | None = None,
    out_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``build`` with one search per item over the full prefix sums: no compaction, so no
    data-dependent shapes (no host synchronisation on CUDA). The layout of the Triton
    kernels, the torch path's build on CUDA, and the build of a batch ``[R, N]`` of
    distributions (every operation runs along the last dimension, one table per row)."""
    n = weights.shape[-1]
    dev = weights.device
    out_prob, out_alias, out_probs = allocate(weights.shape, dev, out_prob, out_alias, out_probs)
    if weights.is_meta or weights.numel() == 0:  # no values to compute (meta, or no rows)
        return out_prob, out_alias, out_probs
    w = weights.to(torch.float64)
    probs = torch.div(w, w.sum(-1, keepdim=True), out=out_probs)
    del w
    q = probs * n
    light = q <= 1.0
    d = (1.0 - q).clamp_min_(0.0)
    e = (q - 1.0).clamp_min_(0.0)
    a = _scan(d)
    h = _scan(e)
    del d, e
    # Exactly, A_N = H_N (the q sum to N); in float64 they differ by the rounding of N terms
    # (~1e-4 at N = 2^25), and the last heavy item would absorb it all. Scaling the excesses
    # by A_N / H_N (1 + ~1e-12) spreads it over the heavy items instead.
    a_end, h_end = a[..., -1:], h[..., -1:]
    h.mul_(torch.where(h_end > 0, a_end / h_end, 1.0))
    # Query per item: the exclusive prefix A_{k-1} for lights, H_k for heavies.
    a_excl = torch.zeros_like(a)
    a_excl[..., 1:] = a[..., :-1]
    # H just before k (the previous heavy's H, 0 before the first): see ``build``'s ties
    h_excl = torch.zeros_like(h)
    h_excl[..., 1:] = h[..., :-1]
    tied = light.logical_not().logical_and_(h <= h_excl)
    del h_excl
    x = torch.where(light, a_excl, h)
    del a_excl
    target = torch.searchsorted(h, x, right=True)
    del x
    # Heavy remainders r_h = 1 + H_h - A_{i(h)}; lights keep q.
    pos = torch.searchsorted(a, h, right=False)
    found = pos < n
    a_at = a.gather(-1, pos.clamp_max_(n - 1))
    del pos, a
    r = torch.where(found, (1.0 + h - a_at).clamp_(0.0, 1.0), 1.0).masked_fill_(tied, 1.0)
    del a_at, h
    self_idx = torch.arange(n, device=dev, dtype=torch.int64)
    prob = torch.where(light, q, r, out=out_prob)
    alias = out_alias.copy_(torch.where((target < n) & ~tied, target, self_idx))
    return prob, alias, probs


def random_buckets(
    n: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform int64 buckets in ``[0, n)`` from 63 random bits (bias <= n / 2^63).

    (``torch.randint(0, n)`` takes 32 random bits for ``n < 2^32``: a modulo bias of up to
    ``n / 2^32``, 1.6% at ``n = 2^26``.)
    """
    r = torch.empty(shape, dtype=torch.int64, device=device)
    r.random_(generator=generator)  # uniform on [0, 2^63 - 1]
    return r.remainder_(n)


def sample_table(
    prob: torch.Tensor, alias: torch.Tensor, size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``size`` int64 indices per table (``[..., size]``; bucket first, then the coin)."""
    shape = (*prob.shape[:-1], size)
    bucket = random_buckets(prob.shape[-1], shape, generator, prob.device)
    coin = torch.rand(shape, dtype=torch.float64, device=prob.device, generator=generator)
    keep = coin < prob.gather(-1, bucket)
    return torch.where(keep, bucket, alias.gather(-1, bucket).to(torch.int64))


def cdf(weights: torch.Tensor) -> torch.Tensor:
    """float64 inclusive cumulative sum along the last dimension (its last entry: the total)."""
    return _scan(weights, torch.float64)


def last(c: torch.Tensor) -> torch.Tensor:
    """``c[..., -1:]``, the totals of a ``cdf`` (a view; ``narrow`` costs a fraction of the
    indexing expression's parsing, which matters for the small draws of a training step)."""
    return c.narrow(-1, c.shape[-1] - 1, 1)


def sample_cdf(
    c: torch.Tensor,
    size: int,
    generator: torch.Generator | None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-shot inverse-CDF draw from a ``cdf``: int64 ``[..., size]``, one search each.

    Item ``k`` is drawn when ``C_{k-1} <= u C_{N-1} < C_k`` (``u`` float64 uniform on
    ``[0, 1)``, 53 bits), so weight-0 items never are; a target rounded up past the last
    bucket goes to the last positive item. ``total``: ``last(c)``, when the caller has it.
    """
    shape = (*c.shape[:-1], size)
    u = torch.rand(shape, dtype=torch.float64, device=c.device, generator=generator)
    total = (last(c) if total is None else total).contiguous()
    idx = torch.searchsorted(c, u.mul_(total), right=True)
    last_positive = torch.searchsorted(c, total, right=False)
    return torch.minimum(idx, last_positive)
