"""The step-cost benchmark at a tiny size, so that it keeps running (no timing asserted)."""

import math
import os
import time

import pytest

from bench import step_cost


def test_step_cost_smoke(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTIS_BACKEND", raising=False)
    out = tmp_path / "step_cost.md"
    result = step_cost.main(
        ["--steps", "4", "--rounds", "2", "--num-samples", "1000", "--out", str(out)]
    )
    backends = ["torch"] + (["native"] if step_cost.native_built() else [])
    assert [r["backend"] for r in result["rows"]] == backends
    for row in result["rows"]:
        for key in ("plain_ms", "off_ms", "on_ms", "forward_B_ms", "ideal_ms"):
            assert math.isfinite(row[key]) and row[key] > 0
        assert math.isclose(row["off_over_plain"], row["off_ms"] / row["plain_ms"])
        assert math.isclose(row["on_over_ideal"], row["on_ms"] / row["ideal_ms"])
        # the sampled steps do more than the plain one: scores, weights, bookkeeping
        assert row["calls_off"] > row["calls_plain"] and row["calls_on"] > row["calls_off"]
    text = out.read_text()
    assert "| torch |" in text and "off / plain" in text and "clock: thread" in text
    # the variable is restored after the run
    assert "FASTIS_BACKEND" not in os.environ


@pytest.mark.parametrize(
    ("clock", "timer"), [("wall", time.perf_counter), ("thread", time.thread_time)]
)
def test_both_clocks_use_the_shared_helper(monkeypatch, clock, timer):
    calls = []
    real = step_cost.interleaved_ms

    def spy(steps, calls_, device, rounds, clock):
        calls.append((sorted(steps), device, clock))
        return real(steps, calls_, device, rounds=rounds, clock=clock)

    monkeypatch.setattr(step_cost, "interleaved_ms", spy)
    result = step_cost.measure(2, 1, 1000, backends=["torch"], clock=clock)
    assert calls and calls[0][1] == "cpu" and "on[torch]" in calls[0][0]
    assert calls[0][2] is timer
    assert result["clock"] == clock and len(result["rows"]) == 1
