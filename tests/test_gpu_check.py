"""The GPU check script must not rot between the sessions that have a GPU: smoke-run it."""

import json

from bench import gpu_check


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    report = gpu_check.main(["--device", "cpu", "--quick", "--skip-tests", "--out",
                             str(tmp_path)])
    assert report["copy_GBps"] > 0
    assert {r["dtype"] for r in report["score"]} == {"float32", "bfloat16"}
    assert all(r["fastis_ms"] > 0 and r["eager_ms"] > 0 for r in report["score"])
    (md,) = tmp_path.glob("gpu_*.md")
    assert "fastis.score" in md.read_text()
    (js,) = tmp_path.glob("gpu_*.json")
    saved = json.loads(js.read_text())
    assert saved["score"] and saved["cross_entropy"] and saved["extra_alias"]
    costs = saved["extra_sampler"]["step_costs"]
    assert len(costs) == 2 and all(r["on_ms"] > 0 and "error" not in r for r in costs)


def test_gpu_check_deadline_skips_and_still_writes(tmp_path):
    report = gpu_check.main(["--device", "cpu", "--quick", "--skip-tests", "--out",
                             str(tmp_path), "--deadline", "0"])
    assert len(report["skipped"]) == 2 + len(gpu_check.SECTIONS)
    (md,) = tmp_path.glob("gpu_*.md")
    assert "skipped past the deadline: sampler_section" in md.read_text()
