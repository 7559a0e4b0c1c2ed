"""ImportanceSampler(switch=MeasuredSwitch(...)): the decision rule, the step clock, the
switch's decisions on synthetic costs (a fake clock) and progress signals, resume, bad
input, and no synchronisation on CUDA (the 2-process agreement is in
test_sampler_distributed.py)."""

import copy
import itertools
import math

import pytest
import torch
from sampler_helpers import forever

import fastis
from fastis.sampling import ImportanceSampler, MeasuredSwitch
from fastis.sampling.measured import StepClock

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# --------------------------------------------------------------------------------------
# the rule


def expected_benefit(tau, phi, b, big_b, k):
    vr = 1.0 / (1.0 / max(tau, 1.0) ** 2 + k * b / big_b)
    return 1.0 / ((1.0 - phi) + phi / vr), vr


@pytest.mark.parametrize("k", [1, 2])
def test_decide_is_benefit_against_cost_with_hysteresis(k):
    b, big_b = 8, 64
    for tau in (0.0, 1.0, 1.7, 3.0, 9.0):
        for phi in (0.0, 0.3, 1.0):
            for r in (1.0, 1.5, 3.0):
                benefit, vr = expected_benefit(tau, phi, b, big_b, k)
                sw = MeasuredSwitch(noise_share=lambda phi=phi: phi, margin=0.1)
                assert sw.decide(tau, r, b, big_b, k) == (benefit > 1.1 * r)
                assert sw.last["benefit"] == pytest.approx(benefit, rel=1e-12)
                assert sw.last["variance_reduction"] == pytest.approx(vr, rel=1e-12)
                sw.on = True  # once on, it stays on while benefit > r
                assert sw.decide(tau, r, b, big_b, k) == (benefit > r)
    # noise-limited (phi = 1): benefit is VR, capped by the presample's own noise at B / kb
    sw = MeasuredSwitch()
    sw.decide(1e6, 1.0, b, big_b, k)
    assert sw.last["benefit"] == pytest.approx(big_b / (k * b), rel=1e-6)
    # step-limited (phi = 0): an importance step is worth one uniform step, never pays
    assert not MeasuredSwitch(noise_share=lambda: 0.0).decide(1e6, 1.01, b, big_b, k)


def test_cost_ratio_prior_then_measured_with_bias_correction_and_clipping():
    sw = MeasuredSwitch(min_steps=2, a_cost=0.5)
    b, big_b = 4, 12
    assert sw.cost_ratio(b, big_b, 1) == pytest.approx(2.0)  # the model's (B + 3b) / 3b
    assert sw.cost_ratio(b, big_b, 3) == pytest.approx((12 / 3 + 12) / 12)
    sw.observe("uniform", 1.0)
    assert sw.seconds("uniform") == 1.0  # bias-corrected: the first sample counts in full
    sw.observe("uniform", 1.0)
    sw.observe("presample", 3.0)
    assert sw.cost_ratio(b, big_b, 1) == pytest.approx(2.0)  # presample: 1 of 2 samples
    sw.observe("presample", 3.0)
    assert sw.cost_ratio(b, big_b, 1) == pytest.approx(3.0)
    sw.observe("uniform", 100.0)  # an evaluation between steps: clipped to 4x
    assert sw.seconds("uniform") == pytest.approx((0.25 + 0.125 + 0.5 * 4.0) / 0.875)
    for _ in range(2):
        sw.observe("reuse", 1.5)
    t_u = sw.seconds("uniform")
    assert sw.cost_ratio(b, big_b, 3) == pytest.approx((3.0 + 2 * 1.5) / 3 / t_u)
    sw.observe("uniform", math.nan)  # ignored
    assert sw.seconds("uniform") == t_u


def test_step_clock_times_from_one_mark_to_the_next():
    clock = FakeClock()
    timer = StepClock(clock)
    assert timer.mark("uniform", CPU) == []
    clock.now = 2.5
    assert timer.mark("presample", CPU) == [("uniform", 2.5)]
    clock.now = 3.0
    assert timer.mark("reuse", CPU) == [("presample", 0.5)]
    timer.reset()
    clock.now = 9.0
    assert timer.mark("uniform", CPU) == []  # the gap across a reset is no step


# --------------------------------------------------------------------------------------
# decisions on synthetic costs and progress signals


