"""The fastis command: the demo end to end at a tiny budget, its errors, data, baselines."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")

from fastis import cli  # noqa: E402
from fastis.demo import baselines, data  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTIS_BACKEND", "torch")


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["demo", "--budget", "0.6", "--num-samples", "1500", "--evals", "3",
                     "--out", str(out), "--no-progress",
                     "--methods", "uniform,upper-bound,history,loss,infobatch,selective-backprop"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | train loss | test error |" in printed
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in results["summary"]]
    assert methods == ["uniform", "upper-bound", "history", "loss", "infobatch",
                       "selective-backprop"]
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
    proc = subprocess.run([sys.executable, "-m", "fastis", "info"], capture_output=True,
                          text=True, check=True)
    assert "fastis" in proc.stdout and "torch" in proc.stdout


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--methods", "uniform,magic"], "unknown method(s) magic"),
        (["demo", "--methods", "uniform,uniform"], "listed twice"),
        (["demo", "--budget", "-3"], "must be positive"),
        (["demo", "--budget", "soon"], "not a number"),
        (["demo", "--lr", "uniform=fast"], "not a number"),
        (["demo", "--schedule", "cosine"], "invalid choice"),
        (["demo", "--batch-size", "128", "--presample", "64"], "smaller than --batch-size"),
        (["demo", "--num-samples", "100"], "fewer than the presample"),
        ([], "required"),
    ],
)
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


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


def _write_cifar(root, n_per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                 b"batch_label": name.encode()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return rng


def test_cifar10_reader(tmp_path):
    _write_cifar(tmp_path / "cifar")
    x, y, x_test, y_test = data.cifar10(tmp_path / "cifar")
    assert x.shape == (30, 3, 32, 32) and x_test.shape == (6, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (30,)
    # normalised per channel with the training statistics
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    # the layout: a row is the red, green and blue planes, each 32 x 32 row-major; the
    # normalisation is increasing per channel, so each plane keeps the raw bytes' order
    with open(tmp_path / "cifar" / "data_batch_1", "rb") as f:
        raw = torch.from_numpy(pickle.load(f, encoding="bytes")[b"data"][0].astype(np.int64))
    for c in range(3):
        plane = raw[1024 * c:1024 * (c + 1)]
        assert torch.equal(x[0, c].flatten().argsort(stable=True), plane.argsort(stable=True))


def test_cifar10_reader_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing data_batch_1"):
        data.cifar10(tmp_path / "empty")


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


def test_e2e_benchmark_smoke(tmp_path):
    from bench import e2e

    records = e2e.main(["--methods", "uniform", "history", "infobatch", "--seeds", "0", "1",
                        "--budget", "0.3", "--num-samples", "1500", "--evals", "2",
                        "--out", str(tmp_path), "--name", "smoke"])
    assert set(records) == {"uniform", "history", "infobatch"}
    text = (tmp_path / "e2e_smoke.md").read_text()
    assert "| uniform |" in text and "±" in text
    best = e2e.main(["--methods", "uniform", "--seeds", "0", "--budget", "0.2",
                     "--num-samples", "1500", "--evals", "1", "--out", str(tmp_path),
                     "--name", "smoke", "--sweep", "0.01", "0.1"])
    assert best["uniform"] in (0.01, 0.1)


def test_resnet18_shapes():
    from bench.e2e import ResNet18

    model = ResNet18(width=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
