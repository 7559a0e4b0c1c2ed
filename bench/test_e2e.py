"""The end-to-end benchmark: a smoke run of both modes, and its CIFAR-10 setting."""

import pickle

import numpy as np
import pytest
import torch

from bench import cifar10


def test_e2e_benchmark_smoke(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    from bench import e2e

    monkeypatch.setenv("FASTIS_CACHE_DIR", str(tmp_path / "cache"))
    records = e2e.main(
        [
            "--methods",
            "uniform",
            "history",
            "infobatch",
            "--seeds",
            "0",
            "1",
            "--budget",
            "0.3",
            "--num-samples",
            "1500",
            "--evals",
            "2",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
        ]
    )
    assert set(records) == {"uniform", "history", "infobatch"}
    assert all(len(rows) == 2 and rows[0]["steps"] > 0 for rows in records.values())
    text = (tmp_path / "e2e_smoke.md").read_text()
    assert "| uniform |" in text and "±" in text
    best = e2e.main(
        [
            "--methods",
            "uniform",
            "--seeds",
            "0",
            "--budget",
            "0.2",
            "--num-samples",
            "1500",
            "--evals",
            "1",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
            "--sweep",
            "0.01",
            "0.1",
        ]
    )
    assert best["uniform"] in (0.01, 0.1)
    assert "lr 0.01 | lr 0.1 | best" in (tmp_path / "e2e_lr_sweep_smoke.md").read_text()


def test_e2e_schedules_sequential_and_sweep_then_compare(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    from bench import e2e

    monkeypatch.setenv("FASTIS_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--num-samples", "1500", "--evals", "1", "--out", str(tmp_path), "--seeds", "0"]
    by_schedule = e2e.main(
        ["--methods", "uniform", "upper-bound-constant-noise", "--budget", "0.2"]
        + ["--schedule", "paper-step", "cosine", "--no-interleave", "--name", "seq"]
        + common
    )
    assert set(by_schedule) == {"paper-step", "cosine"}
    for schedule in by_schedule:
        text = (tmp_path / f"e2e_seq_{schedule}.md").read_text()
        assert f"{schedule} schedule" in text and "one after the other" in text
        assert "| upper-bound-constant-noise | 0.1 |" in text
    records = e2e.main(
        ["--methods", "uniform", "upper-bound-measured", "--budget", "0.15", "--slice", "0.05"]
        + ["--sweep", "0.05", "0.1", "--compare-seeds", "1", "--schedule", "constant"]
        + ["--name", "grid"]
        + common
    )
    assert set(records) == {"uniform", "upper-bound-measured"}
    assert all(len(rows) == 1 for rows in records.values())
    sweep = (tmp_path / "e2e_lr_sweep_grid.md").read_text()
    assert "(edge)" in sweep and "interleaved in one process, 0.05 s slices" in sweep
    compared = (tmp_path / "e2e_grid.md").read_text()
    assert "seeds [1]" in compared and "1 intra-op thread(s)" in compared


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--slice", "0"], "--slice must be finite and > 0, got 0.0"),
        (["--slice", "inf"], "--slice must be finite and > 0, got inf"),
        (["--threads", "-1"], "--threads must be >= 0, got -1"),
        (["--warmup", "-2"], "--warmup must be >= 0, got -2"),
        (["--budget", "0"], "--budget must be finite and > 0"),
        (["--compare-seeds", "3"], "--compare-seeds needs --sweep"),
        (["--sweep", "0.1", "--lr", *["0.1"] * 6], "--lr and --sweep exclude each other"),
        (["--schedule", "linear"], "invalid choice"),
    ],
)
def test_e2e_refuses_bad_options(argv, message, capsys):
    from bench import e2e

    with pytest.raises(SystemExit):
        e2e.main(argv)
    assert message in capsys.readouterr().err


def test_e2e_refuses_a_rate_count_that_does_not_match(capsys):
    from bench import e2e

    with pytest.raises(SystemExit):
        e2e.main(["--methods", "uniform", "history", "--lr", "0.1"])
    assert "--lr gives 1 rates for 2 methods" in capsys.readouterr().err


def test_resnet18_shapes():
    model = cifar10.ResNet18(width=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert cifar10.ResNet18(num_classes=7, width=4)(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def _write_cifar(root, n_per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n_per_batch).tolist(),
            b"batch_label": name.encode(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reader(tmp_path):
    _write_cifar(tmp_path / "cifar")
    x, y, x_test, y_test = cifar10.load(tmp_path / "cifar")
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
        plane = raw[1024 * c : 1024 * (c + 1)]
        assert torch.equal(x[0, c].flatten().argsort(stable=True), plane.argsort(stable=True))


def test_cifar10_reader_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing data_batch_1"):
        cifar10.load(tmp_path / "empty")
