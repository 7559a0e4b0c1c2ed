"""The fastis command: the demo end to end at a tiny budget, its errors, data, baselines."""

import dataclasses
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

import fastis

pytest.importorskip("mnist1d")

from fastis import cli  # noqa: E402
from fastis.demo import baselines, data, interleave, report, train  # noqa: E402
from fastis.demo.config import (  # noqa: E402
    DEFAULT_LR,
    GAINED,
    METHODS,
    SCHEDULES,
    VARIANTS,
    RunConfig,
    schedule_factor,
)
from fastis.demo.models import MNIST1DCNN  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTIS_BACKEND", "torch")


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "demo",
            "--budget",
            "0.6",
            "--num-samples",
            "1500",
            "--evals",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--methods",
            "uniform,upper-bound,history,loss,infobatch,selective-backprop,upper-bound-measured",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | train loss | test error |" in printed
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in results["summary"]]
    assert methods == [
        "uniform",
        "upper-bound",
        "history",
        "loss",
        "infobatch",
        "selective-backprop",
        "upper-bound-measured",
    ]
    for name in methods:
        assert name in printed
        run = results["runs"][name]
        assert run["steps"] > 0 and run["curve"]["time"][-1] >= 0.6
        assert run["curve"]["train_loss"][0] > 0 and 0 <= run["final_test_error"] <= 1
    assert results["summary"][0]["speedup"] == 1.0
    assert results["machine"]["torch"] == torch.__version__
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_python_dash_m_fastis_info():
    proc = subprocess.run(
        [sys.executable, "-m", "fastis", "info"], capture_output=True, text=True, check=True
    )
    assert "fastis" in proc.stdout and "torch" in proc.stdout


