"""ImportanceSampler(draws_per_presample=k): one scored presample serves k steps.
Unbiasedness item by item, the weights of every reuse, the yielded stream, DataLoader use,
resume mid-cycle and bad input."""

import copy
import math

import pytest
import torch
from sampler_helpers import Z_MAX, Prefetcher, forever
from torch.utils.data import DataLoader, TensorDataset

import fastis
from fastis.sampling import ImportanceSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def skewed_scores(n):
    """Scores spread over 30x (geometric): some examples are rarely drawn."""
    return torch.logspace(math.log10(0.1), math.log10(3.0), n, dtype=torch.float64)


def identity_sampler(n, b, **kw):
    return ImportanceSampler(n, b, score_fn=lambda out, y: out[:, 0], **kw)


class CountingIdentity:
    """The identity 'model', counting its calls (the scoring passes)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, t):
        self.calls += 1
        return t


def weighted_counts(k, steps, *, n=16, b=8, seed=0):
    """Per-example sums of ``(B / b) sum_k w_k [sel_k = i]`` over ``steps`` steps with
    ``N = B`` and ``k`` draws per presample, and the unweighted sums."""
    scores = skewed_scores(n)
    s = identity_sampler(n, b, presample_size=n, tau_th=-1.0, seed=seed, draws_per_presample=k)
    model = CountingIdentity()
    weighted = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    it = forever(s)
    for _ in range(steps):
        idx = next(it)
        assert len(idx) == n
        xs, _, w = s.select(model, scores[idx][:, None].float(), None)
        sel = s.last_indices
        assert torch.equal(xs[:, 0], scores[sel].float())  # the rows match the indices
        weighted.index_add_(0, sel, w.double() * n / b)
        hits.index_add_(0, sel, torch.full((b,), n / b, dtype=torch.float64))
        s.update(torch.zeros(b))
    return weighted, hits, s, model.calls


def item_z(weighted, steps, p, b):
    """|z| per example of the mean weighted count against 1; one step's count has the exact
    variance ``(1 - p_i) / (b p_i)`` when ``w = 1 / (B p)`` (b iid draws from ``p``)."""
    var = (1 - p) / (b * p * steps)
    return ((weighted / steps - 1.0) / var.sqrt()).abs()


@pytest.mark.parametrize("k", [3, 4])
def test_reused_presample_is_unbiased_item_by_item(k):
    """Each of the k steps a presample serves draws b iid from the same g with weights
    1 / (B g): every example's weighted count averages 1 per step, example by example,
    and the test has power (the unweighted counts are far off)."""
    n, b, steps = 16, 8, 3000
    weighted, hits, s, calls = weighted_counts(k, steps, n=n, b=b)
    scores = skewed_scores(n)
    g = scores / scores.sum()
    z = item_z(weighted, steps, g, b)
    plain = item_z(hits, steps, torch.full((n,), 1.0 / n, dtype=torch.float64), b)
    print(f"\nk={k} ({steps} steps): max |z| {z.max():.2f} (unweighted: {plain.max():.1f})")
    assert z.max() < Z_MAX, z
    assert plain.max() > 2 * Z_MAX
    # one scoring pass per k steps, every step an importance step
    assert calls == s.presamples == math.ceil(steps / k)
    st = s.stats()
    assert st["steps_importance"] == steps and st["presamples"] == calls
    var_w = (1.0 / (n * n * g)).sum() - 1.0  # of one weight, E = 1
    assert abs(st["mean_weight"] - 1.0) < Z_MAX * math.sqrt(var_w / (steps * b))


def test_every_reuse_weights_its_rows_by_the_presamples_probabilities():
    """Presamples smaller than the data set (B = 12 of 48, k = 3): each yielded reuse is the
    same B indices, and every step's weights are 1 / (B g) of that presample's scores."""
    n, b, big_b, k = 48, 4, 12, 3
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.05
    scores[::5] = 0.0  # scored 0: never drawn
    s = identity_sampler(n, b, presample_size=big_b, tau_th=-1, seed=0, draws_per_presample=k)
    it = forever(s)
    last = None
    for step in range(4 * k):
        idx = next(it)
        if step % k:
            assert idx == last  # a reuse yields the presample again
        last = idx
        _, _, w = s.select(lambda t: t, scores[idx][:, None], None)
        sel = s.last_indices.tolist()
        g = scores[idx] / scores[idx].sum()
        pos = [idx.index(i) for i in sel]
        assert all(scores[i] > 0 for i in sel)
        torch.testing.assert_close(w, 1.0 / (big_b * g[pos]), rtol=1e-5, atol=0)
        s.update(scores[s.last_indices])
    assert s.presamples == 4


def test_draws_per_presample_one_is_the_default_stream():
    """k = 1 changes nothing: same batches, same weights as the default sampler."""
    scores = torch.rand(60, generator=torch.Generator().manual_seed(1))
    logs = []
    for kw in ({}, {"draws_per_presample": 1}):
        s = identity_sampler(60, 4, tau_th=1.05, seed=3, **kw)
        it = forever(s)
        log = []
        for _ in range(30):
            idx = next(it)
            _, _, w = s.select(lambda t: t, scores[idx][:, None], None)
            s.update(scores[s.last_indices])
            log.append((idx, s.last_indices.tolist(), w.tolist()))
        logs.append(log)
    assert logs[0] == logs[1]


def test_a_cycle_runs_its_k_steps_then_the_switch_decides():
    """Once a presample is yielded, its k - 1 reuses follow whatever tau does; the mode of
    the batch after the cycle is the switch's again (here: off)."""
    s = identity_sampler(90, 3, tau_th=-1.0, seed=0, draws_per_presample=3)
    it = forever(s)
    sizes = []
    for step in range(7):
        idx = next(it)
        sizes.append(len(idx))
        if step == 1:
            s.tau_th = float("inf")  # off from now on, once the cycle is done
        s.select(lambda t: t, torch.rand(len(idx), 1), None)
        s.update(torch.rand(3))
    assert sizes == [9, 9, 9, 3, 3, 3, 3]
    assert s.steps_importance == 3 and s.presamples == 1