N, B_SMALL, B_BIG = 960, 16, 128
SCORES = torch.rand(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 100


def drive(s, clock, costs, steps, phase=None):
    """Runs ``steps`` steps; the fake clock advances by ``costs[kind]`` over each step.
    Returns the kind of every step."""
    kinds = []
    it = forever(s)
    for t in range(steps):
        if phase is not None:
            phase[0] = t
        idx = next(it)
        before = s.presamples
        s.select(lambda x: x, SCORES[idx][:, None], None)
        s.update(SCORES[s.last_indices])
        kind = (
            "uniform"
            if len(idx) == s.batch_size
            else "presample"
            if s.presamples > before
            else "reuse"
        )
        clock.now += costs[kind]
        kinds.append(kind)
    return kinds


def measured(clock, k=1, big_b=B_BIG, **kw):
    sw = MeasuredSwitch(clock=clock, **kw)
    s = ImportanceSampler(
        N,
        B_SMALL,
        presample_size=big_b,
        seed=0,
        score_fn=lambda out, y: out[:, 0],
        switch=sw,
        draws_per_presample=k,
    )
    return s, sw


def test_cheap_importance_steps_stay_on():
    clock = FakeClock()
    s, sw = measured(clock)
    kinds = drive(s, clock, {"uniform": 1.0, "presample": 2.0}, 60)
    first = kinds.index("presample")
    assert 0 < first < 20  # off until tau has risen past the model's prior ratio
    assert set(kinds[first:]) == {"presample"}
    st = s.stats()["switch"]
    assert st["cost_ratio"] == pytest.approx(2.0)
    assert st["benefit"] > 2.0 and st["seconds_presample"] == pytest.approx(2.0)


def test_dear_importance_steps_turn_it_off_once_measured():
    """Importance steps cost 12x here while the reduction is at most B / b = 8: once the
    switch has timed min_steps of them (read one step late), it turns off for good."""
    clock = FakeClock()
    s, sw = measured(clock)
    kinds = drive(s, clock, {"uniform": 1.0, "presample": 12.0}, 80)
    first = kinds.index("presample")
    # on for min_steps + 1 steps: the third one's time is known at the next select
    assert kinds[first : first + 4] == ["presample"] * 4
    assert set(kinds[first + 4 :]) == {"uniform"}
    assert s.stats()["switch"]["cost_ratio"] == pytest.approx(12.0)


def test_reuse_makes_a_big_presample_pay():
    """B = 512, b = 16, a presample step costs 14 uniform steps. With k = 1 the model's
    prior ratio (512 + 48) / 48 = 11.7 exceeds what uniform batches' tau promises (at most
    1 / (1 / tau^2 + b / B) ~ 9): never on. With k = 2 the prior is 6.3, it turns on, and
    the measured cycle, (14 + 1.2) / 2 = 7.6, stays below the reduction
    1 / (1 / tau^2 + 2 b / B) (8 and rising as tau follows the presamples' scores)."""
    costs = {"uniform": 1.0, "presample": 14.0, "reuse": 1.2}
    clock = FakeClock()
    s, _ = measured(clock, k=1, big_b=512)
    assert "presample" not in drive(s, clock, costs, 80)
    clock = FakeClock()
    s, _ = measured(clock, k=2, big_b=512)
    kinds = drive(s, clock, costs, 80)
    first = kinds.index("presample")
    assert kinds[first:] == (["presample", "reuse"] * 40)[: 80 - first]
    st = s.stats()["switch"]
    assert st["cost_ratio"] == pytest.approx(7.6)
    assert st["benefit"] > st["cost_ratio"]


def test_low_rate_tail_turns_importance_sampling_off():
    """noise_share = lr / lr0 of a step schedule (1, then 0.2 at step 60, 0.04 at step 100):
    on while the rate is high, off in the step-limited tail."""
    clock = FakeClock()
    phase = [0]

    def lr_ratio():
        t = phase[0]
        return 1.0 if t < 60 else 0.2 if t < 100 else 0.04

    s, sw = measured(clock, noise_share=lr_ratio)
    kinds = drive(s, clock, {"uniform": 1.0, "presample": 2.0}, 130, phase)
    assert "presample" in kinds[:60] and set(kinds[40:60]) == {"presample"}
    assert set(kinds[100:]) == {"uniform"}
    assert s.stats()["switch"]["noise_share"] == 0.04


def test_resume_continues_the_measured_decisions_exactly(tmp_path):
    costs = {"uniform": 1.0, "presample": 3.0, "reuse": 1.1}
    total, cut = 70, 31

    def run(steps, state=None):
        clock = FakeClock()
        s, _ = measured(clock, k=2)
        if state is not None:
            s.load_state_dict(state)
        log = []
        it = forever(s)
        for _ in range(steps):
            idx = next(it)
            before = s.presamples
            _, _, w = s.select(lambda x: x, SCORES[idx][:, None], None)
            s.update(SCORES[s.last_indices])
            kind = (
                "uniform"
                if len(idx) == B_SMALL
                else "presample"
                if s.presamples > before
                else "reuse"
            )
            clock.now += costs[kind]
            log.append((kind, s.last_indices.tolist(), w.tolist()))
        return log, s

    ref, _ = run(total)
    kinds = [k for k, *_ in ref]
    assert "uniform" in kinds and "presample" in kinds and "reuse" in kinds
    first, s = run(cut)
    state = s.state_dict()
    torch.save(state, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["switch"]["count_presample"] > 0
    t = ImportanceSampler(
        N,
        B_SMALL,
        presample_size=B_BIG,
        seed=0,
        score_fn=lambda out, y: out[:, 0],
        switch=MeasuredSwitch(),
        draws_per_presample=2,
    )
    t.load_state_dict(state)
    assert repr(t.state_dict()) == repr(s.state_dict())
    rest, _ = run(total - cut, state)
    assert first + rest == ref


def test_copies_keep_the_switch_state():
    clock = FakeClock()
    s, sw = measured(clock)
    drive(s, clock, {"uniform": 1.0, "presample": 2.0}, 30)
    twin = copy.deepcopy(s)
    assert twin.switch.state_dict() == s.switch.state_dict()
    assert twin.switch.last == s.switch.last


# --------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"noise_share": 0.5}, TypeError, "noise_share"),
        ({"clock": 3}, TypeError, "clock"),
        ({"a_cost": 1.0}, ValueError, "a_cost"),
        ({"min_steps": 0}, ValueError, "min_steps"),
        ({"margin": -0.1}, ValueError, "margin"),
        ({"clip": 1.0}, ValueError, "clip"),
    ],
)
def test_bad_switch_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        MeasuredSwitch(**kwargs)


