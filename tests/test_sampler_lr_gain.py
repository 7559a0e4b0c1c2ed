"""fastis.LRGain (AdaScale's gain while importance sampling is on): the rule, its estimate
of the noise share on synthetic gradients of known noise, the rates it applies (1.0
exactly when off, never above the cap, composed with the user's schedule), the sampler's
``variance_reduction``, resume, and bad arguments."""

import copy
import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from sampler_helpers import forever

import fastis
from fastis.sampling.lr_gain import adascale_gain
from fastis.sampling.noise import variance_reduction

pytestmark = pytest.mark.usefixtures("one_thread")

P = 64  # parameters of the synthetic problem


class Stub:
    """A sampler whose variance reduction the test sets per step."""

    variance_reduction = 1.0


class Synthetic:
    """Gradients ``g + noise`` with ``|g|^2 = grad2`` and noise ``sigma2 / rho`` per step
    (float64 draws from a fixed seed), fed to an SGD optimizer with an ``LRGain``; logs the
    rate each step ran with (read inside ``optimizer.step``, after the gain's hook)."""

    def __init__(
        self, *, sigma2, grad2=1.0, lr=0.1, seed=0, tensor_lr=False, measure_uniform=True, **kw
    ):
        self.gen = torch.Generator().manual_seed(seed)
        g = torch.randn(P, generator=self.gen, dtype=torch.float64)
        self.g = g * math.sqrt(grad2) / g.norm()
        self.sigma2 = sigma2
        self.p = torch.nn.Parameter(torch.zeros(P))
        rate = torch.tensor(lr) if tensor_lr else lr
        self.opt = torch.optim.SGD([self.p], lr=rate)
        self.sampler = Stub()
        self.gain = fastis.LRGain(self.opt, self.sampler, measure_uniform=measure_uniform, **kw)
        self.rates = []
        self.opt.register_step_pre_hook(
            lambda o, a, k: self.rates.append(float(o.param_groups[0]["lr"]))
        )

    def step(self, rho):
        self.sampler.variance_reduction = rho
        noise = torch.randn(P, generator=self.gen, dtype=torch.float64)
        self.p.grad = (self.g + noise * math.sqrt(self.sigma2 / (P * rho))).float()
        self.opt.step()
        return self.gain.gain


# --------------------------------------------------------------------------------------
# the rule


def test_adascale_gain_is_the_second_moment_ratio():
    for sigma2 in (0.0, 0.1, 1.0, 7.0, 1e6):
        for grad2 in (1e-6, 0.5, 1.0, 30.0):
            for scale in (1.0, 1.5, 3.0, 64.0):
                phi = sigma2 / (sigma2 + grad2)
                want = (sigma2 + grad2) / (sigma2 / scale + grad2)
                assert adascale_gain(phi, scale) == pytest.approx(want, rel=1e-12)


@given(
    phi=st.floats(0.0, 1.0),
    d_phi=st.floats(0.0, 1.0),
    scale=st.floats(1.0, 1e6),
    ratio=st.floats(1.0, 100.0),
)
def test_adascale_gain_is_bounded_and_monotone(phi, d_phi, scale, ratio):
    r = adascale_gain(phi, scale)
    assert 1.0 <= r <= scale * (1 + 1e-12)
    assert adascale_gain(min(1.0, phi + d_phi), scale) >= r  # more noise, more gain
    assert adascale_gain(phi, scale * ratio) >= r  # more reduction, more gain
    assert adascale_gain(0.0, scale) == 1.0  # step-limited: nothing to gain


# --------------------------------------------------------------------------------------
# the estimate and the rates, on synthetic gradients


@pytest.mark.parametrize("sigma2", [0.25, 1.0, 4.0])
def test_noise_share_estimate_matches_the_truth(sigma2):
    """``phi`` from consecutive gradients, uniform and importance steps mixed, against the
    true ``sigma^2 / (sigma^2 + |g|^2)`` (fixed seed; 3,000 steps, a_noise 0.995)."""
    s = Synthetic(sigma2=sigma2, a_noise=0.995, max_gain=100.0)
    for t in range(3000):
        s.step(1.0 if t % 3 else 2.5)
    assert s.gain.noise_share == pytest.approx(sigma2 / (sigma2 + 1.0), abs=0.06)


def test_off_is_exactly_one_and_leaves_the_rate_alone():
    s = Synthetic(sigma2=10.0, min_steps=1)
    for _ in range(50):
        assert s.step(1.0) == 1.0
    assert s.rates == [0.1] * 50  # the very float, never multiplied
    # a reduction at or below 1 (tau near 1) gains nothing either
    for rho in (0.5, 0.999, 1.0):
        assert s.step(rho) == 1.0
    assert s.rates[-3:] == [0.1] * 3


