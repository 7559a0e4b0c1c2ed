"""The sequence importance sampling benchmark runs end to end at a tiny budget."""

import pytest
import torch

from bench import lm_sequences


@pytest.fixture
def restore_threads():
    """The benchmark runs on one intra-op thread; the test leaves the setting as it was."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_lm_sequences_smoke(tmp_path, restore_threads):
    argv = ["--budget", "0.2", "--lrs", "1e-3", "4e-3", "--seeds", "1", "2", "--max-extend", "1"]
    argv += ["--max-bytes", "150000", "--d-model", "8", "--batch-size", "4", "--slice", "0.1"]
    argv += ["--eval-size", "16", "--test-size", "16", "--out", str(tmp_path), "--name", "smoke"]
    report = lm_sequences.main(argv)
    assert set(report["best"]) == set(lm_sequences.METHODS)
    for method, by_lr in report["grid"].items():
        assert {1e-3, 4e-3} <= set(by_lr) and len(by_lr) <= 3  # one extension at most
        assert report["best"][method] in by_lr
    assert len(report["seeds"]) == 2 * len(lm_sequences.METHODS)
    always = [r for r in report["seeds"] if r["method_label"] == "importance-always"]
    assert all(r["importance_fraction"] == 1.0 and r["steps"] > 0 for r in always)
    text = (tmp_path / "smoke.md").read_text()
    assert "python -m bench.lm_sequences --budget 0.2" in text
    assert "## Learning-rate grid (seed 0)" in text and "(best" in text
    assert "| importance-always | " in text and "Difference to uniform" in text
