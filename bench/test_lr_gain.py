"""The learning-rate gain's benchmark: a smoke run of its tuning and comparison."""

import pytest


def test_lr_gain_benchmark_smoke(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    from bench import lr_gain

    monkeypatch.setenv("FASTIS_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "lr_gain.md"
    results = lr_gain.main(
        [
            "--schedules",
            "paper-step",
            "--seeds",
            "1",
            "--gain-lrs",
            "0.05",
            "0.1",
            "--budget",
            "0.3",
            "--num-samples",
            "1500",
            "--evals",
            "2",
            "--slice",
            "0.1",
            "--out",
            str(out),
        ]
    )
    gain_lr, tuning, rows = results["paper-step"]
    assert gain_lr in (0.05, 0.1)
    assert set(tuning) == {"upper-bound", "gain lr 0.05", "gain lr 0.1"}
    assert set(rows) == {"uniform", "upper-bound", lr_gain.GAINED}
    assert all(len(r) == 1 and r[0]["steps"] > 0 for r in rows.values())
    text = out.read_text()
    assert "| upper-bound + gain |" in text and out.with_suffix(".json").exists()