@pytest.fixture
def no_training(monkeypatch):
    """Argument errors must be caught before any data is made or any method trained."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started although its arguments are wrong")

    monkeypatch.setattr(data, "mnist1d", refuse)
    monkeypatch.setattr(train, "run", refuse)


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--methods", "uniform,magic"], "unknown method(s) magic"),
        (["demo", "--methods", "uniform,uniform"], "listed twice"),
        (["demo", "--budget", "-3"], "must be positive"),
        (["demo", "--budget", "0"], "must be positive"),
        (["demo", "--budget", "inf"], "--budget: must be a finite number, got inf"),
        (["demo", "--budget", "1e400"], "must be a finite number, got 1e400"),
        (["demo", "--budget", "nan"], "must be a finite number, got nan"),
        (["demo", "--budget", "soon"], "not a number"),
        (["demo", "--lr", "uniform=fast"], "not a number"),
        (["demo", "--lr", "inf"], "--lr: must be a finite number, got inf"),
        (["demo", "--lr", "nan"], "must be a finite number, got nan"),
        (["demo", "--lr", "0"], "must be positive, got 0"),
        (["demo", "--lr", "uniform=-0.1"], "must be positive, got -0.1"),
        (["demo", "--lr", "uniform=1e999"], "must be a finite number, got 1e999"),
        (["demo", "--lr", "uniform=0.1,uniform=0.2"], "two rates for uniform"),
        (
            ["demo", "--lr", "uniform=0.1", "--lr", "uniform=0.2"],
            "--lr: two rates for uniform (0.1 and 0.2)",
        ),
        (["demo", "--lr", "0.1", "--lr", "0.2"], "two rates for all methods"),
        (
            ["demo", "--methods", "uniform", "--lr", "uniform=0.1,history=0.1"],
            "--lr names history, which --methods does not run (uniform)",
        ),
        (["demo", "--seed", "-1"], "--seed: must be from 0 to 2**32 - 1, got -1"),
        (["demo", "--seed", str(2**32)], "must be from 0 to 2**32 - 1"),
        (["demo", "--seed", "1.5"], "not a whole number"),
        (["demo", "--num-samples", "inf"], "not a number"),
        (["demo", "--device", "meta"], "--device meta: meta tensors hold no data"),
        (["demo", "--device", "nonsense"], "--device nonsense:"),
        (["demo", "--device", "xpu"], "--device xpu: cannot compute there"),
        (["demo", "--schedule", "warmup"], "invalid choice"),
        (["demo", "--batch-size", "128", "--presample", "64"], "smaller than --batch-size"),
        (["demo", "--num-samples", "100"], "fewer than the presample"),
        (
            ["demo", "--num-samples", "20", "--batch-size", "2", "--presample", "4"],
            "--num-samples must be at least 50, got 20",
        ),
        ([], "required"),
    ],
)
def test_cli_errors(argv, message, capsys, no_training):
    assert message in _refused(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_cuda_without_gpu(capsys, no_training):
    assert "no CUDA device" in _refused(["demo", "--device", "cuda"], capsys)


def test_out_existing_file_is_refused_before_training(tmp_path, capsys, no_training):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    err = _refused(["demo", "--out", str(target)], capsys)
    assert f"--out {target}: exists and is not a folder" in err
    assert target.read_text() == "keep me"


def test_out_unwritable_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("")
    inside_a_file = tmp_path / "file" / "run"
    assert f"--out {inside_a_file}: cannot write there" in _refused(
        ["demo", "--out", str(inside_a_file)], capsys
    )


def test_out_folder_is_made_before_training_and_removed_if_the_run_fails(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"
    seen = []

    def fail(cfg, data_, progress=None, model_fn=None):
        seen.append(out.is_dir())
        raise RuntimeError("interrupted")

    monkeypatch.setattr(train, "run", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        cli.main(
            [
                "demo",
                "--out",
                str(out),
                "--num-samples",
                "500",
                "--methods",
                "uniform",
                "--no-progress",
            ]
        )
    assert seen == [True]  # the folder existed before the first method trained
    assert not out.exists()  # and an empty folder is not left behind


def test_finished_results_survive_a_failing_output_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    write_json = report.write_json
    tried = []

    def flaky(folder, results):
        tried.append(folder)
        if folder == out:  # the folder was fine at the start, not at the end
            raise OSError(28, "No space left on device")
        return write_json(folder, results)

    monkeypatch.setattr(report, "write_json", flaky)
    monkeypatch.setattr(cli.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "fallback"))
    code = cli.main(
        [
            "demo",
            "--budget",
            "0.2",
            "--num-samples",
            "500",
            "--evals",
            "1",
            "--methods",
            "uniform",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert "| uniform |" in captured.out  # the table is printed before anything is written
    saved = tmp_path / "fallback" / "results.json"
    assert tried == [out, saved.parent]
    assert "No space left on device" in captured.err and f"{saved} instead" in captured.err
    assert json.loads(saved.read_text())["summary"][0]["method"] == "uniform"


@pytest.mark.parametrize("stop", [RuntimeError("diverged"), KeyboardInterrupt()])
def test_methods_that_finished_are_saved_when_a_later_one_fails(
    tmp_path, monkeypatch, capsys, stop
):
    real_run = train.run

    def second_fails(cfg, *args, **kwargs):
        if cfg.method == "history":
            raise stop
        return real_run(cfg, *args, **kwargs)

    monkeypatch.setattr(train, "run", second_fails)
    argv = [
        "demo",
        "--budget",
        "0.2",
        "--num-samples",
        "500",
        "--evals",
        "1",
        "--methods",
        "uniform,history,loss",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    if isinstance(stop, KeyboardInterrupt):
        assert cli.main(argv) == 130
    else:
        with pytest.raises(RuntimeError, match="diverged"):
            cli.main(argv)
    captured = capsys.readouterr()
    assert "| uniform |" in captured.out and "| history |" not in captured.out
    assert "history did not finish" in captured.err
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["method"] for r in saved["summary"]] == ["uniform"]
    assert saved["settings"]["lr"] == {"uniform": 0.1}


def test_results_json_is_strict_json():
    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    text = report.to_json({"loss": math.nan, "rows": [math.inf, -math.inf, 1.5], "n": 3})
    assert json.loads(text, parse_constant=no_constants) == {
        "loss": "nan",
        "rows": ["inf", "-inf", 1.5],
        "n": 3,
    }


def test_mnist1d_is_generated_once_and_cached(tmp_path):
    first = data.mnist1d(500, seed=3)
    cached = list((tmp_path / "cache").glob("mnist1d_500_3.npz"))
    assert len(cached) == 1
    second = data.mnist1d(500, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    x, y, x_test, y_test = first
    assert x.shape == (400, 40) and x_test.shape == (100, 40) and y.dtype == torch.int64
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10


def test_infobatch_rule():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(20000, generator=g)
    losses[:10] = float("inf")  # never seen: always kept
    kept, weight = baselines.infobatch_keep(losses, prune=0.5, generator=g)
    kept_mask = torch.zeros(20000, dtype=torch.bool)
    kept_mask[kept] = True
    mean = losses[10:].mean()
    above, below = losses >= mean, losses < mean
    assert kept_mask[above].all()  # above-mean (and unseen) examples are never pruned
    share = kept_mask[below].float().mean()
    assert abs(share - 0.5) < 0.02  # about r of the below-mean ones are dropped
    assert (weight[below] == 2.0).all() and (weight[above] == 1.0).all()
    # expected gradient weight of a below-mean example: P(kept) * 2 = 1 (unbiased on average)
    nothing = baselines.infobatch_keep(losses, prune=0.0, generator=g)[0]
    assert len(nothing) == 20000


def test_selective_backprop_rule():
    history = torch.arange(100.0)
    losses = torch.tensor([-1.0, 49.5, 99.0, 500.0])
    p1 = baselines.selective_backprop_probability(losses, history, beta=1.0)
    p2 = baselines.selective_backprop_probability(losses, history, beta=2.0)
    assert p1[-1] == 1.0 and p2[-1] == 1.0  # the largest loss is always kept
    assert (p1.diff() >= 0).all()  # monotone in the loss
    torch.testing.assert_close(p1[1], torch.tensor(52 / 104))  # 0..49, -1 and itself
    torch.testing.assert_close(p2, p1.square())
    assert p1[0] == 1 / 104  # the smallest is kept rarely (only itself below or equal)


# -- schedules, methods and the interleaved runner ---------------------------------------


@pytest.mark.parametrize(
    "schedule,points",
    [
        ("constant", [(0.0, 1.0), (0.5, 1.0), (0.99, 1.0), (1.0, 1.0)]),
        ("step", [(0.0, 1.0), (0.499, 1.0), (0.5, 0.1), (0.749, 0.1), (0.75, 0.01), (1.0, 0.01)]),
        (
            "paper-step",
            [(0.0, 1.0), (0.499, 1.0), (0.5, 0.2), (0.799, 0.2), (0.8, 0.04), (1.0, 0.04)],
        ),
        ("cosine", [(0.0, 1.0), (0.25, 0.5 + 0.5**1.5), (0.5, 0.5), (0.75, 0.5 - 0.5**1.5)]),
    ],
)
def test_schedule_values_at_the_documented_fractions(schedule, points):
    for fraction, factor in points:
        assert schedule_factor(schedule, fraction) == pytest.approx(factor, abs=1e-12)
        cfg = RunConfig(method="uniform", budget=1.0, lr=0.3, schedule=schedule)
        assert cfg.lr_at(fraction) == pytest.approx(0.3 * factor, abs=1e-12)


def test_cosine_decays_to_zero_and_schedules_clip_the_fraction():
    assert schedule_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-15)
    f = torch.linspace(0, 1, 101).tolist()
    values = [schedule_factor("cosine", v) for v in f]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    for s in SCHEDULES:  # a last step may start just past the budget
        assert schedule_factor(s, 1.3) == schedule_factor(s, 1.0)
        assert schedule_factor(s, -0.1) == schedule_factor(s, 0.0)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        schedule_factor("linear", 0.5)


def test_every_schedule_has_a_rate_for_every_method():
    assert set(DEFAULT_LR) == set(SCHEDULES)
    for rates in DEFAULT_LR.values():
        assert set(rates) == set(METHODS) | {"infobatch", "selective-backprop"}
        for v in VARIANTS:  # until swept: upper-bound's (the gain's: a base rate of its own)
            if v not in GAINED:
                assert rates[v] == rates["upper-bound"]
            else:
                assert math.isfinite(rates[v]) and rates[v] > 0


def _synthetic(n=320, n_test=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, 40, generator=g)
    y = torch.randint(0, 10, (n + n_test,), generator=g)
    x[:, :10] += y[:, None].float()  # learnable
    return x[:n], y[:n], x[n:], y[n:]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TimedCNN(torch.nn.Module):
    """The demo CNN whose every forward costs ``dt`` seconds of a fake clock; training
    forwards (train mode) are logged with the model's name."""

    def __init__(self, clock, dt, log, name):
        super().__init__()
        self.net = MNIST1DCNN(channels=4)
        self.clock, self.dt, self.log, self.name = clock, dt, log, name

    def forward(self, x):
        self.clock.t += self.dt
        if self.training:
            self.log.append(self.name)
        return self.net(x)