def test_gain_rises_with_the_reduction_and_never_passes_the_cap():
    s = Synthetic(sigma2=3.0, max_gain=2.5, min_steps=5)
    for _ in range(200):  # warm the estimate up on uniform steps
        s.step(1.0)
    phi = s.gain.noise_share
    assert 0.6 < phi < 0.9  # true 0.75
    gains = []
    for rho in (1.01, 1.2, 1.5, 2.0, 3.0, 10.0, 1e3):
        s.step(1.0)  # the estimate stays (almost) put between the probes
        g = s.step(rho)  # from phi as of the pairs read by this step's hook
        assert g == min(2.5, adascale_gain(s.gain.noise_share, rho))
        assert s.rates[-1] == pytest.approx(0.1 * g, rel=1e-12)
        assert s.opt.param_groups[0]["lr"] == 0.1  # put back after the step
        gains.append(g)
    assert all(1.0 < g <= 2.5 for g in gains)
    assert gains == sorted(gains) and gains[-1] == 2.5


def test_gain_follows_the_noise_share():
    """Noise-dominated gradients gain near the reduction; gradient-dominated ones near 1."""
    noisy, clean = Synthetic(sigma2=50.0, max_gain=8.0), Synthetic(sigma2=0.02, max_gain=8.0)
    for _ in range(300):
        noisy.step(1.0), clean.step(1.0)
    assert noisy.step(4.0) > 3.5
    assert 1.0 < clean.step(4.0) < 1.1


def test_uniform_steps_are_not_measured_by_default():
    """By default a uniform step costs nothing (no pair, no buffer) and breaks the pair:
    the pairs are consecutive importance steps only."""
    s = Synthetic(sigma2=3.0, measure_uniform=False, min_steps=2)
    for _ in range(20):
        assert s.step(1.0) == 1.0
    assert s.gain._count == 0 and s.gain._prev is None and s.gain._spare is None
    gains = [s.step(4.0) for _ in range(4)]  # pairs from the 2nd, read from the 3rd
    assert s.gain._count == 2 and gains[:3] == [1.0] * 3 and gains[3] > 1.0
    s.step(1.0)  # a uniform step in between: no pair across it
    s.step(4.0)
    assert s.gain._count == 3 and s.gain._pending is None  # the 4th pair read, none new
    s.step(4.0)
    assert s.gain._pending is not None


def test_min_steps_holds_the_gain_at_one():
    s = Synthetic(sigma2=100.0, min_steps=7)
    # step 1 has no previous gradient; the pair of step t is read at step t + 1
    gains = [s.step(4.0) for _ in range(9)]
    assert gains[:8] == [1.0] * 8 and gains[8] > 1.0


def test_composes_with_a_schedule_and_a_tensor_rate():
    """The schedule sees its own rates (get_last_lr, param_groups) with or without the
    gain; inside the step the rate is the schedule's times the gain."""

    def run(with_gain, tensor_lr):
        s = Synthetic(sigma2=5.0, min_steps=2, tensor_lr=tensor_lr, seed=3)
        if not with_gain:
            s.gain.remove()
        sched = torch.optim.lr_scheduler.StepLR(s.opt, step_size=4, gamma=0.5)
        out = []
        for t in range(20):
            s.step(3.0 if t % 2 else 1.0)
            sched.step()
            out.append((s.gain.gain, s.rates[-1], sched.get_last_lr()[0]))
        return out

    for tensor_lr in (False, True):
        plain, gained = run(False, tensor_lr), run(True, tensor_lr)
        assert [o[2] for o in plain] == [o[2] for o in gained]
        for t, (g, rate, _) in enumerate(gained):
            scheduled = plain[t][1]  # the schedule's rate for this step
            assert rate == pytest.approx(scheduled * g, rel=1e-6)
            if t % 2 == 0:  # a uniform step
                assert g == 1.0
        assert any(g > 1.0 for g, _, _ in gained)


def test_a_step_that_raises_does_not_compound_the_gain():
    s = Synthetic(sigma2=20.0, min_steps=1)
    for _ in range(20):
        s.step(1.0)
    s.opt.register_step_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        s.step(3.0)
    assert s.opt.param_groups[0]["lr"] > 0.1  # left scaled by the failed step ...
    s.gain.remove()  # ... until the next hook or remove() puts it back
    assert s.opt.param_groups[0]["lr"] == 0.1


# --------------------------------------------------------------------------------------
# with the sampler