def test_switch_must_be_a_measured_switch():
    with pytest.raises(TypeError, match="switch"):
        ImportanceSampler(60, 4, switch="measured")


@pytest.mark.parametrize(
    "value, err", [(1.5, ValueError), (math.nan, ValueError), ("1", TypeError)]
)
def test_bad_noise_share_value_is_named(value, err):
    s = ImportanceSampler(60, 4, switch=MeasuredSwitch(noise_share=lambda: value))
    with pytest.raises(err, match="noise_share"):
        next(iter(s))


def test_switch_state_is_checked():
    clock = FakeClock()
    s, _ = measured(clock)
    drive(s, clock, {"uniform": 1.0, "presample": 2.0}, 10)
    state = s.state_dict()
    for bad, err in [
        (dict(state["switch"], on="yes"), TypeError),
        (dict(state["switch"], seconds_uniform=-1.0), ValueError),
        (dict(state["switch"], count_reuse=1.5), TypeError),
        ({"on": True}, ValueError),
        (None, TypeError),
    ]:
        with pytest.raises(err):
            measured(FakeClock())[0].load_state_dict(dict(state, switch=bad))
    plain = ImportanceSampler(N, B_SMALL, presample_size=B_BIG, seed=0)
    with pytest.raises(ValueError, match="switch"):
        plain.load_state_dict(state)  # another configuration


# --------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no-sync check)")
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_measured_steps_do_not_synchronise(k):
    # timing events are recorded each select and read only once completed (Event.query):
    # the hot path, with the measured switch and presample reuse, stays free of syncs
    torch.manual_seed(0)
    x, y = torch.randn(4096, 16, device="cuda"), torch.randint(0, 5, (4096,), device="cuda")
    model = torch.nn.Linear(16, 5).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ImportanceSampler(
        4096, 32, presample_size=256, seed=0, switch=MeasuredSwitch(), draws_per_presample=k
    )
    modes = itertools.cycle([True, False])  # both modes (and reuses) get timed
    sampler.switch.decide = lambda *args: next(modes)
    batches = forever(sampler)

    def step():
        idx = torch.as_tensor(next(batches)).to("cuda", non_blocking=True)
        xs, ys, w = sampler.select(model, x[idx], y[idx])
        loss, g = fastis.cross_entropy(model(xs), ys, sample_weight=w, return_score=True)
        sampler.update(g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    step()
    st = sampler.stats()
    assert st["steps"] == 17 and st["steps_importance"] > st["presamples"] * (k - 1)
    times = st["switch"]
    assert times["seconds_uniform"] > 0 and times["seconds_presample"] > 0  # events read
    assert (times["seconds_reuse"] is not None) == (k > 1)
