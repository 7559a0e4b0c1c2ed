"""fastis.ImportanceSampler / fastis.HistorySampler: unbiasedness, the switch, resume,
training, DataLoader use and bad input (the 2-process tests are in
test_sampler_distributed.py)."""

import copy
import math
import pickle
import warnings

import pytest
import torch
from sampler_helpers import Z_MAX, Prefetcher, forever
from torch.utils.data import DataLoader, TensorDataset

import fastis
from fastis.sampling import HistorySampler, ImportanceSampler, compute_tau, default_tau_th

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# helpers


def linear_problem(n=24, d=4, c=3, seed=0, device="cpu"):
    """A fixed softmax-regression model and data with per-example gradient norms that
    differ a lot (a few far-away points), and the per-example gradients in closed form."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[: n // 6] *= 4.0
    y = torch.randint(0, c, (n,), generator=g)
    model = torch.nn.Linear(d, c).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    with torch.no_grad():
        r = torch.softmax(model(x), -1) - torch.nn.functional.one_hot(y, c).double()
    grads = torch.cat([(r[:, :, None] * x[:, None, :]).flatten(1), r], 1)  # [n, c*(d+1)]
    return x.to(device), y.to(device), model.to(device), grads


def z_scores(estimates, mean, var_one):
    """|z| per coordinate of the Monte-Carlo mean of ``estimates`` [M, P] against ``mean``
    [P], with ``var_one`` [P] the exact variance of one estimate."""
    m = estimates.shape[0]
    return ((estimates.mean(0) - mean) / torch.sqrt(var_one / m)).abs()


def estimator_variance(grads, probs, weights_of, b):
    """Exact per-coordinate variance of (1/b) sum_k w_k grad_k, k iid ~ probs."""
    terms = weights_of[:, None] * grads
    mean = (probs[:, None] * terms).sum(0)
    return ((probs[:, None] * terms * terms).sum(0) - mean * mean) / b, mean


def feed(sampler, scores_of, steps, model=None, inputs=None):
    """Runs ``steps`` steps of the protocol with scores ``scores_of[idx]`` (no training)."""
    log = []
    it = forever(sampler)
    for _ in range(steps):
        idx = next(it)
        x = inputs[idx] if inputs is not None else scores_of[idx][:, None]
        xs, _, w = sampler.select(model or (lambda t: t), x, None)
        sampler.update(scores_of[sampler.last_indices])
        log.append((idx, sampler.last_indices.tolist(), w, sampler.tau))
    return log


def identity_sampler(n, b, **kw):
    """A sampler whose 'model' is the identity and whose score is the input's column 0."""
    return ImportanceSampler(n, b, score_fn=lambda out, y: out[:, 0], **kw)


# --------------------------------------------------------------------------------------
# the switch


def test_compute_tau_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    for scores in [
        torch.rand(7, generator=g),
        torch.rand(384, generator=g) ** 8,
        torch.tensor([0.0, 0.0, 3.0, 1e-30]),
        torch.tensor([5.0]),
    ]:
        s = scores.double()
        gn = s / s.sum()
        u = 1.0 / s.shape[0]
        ref = (
            1.0 / math.sqrt(1.0 - float(((gn - u) ** 2).sum() / (gn**2).sum()))
            if s.shape[0] > 1
            else 1.0
        )
        assert float(compute_tau(scores)) == pytest.approx(ref, rel=1e-9)
    assert float(compute_tau(torch.ones(10))) == pytest.approx(1.0)
    assert float(compute_tau(torch.zeros(10))) == 1.0  # all-zero: uniform
    assert float(compute_tau(torch.eye(16)[3])) == pytest.approx(4.0)  # sqrt(|U|)
    assert compute_tau(torch.rand(5)).dtype == torch.float64
    assert default_tau_th(32, 96) == 2.0


def test_equal_scores_keep_it_off():
    s = identity_sampler(400, 8, seed=0)
    log = feed(s, torch.full((400,), 0.3), 60)
    assert all(len(idx) == 8 for idx, *_ in log)
    assert s.tau == pytest.approx(1.0 - 0.9**60, rel=1e-9)
    assert not s.is_active and s.steps_importance == 0 and s.steps_uniform == 60


