"""The off step's cheap path: ``tau`` smoothed on the host from queued updates, index tensors
instead of lists, ``last_indices`` built on demand.

- the host ``tau_new`` against a float64 oracle of the reference formula (shapes, dtypes,
  scales, invalid scores);
- the smoothed ``tau`` against the per-step recursion, and the same whenever it is read;
- resume with updates still queued;
- ``index_tensors`` yields the stream ``iter`` yields, in every mode, and what it yields
  (or ``last_indices``) is the caller's: changing it changes nothing of the sampler's.
"""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastis
from fastis import HistorySampler, ImportanceSampler
from fastis.sampling.switch import SmoothedTau, compute_tau, tau_from_values

pytestmark = pytest.mark.usefixtures("one_thread")


def oracle_tau(scores: torch.Tensor) -> tuple[float, bool]:
    """The reference implementation's ``1 / sqrt(1 - sum (g - u)^2 / sum g^2)`` in float64
    (1 for all-zero scores), and whether the scores are all finite and non-negative."""
    s = scores.double()
    if not (torch.isfinite(s).all() and (s >= 0).all()):
        return math.nan, False
    if float(s.sum()) == 0.0:
        return 1.0, True
    g = s / s.sum()
    u = 1.0 / s.shape[0]
    return 1.0 / math.sqrt(1.0 - float(((g - u) ** 2).sum() / (g**2).sum())), True


def lerp(tau, x, w):
    return tau + w * (x - tau)


# --------------------------------------------------------------------------------------
# tau_new on the host


