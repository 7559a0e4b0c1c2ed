"""GPU check section: ``fastis.score`` against the eager composition and ``torch.compile``.

Per shape and dtype: the median time, GB/s of the bytes the score must move (the logits
once, the int64 targets, the float32 scores) and their fraction of the copy bandwidth,
and the speed-up over the baselines. A cheap part checks a small step (1024 x 10): the
kernels it launches (one is the goal) and that it captures in a CUDA graph and replays
to the same result.
"""

import torch

import fastis
from bench._section import Part, Settings, table
from bench._timing import bench_ms, capture, describe, kernels_launched
from bench.providers import eager_score, inputs
from bench.shapes import DTYPES, FULL, QUICK


def measure(settings: Settings) -> list[dict]:
    device = settings.device
    compiled = torch.compile(eager_score)
    rows = []
    for dtype in DTYPES:
        for N, C in QUICK if settings.quick else FULL:
            logits, target, _ = inputs(N, C, dtype, device)
            nbytes = logits.numel() * logits.element_size() + target.numel() * 8 + N * 4
            row = {
                "N": N,
                "C": C,
                "shape": f"{N} x {C}",
                "bytes": nbytes,
                "dtype": str(dtype).removeprefix("torch."),
            }
            for name, fn in (
                ("fastis", fastis.score),
                ("eager", eager_score),
                ("compile", compiled),
            ):
                try:
                    row[f"{name}_ms"] = bench_ms(lambda fn=fn, z=logits, y=target: fn(z, y), device)
                except Exception as exc:  # a baseline out of memory must not end the run
                    row[f"{name}_ms"] = None
                    row[f"{name}_error"] = describe(exc, 120)
            ms = row["fastis_ms"]
            row["fastis_GBps"] = nbytes / ms / 1e6
            row["fraction_of_copy"] = row["fastis_GBps"] / settings.bandwidth
            for name in ("eager", "compile"):
                if row[f"{name}_ms"]:
                    row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / ms
            rows.append(row)
            del logits, target
    return rows


COLUMNS = [
    ("N x C", "shape", "s"),
    ("dtype", "dtype", "s"),
    ("fastis ms", "fastis_ms", ".4f"),
    ("GB/s", "fastis_GBps", ".0f"),
    ("of copy", "fraction_of_copy", ".0%"),
    ("eager ms", "eager_ms", ".4f"),
    ("x eager", "speedup_vs_eager", ".2f"),
    ("compile ms", "compile_ms", ".4f"),
    ("x compile", "speedup_vs_compile", ".2f"),
]


def markdown(rows: list[dict]) -> list[str]:
    return ["## fastis.score", "", *table(rows, COLUMNS)]


def small_step(settings: Settings) -> dict:
    """Launch count and CUDA-graph capture of ``fastis.score`` at 1024 x 10."""
    device = settings.device
    logits, target, _ = inputs(1024, 10, torch.float32, device)
    out = {}
    if torch.device(device).type == "cuda":
        out["kernels"] = kernels_launched(lambda: fastis.score(logits, target))
        try:
            graph, captured = capture(lambda: fastis.score(logits, target))
            logits.copy_(torch.randn_like(logits))
            graph.replay()
            torch.cuda.synchronize()
            ok = torch.allclose(captured, fastis.score(logits, target))
            out["cuda_graph"] = "captured and replayed" + ("" if ok else ", WRONG RESULT")
        except Exception as exc:
            out["cuda_graph"] = f"failed: {describe(exc)}"
    out["ms"] = bench_ms(lambda: fastis.score(logits, target), device)
    return out


def small_step_markdown(s: dict) -> list[str]:
    return [
        f"Small step (1024 x 10): {s['ms']:.4f} ms; kernels launched: "
        f"{s.get('kernels', 'n/a')}; CUDA graph: {s.get('cuda_graph', 'n/a')}"
    ]


PARTS = [
    Part("score", measure, markdown),
    Part("small_step", small_step, small_step_markdown, cheap=True),
]
