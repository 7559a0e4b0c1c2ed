"""The importance step's own parts: the scoring pass's eval mode
(``fastis.sampling.modes``) and the two ways the presample's draw is computed
(``PresampleDraw.draw`` on the device, ``draw_host`` on the CPU), which must agree."""

import math

import pytest
import torch

from fastis import sample
from fastis.sampling import ImportanceSampler, compute_tau
from fastis.sampling.draw import PresampleDraw
from fastis.sampling.modes import eval_mode
from fastis.sampling.switch import SmoothedTau

# --------------------------------------------------------------------------------------
# eval mode


class Probe(torch.nn.Module):
    """Records ``training`` of itself when called."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, x):
        self.log.append(self.training)
        return x


def tree():
    log = []
    shared = Probe(log)
    model = torch.nn.Sequential(
        Probe(log),
        torch.nn.Sequential(shared, torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(3)),
        shared,  # the same module twice in the tree
        torch.nn.Linear(3, 3),
    )
    return model, log


def modes(model):
    return [m.training for m in model.modules()]


def test_eval_mode_sets_every_module_and_restores_each_own_mode():
    model, log = tree()
    model.train()
    model[1][2].eval()  # a frozen BatchNorm: must stay in eval mode after
    before = modes(model)
    with eval_mode(model):
        assert not any(modes(model))
        model(torch.randn(4, 3))
    assert log == [False, False, False] and modes(model) == before
    assert not model[1][2].training and model[1][1].training


def test_eval_mode_restores_when_the_block_raises():
    model, _ = tree()
    model.train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert all(modes(model))


def test_eval_mode_sees_modules_added_since_the_last_pass():
    model, _ = tree()
    with eval_mode(model):
        pass
    model.append(torch.nn.Dropout(0.5))
    model[1].add_module("late", torch.nn.Dropout(0.1))
    with eval_mode(model):
        assert not model[-1].training and not model[1].late.training
    assert model[-1].training and model[1].late.training


def test_eval_mode_leaves_a_model_in_eval_mode_alone():
    model, _ = tree()
    model.eval()
    with eval_mode(model):
        assert not any(modes(model))
    assert not any(modes(model))


def test_a_module_that_overrides_train_gets_its_own_train_called():
    calls = []

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def train(self, mode=True):
            calls.append(mode)
            super().train(mode)
            self.lin.eval()  # its own rule: the layer is always frozen
            return self

    model = torch.nn.Sequential(torch.nn.Dropout(0.5), Frozen()).train()
    calls.clear()
    with eval_mode(model):
        assert not any(modes(model))
    assert calls == [False, True]  # model.eval(), then model.train(), as before
    assert model[0].training and model[1].training and not model[1].lin.training


def test_scoring_pass_of_a_dropout_model_is_deterministic_and_training_resumes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    with torch.no_grad():
        ref = model.eval()(x)
    model.train()
    seen = []
    s = ImportanceSampler(
        24,
        4,
        presample_size=12,
        tau_th=-1,
        seed=0,
        score_fn=lambda out, t: seen.append(out) or out[:, 0].abs(),
    )
    idx = next(s.index_tensors())
    s.select(model, x[idx], y[idx])
    torch.testing.assert_close(seen[0], ref[idx])
    assert model.training and model[1].training


# --------------------------------------------------------------------------------------
# the presample's draw: device and host computations agree


def score_cases():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        s = torch.rand(37, generator=g, dtype=dtype) ** 3
        s[::5] = 0.0  # never drawn
        yield "skewed", s
        yield "one", torch.zeros(37, dtype=dtype).index_fill_(0, torch.tensor([11]), 2.5)
    bad = torch.rand(37, generator=g)
    yield "zero", torch.zeros(37)
    yield "nan", bad.clone().index_fill_(0, torch.tensor([4]), math.nan)
    yield "inf", bad.clone().index_fill_(0, torch.tensor([9]), math.inf)
    yield "negative", bad.clone().index_fill_(0, torch.tensor([0]), -1e-3)
    yield "overflow", torch.full((37,), 1e308, dtype=torch.float64)


@pytest.mark.parametrize("n", [5, 40, 3000])  # 3000 draws from 37: the table path
def test_host_and_device_draws_agree(n):
    for name, s in score_cases():
        dev, host = PresampleDraw(seed=5), PresampleDraw(seed=5)
        pos_d, w_d, norm_g, valid_d, usable_d = dev.draw(s, n)
        pos_h, w_h, tau_h, valid_h, usable_h = host.draw_host(s, n)
        assert torch.equal(pos_d, pos_h), name
        assert torch.equal(w_d, w_h), name
        assert w_h.dtype == torch.float32 and pos_h.dtype == torch.int64
        assert (bool(valid_d), bool(usable_d)) == (valid_h, usable_h), name
        ok = bool(torch.isfinite(s).all() & (s >= 0).all()) and name != "overflow"
        assert valid_h == ok, name
        if not ok:
            assert math.isnan(tau_h)
        elif not usable_h:
            assert tau_h == 1.0
        else:
            tau = float(compute_tau(s))
            assert tau_h == pytest.approx(tau, rel=1e-12)
            assert math.sqrt(37) * float(norm_g) == pytest.approx(tau, rel=1e-12)
        if usable_h:  # the draws are fastis.sample's, with the same generator state
            g = torch.Generator().manual_seed(5)
            ref, p = sample(s.double(), n, generator=g, return_probs=True)
            assert torch.equal(pos_h, ref)
            torch.testing.assert_close(w_h, (1.0 / (37 * p)).float(), rtol=2e-7, atol=0)
            assert bool((s[pos_h] > 0).all())
        else:  # uniform over the presample, unit weights
            assert bool((w_h == 1.0).all())


def test_presample_records_count_invalid_and_zero_steps_alike():
    """The device record and the host record fold to the same tau and the same counts."""
    taus = []
    for host in (False, True):
        tau, draw = SmoothedTau(distributed=False), PresampleDraw(seed=0)
        for _, s in score_cases():
            if host:
                _, _, t, valid, usable = draw.draw_host(s, 8)
                tau.observe_presample_host(t, valid, usable, 0.9)
            else:
                _, _, norm_g, valid, usable = draw.draw(s, 8)
                tau.observe_presample(norm_g, valid, usable, 37, 0.9)
            taus.append((host, tau.host_value(), tau.host_new()))
        assert (tau.host_invalid(), tau.host_zero()) == (4, 1)
    half = len(taus) // 2
    for (_, a, an), (_, b, bn) in zip(taus[:half], taus[half:], strict=True):
        assert a == pytest.approx(b, rel=1e-12)
        assert (math.isnan(an) and math.isnan(bn)) or an == pytest.approx(bn, rel=1e-12)


def test_sampler_counts_invalid_and_zero_presamples_through_a_checkpoint():
    s = ImportanceSampler(40, 2, presample_size=4, tau_th=-1, seed=0, score_fn=lambda o, t: o[:, 0])
    rows = [[1.0, 2.0, 0.0, 1.0], [math.nan, 1.0, 1.0, 1.0], [0.0] * 4, [-1.0, 1.0, 1.0, 1.0]]
    it = s.index_tensors()
    for r in rows:
        next(it)
        s.select(lambda t: t, torch.tensor(r)[:, None], None)
        s.update(torch.ones(2))
    st = s.stats()
    assert (st["invalid_score_steps"], st["zero_score_steps"]) == (2, 1)
    state = s.state_dict()
    assert (float(state["invalid_steps"]), float(state["zero_steps"])) == (2.0, 1.0)
    t = ImportanceSampler(40, 2, presample_size=4, tau_th=-1, seed=0, score_fn=lambda o, t: o[:, 0])
    t.load_state_dict(state)
    next(t.index_tensors())
    t.select(lambda x: x, torch.zeros(4, 1), None)
    assert (t.stats()["invalid_score_steps"], t.stats()["zero_score_steps"]) == (2, 2)
