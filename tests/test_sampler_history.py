"""fastis.HistorySampler's stable mode (``max_staleness``): the draws against a float64
oracle of the intended probabilities, unbiasedness, the staleness bound, resume and bad
arguments."""

import io
import math

import pytest
import torch
from sampler_helpers import forever

from fastis import HistorySampler

pytestmark = pytest.mark.usefixtures("one_thread")

N, B, A, K, L = 30, 3, 0.1, 2, 7


def base_scores(n=N, seed=0):
    """Scores spread over two decades: the low ones are drawn rarely and go stale."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * math.log(100.0))


def score_at(base, idx, step):
    """The score the training forward of ``step`` returns for examples ``idx`` (a drift,
    so that old scores are wrong; a function of (example, step), so duplicates agree)."""
    i = torch.as_tensor(idx, dtype=torch.float64)
    return base[idx] * (1.0 + 0.5 * torch.sin(step / 40.0 + i))


def run(sampler, steps, base, log=None):
    """``steps`` steps of the protocol; appends (step, positions, weights, scores) to log."""
    log = [] if log is None else log
    it = forever(sampler)
    for _ in range(steps):
        next(it)
        _, _, w = sampler.select(None, torch.zeros(sampler.batch_size, 1), None)
        sel = sampler.last_indices
        s = score_at(base, sel, sampler.steps)
        sampler.update(s.float())
        log.append((sampler.steps, sel.clone(), w.clone(), s.float().double()))
    return log


def intended(log, n=N, a=A, k=K, max_staleness=L):
    """float64 oracle of the probabilities of every draw ``d`` (0-based) of ``log``, from
    the log alone: table ``j = d // k`` is uniform for ``j <= 1``, else built from the
    scores of steps ``<= (j - 1) k``. Without a bound (``None``) an unscored example counts
    at the maximum score; with one, a score of step ``t`` is stale when ``(j + 1) k - 1 -
    t > max_staleness``, and stale or unscored examples count at the mean fresh score
    (times ``1 - 2^-20``, as the sampler does)."""
    score = torch.zeros(n, dtype=torch.float64)
    stamp = torch.zeros(n, dtype=torch.int64)
    out = []
    for j in range(-(-len(log) // k)):
        if j <= 1:
            p = torch.full((n,), 1.0 / n, dtype=torch.float64)
        else:
            for t, sel, _, s in log[(j - 2) * k : (j - 1) * k]:
                score[sel], stamp[sel] = s, t
            fresh = stamp > 0
            if max_staleness is None:
                top = score[fresh].max() if fresh.any() else 0.0
                fill = top if top > 0 else 1.0
            else:
                fresh &= stamp >= (j + 1) * k - 1 - max_staleness
                fill = score[fresh].mean() if fresh.any() else 1.0
            s = torch.where(fresh, score, fill)
            p = (1 - a) * s / s.sum() + a / n
        out += [p] * k
    return out[: len(log)]


def test_stable_draws_follow_the_intended_probabilities():
    """Every weight is ``1 / (N p_i)`` of the oracle's ``p`` with the staleness rule, the
    draws pass a chi-square test against the oracle's expected counts, and the rule
    matters here: the oracle without it disagrees with the weights."""
    steps = 1200
    base = base_scores()
    s = HistorySampler(N, B, uniform_mix=A, rebuild_every=K, max_staleness=L, seed=3)
    log = run(s, steps, base)
    counts = torch.zeros(N, dtype=torch.float64)
    expected = torch.zeros(N, dtype=torch.float64)
    differs = 0
    for (_, sel, w, _), p, free in zip(
        log, intended(log), intended(log, max_staleness=None), strict=True
    ):
        torch.testing.assert_close(w, (1.0 / (N * p[sel])).float(), rtol=2e-6, atol=0)
        differs += int(not torch.allclose(free[sel], p[sel], rtol=1e-3))
        counts.index_add_(0, sel, torch.ones(B, dtype=torch.float64))
        expected += B * p
    # draws are independent given the tables: Pearson's statistic, 29 degrees of freedom
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    print(f"\nstable mode: chi2 {chi2:.1f} (29 dof), {differs} draws differ without the bound")
    assert chi2 < 58.3  # the 0.999 quantile of chi2(29)
    assert differs > steps // 10  # stale scores are common in this run
    assert 0.0 < s.stats()["stale_fraction"] < 1.0


def test_stale_examples_get_weight_one_and_the_bound_is_what_does_it():
    """A drawn example whose latest score is more than ``L`` steps old at the draw gets
    weight 1 (it counts at the mean fresh score, so ``p_i = 1 / N``). Without the bound,
    such examples keep their low scores and get weights well above 1."""
    base = base_scores(seed=1)

    def stale_weights(max_staleness):
        s = HistorySampler(
            N, B, uniform_mix=A, rebuild_every=K, max_staleness=max_staleness, seed=5
        )
        log = run(s, 800, base)
        last = torch.zeros(N, dtype=torch.int64)
        out = []
        for d, (t, sel, w, _) in enumerate(log):
            age = d - last[sel]  # steps since the latest score, at draw d
            out.append(w[(last[sel] > 0) & (age > L)])
            last[sel] = t
        return torch.cat(out)

    bounded = stale_weights(L)
    assert bounded.numel() > 50
    torch.testing.assert_close(bounded, torch.ones_like(bounded), rtol=2e-6, atol=0)
    free = stale_weights(None)
    assert free.numel() > 50 and float(free.max()) > 3.0


def test_stable_mode_is_unbiased_and_fails_without_the_weights():
    """Monte Carlo: the mean over steps of the weighted batch mean of fixed per-example
    vectors ``g_i`` (norms correlated with the scores) matches ``mean(g)``; each step's
    estimate is unbiased given the past, so the z-score uses their empirical spread. The
    unweighted mean is far off."""
    steps, p_dim = 3000, 5
    base = base_scores(seed=2)
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(N, p_dim, generator=gen, dtype=torch.float64) * 3.0
    g += base[:, None] / 3.0  # a mean that sampling by score would bias
    truth = g.mean(0)
    s = HistorySampler(N, B, uniform_mix=A, rebuild_every=K, max_staleness=L, seed=11)
    log = run(s, steps, base)
    weighted = torch.stack([(w.double()[:, None] * g[sel]).mean(0) for _, sel, w, _ in log])
    plain = torch.stack([g[sel].mean(0) for _, sel, _, _ in log])

    def z(est):
        return ((est.mean(0) - truth) / (est.std(0) / math.sqrt(steps))).abs()

    print(f"\nweighted max|z| {z(weighted).max():.2f}, unweighted {z(plain).max():.1f}")
    assert z(weighted).max() < 3.5
    assert z(plain).max() > 6.0


@pytest.mark.parametrize("max_staleness", [None, 10**6])
def test_without_a_binding_bound_nothing_goes_stale(max_staleness):
    """The default (no bound) still draws by the maximum-score rule for unscored examples,
    and a bound longer than the run never marks a score stale (the same oracle, with the
    mean fill for unscored examples only)."""
    base = base_scores(seed=4)
    s = HistorySampler(N, B, uniform_mix=A, rebuild_every=K, max_staleness=max_staleness, seed=2)
    log = run(s, 80, base)
    for (_, sel, w, _), p in zip(log, intended(log, max_staleness=max_staleness), strict=True):
        torch.testing.assert_close(w, (1.0 / (N * p[sel])).float(), rtol=2e-6, atol=0)
    assert s.stats()["stale_fraction"] == 0.0


def test_resume_continues_the_same_draws():
    """Checkpointed mid-period with a batch yielded but not selected, saved through
    torch.save, and resumed in a new sampler: the same indices and weights as the
    uninterrupted run, and the same state at the end."""
    base = base_scores(seed=5)

    def make():
        return HistorySampler(N, B, rebuild_every=K, max_staleness=L, seed=9)

    full = make()
    ref = run(full, 70, base)
    part = make()
    first = run(part, 33, base)
    it = iter(part)
    next(it)  # yielded, not selected: replayed after the resume
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = run(resumed, 37, base)
    for (ta, sa, wa, _), (tb, sb, wb, _) in zip(ref, first + rest, strict=True):
        assert ta == tb and torch.equal(sa, sb) and torch.equal(wa, wb)
    sa, sb = full.state_dict(), resumed.state_dict()
    for key in ("history", "seen", "stamps", "stale", "generator"):
        assert torch.equal(sa[key], sb[key]), key
    assert full.stats() == resumed.stats()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(max_staleness=2), ValueError, r"max_staleness must be >= .*rebuild_every=2"),
        (dict(max_staleness=-1), ValueError, "max_staleness"),
        (dict(max_staleness=7.0), TypeError, "max_staleness"),
        (dict(max_staleness=True), TypeError, "max_staleness"),
        (dict(max_staleness="7"), TypeError, "max_staleness"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, err, match):
    with pytest.raises(err, match=match):
        HistorySampler(N, B, rebuild_every=K, seed=0, **kwargs)


def stable_state(steps=9):
    s = HistorySampler(N, B, rebuild_every=K, max_staleness=L, seed=0)
    run(s, steps, base_scores())
    return s.state_dict()


def with_(state, **changes):
    return dict(state, **changes)


CORRUPT = [
    (lambda st: {k: v for k, v in st.items() if k != "stamps"}, ValueError, "stamps"),
    (lambda st: with_(st, stamps=st["stamps"].int()), TypeError, "stamps"),
    (lambda st: with_(st, stamps=st["stamps"][:-1]), ValueError, "stamps"),
    (lambda st: with_(st, stamps=st["stamps"] + 100), ValueError, r"stamps.*steps=9"),
    (lambda st: with_(st, stamps=st["stamps"] * 0), ValueError, "stamps"),
    (lambda st: with_(st, stamps=-st["stamps"]), ValueError, "stamps"),
    (lambda st: with_(st, stale=torch.tensor(2.0, dtype=torch.float64)), ValueError, "stale"),
    (
        lambda st: with_(
            st, snapshots=[{k: v for k, v in x.items() if k != "stamps"} for x in st["snapshots"]]
        ),
        ValueError,
        "snapshot.*stamps",
    ),
]


@pytest.mark.parametrize("corrupt, err, match", CORRUPT)
def test_corrupt_stable_state_is_refused_and_leaves_the_sampler_unchanged(corrupt, err, match):
    state = stable_state()
    assert state["snapshots"], "the corruption of the snapshots needs one"
    s = HistorySampler(N, B, rebuild_every=K, max_staleness=L, seed=0)
    with pytest.raises(err, match=match):
        s.load_state_dict(corrupt(state))
    base = base_scores()
    fresh = HistorySampler(N, B, rebuild_every=K, max_staleness=L, seed=0)
    for x, y in zip(run(s, 6, base), run(fresh, 6, base), strict=True):
        assert torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])


def test_modes_do_not_load_each_others_state():
    stable = stable_state()
    plain = HistorySampler(N, B, rebuild_every=K, seed=0)
    with pytest.raises(ValueError, match="max_staleness"):
        plain.load_state_dict(stable)
    run(plain, 9, base_scores())
    with pytest.raises(ValueError, match="max_staleness"):
        HistorySampler(N, B, rebuild_every=K, max_staleness=L, seed=0).load_state_dict(
            plain.state_dict()
        )
    with pytest.raises(ValueError, match="max_staleness"):
        HistorySampler(N, B, rebuild_every=K, max_staleness=L + 1, seed=0).load_state_dict(stable)
    # a state saved before the option existed (no 'max_staleness' in its config) loads
    old = plain.state_dict()
    old["config"] = {k: v for k, v in old["config"].items() if k != "max_staleness"}
    HistorySampler(N, B, rebuild_every=K, seed=0).load_state_dict(old)
    assert "max_staleness=7" in repr(HistorySampler(N, B, rebuild_every=K, max_staleness=7))