def scored_sampler(**kw):
    scores = torch.rand(48, generator=torch.Generator().manual_seed(1)) ** 4 + 1e-3
    sampler = fastis.ImportanceSampler(48, 4, seed=0, score_fn=lambda o, y: o[:, 0], **kw)
    return sampler, scores


def test_sampler_variance_reduction_per_step():
    sampler, scores = scored_sampler(tau_th=1.3, a_tau=0.5)
    assert sampler.variance_reduction == 1.0
    seen = {True: 0, False: 0}
    for idx in itertools.islice(forever(sampler), 40):
        tau = sampler.tau  # what the decision of this batch read (no update since)
        _, _, w = sampler.select(lambda t: t, scores[idx][:, None], None)
        active = len(idx) == sampler.presample_size
        seen[active] += 1
        if active:
            want = variance_reduction(tau, 4, 4, sampler.presample_size, 1)
            assert sampler.variance_reduction == want
        else:
            assert sampler.variance_reduction == 1.0
        sampler.update(scores[sampler.last_indices])
    assert seen[True] and seen[False]


def noisy_rule(n):
    """``n`` examples of a linear rule in 5 features, 3 classes, a quarter of the labels
    random (so the scores spread as the fit goes on); from torch's global generator."""
    X = torch.randn(n, 5) * 3
    Y = (X @ torch.randn(5, 3)).argmax(1)
    Y[: n // 4] = torch.randint(0, 3, (n // 4,))
    return X, Y


def protocol_step(model, opt, sampler, X, Y, idx) -> None:
    """One step of the documented loop."""
    x, y, w = sampler.select(model, X[idx], Y[idx])
    loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
    sampler.update(g)
    opt.zero_grad()
    loss.backward()
    opt.step()


def train(sampler_kw, gain_kw, steps, *, state=None, stop=None):
    """A tiny linear classifier trained through the sampler, with or without a gain
    (``gain_kw`` None); ``state`` resumes from a checkpoint, ``stop`` returns one."""
    torch.manual_seed(0)
    X, Y = noisy_rule(48)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    sampler = fastis.ImportanceSampler(48, 4, presample_size=24, a_tau=0.5, seed=0, **sampler_kw)
    gain = None if gain_kw is None else fastis.LRGain(opt, sampler, **gain_kw)
    if state is not None:
        for obj, key in ((model, "model"), (opt, "opt"), (sampler, "sampler"), (gain, "gain")):
            obj.load_state_dict(state[key])
    gains = []
    for idx in itertools.islice(forever(sampler), steps - sampler.steps):
        protocol_step(model, opt, sampler, X, Y, idx)
        gains.append(None if gain is None else gain.gain)
        if sampler.steps == stop:
            objs = {"model": model, "opt": opt, "sampler": sampler, "gain": gain}
            return gains, {k: copy.deepcopy(o.state_dict()) for k, o in objs.items()}
    return gains, [p.detach().clone() for p in model.parameters()]


def test_sampler_off_trains_bit_for_bit_as_without_the_gain():
    kw = {"tau_th": math.inf}
    gains, params = train(kw, {"min_steps": 1}, 30)
    assert gains == [1.0] * 30
    _, plain = train(kw, None, 30)
    assert all(torch.equal(a, b) for a, b in zip(params, plain, strict=True))


def test_resume_applies_the_gains_of_the_uninterrupted_run():
    kw, gkw = {"tau_th": 1.0}, {"min_steps": 3, "max_gain": 3.0}
    gains, params = train(kw, gkw, 40)
    assert any(g > 1.0 for g in gains) and max(gains) <= 3.0
    first, state = train(kw, gkw, 40, stop=17)
    assert state["gain"]["pending"] is not None and state["gain"]["prev_grad"] is not None
    rest, resumed = train(kw, gkw, 40, state=state)
    assert first + rest == gains
    assert all(torch.equal(a, b) for a, b in zip(params, resumed, strict=True))


def test_resume_of_the_estimate_is_exact():
    """Mid-run, with a pair still unread and a noise share inside (0, 1): the resumed
    gains are the uninterrupted run's, bit for bit."""
    rhos = [1.0 if t % 3 else 2.0 for t in range(60)]
    whole = Synthetic(sigma2=1.5, min_steps=4)
    gains = [whole.step(r) for r in rhos]
    assert 0.2 < whole.gain.noise_share < 0.9 and len(set(gains)) > 10
    first = Synthetic(sigma2=1.5, min_steps=4)
    head = [first.step(r) for r in rhos[:25]]
    state, rng = copy.deepcopy(first.gain.state_dict()), first.gen.get_state()
    assert state["pending"] is not None and state["prev_grad"] is not None
    second = Synthetic(sigma2=1.5, min_steps=4)
    second.gen.set_state(rng)
    second.gain.load_state_dict(state)
    assert head + [second.step(r) for r in rhos[25:]] == gains


def forever_tensors(sampler):
    """``index_tensors()`` batches, pass after pass."""
    while True:
        yield from sampler.index_tensors()


def _ddp_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same data and initial weights on both ranks
        X, Y = noisy_rule(96)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(5, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
        sampler = fastis.ImportanceSampler(96, 4, presample_size=24, a_tau=0.5, tau_th=1.0)
        gain = fastis.LRGain(opt, sampler, min_steps=3, max_gain=3.0)
        gains = []
        for idx in itertools.islice(forever(sampler), 40):
            protocol_step(model, opt, sampler, X, Y, idx)
            gains.append(gain.gain)
        torch.save({"gains": gains, "phi": gain.noise_share}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_apply_the_same_gains(tmp_path):
    """Two gloo ranks, disjoint shards, DDP's all-reduced gradients and the shared tau:
    the same gains on both, bit for bit."""
    mp.spawn(_ddp_worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a == b
    assert any(g > 1.0 for g in a["gains"]) and 0.0 <= a["phi"] <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no-sync check)")
def test_cuda_gain_steps_do_not_synchronise():
    # the pair is copied to pinned memory and read one step late (its event): the gain's
    # hooks add no synchronisation to the step
    torch.manual_seed(0)
    x, y = torch.randn(4096, 16, device="cuda"), torch.randint(0, 5, (4096,), device="cuda")
    model = torch.nn.Linear(16, 5).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = fastis.ImportanceSampler(4096, 32, presample_size=256, seed=0, tau_th=-1.0)
    gain = fastis.LRGain(opt, sampler, min_steps=2)
    batches = (idx.to("cuda", non_blocking=True) for idx in forever_tensors(sampler))
    try:
        for i in range(16):
            if i == 4:  # warmed up: from here on, a synchronisation raises
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            protocol_step(model, opt, sampler, x, y, next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gain.state_dict()["count"] == 14  # every pair but the last read, one step late
    assert 0.0 <= gain.noise_share <= 1.0


# --------------------------------------------------------------------------------------
# bad input


def make(**kw):
    p = torch.nn.Parameter(torch.zeros(3))
    return fastis.LRGain(torch.optim.SGD([p], lr=0.1), Stub(), **kw)


def test_arguments_are_checked_and_named():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        fastis.LRGain([p], Stub())
    with pytest.raises(TypeError, match="sampler must be an ImportanceSampler"):
        fastis.LRGain(torch.optim.SGD([p], lr=0.1), object())
    for bad, err in ((0.5, ValueError), (math.inf, ValueError), (math.nan, ValueError)):
        with pytest.raises(err, match="max_gain"):
            make(max_gain=bad)
    with pytest.raises(TypeError, match="max_gain"):
        make(max_gain="2")
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"a_noise must be in \[0, 1\)"):
            make(a_noise=bad)
    with pytest.raises(ValueError, match="min_steps"):
        make(min_steps=0)
    with pytest.raises(TypeError, match="min_steps"):
        make(min_steps=2.5)
    assert "max_gain=2.0" in repr(make())


def test_bad_state_is_refused_naming_the_key():
    s = Synthetic(sigma2=2.0, min_steps=1)
    for _ in range(5):
        s.step(2.0)
    good = s.gain.state_dict()
    fresh = Synthetic(sigma2=2.0, min_steps=1).gain

    def refused(err, match, **change):
        bad = dict(good, **change)
        with pytest.raises(err, match=match):
            fresh.load_state_dict(bad)

    refused(ValueError, "another configuration", config=dict(good["config"], max_gain=3.0))
    refused(ValueError, "not a 'LRGain'", kind="ImportanceSampler")
    refused(ValueError, r"'gain'.*>= 1", gain=0.5)
    refused(ValueError, "max_gain", gain=5.0)
    refused(ValueError, r"'count'", count=-1)
    refused(TypeError, r"'noise_avg'", noise_avg="x")
    refused(ValueError, r"'grad_avg'", grad_avg=math.inf)
    refused(ValueError, r"'pending'", pending=[1.0, 2.0])
    refused(ValueError, r"pending\[2\]", pending=[1.0, 2.0, -1.0])
    refused(TypeError, "prev_grad", prev_grad=torch.zeros(P, dtype=torch.float64))
    assert fresh.gain == 1.0 and fresh.state_dict()["count"] == 0  # nothing changed
    fresh.load_state_dict(good)
    assert fresh.state_dict()["count"] == good["count"]
