"""The end-to-end benchmark: a smoke run of both modes, and its CIFAR-10 setting."""

import math
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
    assert "edge**" in sweep and "interleaved in one process, 0.05 s slices" in sweep
    assert "Best rate strictly inside the grid: none. Not inside (extend the grid" in sweep
    compared = (tmp_path / "e2e_grid.md").read_text()
    assert "seeds [1]" in compared and "1 intra-op thread(s)" in compared
    # the rates came from an edge of a two-rate grid: the comparison says so
    assert compared.count(" (grid edge) |") == 2


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
        (["--workload", "resnet"], "invalid choice"),
        (["--cifar", "x", "--workload", "wide-cnn"], "--cifar trains its own ResNet-18"),
        (["--step-times", "0"], "--step-times must be finite and > 0, got 0.0"),
        (["--step-times", "1", "--sweep", "0.1"], "--step-times times the default rates"),
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


def test_grid_position_and_ratio_summary():
    from bench import e2e

    grid = [0.01, 0.1, 1.0]
    loss = {0.01: 3.0, 0.1: 1.0, 1.0: 2.0}
    assert e2e.grid_position(grid, loss, 0.1) == "inside"
    assert e2e.grid_position(grid, loss, 0.01) == "lower edge"
    assert e2e.grid_position(grid, loss, 1.0) == "upper edge"
    assert e2e.grid_position([0.1], {0.1: 1.0}, 0.1) == "one rate"
    assert e2e.grid_position(grid, dict.fromkeys(grid, math.inf), 0.01) == "all diverged"
    # the geometric mean and the range; a diverged seed counted, not dropped silently
    assert e2e.ratio_summary([2.0, 8.0]) == "4 [2, 8]"
    assert e2e.ratio_summary([0.5, math.nan, 2.0]) == "1 [0.5, 2] (1 n/a)"
    assert e2e.ratio_summary([math.nan]) == "n/a"


def test_e2e_tabular_workload_compare_and_sweep(tmp_path):
    from bench import e2e

    common = ["--workload", "tabular-mlp", "--num-samples", "800", "--evals", "2"]
    common += ["--out", str(tmp_path), "--methods", "uniform", "upper-bound"]
    records = e2e.main(
        common
        + ["--seeds", "0", "1", "--budget", "0.3", "--slice", "0.1", "--schedule", "constant"]
    )
    assert all(len(rows) == 2 for rows in records.values())
    assert all(r["run"]["config"]["workload"] == "tabular-mlp" for r in records["upper-bound"])
    text = (tmp_path / "e2e_tabular-mlp_cpu_constant.md").read_text()
    assert "the generated table (fastis.demo.data.tabular), 800 rows" in text
    assert "75268 parameters" in text and "| loss / uniform |" in text
    uniform = next(ln for ln in text.splitlines() if ln.startswith("| uniform |"))
    assert uniform.count("1 [1, 1]") == 2  # its own loss ratio and speed-up, every seed
    best = e2e.main(common + ["--seeds", "0", "--budget", "0.15", "--sweep", "0.3", "0.03", "0.1"])
    assert set(best) == {"uniform", "upper-bound"}
    sweep = (tmp_path / "e2e_lr_sweep_tabular-mlp_cpu_step.md").read_text()
    assert "| lr 0.03 | lr 0.1 | lr 0.3 | best | where |" in sweep
    for m, rate in best.items():
        where = {0.03: "**lower edge**", 0.1: "inside", 0.3: "**upper edge**"}[rate]
        assert next(ln for ln in sweep.splitlines() if ln.startswith(f"| {m} |")).endswith(
            f"| {rate:g} | {where} |"
        )


def test_e2e_step_times_of_the_wide_cnn(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    from bench import e2e

    monkeypatch.setenv("FASTIS_CACHE_DIR", str(tmp_path / "cache"))
    ms = e2e.main(
        ["--workload", "wide-cnn", "--step-times", "0.2", "--slice", "0.1", "--warmup", "1"]
        + ["--num-samples", "600", "--out", str(tmp_path), "--seeds", "3"]
    )
    assert set(ms) == {"uniform", "importance (IS every step)"}
    assert all(v > 0 for v in ms.values())
    text = (tmp_path / "e2e_step_times_wide-cnn_cpu.md").read_text()
    assert "the wide 1-D CNN (WideCNN1D), 216458 parameters" in text
    assert "| uniform |" in text and "| 1.00 | " in text and "b = 128, B = 384" in text
    assert "| mode | steps | CPU ms/step | / uniform | wall ms/step | / uniform |" in text
