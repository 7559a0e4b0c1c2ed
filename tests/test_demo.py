"""The fastis command: the demo end to end at a tiny budget, its errors, data, baselines."""

import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mnist1d")

from fastis import cli  # noqa: E402
from fastis.demo import baselines, data, report, train  # noqa: E402


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
            "uniform,upper-bound,history,loss,infobatch,selective-backprop",
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
        (["demo", "--schedule", "cosine"], "invalid choice"),
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