@pytest.mark.parametrize("tau_th, b", [(None, 8), (3.5, 32)])
def test_skewed_scores_switch_on_after_the_smoothing_delay(tau_th, b):
    n = 960
    # u^100: in any batch one or two examples hold nearly all the score
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = scores**100
    s = ImportanceSampler(n, b, tau_th=tau_th, seed=1, score_fn=lambda out, y: out[:, 0])
    th = 2.0 if tau_th is None else tau_th
    assert s.tau_th == th
    tau, switched = 0.0, None
    it = forever(s)
    for step in range(40):
        idx = next(it)
        if len(idx) == s.presample_size:
            switched = step
            break
        assert len(idx) == b
        s.select(lambda t: t, scores[idx][:, None], None)
        # off: tau follows the recursion on the training batch's own scores
        g = scores[idx]
        s.update(g)
        tau = 0.9 * tau + 0.1 * float(compute_tau(g))
        assert s.tau == pytest.approx(tau, rel=1e-12)
        assert s.is_active == (tau > th)
    assert switched is not None
    # the switch comes exactly when the recursion crosses tau_th, not before
    assert tau > th and s.stats()["steps_uniform"] == switched
    # on: tau follows the recursion on the presample's scores (update() is then a no-op)
    s.select(lambda t: t, scores[idx][:, None], None)
    tau = 0.9 * tau + 0.1 * float(compute_tau(scores[idx]))
    assert s.tau == pytest.approx(tau, rel=1e-12)
    s.update(torch.full((b,), float("nan")))
    assert s.tau == pytest.approx(tau, rel=1e-12)


def test_switch_delay_with_constant_tau_new():
    """With tau_new = c every step, tau_t = c (1 - 0.9^t): on at the first t with tau_t > th."""
    n, b = 64, 4
    s = ImportanceSampler(n, b, seed=0, score_fn=lambda out, y: out[:, 0])
    g = torch.tensor([1.0, 0.0, 0.0, 0.0])  # tau_new = 2 for every batch of 4
    c = 2.0
    th = 1.5
    s.tau_th = th  # override after construction is allowed (a plain attribute)
    expected = next(t for t in range(1, 100) if c * (1 - 0.9**t) > th)
    it = forever(s)
    for t in range(expected):
        idx = next(it)
        assert len(idx) == b, f"switched on at step {t} before the delay {expected}"
        s.select(lambda z: z, torch.zeros(b, 1), None)
        s.update(g)
    assert len(next(it)) == s.presample_size
    assert s.tau == pytest.approx(c * (1 - 0.9**expected))


def test_tau_th_inf_never_switches_and_negative_always():
    scores = torch.zeros(100)
    scores[0] = 1.0
    off = identity_sampler(100, 4, tau_th=float("inf"), seed=0)
    feed(off, scores, 30)
    assert off.steps_importance == 0
    on = identity_sampler(100, 4, tau_th=-1.0, seed=0)
    log = feed(on, scores, 5)
    assert on.steps_uniform == 0 and all(len(idx) == 12 for idx, *_ in log)


# --------------------------------------------------------------------------------------
# unbiasedness


def skewed_scores(n):
    """Scores spread over 30x (geometric), so some examples are rarely drawn: a draw that
    over- or under-samples them while weighting as if it did not shows in their counts."""
    return torch.logspace(math.log10(0.1), math.log10(3.0), n, dtype=torch.float64)


def item_z(weighted, steps, p, per_step):
    """|z| per example of the mean weighted count against its expectation 1.

    ``weighted[i]`` is the sum over ``steps`` steps of ``scale * sum_k w_k [sel_k = i]``,
    with ``per_step`` = ``(scale, b)``: ``b`` iid draws a step from ``p``, so that the exact
    variance of one step's count is ``(1 - p_i) / (b p_i)`` when ``w = 1 / (scale b p)``.
    """
    _, b = per_step
    var = (1 - p) / (b * p * steps)
    return ((weighted / steps - 1.0) / var.sqrt()).abs()


# steps of the Monte-Carlo tests: the Triton path runs under the interpreter (slow)
MC_STEPS = {"torch": 4000, "triton": 300}