@given(
    n=st.integers(1, 300),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    power=st.sampled_from([1, 4, 12]),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_host_tau_new_matches_the_reference_formula(n, dtype, power, scale, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(n, generator=g, dtype=torch.float64) ** power * scale
    scores = raw.to(dtype)
    if dtype != torch.float64 and scale == 1e-30:
        scores = raw.float()  # below the half types' range
    tau, valid = tau_from_values(scores.tolist())
    ref, ref_valid = oracle_tau(scores)
    assert valid and ref_valid
    assert tau == pytest.approx(ref, rel=1e-9)
    assert tau == pytest.approx(float(compute_tau(scores)), rel=1e-12)  # the device form


@pytest.mark.parametrize(
    "bad",
    [
        [1.0, math.nan, 2.0],
        [math.nan, -1.0],
        [1.0, math.inf],
        [math.inf, -math.inf],
        [3.0, -1e-30, 2.0],
        [1e308, 1e308],  # finite float64 scores whose sum overflows (invalid on the device too)
    ],
)
def test_host_tau_new_refuses_nan_inf_negative(bad):
    assert tau_from_values(bad)[1] is False
    assert math.isnan(tau_from_values(bad)[0])


def test_host_tau_new_edge_values():
    assert tau_from_values([0.0, 0.0, 0.0]) == (1.0, True)  # all zero: uniform
    assert tau_from_values([5.0]) == (1.0, True)
    tau, _ = tau_from_values([0.0] * 15 + [2.0])
    assert tau == pytest.approx(4.0, rel=1e-15)  # sqrt(|U|)
    tau, _ = tau_from_values([1e-300] * 3 + [3e-300])  # no underflow
    assert tau == pytest.approx(oracle_tau(torch.tensor([1.0, 1, 1, 3]))[0], rel=1e-12)
    tau, _ = tau_from_values([1e300, 3e300])  # no overflow of the squares
    assert tau == pytest.approx(oracle_tau(torch.tensor([1.0, 3.0]))[0], rel=1e-12)


# --------------------------------------------------------------------------------------
# the smoothing


def random_updates(steps, seed):
    """A mix of off-step score batches (some invalid) and presample tau_new values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        n = int(torch.randint(1, 40, (), generator=g))
        s = torch.rand(n, generator=g) ** int(torch.randint(1, 9, (), generator=g))
        if t % 7 == 3:
            s[0] = math.nan
        elif t % 11 == 5:
            s[-1] = -0.5
        if t % 5 == 2:  # a scored presample: its tau_new and validity come from the draw
            out.append(("presample", s))
        else:
            out.append(("scores", s))
    return out


def apply(tau: SmoothedTau, update, a_tau):
    kind, s = update
    if kind == "scores":
        tau.observe_scores(s, a_tau)
    else:
        valid = torch.isfinite(s).all() & (s >= 0).all()
        tau.observe(compute_tau(s), valid, a_tau)


@pytest.mark.parametrize("a_tau", [0.0, 0.3, 0.9])
def test_smoothed_tau_follows_the_per_step_recursion(a_tau):
    updates = random_updates(200, seed=1)
    tau = SmoothedTau(distributed=False)
    ref, invalid = 0.0, 0
    for u in updates:
        apply(tau, u, a_tau)
        new, valid = oracle_tau(u[1])
        if valid:
            ref = lerp(ref, new, 1.0 - a_tau)
        elif u[0] == "scores":
            invalid += 1
        assert tau.host_value() == pytest.approx(ref, rel=1e-12, abs=1e-300)
        assert (math.isnan(tau.host_new()) and not valid) or tau.host_new() == pytest.approx(new)
    assert tau.host_invalid() == invalid > 0


def test_smoothed_tau_is_the_same_whenever_it_is_read():
    """Folded every step, every 13th, or once at the end: the same value, bit for bit."""
    updates = random_updates(150, seed=2)
    values = []
    for every in (1, 13, 10**9):
        tau = SmoothedTau(distributed=False)
        for t, u in enumerate(updates):
            apply(tau, u, 0.9)
            if t % every == 0:
                tau.host_value()
        values.append((tau.host_value(), tau.host_new(), tau.host_invalid()))
    assert values[0] == values[1] == values[2]


def test_scores_are_read_at_update_the_caller_may_reuse_them():
    tau = SmoothedTau(distributed=False)
    s = torch.tensor([1.0, 0.0, 0.0, 0.0])
    tau.observe_scores(s, 0.0)
    s.fill_(1.0)  # reused before tau is read
    assert tau.host_value() == pytest.approx(2.0)


def test_scores_that_require_grad_leave_no_graph_behind():
    model = torch.nn.Linear(4, 3)
    s = ImportanceSampler(32, 8, tau_th=math.inf, seed=0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    idx = next(s.index_tensors())
    xs, ys, w = s.select(model, x[idx], y[idx])
    scores = model(xs).square().sum(1)  # part of a graph
    assert scores.requires_grad
    s.update(scores)
    assert s.tau > 0 and not any(isinstance(r[2], torch.Tensor) for r in s._switch._pending)


# --------------------------------------------------------------------------------------
# the sampler: resume with queued updates, index tensors, last_indices


def identity(n, b, **kw):
    return ImportanceSampler(n, b, score_fn=lambda out, y: out[:, 0], **kw)


SCORES = torch.rand(90, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 3


def drive(sampler, steps, *, tensors, mutate=False, read_tau=True):
    """``steps`` steps over SCORES; logs (yielded, last_indices, weights, tau)."""
    log = []
    while len(log) < steps:
        it = sampler.index_tensors() if tensors else iter(sampler)
        for idx in it:
            yielded = idx.tolist() if tensors else list(idx)
            _, _, w = sampler.select(lambda t: t, SCORES[idx][:, None], None)
            last = sampler.last_indices
            sampler.update(SCORES[last])
            tau = sampler.tau if read_tau else None
            log.append((yielded, last.tolist(), w.tolist(), tau))
            if mutate:  # what the sampler handed out is the caller's
                idx.fill_(0) if tensors else idx.clear()
                last.fill_(-1)
                w.mul_(7.0)
            if len(log) == steps:
                break
    return log


VARIANTS = [  # (options, the batch sizes yielded: both modes where it switches)
    (dict(tau_th=1.2), {9, 27}),
    (dict(tau_th=1.05, draws_per_presample=3), {9, 27}),
    (dict(tau_th=1.2, constant_noise=True), {9, 27}),
    (dict(tau_th=math.inf), {9}),
    (dict(tau_th=-1.0), {27}),
]


@pytest.mark.parametrize("kw, sizes", VARIANTS)
def test_index_tensors_yield_the_stream_of_lists(kw, sizes):
    """The same batches, weights and tau, though the caller changes in place everything
    the sampler hands out (yielded indices, last_indices, weights)."""
    lists = drive(identity(90, 9, seed=5, **kw), 40, tensors=False)
    tensors = drive(identity(90, 9, seed=5, **kw), 40, tensors=True, mutate=True)
    assert tensors == lists
    assert {len(y) for y, *_ in lists} == sizes
    assert all(y == last or len(y) > len(last) for y, last, *_ in lists)


def test_index_tensors_for_the_history_sampler():
    def run(tensors):
        h = HistorySampler(90, 8, seed=1, rebuild_every=3)
        return drive(h, 30, tensors=tensors, mutate=tensors, read_tau=False)

    assert run(True) == run(False)


@pytest.mark.parametrize("kw", [v[0] for v in VARIANTS[:3]])
@pytest.mark.parametrize("cut", [4, 17])
def test_resume_with_queued_updates_continues_bit_for_bit(kw, cut):
    """A checkpoint taken with updates queued (tau never read since) continues as the run
    that was never interrupted, bit for bit; so does a copy."""
    whole = identity(90, 9, seed=2, **kw)
    ref = drive(whole, 35, tensors=True, read_tau=False)
    s = identity(90, 9, seed=2, **kw)
    first = drive(s, cut, tensors=True, read_tau=False)
    assert s._switch._pending  # nothing has read tau since the last update
    state = s.state_dict()
    twin = copy.deepcopy(s)
    resumed = identity(90, 9, seed=2, **kw)
    resumed.load_state_dict(state)
    rest = drive(resumed, 35 - cut, tensors=True, read_tau=False)
    assert first + rest == ref
    assert drive(twin, 35 - cut, tensors=True, read_tau=False) == rest
    assert resumed.tau == twin.tau == whole.tau  # bit for bit
    assert repr(resumed.stats()) == repr(whole.stats())


def test_yielded_tensors_and_last_indices_do_not_alias_the_stream():
    s = identity(90, 9, seed=0, tau_th=math.inf)
    it = s.index_tensors()
    a = next(it)
    a_copy = a.clone()
    s.select(lambda t: t, SCORES[a][:, None], None)
    first = s.last_indices
    assert first is s.last_indices  # built once per step
    first.add_(1000)
    a.zero_()
    s.update(SCORES[a_copy])
    b = next(it)
    assert s.state_dict()["pending"][0]["indices"] == b.tolist()
    assert not set(a_copy.tolist()) & set(b.tolist())  # a pass: distinct batches
    ref = identity(90, 9, seed=0, tau_th=math.inf)
    ref_it = iter(ref)
    assert next(ref_it) == a_copy.tolist()
    ref.select(lambda t: t, SCORES[a_copy][:, None], None)
    ref.update(SCORES[a_copy])
    assert next(ref_it) == b.tolist()


def test_index_tensors_device_and_dtype():
    s = identity(90, 9, seed=0, tau_th=math.inf)
    idx = next(s.index_tensors(device="cpu"))
    assert idx.dtype == torch.int64 and idx.device.type == "cpu" and idx.shape == (9,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no-sync check)")
@pytest.mark.parametrize("tau_th", [-1.0, float("inf")])
def test_cuda_index_tensors_steps_do_not_synchronise(tau_th):
    torch.manual_seed(0)
    x, y = torch.randn(4096, 16, device="cuda"), torch.randint(0, 5, (4096,), device="cuda")
    model = torch.nn.Linear(16, 5).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = ImportanceSampler(4096, 32, presample_size=96, tau_th=tau_th, seed=0)
    batches = s.index_tensors(device="cuda")

    def step():
        idx = next(batches)
        xs, ys, w = s.select(model, x[idx], y[idx])
        loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
        s.update(g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.stats()["steps"] == 8
    assert s.last_indices.device.type == "cuda"


@pytest.mark.parametrize("replicas, rank", [(1, 0), (3, 1), (4, 3)])
def test_pass_views_are_copies_of_the_shard(replicas, rank):
    """A rank's shard is a strided, padded view of the permutation: the views handed out
    hold its indices, contiguous, and changing them changes nothing of the stream."""
    from fastis.sampling.stream import Permutations

    perms = Permutations(23, replicas, rank, seed=9, key=1)
    twin = Permutations(23, replicas, rank, seed=9, key=1)
    dev = torch.device("cpu")
    for _ in range(12):
        n = 2 if perms.cursor % 3 else 5
        shard, start, pass_ = perms.take(n)
        want = twin.take(n)[0].narrow(0, start, n).clone()
        view = perms.view(pass_, start, n, dev)
        assert view.is_contiguous() and torch.equal(view, want)
        assert torch.equal(shard.narrow(0, start, n), want)
        view.fill_(-1)  # the caller's
        assert torch.equal(shard.narrow(0, start, n), want)
    assert perms.view(pass_ - 1, 0, 1, dev) is None  # a past pass: the caller copies
