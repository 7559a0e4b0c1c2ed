"""The amortised-scoring variance benchmark at a tiny size: it runs, its table is complete,
and its variance ratios mean what they say."""

import pytest
import torch


def test_reuse_variance_runs_at_tiny_size(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    from bench import reuse_variance

    monkeypatch.setenv("FASTIS_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        out = reuse_variance.main(
            [
                "--num-samples",
                "600",
                "--checkpoints",
                "3",
                "12",
                "--pool",
                "96",
                "--batch-size",
                "8",
                "--draws",
                "1",
                "4",
                "--mc-steps",
                "16",
                "--time-calls",
                "5",
                "--out",
                str(tmp_path),
                "--name",
                "tiny",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    rows = out["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {
        "upper-bound B=24 k=1",
        "upper-bound B=24 k=4",
        "upper-bound B=64 k=1",
        "upper-bound B=64 k=4",
        "history-stable L=19 mix=0.1",
        "history mix=0.1",
        "history-stable L=19 mix=0.5",
        "history mix=0.5",
    }
    assert len(rows) == 2 * len(methods)
    for r in rows:
        assert r["var_step"] > 0 and r["var_k"] > 0 and r["ms"] > 0
        assert r["var_time"] == pytest.approx(r["var_k"] * r["ms"] / out["times"]["uniform"])
        if r["method"].startswith("history"):  # k = 1, exact given the tables
            assert r["var_k"] == r["var_exact"] > 0
        elif r["k"] == 1:  # one step per cycle: the two ratios are the same quantity
            assert r["var_k"] == pytest.approx(r["var_step"]) and r["var_exact"] is None
    text = (tmp_path / "tiny.md").read_text()
    assert "python -m bench.reuse_variance --num-samples 600" in text
    assert text.count("## After") == 2 and "history-stable L=19 mix=0.5" in text


def test_per_sample_grads_match_a_loop():
    """The torch.func per-example gradients against one backward per example."""
    from bench.reuse_variance import per_sample_grads
    from fastis.demo.models import MNIST1DCNN

    torch.manual_seed(0)
    model = MNIST1DCNN(channels=4)
    x, y = torch.randn(5, 40), torch.randint(0, 10, (5,))
    got = per_sample_grads(model, x, y, chunk=2)
    for i in range(5):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        want = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