def test_importance_sampler_is_unbiased_item_by_item(backend):
    """N = B: each presample is the whole data set, and each example's weighted count,
    ``(B / b) sum_k w_k [sel_k = i]``, must average 1 per presample, example by example
    (the tolerance is the exact standard error; without the weights the counts are far
    off, so the test has power)."""
    n, b, steps = 16, 8, MC_STEPS[backend]
    scores = skewed_scores(n)
    g = scores / scores.sum()
    s = identity_sampler(n, b, presample_size=n, tau_th=-1.0, seed=0)
    weighted = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    it = forever(s)
    for _ in range(steps):
        idx = next(it)
        xs, _, w = s.select(lambda t: t, scores[idx][:, None].float(), None)
        sel = s.last_indices
        assert torch.equal(xs[:, 0], scores[sel].float())  # the rows match the indices
        weighted.index_add_(0, sel, w.double() * n / b)
        hits.index_add_(0, sel, torch.full((b,), n / b, dtype=torch.float64))
        s.update(torch.zeros(b))
    z = item_z(weighted, steps, g, (n / b, b))
    plain = item_z(hits, steps, torch.full((n,), 1.0 / n, dtype=torch.float64), (n / b, b))
    print(
        f"\nImportanceSampler ({backend}, {steps} steps): max |z| {z.max():.2f} over {n} "
        f"examples (unweighted: {plain.max():.1f})"
    )
    assert z.max() < Z_MAX, z
    assert plain.max() > 2 * Z_MAX  # the draws are skewed: unit weights would be biased
    st = s.stats()
    var_w = (1.0 / (n * n * g)).sum() - 1.0  # of one weight 1 / (B g_sel), E = 1
    assert st["steps_importance"] == steps
    assert abs(st["mean_weight"] - 1.0) < Z_MAX * math.sqrt(var_w / (steps * b))


def test_weights_are_inverse_presample_probabilities(backend):
    """On each backend (the Triton kernels under the interpreter without a GPU): the weight
    of a selected example is 1 / (B g_i) with g its share of the presample's scores, and an
    example scored 0 is never selected."""
    scores = torch.rand(36, generator=torch.Generator().manual_seed(0))
    scores[::3] = 0.0
    s = identity_sampler(36, 4, presample_size=12, tau_th=-1, seed=0)
    for idx, sel, w, _ in feed(s, scores, 3):
        g = scores[idx] / scores[idx].sum()
        pos = [idx.index(i) for i in sel]
        assert all(scores[i] > 0 for i in sel)
        assert torch.allclose(w, 1.0 / (12 * g[pos]), rtol=1e-5)


def test_history_sampler_is_unbiased_item_by_item(backend):
    """Each example's weighted count ``(N / b) sum_k w_k [sel_k = i]`` averages 1 per step,
    example by example, and every weight is exactly ``1 / (N p_i)`` for the table's
    ``p = (1 - a) s / sum(s) + a / N`` (float64 oracle; the weights are float32)."""
    n, b, a = 16, 8, 0.1
    steps = MC_STEPS[backend]
    k = 1 if backend == "torch" else 20  # table builds under the interpreter are slow
    scores = skewed_scores(n).float()
    s = HistorySampler(n, b, uniform_mix=a, seed=4, rebuild_every=k)
    it = forever(s)

    def step():
        next(it)
        _, _, w = s.select(None, torch.zeros(b, 1), None)
        sel = s.last_indices
        s.update(scores[sel])
        return w, sel

    # warm-up: every example scored, then two table periods (a table lags one period)
    while s.stats()["seen_fraction"] < 1.0:
        step()
    for _ in range(2 * k + 1 - s.steps % k):
        step()
    sf = scores.double()
    p = (1 - a) * sf / sf.sum() + a / n
    weighted = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        w, sel = step()
        torch.testing.assert_close(w, (1.0 / (n * p[sel])).float(), rtol=2e-7, atol=0)
        weighted.index_add_(0, sel, w.double() * n / b)
    z = item_z(weighted, steps, p, (n / b, b))
    print(f"\nHistorySampler ({backend}, {steps} steps): max |z| {z.max():.2f} over {n} examples")
    assert z.max() < Z_MAX, z
    assert s.stats()["max_weight"] <= 1.0 / a + 1e-5


# --------------------------------------------------------------------------------------
# a short real training run


