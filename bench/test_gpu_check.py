"""The GPU check must not rot between the runs that have a GPU: smoke-run it on the CPU."""

import dataclasses
import json

from bench import gpu_check

QUICK = ["--device", "cpu", "--quick", "--skip-tests"]


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    report = gpu_check.main([*QUICK, "--out", str(tmp_path)])
    assert report["copy_GBps"] > 0
    assert not report.get("errors") and not report.get("skipped")
    assert {r["dtype"] for r in report["score"]} == {"float32", "bfloat16"}
    assert all(r["fastis_ms"] > 0 and r["eager_ms"] > 0 for r in report["score"])
    assert all(r["fastis_ms"] > 0 and r["torch_ms"] > 0 for r in report["cross_entropy"])
    assert report["alias"]["exactness"]["max_rel_error"] < 1e-6
    (md,) = tmp_path.glob("gpu_*.md")
    text = md.read_text()
    for heading in (
        "## fastis.score",
        "## fastis.cross_entropy",
        "Small step (1024 x 10)",
        "Training step in a CUDA graph",
        "## fastis.AliasTable",
        "## Training loop (ImportanceSampler)",
    ):
        assert heading in text
    (js,) = tmp_path.glob("gpu_*.json")
    saved = json.loads(js.read_text())
    assert set(saved) >= {part.name for part in gpu_check.PARTS}
    costs = saved["sampler"]["step_costs"]
    assert len(costs) == 2 and all(r["on_ms"] > 0 and "error" not in r for r in costs)


def test_gpu_check_deadline_skips_and_still_writes(tmp_path):
    report = gpu_check.main([*QUICK, "--out", str(tmp_path), "--deadline", "0"])
    skipped = [entry.split(" ")[0] for entry in report["skipped"]]
    assert sorted(skipped) == sorted(part.name for part in gpu_check.PARTS)
    (md,) = tmp_path.glob("gpu_*.md")
    assert "skipped past the deadline: sampler" in md.read_text()


def test_gpu_check_some_parts_write_their_own_file(tmp_path):
    report = gpu_check.main([*QUICK, "--out", str(tmp_path), "--parts", "alias"])
    assert "alias" in report and "score" not in report and "sampler" not in report
    (md,) = tmp_path.glob("gpu_*.md")
    assert md.name.endswith("_alias.md")
    assert "## fastis.AliasTable" in md.read_text() and "fastis.score" not in md.read_text()


def test_a_failing_part_costs_only_itself(tmp_path, monkeypatch):
    def broken(settings):
        raise RuntimeError("out of memory")

    parts = [
        dataclasses.replace(p, measure=broken) if p.name == "small_step" else p
        for p in gpu_check.PARTS
    ]
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    report = gpu_check.main([*QUICK, "--out", str(tmp_path), "--parts", "small_step", "alias"])
    assert report["errors"] == {"small_step": "RuntimeError: out of memory"}
    assert "alias" in report
    (md,) = tmp_path.glob("gpu_*.md")
    assert "- small_step: error RuntimeError: out of memory" in md.read_text()


def test_section_table_cells():
    from bench._section import table

    columns = [("name", "name", "s"), ("ms", "ms", ".2f"), ("x", "x", ".1f")]
    rows = [
        {"name": "a", "ms": 1.234, "x": None},
        {"name": "b", "ms": "OutOfMemoryError"},
        {"name": "c", "error": "RuntimeError: no"},
    ]
    assert table(rows, columns) == [
        "| name | ms | x |",
        "|---|---|---|",
        "| a | 1.23 | - |",
        "| b | OutOfMemoryError | - |",
        "| c | RuntimeError: no |",
    ]


def test_linear_section_on_cpu_with_and_without_the_other_fused_layers(monkeypatch):
    import torch.nn.functional as F

    from bench import gpu_linear
    from bench._section import Settings

    settings = Settings(device="cpu", quick=True, bandwidth=1.0)
    rows = gpu_linear.linear(settings)
    assert [r["provider"] for r in rows] == ["fused", "naive"]  # neither package installed
    for r in rows:
        assert r["ms"] > 0 and r["MiB"] is None
        assert r["loss_err"] < 1e-5 and r["dh_err"] < 1e-5 and r["dw_err"] < 1e-5
    assert gpu_linear._optional("no_such_package_here", "x") is None

    # stand-ins with the packages' call signatures: their rows appear, measured alike
    def composed(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y)

    class Liger:
        def __call__(self, w, h, y):
            return composed(h, w, y)

    fakes = {"LigerFusedLinearCrossEntropyLoss": Liger, "linear_cross_entropy": composed}
    monkeypatch.setattr(gpu_linear, "_optional", lambda module, name: fakes[name])
    rows = gpu_linear.linear(settings)
    assert [r["provider"] for r in rows] == ["fused", "naive", "liger", "cce"]
    assert all(r["ms"] > 0 and r["dw_err"] < 1e-5 for r in rows)
    assert "| provider |" in "\n".join(gpu_linear.linear_markdown(rows))
