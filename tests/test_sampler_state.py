"""fastis.ImportanceSampler / fastis.HistorySampler: seeds, checkpoint validation, epochs,
``len``, a ``select`` that raises, and resume across DataLoader worker counts."""

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastis
from fastis import HistorySampler, ImportanceSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def scored(n, b, **kw):
    """An ImportanceSampler whose 'model' is the identity and score the input's column 0."""
    return ImportanceSampler(n, b, score_fn=lambda out, y: out[:, 0], **kw)


SCORES = torch.rand(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1


def run(sampler, steps, *, epoch_hook=None):
    """``steps`` steps of the protocol on the fixed SCORES; logs (indices, weights)."""
    log = []
    epoch = 0
    while len(log) < steps:
        if epoch_hook is not None:
            epoch_hook(sampler, epoch)
        for idx in sampler:
            _, _, w = sampler.select(lambda t: t, SCORES[idx][:, None], None)
            sampler.update(SCORES[sampler.last_indices])
            log.append((sampler.last_indices.tolist(), w.tolist()))
            if len(log) == steps:
                break
        epoch += 1
    return log


def make(kind, seed=0, **kw):
    if kind == "importance":
        return scored(60, 4, seed=seed, tau_th=1.05, **kw)
    return HistorySampler(60, 4, seed=seed, rebuild_every=3, **kw)


KINDS = ["importance", "history"]


# --------------------------------------------------------------------------------------
# seeds


@pytest.mark.parametrize("kind", KINDS)
def test_seed_range_is_torchs(kind):
    for bad in (2**64, 2**70):
        with pytest.raises(ValueError, match="seed must be in"):
            make(kind, seed=bad)
    with pytest.raises(ValueError, match="seed"):
        make(kind, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        make(kind, seed=1.0)
    # the largest seed runs through several passes (60 / 4 = 15 steps per pass)
    assert len(run(make(kind, seed=2**64 - 1), 50)) == 50


@pytest.mark.parametrize("kind", KINDS)
def test_seeds_differing_in_high_bits_give_different_streams(kind):
    a = run(make(kind, seed=5), 20)
    b = run(make(kind, seed=5 + 2**32), 20)
    c = run(make(kind, seed=5 + 2**40), 20)
    assert a != b and a != c and b != c
    assert run(make(kind, seed=5), 20) == a  # and a seed still fixes its stream


def test_next_seeds_pass_is_not_this_seeds_next_pass():
    """Pass k + 1 of seed s is not pass k of seed s + 1 (no shifted copies of a stream)."""
    per_pass = 15  # uniform steps of 4 from 60 examples
    a = run(scored(60, 4, seed=7, tau_th=math.inf), 2 * per_pass)
    b = run(scored(60, 4, seed=8, tau_th=math.inf), per_pass)
    assert [i for i, _ in a[per_pass:]] != [i for i, _ in b]


# --------------------------------------------------------------------------------------
# epochs and len


@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_is_accepted_and_changes_nothing(kind):
    plain = run(make(kind), 40)
    called = []

    def hook(sampler, epoch):
        sampler.set_epoch(epoch)
        called.append(sampler.epoch)

    assert run(make(kind), 40, epoch_hook=hook) == plain
    assert called == list(range(len(called))) and len(called) >= 3
    s = make(kind)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch"):
        s.set_epoch(1.5)


def test_len_is_the_number_of_batches_an_epoch_yields():
    # ImportanceSampler: shard // b (a pass never straddles; the tail of each pass is
    # skipped); HistorySampler: ceil(shard / b) (draws with replacement)
    for n, b in [(50, 8), (48, 8), (7, 3)]:
        s = scored(n, b, seed=0, tau_th=math.inf, presample_size=b)
        h = HistorySampler(n, b, seed=0)
        assert len(s) == n // b and len(h) == -(-n // b)
        for sampler in (s, h):
            count = 0
            for _ in sampler:
                sampler.select(lambda t: t, torch.rand(b, 1), None)
                sampler.update(torch.rand(b))
                count += 1
            assert count == len(sampler)


# --------------------------------------------------------------------------------------
# a select() that raises can be retried


def test_select_is_transactional_when_score_fn_raises():
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("transient")
        return out[:, 0]

    ref = run(scored(60, 4, seed=1, tau_th=-1), 6)
    s = ImportanceSampler(60, 4, seed=1, tau_th=-1, score_fn=flaky)
    got, it = [], iter(s)
    while len(got) < 6:
        idx = next(it)
        try:
            _, _, w = s.select(lambda t: t, SCORES[idx][:, None], None)
        except RuntimeError:
            before = repr(s.stats())
            _, _, w = s.select(lambda t: t, SCORES[idx][:, None], None)  # the retry
            assert s.stats()["steps"] == len(got) + 1, before
        s.update(SCORES[s.last_indices])
        got.append((s.last_indices.tolist(), w.tolist()))
    assert got == ref
    assert s.stats()["steps"] == 6 and s.stats()["missing_updates"] == 0


def test_select_with_a_bad_model_keeps_the_batch():
    s = scored(60, 4, seed=0, tau_th=-1)
    idx = next(iter(s))
    with pytest.raises(TypeError, match="model"):
        s.select(3, SCORES[idx][:, None], None)
    with pytest.raises(ValueError, match="rows"):
        s.select(lambda t: t, SCORES[idx][:5, None], None)
    s.select(lambda t: t, SCORES[idx][:, None], None)
    assert s.stats()["steps"] == 1


# --------------------------------------------------------------------------------------
# scoring without autograd


def test_inference_mode_scoring_and_the_no_grad_option():
    """The presample is scored under inference_mode; a model that caches a tensor in its
    forward needs inference_mode=False (the cached tensor is then usable in training)."""

    class Cache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.table = None

        def forward(self, t):
            if self.table is None:
                self.table = torch.full((3,), 2.0)  # built lazily, in the first forward
            return self.lin(t) * self.table

    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    for mode in (True, False):
        torch.manual_seed(0)
        model = Cache()
        s = ImportanceSampler(60, 4, tau_th=-1, seed=0, inference_mode=mode)
        idx = next(iter(s))
        xs, ys, w = s.select(model, x[idx], y[idx])
        assert not w.is_inference() and not s.last_indices.is_inference()
        if mode:
            assert model.table.is_inference()
            with pytest.raises(RuntimeError, match="[Ii]nference"):
                model(xs)
            continue
        loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
        loss.backward()
        assert model.lin.weight.grad is not None
        s.update(g)


# --------------------------------------------------------------------------------------
# checkpoints: validated as constructor arguments


def importance_state():
    s = scored(60, 4, seed=0, tau_th=1.05)
    it = iter(s)
    for _ in range(3):
        idx = next(it)
        s.select(lambda t: t, SCORES[idx][:, None], None)
        s.update(SCORES[s.last_indices])
    next(it), next(it)  # two batches pending
    return s.state_dict()


def history_state():
    s = HistorySampler(60, 4, seed=0, rebuild_every=2)
    it = iter(s)
    for _ in range(5):
        next(it)
        s.select(None, torch.zeros(4, 1), None)
        s.update(SCORES[s.last_indices].float())
    next(it)
    return s.state_dict()


def with_pending(state, **changes):
    state = copy.deepcopy(state)
    state["pending"][0].update(changes)
    return state


IMPORTANCE_CORRUPT = [
    (lambda st: with_pending(st, indices=[0, 1, 2, 60]), ValueError, "pending"),
    (lambda st: with_pending(st, indices=[0, 1, 2, -1]), ValueError, "pending"),
    (lambda st: with_pending(st, indices=[0, 1, 2]), ValueError, "length"),
    (lambda st: with_pending(st, indices=[0, 1, 2, 3.0]), TypeError, "ints"),
    (lambda st: with_pending(st, active="yes"), TypeError, "active"),
    (lambda st: dict(st, pending="x"), TypeError, "pending"),
    (lambda st: dict(st, tau=2.5), TypeError, "tau"),
    (lambda st: dict(st, tau=torch.tensor(2.5)), TypeError, "tau"),  # float32
    (lambda st: dict(st, tau=torch.tensor(math.nan, dtype=torch.float64)), ValueError, "tau"),
    (lambda st: dict(st, tau=torch.tensor(math.inf, dtype=torch.float64)), ValueError, "tau"),
    (lambda st: dict(st, tau=torch.tensor(-1.0, dtype=torch.float64)), ValueError, "tau"),
    (lambda st: dict(st, tau=torch.ones(2, dtype=torch.float64)), ValueError, "shape"),
    (lambda st: dict(st, tau_new=torch.tensor(-1.0, dtype=torch.float64)), ValueError, "tau_new"),
    (lambda st: dict(st, cursor="3"), TypeError, "cursor"),
    (lambda st: dict(st, cursor=61), ValueError, "cursor"),
    (lambda st: dict(st, steps=-1), ValueError, "steps"),
    (lambda st: dict(st, steps=st["steps"] + 1), ValueError, "steps"),
    (lambda st: dict(st, missing_updates=st["steps"] + 1), ValueError, "missing_updates"),
    (lambda st: dict(st, epoch_yielded=99), ValueError, "epoch_yielded"),
    (
        lambda st: dict(st, weight_max=torch.tensor(-1.0, dtype=torch.float64)),
        ValueError,
        "weight_max",
    ),
    (
        lambda st: dict(
            st, generator={"device": "cpu", "state": torch.zeros(3, dtype=torch.uint8)}
        ),
        ValueError,
        "generator",
    ),
    (lambda st: dict(st, generator="seed"), TypeError, "generator"),
    (lambda st: dict(st, config=None), TypeError, "config"),
]


@pytest.mark.parametrize("corrupt, err, match", IMPORTANCE_CORRUPT)
def test_importance_load_state_dict_refuses_corrupt_state(corrupt, err, match):
    state = importance_state()
    s = scored(60, 4, seed=0, tau_th=1.05)
    if state["generator"] is None:
        state["generator"] = {"device": "cpu", "state": torch.Generator().get_state()}
    with pytest.raises(err, match=match):
        s.load_state_dict(corrupt(state))
    # refused: nothing changed, the sampler runs as a fresh one
    assert run(s, 5) == run(scored(60, 4, seed=0, tau_th=1.05), 5)


HISTORY_CORRUPT = [
    (lambda st: dict(st, seen=torch.zeros(7, dtype=torch.bool)), ValueError, "seen"),
    (lambda st: dict(st, seen=st["seen"].float()), TypeError, "seen"),
    (lambda st: dict(st, history=st["history"].double()), TypeError, "history"),
    (lambda st: dict(st, history=st["history"][:-1]), ValueError, "history"),
    (lambda st: dict(st, history=-st["history"]), ValueError, "history"),
    (lambda st: dict(st, history=st["history"] * math.nan), ValueError, "history"),
    (lambda st: dict(st, history=None), ValueError, "history"),
    (lambda st: dict(st, snapshots=[{"index": 1}]), ValueError, "snapshots"),
    (lambda st: dict(st, invalid=torch.tensor(-1.0, dtype=torch.float64)), ValueError, "invalid"),
    (lambda st: dict(st, draws=-1), ValueError, "draws"),
    (lambda st: dict(st, table=None), ValueError, "table"),
    (lambda st: dict(st, tau=math.nan), ValueError, "tau"),
    (lambda st: dict(st, weight_count=1.5), TypeError, "weight_count"),
    (lambda st: dict(st, generator=torch.zeros(3, dtype=torch.uint8)), ValueError, "generator"),
    (lambda st: with_pending(st, local=[0, 1, 2, 60]), ValueError, "local"),
    (lambda st: with_pending(st, indices=[0, 1, 2, 3]), ValueError, "indices"),
    (lambda st: with_pending(st, weights=-st["pending"][0]["weights"]), ValueError, "weights"),
    (
        lambda st: with_pending(st, weights=st["pending"][0]["weights"].double()),
        TypeError,
        "weights",
    ),
]


@pytest.mark.parametrize("corrupt, err, match", HISTORY_CORRUPT)
def test_history_load_state_dict_refuses_corrupt_state(corrupt, err, match):
    state = history_state()
    s = HistorySampler(60, 4, seed=0, rebuild_every=2)
    with pytest.raises(err, match=match):
        s.load_state_dict(corrupt(state))
    assert run(s, 5) == run(HistorySampler(60, 4, seed=0, rebuild_every=2), 5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_valid_state_still_loads(kind):
    state = importance_state() if kind == "importance" else history_state()
    if kind == "importance":
        s = scored(60, 4, seed=0, tau_th=1.05)
    else:
        s = HistorySampler(60, 4, seed=0, rebuild_every=2)
    s.load_state_dict(state)
    assert s.state_dict()["steps"] == state["steps"]


# --------------------------------------------------------------------------------------
# resume with another number of DataLoader workers


@pytest.mark.parametrize("kind", KINDS)
def test_resume_with_another_worker_count_continues_the_stream(kind):
    """Checkpointed under a DataLoader with 2 workers (batches in flight), resumed with 0:
    the steps are those of the uninterrupted run (with either worker count)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 16, generator=g), torch.randint(0, 8, (160,), generator=g)
    ds = TensorDataset(x, y)

    def train(steps, workers, state=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8)
        s = (
            ImportanceSampler(ds, 8, seed=1, tau_th=1.2)
            if kind == "importance"
            else HistorySampler(ds, 8, seed=1, rebuild_every=6)
        )
        if state is not None:
            s.load_state_dict(state["sampler"])
            model.load_state_dict(state["model"])
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        extra = dict(num_workers=workers, prefetch_factor=2) if workers else {}
        log = []
        while True:
            for xb, yb in DataLoader(ds, batch_sampler=s, **extra):
                xs, ys, w = s.select(model, xb, yb)
                loss, sc = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
                s.update(sc)
                opt.zero_grad()
                loss.backward()
                opt.step()
                log.append((s.last_indices.tolist(), w.tolist()))
                if len(log) == steps:
                    return log, {"sampler": s.state_dict(), "model": model.state_dict()}

    ref, _ = train(40, 2)
    first, state = train(13, 2)
    assert state["sampler"]["pending"]  # the loader had batches in flight
    rest, _ = train(40 - 13, 0, state)
    assert first + rest == ref
    if kind == "history":
        assert train(40, 0)[0] == ref  # the draws do not depend on the loader