def noisy_blobs(n=1200, d=16, c=8, noise=0.06, seed=0):
    """Separable Gaussian blobs with a few flipped labels: most examples are learned fast,
    the flipped ones keep a large gradient, so the scores become skewed."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, torch.randint(0, c, (n,), generator=g), y)
    return x, y


def train_step(sampler, model, opt, x, y):
    """One step of the documented protocol: select, weighted loss, update, SGD step."""
    xs, ys, w = sampler.select(model, x, y)
    loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
    sampler.update(g)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_training_switches_on_and_loss_falls(device):
    torch.manual_seed(0)
    x, y = noisy_blobs()
    x, y = x.to(device), y.to(device)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = ImportanceSampler(len(x), 32, seed=0)

    def full_loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    before, first_on, taus = full_loss(), None, []
    for _epoch in range(3):
        for idx in s:
            train_step(s, model, opt, x[idx], y[idx])
            taus.append(s.tau)
            if first_on is None and s.is_active:
                first_on = s.steps
    after = full_loss()
    st = s.stats()
    print(
        f"\nswitched on after step {first_on}; tau at 10/first_on/end: {taus[9]:.3f}/"
        f"{taus[first_on - 1]:.3f}/{taus[-1]:.3f}; loss {before:.3f} -> {after:.3f}; {st}"
    )
    assert first_on is not None and st["steps_importance"] > 0 and st["steps_uniform"] > 0
    assert after < 0.5 * before
    assert st["invalid_score_steps"] == 0 and st["missing_updates"] == 0
    assert 0.5 < st["mean_weight"] < 2.0


# --------------------------------------------------------------------------------------
# resume


def train_steps(sampler, model, opt, x, y, steps, loader):
    """Runs ``steps`` training steps; logs (data set indices, weights) per step."""
    log = []
    for _ in range(steps):
        idx = next(loader)
        xs, ys, w = sampler.select(model, x[idx], y[idx])
        loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
        sampler.update(g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append((sampler.last_indices.tolist(), w.clone()))
    return log


def fresh(kind, x, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    if kind == "importance":
        s = ImportanceSampler(len(x), 16, seed=7, tau_th=1.3)
    else:
        s = HistorySampler(len(x), 16, seed=7, rebuild_every=3)
    return model, opt, s


@pytest.mark.parametrize("kind", ["importance", "history"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_continues_exactly(kind, prefetch, tmp_path):
    x, y = noisy_blobs(n=200)
    total, cut = 40, 17  # crosses an epoch (13 steps) and, for importance, the switch
    model, opt, s = fresh(kind, x)
    ref = train_steps(s, model, opt, x, y, total, Prefetcher(s, prefetch))
    ref_params = [p.detach().clone() for p in model.parameters()]
    if kind == "importance":
        assert 0 < s.steps_importance < total  # the run does switch

    model, opt, s = fresh(kind, x)
    first = train_steps(s, model, opt, x, y, cut, Prefetcher(s, prefetch))
    torch.save(
        {"sampler": s.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()},
        tmp_path / "ckpt.pt",
    )
    del model, opt, s
    model, opt, s = fresh(kind, x, seed=123)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    s.load_state_dict(ckpt["sampler"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    rest = train_steps(s, model, opt, x, y, total - cut, Prefetcher(s, prefetch))
    got = first + rest
    for t, ((i_ref, w_ref), (i_got, w_got)) in enumerate(zip(ref, got, strict=True)):
        assert i_ref == i_got, f"indices differ at step {t}"
        assert torch.equal(w_ref, w_got), f"weights differ at step {t}"
    for p, q in zip(ref_params, model.parameters(), strict=True):
        assert torch.equal(p, q.detach())


def test_stream_is_a_permutation_per_pass_and_batches_never_straddle():
    s = identity_sampler(50, 4, tau_th=-1, seed=0)  # presamples of 12: 4 per pass of 50
    log = feed(s, torch.rand(50), 8)
    passes = [sum((idx for idx, *_ in log[k : k + 4]), []) for k in (0, 4)]
    for p in passes:
        assert len(p) == 48 and len(set(p)) == 48  # distinct; the last 2 of the pass skipped
    assert passes[0] != passes[1]  # a new permutation per pass


def test_resume_at_epoch_end_starts_a_new_epoch():
    s = identity_sampler(40, 4, seed=0)
    scores = torch.rand(40)
    feed(s, scores, len(s))  # one whole epoch, iterator exhausted
    t = ImportanceSampler(40, 4, seed=0, score_fn=lambda out, y: out[:, 0])
    t.load_state_dict(s.state_dict())
    assert len(list(iter(t))) == len(t) == 10


# --------------------------------------------------------------------------------------
# DataLoader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batch_sampler(num_workers):
    x, y = noisy_blobs(n=240)
    ds = TensorDataset(x, y)
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    s = ImportanceSampler(ds, 12, seed=0, tau_th=1.2)
    loader = DataLoader(ds, batch_sampler=s, num_workers=num_workers)
    sizes = []
    for _epoch in range(2):
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
    assert 36 in sizes and 12 in sizes  # both modes came through the loader
    h = HistorySampler(ds, 12, seed=0)
    for xb, yb in DataLoader(ds, batch_sampler=h, num_workers=num_workers):
        xs, ys, w = h.select(None, xb, yb)
        h.update(fastis.score(model(xs), ys))
    assert h.stats()["steps"] == len(h) == 20


def test_dataloader_with_workers_resumes_exactly(tmp_path):
    """A real prefetching DataLoader (1 worker, 2 batches in flight): the batches drawn
    but not trained at the checkpoint are replayed, and later decisions see the same tau."""
    x, y = noisy_blobs(n=160)
    ds = TensorDataset(x, y)

    def run(steps, state=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8)
        s = ImportanceSampler(ds, 8, seed=1, tau_th=1.2)
        if state is not None:
            s.load_state_dict(state["sampler"])
            model.load_state_dict(state["model"])
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        loader = DataLoader(ds, batch_sampler=s, num_workers=1, prefetch_factor=2)
        log = []
        while len(log) < steps:
            for xb, yb in loader:
                xs, ys, w = s.select(model, xb, yb)
                loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
                s.update(g)
                opt.zero_grad()
                loss.backward()
                opt.step()
                log.append((s.last_indices.tolist(), len(xb)))
                if len(log) == steps:
                    return log, {"sampler": s.state_dict(), "model": model.state_dict()}
        return log, None

    ref, _ = run(45)  # 20 steps per epoch: crosses two epochs
    first, state = run(13)
    rest, _ = run(45 - 13, state)
    assert first + rest == ref
    assert {n for _, n in ref} == {8, 24}  # both modes


@pytest.mark.parametrize("kind", ["importance", "history"])
def test_copy_mid_run_continues_identically(kind):
    # deepcopy / pickle (what frameworks do to samplers) keep the stream, the pending
    # batches, tau and the draw generator: the copy and the original go on alike
    torch.manual_seed(0)
    x, y = noisy_blobs()
    model = torch.nn.Linear(16, 8)
    make = (
        (lambda: ImportanceSampler(len(x), 32, seed=0, tau_th=-1.0))
        if kind == "importance"
        else (lambda: HistorySampler(len(x), 32, seed=0, rebuild_every=3))
    )
    original = make()
    batches = iter(original)
    for _ in range(5):
        idx = next(batches)
        xs, ys, w = original.select(model, x[idx], y[idx])
        original.update(fastis.score(model(xs), ys))
    pending = next(batches)  # yielded, not yet selected: travels with the copy
    copy_ = pickle.loads(pickle.dumps(copy.deepcopy(original)))
    for sampler in (original, copy_):
        xs, ys, w = sampler.select(model, x[pending], y[pending])
        sampler.update(fastis.score(model(xs), ys))
    assert torch.equal(original.last_indices, copy_.last_indices)
    assert [next(iter(original)) for _ in range(3)] == [next(iter(copy_)) for _ in range(3)]
    assert repr(original.stats()) == repr(copy_.stats())  # repr: NaN == NaN


def test_iterator_abandoned_then_restarted():
    s = identity_sampler(40, 4, seed=0)
    it = forever(s)
    stale = [next(it), next(it)]  # drawn, never selected
    it2 = iter(s)
    idx = next(it2)
    s.select(lambda t: t, torch.rand(len(idx), 1), None)  # the stale batches were dropped
    assert s.last_indices.tolist() == idx and idx not in stale
    s.update(torch.rand(4))
    with pytest.raises(RuntimeError, match="no batch"):  # nothing else is queued
        s.select(lambda t: t, torch.rand(4, 1), None)


# --------------------------------------------------------------------------------------
# scores: custom functions, chunks, bad values


def test_chunked_scoring_matches_unchunked():
    x, y, model, _ = linear_problem(48)
    outs = []
    for chunk in (None, 7):
        s = ImportanceSampler(48, 4, tau_th=-1, chunk_size=chunk, seed=2)
        log = []
        for _, idx in zip(range(5), s, strict=False):
            xs, ys, w = s.select(model, x[idx], y[idx])
            s.update(torch.ones(4))
            log.append((s.last_indices.tolist(), w))
        outs.append(log)
    for (ia, wa), (ib, wb) in zip(*outs, strict=True):
        assert ia == ib and torch.allclose(wa, wb)


def test_scoring_uses_eval_mode_and_restores_training():
    modes = []

    class Probe(torch.nn.Module):
        def forward(self, t):
            modes.append(self.training)
            return t

    probe = Probe().train()
    s = identity_sampler(30, 2, tau_th=-1, seed=0)
    idx = next(iter(s))
    s.select(probe, torch.rand(len(idx), 1), None)
    assert modes == [False] and probe.training


def test_custom_score_fn_features_and_regression():
    torch.manual_seed(0)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    body, head = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)

    def model(t):
        h = body(t)
        return h, head(h)

    s = ImportanceSampler(
        30, 3, tau_th=-1, seed=0, score_fn=lambda out, t: fastis.score(out[1], t, features=out[0])
    )
    idx = next(iter(s))
    xs, ys, w = s.select(model, x[idx], y[idx])
    assert xs.shape == (3, 5) and w.shape == (3,)
    r = ImportanceSampler(
        30, 3, tau_th=-1, seed=0, score_fn=lambda out, t: 2 * (out - t).flatten(1).norm(dim=1)
    )
    idx = next(iter(r))
    xs, ys, w = r.select(lambda t: t * 2, x[idx], x[idx])
    assert ys.shape == (3, 5)
    d = ImportanceSampler(30, 3, tau_th=-1, seed=0, score_fn=lambda out, t: out.norm(dim=1) + 0.1)
    idx = next(iter(d))
    batch, tgt, w = d.select(lambda b: b["a"], {"a": x[idx], "b": y[idx]}, None)
    assert set(batch) == {"a", "b"} and batch["a"].shape == (3, 5) and tgt is None


@pytest.mark.parametrize("bad", ["nan", "inf", "negative"])
def test_invalid_scores_fall_back_to_uniform_and_count(bad, device):
    value = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[bad]

    calls = []

    def score_fn(out, t):  # a bad score in the first call only
        s = out[:, 0].clone()
        if not calls:
            s[1] = value
        calls.append(1)
        return s

    s = ImportanceSampler(30, 3, tau_th=-1, seed=0, score_fn=score_fn)
    it = forever(s)
    idx = next(it)
    xs, _, w = s.select(lambda t: t, torch.rand(len(idx), 1, device=device) + 0.5, None)
    assert torch.equal(w.cpu(), torch.ones(3))  # uniform among the presample, unit weights
    s.update(torch.rand(3, device=device))
    st = s.stats()
    assert st["invalid_score_steps"] == 1 and st["tau"] == 0.0 and math.isnan(st["tau_new"])
    idx = next(it)  # the next step is normal
    s.select(lambda t: t, torch.rand(len(idx), 1, device=device) + 0.5, None)
    assert s.stats()["tau"] > 0


def test_all_zero_scores_select_uniformly():
    s = identity_sampler(30, 3, tau_th=-1, seed=0)
    idx = next(iter(s))
    _, _, w = s.select(lambda t: t, torch.zeros(len(idx), 1), None)
    assert torch.equal(w, torch.ones(3))
    st = s.stats()
    assert st["zero_score_steps"] == 1 and st["invalid_score_steps"] == 0
    assert st["tau"] == pytest.approx(0.1)  # tau_new = 1 for all-zero scores


@pytest.mark.parametrize(
    "result, err, match",
    [
        (lambda out: out[:, 0][:-1], ValueError, "shape"),
        (lambda out: out, ValueError, "shape"),
        (lambda out: out[:, 0].long(), TypeError, "floating"),
        (lambda out: [1.0] * len(out), TypeError, "tensor"),
    ],
)
def test_score_fn_with_wrong_result_raises(result, err, match):
    s = ImportanceSampler(30, 3, tau_th=-1, seed=0, score_fn=lambda out, t: result(out))
    idx = next(iter(s))
    with pytest.raises(err, match=match):
        s.select(lambda t: t, torch.rand(len(idx), 2), None)


def test_history_sampler_scores_unseen_examples_and_table_lag():
    """The table of draws jk.. is built from the history after (j - 1) k updates: with
    k = 1, step t's weights come from the scores of steps < t - 1 (tables 0 and 1 are
    uniform); never-seen and NaN-scored examples count at the maximum score."""
    n, a = 20, 0.2
    s = HistorySampler(n, 4, uniform_mix=a, seed=0, rebuild_every=1)
    it = forever(s)
    first = next(it)
    _, _, w = s.select(None, torch.zeros(4, 1), None)
    assert torch.equal(w, torch.ones(4))
    value = {i: 0.1 * (i + 1) for i in first}
    value[first[1]] = float("nan")
    s.update(torch.tensor([value[i] for i in first]))
    next(it)
    _, _, w = s.select(None, torch.zeros(4, 1), None)
    assert torch.equal(w, torch.ones(4))  # table 1: still from no update at all
    s.update(torch.full((4,), 7.0))  # too late for table 2
    next(it)
    _, _, w = s.select(None, torch.zeros(4, 1), None)
    seen = {i: v for i, v in value.items() if not math.isnan(v)}
    top = max(seen.values())
    raw = torch.tensor([seen.get(i, top) for i in range(n)], dtype=torch.float64)
    p = (1 - a) * raw / raw.sum() + a / n
    torch.testing.assert_close(w, (1.0 / (n * p[s.last_indices])).float())
    st = s.stats()
    assert st["invalid_scores"] == first.count(first[1])
    assert st["tau"] == pytest.approx(float(compute_tau(p)))


# --------------------------------------------------------------------------------------
# the protocol and bad input


def test_protocol_errors_and_missing_update_warning():
    s = identity_sampler(30, 3, seed=0)
    with pytest.raises(RuntimeError, match="no batch"):
        s.select(lambda t: t, torch.rand(3, 1), None)
    it = forever(s)
    next(it)
    with pytest.raises(RuntimeError, match="update"):
        s.update(torch.rand(3))
    with pytest.raises(ValueError, match="rows"):
        s.select(lambda t: t, torch.rand(5, 1), None)
    s.select(lambda t: t, torch.rand(3, 1), None)
    with pytest.raises(ValueError, match="shape"):
        s.update(torch.rand(4))
    next(it)
    with pytest.warns(UserWarning, match="update"):
        s.select(lambda t: t, torch.rand(3, 1), None)
    assert s.stats()["missing_updates"] == 1
    s.update(torch.rand(3))
    with pytest.raises(RuntimeError, match="once per step"):
        s.update(torch.rand(3))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(data_source=10, batch_size=4), ValueError, "fewer than presample_size=12"),
        (
            dict(data_source=list(range(20)), batch_size=8, presample_size=4),
            ValueError,
            "presample_size must be >= batch_size=8",
        ),
        (dict(data_source=100, batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
        (dict(data_source=100, batch_size=-3), ValueError, "batch_size"),
        (dict(data_source=100, batch_size=4, presample_size=0), ValueError, "presample_size"),
        (dict(data_source=0, batch_size=4), ValueError, "data_source"),
        (dict(data_source=[], batch_size=4), ValueError, "data_source"),
        (dict(data_source=100, batch_size=2.0), TypeError, "batch_size must be an int"),
        (dict(data_source=100, batch_size=True), TypeError, "batch_size"),
        (dict(data_source=object(), batch_size=4), TypeError, "data_source"),
        (dict(data_source=100, batch_size=4, a_tau=1.0), ValueError, "a_tau"),
        (dict(data_source=100, batch_size=4, tau_th=float("nan")), ValueError, "tau_th"),
        (dict(data_source=100, batch_size=4, tau_th="2"), TypeError, "tau_th"),
        (dict(data_source=100, batch_size=4, chunk_size=0), ValueError, "chunk_size"),
        (dict(data_source=100, batch_size=4, score_fn=3), TypeError, "score_fn"),
        (dict(data_source=100, batch_size=4, seed=-1), ValueError, "seed"),
        (dict(data_source=100, batch_size=4, num_replicas=2, rank=2, seed=0), ValueError, "rank"),
        (
            dict(data_source=100, batch_size=4, num_replicas=2, rank=0, seed=0),
            ValueError,
            "process group",
        ),
    ],
)
def test_importance_sampler_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        ImportanceSampler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(data_source=100, batch_size=0), ValueError, "batch_size"),
        (dict(data_source=100, batch_size=4, uniform_mix=0.0), ValueError, "uniform_mix"),
        (dict(data_source=100, batch_size=4, uniform_mix=1.5), ValueError, "uniform_mix"),
        (dict(data_source=100, batch_size=4, rebuild_every=0), ValueError, "rebuild_every"),
        (dict(data_source=100, batch_size=4, num_replicas=3, rank=1), ValueError, "seed"),
    ],
)
def test_history_sampler_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        HistorySampler(**kwargs)


def test_history_sampler_rebuilds_every_k_draws():
    s = HistorySampler(100, 4, rebuild_every=3, seed=0)
    feed_history(s, 7)
    assert s.stats()["rebuilds"] == 3  # before draws 0, 3 and 6


def feed_history(s, steps):
    it = forever(s)
    for _ in range(steps):
        next(it)
        s.select(None, torch.zeros(s.batch_size, 1), None)
        s.update(torch.rand(s.batch_size))


def test_history_sampler_shards_without_process_group():
    shards = [HistorySampler(11, 2, num_replicas=3, rank=r, seed=0) for r in range(3)]
    owned = [{0, 3, 6, 9}, {1, 4, 7, 10}, {2, 5, 8, 0}]  # the last pads by wrapping
    for r, s in enumerate(shards):
        assert len(s) == 2  # ceil(ceil(11 / 3) / 2)
        for _epoch in range(3):
            for idx in s:
                assert set(idx) <= owned[r]
                s.select(None, torch.zeros(2, 1), None)
                s.update(torch.ones(2))


def test_load_state_dict_checks_the_configuration():
    s = ImportanceSampler(100, 4, seed=0)
    state = s.state_dict()
    for other in [
        ImportanceSampler(101, 4, seed=0),
        ImportanceSampler(100, 5, seed=0),
        ImportanceSampler(100, 4, seed=1),
        ImportanceSampler(100, 4, seed=0, tau_th=3.0),
    ]:
        with pytest.raises(ValueError, match="another configuration"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="HistorySampler"):
        HistorySampler(100, 4, seed=0).load_state_dict(state)
    with pytest.raises(TypeError, match="dict"):
        s.load_state_dict([1])
    bad = dict(state, version=99)
    with pytest.raises(ValueError, match="version"):
        s.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"missing \['cursor'\]"):
        s.load_state_dict({k: v for k, v in state.items() if k != "cursor"})
    with pytest.raises(ValueError, match="cursor"):
        s.load_state_dict(dict(state, cursor=1000))
    h = HistorySampler(100, 4, seed=0)
    with pytest.raises(ValueError, match="uniform_mix"):
        HistorySampler(100, 4, seed=0, uniform_mix=0.3).load_state_dict(h.state_dict())


def test_seed_none_uses_torch_default_generator():
    torch.manual_seed(5)
    a = ImportanceSampler(50, 4)
    torch.manual_seed(5)
    b = ImportanceSampler(50, 4)
    assert a.seed == b.seed and next(iter(a)) == next(iter(b))


def test_repr_and_len():
    s = ImportanceSampler(TensorDataset(torch.zeros(50, 1)), 8, seed=0)
    assert len(s) == 6 and "presample_size=24" in repr(s)
    assert "HistorySampler(" in repr(HistorySampler(50, 8, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.stats()["steps"] == 0 and math.isnan(s.stats()["mean_weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no-sync check)")
@pytest.mark.parametrize("tau_th", [-1.0, float("inf")])  # always on / always off
def test_cuda_steps_do_not_synchronise(tau_th):
    # the hot path (draw the indices, select, cross-entropy, update, backward, step) makes no
    # implicit synchronisation; the on/off decision waits on an event (not flagged, and
    # only for the work queued up to the last tau update)
    torch.manual_seed(0)
    x, y = torch.randn(4096, 16, device="cuda"), torch.randint(0, 5, (4096,), device="cuda")
    model = torch.nn.Linear(16, 5).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ImportanceSampler(4096, 32, presample_size=96, tau_th=tau_th, seed=0)
    batches = iter(sampler)

    def step():
        idx = torch.as_tensor(next(batches)).to("cuda", non_blocking=True)
        train_step(sampler, model, opt, x[idx], y[idx])

    for _ in range(3):  # first steps move the sampler's state to the GPU
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = sampler.stats()
    assert stats["steps"] == 8
    assert stats["steps_importance"] == (8 if tau_th < 0 else 0)
    clone = copy.deepcopy(sampler)  # the CUDA event is dropped, not copied
    step()
    batches = iter(clone)
    sampler = clone
    step()
    assert clone.stats()["steps"] == 9
