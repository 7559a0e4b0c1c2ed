"""ImportanceSampler(constant_noise=True): fewer backpropagated rows at the noise of a
uniform batch. The batch-size rule, unbiasedness item by item with the batch size varying
as tau rises, the protocol with n rows, resume, and bad input."""

import math

import pytest
import torch
from sampler_helpers import Z_MAX, forever

from fastis.sampling import ImportanceSampler, MeasuredSwitch, compute_tau
from fastis.sampling.noise import constant_noise_rows, variance_reduction

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_keep_the_noise_of_a_uniform_batch():
    b, big_b = 32, 256
    for k in (1, 2, 4):
        for tau in (1.5, 2.0, 3.0, 6.0):
            n = constant_noise_rows(tau, b, big_b, k, 1)
            exact = 1.0 / (tau**2 * (1.0 / b - k / big_b))
            assert n == min(b, math.ceil(exact))
            # the noise of n weighted rows plus the presample's equals a uniform batch's
            assert variance_reduction(tau, exact, b, big_b, k) == pytest.approx(1.0)
            assert variance_reduction(tau, n, b, big_b, k) >= 1.0 - 1e-12  # rounded up
    assert constant_noise_rows(0.0, b, big_b, 1, 1) == b  # tau below 1: no reduction
    assert constant_noise_rows(100.0, b, big_b, 1, 4) == 4  # the floor
    assert constant_noise_rows(2.5, b, big_b, 1, 4) == 8  # 5.8 rounds up to a multiple of 4
    assert constant_noise_rows(50.0, b, 64, 2, 1) == b  # k b >= B: cannot hold the noise
    assert constant_noise_rows(math.inf, b, big_b, 1, 1) == 1


def skewed(n):
    return torch.logspace(math.log10(0.01), math.log10(3.0), n, dtype=torch.float64)


def test_constant_noise_is_unbiased_item_by_item():
    """N = B = 32, b = 8: the rows n fall from 8 to 4 as the smoothed tau rises (so the
    shape varies); every step's weighted count ``(B / n) sum_k w_k [sel_k = i]`` still
    averages 1, example by example, and the unweighted counts do not."""
    n_data, b, steps = 32, 8, 3000
    scores = skewed(n_data)
    g = scores / scores.sum()
    s = ImportanceSampler(
        n_data,
        b,
        presample_size=n_data,
        tau_th=-1.0,
        seed=0,
        score_fn=lambda out, y: out[:, 0],
        constant_noise=True,
    )
    weighted = torch.zeros(n_data, dtype=torch.float64)
    hits = torch.zeros(n_data, dtype=torch.float64)
    inv_rows = 0.0  # sum over steps of 1 / n: the exact variance is (1 - p) / p times it
    sizes = set()
    it = forever(s)
    for _ in range(steps):
        idx = next(it)
        xs, _, w = s.select(lambda t: t, scores[idx][:, None].float(), None)
        rows = len(w)
        sizes.add(rows)
        sel = s.last_indices
        assert len(xs) == rows == len(sel)
        weighted.index_add_(0, sel, w.double() * n_data / rows)
        hits.index_add_(0, sel, torch.full((rows,), n_data / rows, dtype=torch.float64))
        inv_rows += 1.0 / rows
        s.update(torch.zeros(rows))
    tau = float(compute_tau(scores))
    assert (
        sizes >= {8, 4}
        and max(sizes) == 8
        and min(sizes) == constant_noise_rows(tau, b, n_data, 1, 1)
    )

    def z(counts, p):
        return ((counts - steps) / ((1 - p) / p * inv_rows).sqrt()).abs()

    zw = z(weighted, g)
    plain = z(hits, torch.full((n_data,), 1.0 / n_data, dtype=torch.float64))
    print(f"\nconstant noise ({steps} steps, rows {sorted(sizes)}): max |z| {zw.max():.2f}")
    assert zw.max() < Z_MAX, zw
    assert plain.max() > 2 * Z_MAX
    st = s.stats()
    assert st["weighted_rows"] < steps * b and st["steps_importance"] == steps


def test_update_takes_the_rows_select_returned_and_resume_is_exact():
    scores = torch.rand(120, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = scores**8

    def make():
        return ImportanceSampler(
            120,
            8,
            presample_size=64,
            tau_th=1.2,
            seed=2,
            score_fn=lambda out, y: out[:, 0],
            constant_noise=True,
            min_batch_size=2,
            draws_per_presample=2,
        )

    def run(s, steps):
        log = []
        it = forever(s)
        for _ in range(steps):
            idx = next(it)
            _, _, w = s.select(lambda t: t, scores[idx][:, None], None)
            s.update(scores[s.last_indices])
            log.append((len(idx), s.last_indices.tolist(), w.tolist()))
        return log

    ref = run(make(), 40)
    rows = {len(w) for n, _, w in ref if n == 64}
    assert rows and min(rows) < 8 and all(r % 2 == 0 for r in rows)
    s = make()
    first = run(s, 23)
    t = make()
    t.load_state_dict(s.state_dict())
    assert first + run(t, 17) == ref
    # update() must get exactly the rows select() returned
    u = make()
    run(u, 23)
    it = forever(u)
    while True:
        idx = next(it)
        _, _, w = u.select(lambda t: t, scores[idx][:, None], None)
        if len(w) < 8:
            break
        u.update(scores[u.last_indices])
    with pytest.raises(ValueError, match="shape"):
        u.update(torch.zeros(8))
    u.update(torch.zeros(len(w)))


def test_measured_switch_at_constant_noise_pays_only_for_cheaper_steps():
    """At constant noise an importance step is worth one uniform step (VR ~ 1): it is on
    only while it costs less than one."""
    b, big_b, tau = 64, 1024, 2.0
    n = constant_noise_rows(tau, b, big_b, 1, 1)
    exact = 1.0 / (tau**2 * (1.0 / b - 1.0 / big_b))
    assert n == 18 and exact == pytest.approx(17.07, abs=0.01)
    sw = MeasuredSwitch(margin=0.0)
    sw.decide(tau, 0.95, b, big_b, 1, n)
    vr = (1 / 64) / (1 / (18 * 4) + 1 / 1024)  # > 1 by the rounding of n only
    assert sw.last["variance_reduction"] == pytest.approx(vr) and 1.0 < vr < 1.06
    assert sw.on
    assert not sw.decide(tau, 1.1, b, big_b, 1, n)
    # the model's prior cost ratio counts the fewer rows: (B + 3 n) / (3 b)
    assert sw.cost_ratio(b, big_b, 1, n) == pytest.approx((big_b + 3 * n) / (3 * b))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"constant_noise": 1}, TypeError, "constant_noise"),
        ({"min_batch_size": 0}, ValueError, "min_batch_size"),
        ({"min_batch_size": 9}, ValueError, "min_batch_size"),
        ({"min_batch_size": 2.0}, TypeError, "min_batch_size"),
    ],
)
def test_bad_constant_noise_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        ImportanceSampler(60, 8, **kwargs)