@pytest.fixture
def slow_evaluation(monkeypatch):
    """Every evaluation costs 100 s of the fake clock."""
    clock, real = FakeClock(), train.evaluate

    def evaluate(*args, **kwargs):
        clock.t += 100.0
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)
    return clock


def _timed_models(clock, dt, log, names):
    names = iter(names)
    return lambda: TimedCNN(clock, dt, log, next(names))


def test_interleaved_runner_alternates_slices_and_counts_only_training(slow_evaluation):
    clock, dt, log = slow_evaluation, 0.0625, []  # powers of 2: exact sums
    cfgs = [
        RunConfig(method="uniform", budget=1.0, lr=0.05, batch_size=16, evals=4),
        RunConfig(
            method="upper-bound-measured",
            budget=1.0,
            lr=0.05,
            batch_size=16,
            presample_size=48,
            evals=4,
            schedule="cosine",
        ),
    ]
    records = interleave.run_interleaved(
        cfgs,
        _synthetic(),
        slice_seconds=0.25,
        model_fn=_timed_models(clock, dt, log, "AB"),
        clock=clock,
        warmup_steps=0,
    )
    # slices alternate A, B, A, B, ...; a uniform step is one training forward
    runs = [(k, len(list(g))) for k, g in itertools.groupby(log)]
    assert [k for k, _ in runs] == ["A", "B"] * (len(runs) // 2)
    assert runs[0] == ("A", 4)  # a 0.25 s slice of 0.0625 s steps
    for r in records:
        t = r["curve"]["time"]
        # each reached its own budget, within one step (<= 2 forwards), evaluations apart:
        # the fake clock has run 100 s per evaluation, and the other method's slices
        assert 1.0 <= t[-1] <= 1.0 + 2 * dt
        assert t == sorted(t) and len(t) == 5 and t[0] == 0.0
        assert r["timing"] == {
            "mode": "interleaved",
            "slice_seconds": 0.25,
            "slices": 4,
            "threads": torch.get_num_threads(),
        }
    assert clock.t > 10 * 100.0
    uniform = records[0]
    assert uniform["steps"] == 16 and uniform["seconds_per_step"] == pytest.approx(dt)
    # the measured switch timed its steps on the method's own training clock: a uniform
    # step is one forward, never an evaluation or the other method's slice
    switch = records[1]["sampler"]["switch"]
    assert switch["seconds_uniform"] == pytest.approx(dt)
    # its noise share is the rate's share of the initial one (cosine: < 1 near the end)
    assert 0.0 <= switch["noise_share"] < 0.2


def test_each_method_follows_the_schedule_of_its_own_trained_share(slow_evaluation):
    clock = slow_evaluation
    data, log = _synthetic(), []
    cfg = RunConfig(method="uniform", budget=1.0, lr=0.2, batch_size=16, evals=2)
    fast = train.Trainer(cfg, data, _timed_models(clock, 0.0625, log, "A"), clock)
    slow = train.Trainer(
        dataclasses.replace(cfg, schedule="paper-step"),
        data,
        _timed_models(clock, 0.125, log, "B"),
        clock,
    )
    fast.advance(0.5)
    slow.advance(0.5)
    # both trained half their budget: the next step of each starts the second phase
    assert fast.trained == slow.trained == 0.5 and (fast.steps, slow.steps) == (8, 4)
    fast.step(), slow.step()
    assert fast.opt.param_groups[0]["lr"] == pytest.approx(0.02)  # step: x0.1 at 50%
    assert slow.opt.param_groups[0]["lr"] == pytest.approx(0.04)  # paper-step: x0.2


def test_interleaved_runs_start_from_the_same_model_and_match_run_records():
    data = _synthetic()
    cfgs = [
        RunConfig(method=m, budget=0.05, lr=0.05, batch_size=16, presample_size=48, evals=1)
        for m in ("uniform", "upper-bound", "history")
    ]
    before = torch.get_num_threads()
    records = interleave.run_interleaved(cfgs, data, slice_seconds=0.02, threads=1)
    assert torch.get_num_threads() == before
    assert all(r["timing"]["threads"] == 1 and r["curve"]["time"][-1] >= 0.05 for r in records)
    first = {r["curve"]["train_loss"][0] for r in records}
    assert len(first) == 1  # the same seed: the same initial weights for every method
    sequential = train.run(cfgs[0], data)
    assert set(records[0]) == set(sequential) | {"timing"}
    assert set(records[0]["curve"]) == set(sequential["curve"])
    runs = {c.method: r for c, r in zip(cfgs, records, strict=True)}
    rows = report.summarise(runs)
    assert [r["method"] for r in rows] == ["uniform", "upper-bound", "history"]
    assert rows[0]["speedup"] == 1.0 and "| history |" in report.table(rows)
    json.loads(report.to_json(report.collect(runs, {"budget": 0.05})))


def test_warm_up_leaves_the_runs_as_they_would_be():
    data = _synthetic()
    # a constant rate: the step schedule reads the clock, and a slow machine could pass a
    # decay within the three steps of one run and not the other
    cfg = RunConfig(
        method="upper-bound",
        budget=1.0,
        lr=0.05,
        batch_size=16,
        presample_size=48,
        schedule="constant",
    )

    def three_steps():
        trainer = train.Trainer(cfg, data, model_fn=lambda: MNIST1DCNN(channels=4))
        trainer.method.sampler.tau_th = -1.0  # importance steps: the sampler's draws count
        for _ in range(3):
            trainer.step()
        return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    cold = three_steps()
    train.warm_up([cfg, cfg], data, 2, model_fn=lambda: MNIST1DCNN(channels=4))
    assert torch.equal(three_steps(), cold)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got 1.5"):
        train.warm_up([cfg], data, 1.5)


@pytest.mark.parametrize("method", list(VARIANTS))
def test_variants_construct_and_train(method):
    data = _synthetic()
    cfg = RunConfig(
        method=method,
        budget=1.0,
        lr=0.05,
        batch_size=16,
        presample_size=48,
        evals=1,
        schedule="cosine",
    )
    trainer = train.Trainer(cfg, data, model_fn=lambda: MNIST1DCNN(channels=4))
    s = trainer.method.sampler
    options = VARIANTS[method]
    if "measured" not in options:
        s.tau_th = -1.0  # importance sampling from the first step: the variant's own path
    for _ in range(5):
        assert math.isfinite(float(trainer.step().detach()))
    assert (s.draws_per_presample, s.presample_size) == (
        (2, 8 * 16) if "reuse" in options else (1, 48)
    )
    assert s.constant_noise == ("constant_noise" in options)
    assert isinstance(s.switch, fastis.MeasuredSwitch) == ("measured" in options)
    if s.switch is not None:
        share = trainer.opt.param_groups[0]["lr"] / cfg.lr
        assert s.switch.noise_share() == pytest.approx(share) and share < 1.0
    stats = trainer.result()["sampler"]
    assert stats["steps"] == 5
    if "measured" not in options:
        assert stats["steps_importance"] == 5
        assert stats["presamples"] == (3 if "reuse" in options else 5)
        assert stats["weighted_rows"] <= 5 * 16


def _skewed(n=320, n_test=80, seed=0):
    """Separable classes with 10% of the labels redrawn: once the clean rows are learned,
    the scores are skewed (tau and the variance reduction well above 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n + n_test,), generator=g)
    x = torch.randn(n + n_test, 40, generator=g)
    x[torch.arange(n + n_test), 4 * y] += 8.0
    noisy = torch.rand(n + n_test, generator=g) < 0.1
    y = torch.where(noisy, torch.randint(0, 10, (n + n_test,), generator=g), y)
    return x[:n], y[:n], x[n:], y[n:]


@pytest.mark.parametrize("method", GAINED)
def test_gain_variants_scale_the_rate_of_importance_steps(method):
    cfg = RunConfig(
        method=method,
        budget=1e6,  # the constant rate throughout
        lr=0.1,
        batch_size=16,
        presample_size=96,
        evals=1,
        schedule="constant",
    )
    trainer = train.Trainer(cfg, _skewed(), model_fn=lambda: MNIST1DCNN(channels=4))
    s, gain = trainer.method.sampler, trainer.method.gain
    assert isinstance(gain, fastis.LRGain) and gain.optimizer is trainer.opt
    assert gain.max_gain == cfg.max_gain == 2.0
    assert isinstance(s.switch, fastis.MeasuredSwitch) == ("measured" in VARIANTS[method])
    if s.switch is None:
        s.tau_th = -1.0  # importance steps from the first
    s.a_tau, gain.min_steps = 0.0, 2  # tau and the gain respond within these few steps
    applied, gains, vrs = [], [], []
    trainer.opt.register_step_pre_hook(  # after the gain's own: the scaled rate
        lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"])
    )
    for _ in range(16):
        assert math.isfinite(float(trainer.step().detach()))
        gains.append(gain.gain)
        vrs.append(s.variance_reduction)
        assert trainer.opt.param_groups[0]["lr"] == cfg.lr  # the schedule's, put back
        assert trainer.method.state()["gain"] == gain.gain
    for lr, g, vr in zip(applied, gains, vrs, strict=True):
        assert lr == pytest.approx(cfg.lr * g, rel=1e-12)
        assert 1.0 <= g <= min(2.0, max(vr, 1.0))  # capped, and 1 unless VR > 1
    record = trainer.result()["sampler"]["lr_gain"]
    gained = [g for g in gains if g != 1.0]
    assert record["gained_steps"] == len(gained)
    assert record["mean_gain_when_gained"] == pytest.approx(
        sum(gained) / len(gained) if gained else 1.0
    )
    assert record["max_gain"] == 2.0
    # (NaN until a pair of consecutive importance steps is read: uniform ones are not)
    phi = record["noise_share"]
    assert 0.0 <= phi <= 1.0 if gain._count else math.isnan(phi)
    if s.switch is None:  # Algorithm 1 on every step: tau rises, the gain scales some
        assert len(gained) >= 3 and max(gained) == 2.0
    else:  # the measured switch starts uniform: the rate untouched there
        assert all(g == 1.0 for g, vr in zip(gains, vrs, strict=True) if vr == 1.0)


def test_gain_variants_run_through_the_public_path_and_need_the_optimizer():
    data = _skewed()
    cfg = RunConfig(
        method="upper-bound-gain", budget=0.3, lr=0.05, batch_size=16, presample_size=48, evals=2
    )
    record = train.run(cfg, data, model_fn=lambda: MNIST1DCNN(channels=4))
    assert record["steps"] > 0 and math.isfinite(record["final_train_loss"])
    assert record["config"]["max_gain"] == 2.0
    assert record["sampler"]["lr_gain"]["gained_steps"] <= record["steps_importance"]
    json.loads(report.to_json(record))  # the gain's NaN noise share, if any, strict JSON
    from fastis.demo.methods import make_method

    with pytest.raises(ValueError, match="'upper-bound-gain' scales the optimizer's rates"):
        make_method(cfg, len(data[0]))
    plain = make_method(dataclasses.replace(cfg, method="upper-bound"), len(data[0]))
    assert plain.gain is None and "lr_gain" not in plain.summary()
    assert "gain" not in plain.state()


def test_cli_accepts_the_gain_variants():
    args = cli.build_parser().parse_args(
        ["demo", "--methods", "uniform,upper-bound-gain,upper-bound-measured-gain"]
    )
    assert args.methods == ["uniform", "upper-bound-gain", "upper-bound-measured-gain"]
    args = cli.build_parser().parse_args(["demo", "--methods", "upper-bound-gain"])
    assert args.methods == ["upper-bound-gain"]
    for schedule in SCHEDULES:
        for m in GAINED:
            assert math.isfinite(DEFAULT_LR[schedule][m]) and DEFAULT_LR[schedule][m] > 0


@pytest.mark.parametrize("method", ["history", "history-stable"])
def test_history_methods_construct_and_train(method):
    data = _synthetic()
    cfg = RunConfig(method=method, budget=1.0, lr=0.05, batch_size=16, evals=1)
    trainer = train.Trainer(cfg, data, model_fn=lambda: MNIST1DCNN(channels=4))
    s = trainer.method.sampler
    assert isinstance(s, fastis.HistorySampler)
    one_pass = -(-len(data[0]) // 16)
    expected = max(one_pass, 2 * cfg.history_rebuild_every - 1)
    assert s.max_staleness == (expected if method == "history-stable" else None)
    for _ in range(25):
        assert math.isfinite(float(trainer.step().detach()))
    assert trainer.result()["sampler"]["steps"] == 25


def test_interleaved_runner_refuses_bad_arguments():
    cfg = [RunConfig(method="uniform", budget=0.01, lr=0.1, batch_size=16)]
    data = _synthetic()
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="slice_seconds must be finite and > 0"):
            interleave.run_interleaved(cfg, data, slice_seconds=bad)
    with pytest.raises(ValueError, match="threads must be None or an int >= 1, got 0"):
        interleave.run_interleaved(cfg, data, threads=0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got -1"):
        interleave.run_interleaved(cfg, data, warmup_steps=-1)
    with pytest.raises(ValueError, match="cfgs must hold at least one"):
        interleave.run_interleaved([], data)


def test_intra_op_threads_are_restored():
    before = torch.get_num_threads()
    with interleave.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# -- the workloads: data, networks, runs, and the report's paired ratios -----------------


def test_tabular_task_is_deterministic_imbalanced_noisy_and_nonlinear():
    n = 3000
    x, y, clean = data.tabular_raw(n, seed=7)
    again = data.tabular_raw(n, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((x, y, clean), again, strict=True))
    assert not torch.equal(x, data.tabular_raw(n, seed=8)[0])
    assert x.shape == (n, data.TABULAR_FEATURES) and x.dtype == torch.float64
    assert y.dtype == clean.dtype == torch.int64
    # the clean labels take the documented shares; a few percent are replaced, always
    # by another class
    shares = torch.bincount(clean, minlength=data.TABULAR_CLASSES).double() / n
    torch.testing.assert_close(
        shares, torch.tensor(data.TABULAR_CLASS_SHARES, dtype=torch.float64), atol=0.01, rtol=0
    )
    flipped = (y != clean).double().mean().item()
    assert abs(flipped - data.TABULAR_LABEL_NOISE) < 0.01  # binomial sd 0.003
    # raw columns on scales four orders of magnitude apart and more
    std = x.std(0)
    assert std.max() / std.min() > 1e4
    # not linearly separable: least squares on one-hot clean labels (float64, with a
    # bias column) classifies far fewer rows right than the teacher, which gets them all
    xs = torch.cat([(x - x.mean(0)) / std, torch.ones(n, 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(xs, torch.nn.functional.one_hot(clean).double()).solution
    assert ((xs @ w).argmax(1) == clean).double().mean() < 0.85
    assert data.tabular_raw(n, seed=7)[1].unique().numel() == data.TABULAR_CLASSES


def test_tabular_split_is_standardised_with_the_training_statistics():
    x, y, x_test, y_test = data.tabular(1000, seed=3)
    raw, labels, _ = data.tabular_raw(1000, seed=3)
    assert x.shape == (800, data.TABULAR_FEATURES) and x_test.shape == (200, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.cat([y, y_test]), labels)
    x64 = x.double()
    torch.testing.assert_close(x64.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x64.std(0), torch.ones(32, dtype=torch.float64), atol=1e-5, rtol=0)
    # the test rows with the training rows' statistics, not their own
    mean, std = raw[:800].mean(0), raw[:800].std(0)
    torch.testing.assert_close(x_test.double(), (raw[800:] - mean) / std, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="num_samples must be at least 50, got 20"):
        data.tabular(20)


def test_workloads_load_their_data_and_build_their_networks():
    from fastis.demo import models
    from fastis.demo.config import WORKLOADS

    for workload in WORKLOADS:
        x, y, x_test, y_test = data.load(workload, 500, seed=1)
        torch.manual_seed(0)
        model = models.build(workload)
        logits = model(x[:5])
        assert logits.shape == (5, int(y.max()) + 1 if workload == "tabular-mlp" else 10)
        assert len(x) == 400 and len(x_test) == 100
    assert isinstance(models.build(), MNIST1DCNN)
    sizes = {w: sum(p.numel() for p in models.build(w).parameters()) for w in WORKLOADS}
    assert sizes == {"demo": 9610, "wide-cnn": 216458, "tabular-mlp": 75268}
    # the demo's network is built exactly as before (same draws, same weights)
    torch.manual_seed(5)
    a = models.build("demo")
    torch.manual_seed(5)
    b = MNIST1DCNN()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="unknown workload 'resnet'"):
        models.build("resnet")
    with pytest.raises(ValueError, match="unknown workload 'resnet'"):
        data.load("resnet", 500)


@pytest.mark.parametrize("workload", ["wide-cnn", "tabular-mlp"])
def test_each_workload_trains_end_to_end(workload):
    from fastis.demo import models

    x, y, x_test, y_test = data.load(workload, 600, seed=2)
    cfgs = [
        RunConfig(
            method=m,
            budget=0.3,
            lr=0.05,
            batch_size=32,
            presample_size=96,
            evals=2,
            workload=workload,
            schedule="paper-step",
        )
        for m in ("uniform", "upper-bound")
    ]
    records = interleave.run_interleaved(
        cfgs, (x, y, x_test, y_test), slice_seconds=0.1, threads=1, warmup_steps=1
    )
    for r in records:
        assert r["config"]["workload"] == workload and r["steps"] > 0
        assert r["curve"]["time"][-1] >= 0.3 and math.isfinite(r["final_train_loss"])
    assert len({r["curve"]["train_loss"][0] for r in records}) == 1  # same initial weights
    trainer = train.Trainer(cfgs[1], (x, y, x_test, y_test), curve=False)
    kind = {"wide-cnn": models.WideCNN1D, "tabular-mlp": models.TabularMLP}[workload]
    assert isinstance(trainer.model, kind)
    trainer.method.sampler.tau_th = -1.0  # an importance step through the workload's net
    assert math.isfinite(float(trainer.step().detach()))
    assert trainer.method.summary()["steps_importance"] == 1


def test_default_rates_per_workload():
    from fastis.demo.config import default_lr

    for schedule in SCHEDULES:
        for m in DEFAULT_LR[schedule]:
            assert default_lr("demo", schedule, m) == DEFAULT_LR[schedule][m]
            for w in ("wide-cnn", "tabular-mlp"):
                rate = default_lr(w, schedule, m)
                assert math.isfinite(rate) and rate > 0
                if m in VARIANTS and m not in GAINED:
                    assert rate == default_lr(w, schedule, "upper-bound")
                    if schedule != "constant":  # one rate for the decaying schedules
                        assert rate == default_lr(w, "paper-step", m)
                if m in GAINED and schedule in ("constant", "step"):  # not tuned there:
                    assert rate == default_lr(w, schedule, "upper-bound") / 2  # over the cap
    with pytest.raises(ValueError, match="unknown workload 'resnet'"):
        default_lr("resnet", "step", "uniform")
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        default_lr("wide-cnn", "linear", "uniform")


def _curve(times, losses):
    return {"time": times, "train_loss": losses, "test_error": [0.5] * len(times)}


def test_time_to_reach_interpolates_in_log_loss():
    c = _curve([0.0, 1.0, 2.0, 3.0], [1.0, 0.1, 0.01, 0.02])
    assert report.time_to_reach(c, 1.0) == 0.0
    assert report.time_to_reach(c, 0.1) == 1.0
    # halfway between 0.1 and 0.01 in log loss: halfway in time
    assert report.time_to_reach(c, 0.1 * 0.1**0.5) == pytest.approx(1.5, abs=1e-12)
    assert report.time_to_reach(c, 0.03) == pytest.approx(1 + math.log(0.1 / 0.03) / math.log(10))
    assert report.time_to_reach(c, 0.005) == math.inf
    assert report.time_to_reach(c, math.nan) == math.inf
    # after a non-finite loss, or at a zero one, the evaluation's own time
    assert report.time_to_reach(_curve([0.0, 1.0, 2.0], [math.nan, math.inf, 0.5]), 0.6) == 2.0
    assert report.time_to_reach(_curve([0.0, 1.0], [1.0, 0.0]), 0.5) == 1.0


def test_speedup_is_paired_and_defined_for_slower_methods_too():
    uniform = _curve([0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 0.5, 0.25, 0.125, 0.0625])
    # twice as fast (the same curve in half the time, then lower)
    fast = _curve([0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 0.25, 0.0625, 0.015625, 0.004])
    assert report.speedup(fast, uniform) == pytest.approx(2.0)
    # twice as slow: ends at 0.25, which uniform reached at 2 s of its 4
    slow = _curve([0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 0.5**0.5, 0.5, 0.5**1.5, 0.25])
    assert report.speedup(slow, uniform) == pytest.approx(0.5)
    assert report.speedup(uniform, uniform) == 1.0
    diverged = _curve([0.0, 1.0], [1.0, math.nan])
    assert math.isnan(report.speedup(diverged, uniform))
    runs = {
        name: {
            "curve": c,
            "final_train_loss": c["train_loss"][-1],
            "final_test_error": 0.1,
            "steps": 10,
            "steps_importance": 5,
            "seconds_per_step": 0.4,
        }
        for name, c in {"uniform": uniform, "fast": fast, "slow": slow}.items()
    }
    rows = {r["method"]: r for r in report.summarise(runs)}
    assert rows["uniform"]["loss_ratio"] == 1.0 and rows["slow"]["loss_ratio"] == 4.0
    assert rows["fast"]["loss_ratio"] == pytest.approx(0.004 / 0.0625)
    assert rows["slow"]["time_to_uniform_loss"] == math.inf
    assert rows["slow"]["speedup"] == pytest.approx(0.5)
    assert "| slow |" in report.table(list(rows.values())) and "0.50x" in report.table(
        list(rows.values())
    )