def test_abandoned_iterator_drops_the_cycle():
    s = identity_sampler(90, 3, tau_th=-1.0, seed=0, draws_per_presample=3)
    it = iter(s)
    next(it), next(it)  # a presample and its first reuse, never selected
    s.tau_th = float("inf")
    it2 = iter(s)
    assert len(next(it2)) == 3  # the cycle went with the dropped batches: a fresh decision
    s.select(lambda t: t, torch.rand(3, 1), None)
    s.update(torch.rand(3))


def blobs(n=200, d=16, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(c, d, generator=g)[y] + 0.3 * torch.randn(n, d, generator=g)
    return x, y


def fresh(x, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    s = ImportanceSampler(len(x), 8, presample_size=24, seed=7, tau_th=1.2, draws_per_presample=3)
    return model, opt, s


def train_steps(sampler, model, opt, x, y, steps, loader):
    log = []
    for _ in range(steps):
        idx = next(loader)
        xs, ys, w = sampler.select(model, x[idx], y[idx])
        loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
        sampler.update(g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append((len(idx), sampler.last_indices.tolist(), w.clone()))
    return log


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("into", [1, 2])  # cut after the first / the second step of a cycle
def test_resume_mid_cycle_continues_exactly(prefetch, into, tmp_path):
    x, y = blobs()
    total = 45  # 25 steps per epoch: crosses an epoch and the switch
    model, opt, s = fresh(x)
    ref = train_steps(s, model, opt, x, y, total, Prefetcher(s, prefetch))
    ref_params = [p.detach().clone() for p in model.parameters()]
    sizes = [n for n, *_ in ref]
    assert 8 in sizes and 24 in sizes
    cut = sizes.index(24) + into

    model, opt, s = fresh(x)
    first = train_steps(s, model, opt, x, y, cut, Prefetcher(s, prefetch))
    state = s.state_dict()
    assert state["plan"] is not None  # mid-cycle: the rest of the draws travel along
    torch.save(
        {"sampler": state, "model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt"
    )
    model, opt, s = fresh(x, seed=123)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    s.load_state_dict(ckpt["sampler"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    rest = train_steps(s, model, opt, x, y, total - cut, Prefetcher(s, prefetch))
    for t, (a, b) in enumerate(zip(ref, first + rest, strict=True)):
        assert a[:2] == b[:2], f"batches differ at step {t}"
        assert torch.equal(a[2], b[2]), f"weights differ at step {t}"
    for p, q in zip(ref_params, model.parameters(), strict=True):
        assert torch.equal(p, q.detach())


def test_deepcopy_mid_cycle_continues_identically():
    x, y = blobs()
    model, opt, s = fresh(x)
    s.tau_th = -1.0
    train_steps(s, model, opt, x, y, 4, Prefetcher(s, 1))  # mid-cycle, one batch pending
    t_model, t_opt, twin = copy.deepcopy((model, opt, s))
    a = train_steps(s, model, opt, x, y, 5, Prefetcher(s, 0))
    b = train_steps(twin, t_model, t_opt, x, y, 5, Prefetcher(twin, 0))
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert [n for n, *_ in a] == [24] * 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batch_sampler_with_reuse(num_workers):
    x, y = blobs(n=240)
    ds = TensorDataset(x, y)
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    s = ImportanceSampler(ds, 12, seed=0, tau_th=1.05, draws_per_presample=2)
    sizes = []
    loader = DataLoader(ds, batch_sampler=s, num_workers=num_workers)
    for _epoch in range(2):  # a cycle may straddle the two epochs
        for xb, yb in loader:
            sizes.append(len(xb))
            xs, ys, w = s.select(model, xb, yb)
            assert len(xs) == 12
            loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
            s.update(g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert len(sizes) == 2 * len(s) == 40
    assert 36 in sizes and 12 in sizes
    assert s.steps_importance in (2 * s.presamples, 2 * s.presamples - 1)


def reuse_state():
    s = identity_sampler(60, 4, seed=0, tau_th=-1.0, draws_per_presample=3)
    it = iter(s)
    next(it)
    s.select(lambda t: t, torch.rand(12, 1), None)
    s.update(torch.rand(4))
    next(it)  # the first reuse, pending
    return s.state_dict()


def plan_with(state, **changes):
    state = copy.deepcopy(state)
    state["plan"].update(changes)
    return state


CORRUPT = [
    (lambda st: plan_with(st, next=0), ValueError, "next"),
    (lambda st: plan_with(st, next=3), ValueError, "next"),
    (lambda st: plan_with(st, positions=torch.full((3, 4), 12)), ValueError, "positions"),
    (lambda st: plan_with(st, positions=torch.zeros(3, 4)), TypeError, "positions"),
    (lambda st: plan_with(st, weights=torch.zeros(2, 4)), ValueError, "weights"),
    (lambda st: plan_with(st, weights=torch.full((3, 4), -1.0)), ValueError, "weights"),
    (lambda st: dict(st, plan="x"), TypeError, "plan"),
    (
        lambda st: dict(st, reuse={"indices": list(range(12)), "left": 3, "rows": 4}),
        ValueError,
        "left",
    ),
    (
        lambda st: dict(st, reuse={"indices": list(range(12)), "left": 1, "rows": 5}),
        ValueError,
        "rows",
    ),
    (lambda st: dict(st, reuse={"indices": [0, 1], "left": 1, "rows": 4}), ValueError, "length"),
    (lambda st: dict(st, reuse={"indices": list(range(12)), "left": 1}), TypeError, "reuse"),
    (lambda st: dict(st, reuse="x"), TypeError, "reuse"),
    (lambda st: dict(st, presamples=9), ValueError, "presamples"),
    (lambda st: dict(st, switch={}), ValueError, "switch"),
    (lambda st: dict(st, version=2), ValueError, "version"),
]


@pytest.mark.parametrize("corrupt, err, match", CORRUPT)
def test_load_state_dict_refuses_a_corrupt_cycle(corrupt, err, match):
    state = reuse_state()
    s = identity_sampler(60, 4, seed=0, tau_th=-1.0, draws_per_presample=3)
    before = s.state_dict()
    with pytest.raises(err, match=match):
        s.load_state_dict(corrupt(state))
    assert repr(s.state_dict()) == repr(before)  # refused: unchanged


def test_pending_draw_is_checked_and_the_configuration_too():
    state = reuse_state()
    bad = copy.deepcopy(state)
    bad["pending"][0]["draw"] = 3
    s = identity_sampler(60, 4, seed=0, tau_th=-1.0, draws_per_presample=3)
    with pytest.raises(ValueError, match="draw"):
        s.load_state_dict(bad)
    bad["pending"][0]["draw"] = True
    with pytest.raises(TypeError, match="draw"):
        s.load_state_dict(bad)
    other = identity_sampler(60, 4, seed=0, tau_th=-1.0, draws_per_presample=2)
    with pytest.raises(ValueError, match="draws_per_presample"):
        other.load_state_dict(state)
    s.load_state_dict(state)  # the valid one loads


@pytest.mark.parametrize(
    "value, err", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_draws_per_presample(value, err):
    with pytest.raises(err, match="draws_per_presample"):
        ImportanceSampler(60, 4, draws_per_presample=value)
