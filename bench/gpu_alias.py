"""GPU check section: ``fastis.AliasTable`` and ``fastis.sample`` against ``torch.multinomial``.

Run with the rest of the GPU check, or alone: ``python -m bench.gpu_check --parts alias``
(``--device cpu --quick`` for a smoke run on the torch path). What it measures (medians of
``triton.testing.do_bench`` on CUDA), against the alias sampler's goals:

- exactness on the device: the table's implied distribution against ``w / sum(w)`` for
  N = 2^26 with weights over 30 orders of magnitude (goal: relative 1e-6 for every item);
- build: ms, and the ratio to one read of the weights (4 N bytes) at the measured copy
  bandwidth (goal: <= 5 for N >= 2^24);
- draws: ``table.sample(n)`` against ``torch.multinomial(w, n, replacement=True)``
  (goal: >= 10x at N = 2^24, n = 2^20), with GB/s of the bytes a draw must move;
- one-shot ``b`` of ``B`` (B = 384..4096, b = B / 3): ms, kernels launched (goal: one or
  two), against ``torch.multinomial``;
- no host synchronisation in draws (``torch.cuda.set_sync_debug_mode("error")``) and CUDA
  graph capture of a one-shot draw.
"""

import json

import torch

import fastis
from bench._section import Part, Settings, table
from bench._timing import attempt, bench_ms, capture, describe, kernels_launched, synchronises

BUILD_N = [2**16, 2**20, 2**24, 2**26]
DRAW_GRID = [(2**20, 2**20), (2**24, 2**20), (2**24, 2**22), (2**26, 2**22)]
ONESHOT_B = [384, 1024, 4096]
QUICK_BUILD_N = [2**12, 2**16]
QUICK_DRAW_GRID = [(2**12, 2**12), (2**16, 2**14)]


def _weights(n, device, spread=4.0, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return 10.0 ** (torch.rand(n, generator=g, device=device) * spread)


def exactness(device, n):
    """Max relative error of the table's implied distribution (30 orders of magnitude)."""
    w = _weights(n, device, spread=30.0, seed=1)
    w[::101] = 0.0
    table = fastis.AliasTable(w)
    m = table.prob.clone()
    m.index_add_(0, table.alias.long(), 1.0 - table.prob)
    m /= n
    p = w.double() / w.double().sum()
    pos = p > 0
    rel = ((m[pos] - p[pos]).abs() / p[pos]).max().item()
    zero_ok = bool((m[~pos] == 0).all())
    split = table.prob < 1  # buckets that can hand over to their alias
    light_targets = int((table.probs[table.alias.long()][split] * n <= 1).sum())
    return {
        "N": n,
        "max_rel_error": rel,
        "weight0_never_drawn": zero_ok,
        "buckets_aliasing_a_light_item": light_targets,
        "goal": 1e-6,
    }


def build_rows(device, sizes, bandwidth):
    rows = []
    for n in sizes:
        w = _weights(n, device)
        table = fastis.AliasTable(w)
        ms = bench_ms(lambda w=w, t=table: t.rebuild(w), device)
        read_ms = 4 * n / (bandwidth * 1e6)  # one read of float32 weights at copy speed
        rows.append(
            {
                "N": n,
                "build_ms": ms,
                "x_one_read": ms / read_ms,
                "sum_ms": bench_ms(lambda w=w: torch.sum(w, dtype=torch.float64), device),
            }
        )
        del w, table
    return rows


def draw_rows(device, grid, bandwidth):
    rows = []
    for n_cat, n in grid:
        w = _weights(n_cat, device)
        table = fastis.AliasTable(w)
        g = torch.Generator(device).manual_seed(0)
        ms = bench_ms(lambda t=table, n=n, g=g: t.sample(n, generator=g), device)
        # per draw: one table row (8 + 4 bytes) read, 8 bytes of index written
        row = {
            "N": n_cat,
            "n": n,
            "fastis_ms": ms,
            "draws_per_s": n / ms * 1e3,
            "GBps": 20 * n / ms / 1e6,
        }
        row["fraction_of_copy"] = row["GBps"] / bandwidth
        mult = attempt(
            lambda w=w, n=n, g=g: bench_ms(
                lambda: torch.multinomial(w, n, replacement=True, generator=g), device
            )
        )
        row["multinomial_ms"] = mult
        if isinstance(mult, float):
            row["speedup_vs_multinomial"] = mult / ms
        rows.append(row)
        del w, table
    return rows


def oneshot_rows(device):
    rows = []
    for big in ONESHOT_B:
        b = big // 3
        w = torch.rand(big, device=device)
        g = torch.Generator(device).manual_seed(0)
        row = {
            "B": big,
            "b": b,
            "fastis_ms": bench_ms(
                lambda w=w, b=b, g=g: fastis.sample(w, b, generator=g, return_probs=True), device
            ),
            "multinomial_ms": bench_ms(
                lambda w=w, b=b, g=g: torch.multinomial(w, b, replacement=True, generator=g), device
            ),
        }
        row["speedup_vs_multinomial"] = row["multinomial_ms"] / row["fastis_ms"]
        if torch.device(device).type == "cuda":
            row["kernels"] = kernels_launched(
                lambda w=w, b=b: fastis.sample(w, b, return_probs=True)
            )
        rows.append(row)
    return rows


def sync_checks(device):
    """Draws must not synchronise; a one-shot draw must capture in a CUDA graph."""
    if torch.device(device).type != "cuda":
        return {"skipped": "needs CUDA"}
    w = torch.rand(4096, device=device)
    table = fastis.AliasTable(w)
    large = torch.rand(1 << 20, device=device)
    out = {
        "table.sample": synchronises(lambda: table.sample(1 << 16)),
        "sample b-of-B": synchronises(lambda: fastis.sample(w, 1365, return_probs=True)),
        "sample large": synchronises(lambda: fastis.sample(large, 1 << 12)),
    }
    try:
        graph, idx = capture(lambda: fastis.sample(w, 1365))
        graph.replay()
        torch.cuda.synchronize()
        out["cuda_graph"] = f"captured and replayed ({int(idx.max())} < 4096)"
    except Exception as exc:
        out["cuda_graph"] = f"failed: {describe(exc, 160)}"
    return out


def measure(settings: Settings) -> dict:
    device, quick, bandwidth = settings.device, settings.quick, settings.bandwidth
    return {
        "exactness": attempt(lambda: exactness(device, 2**14 if quick else 2**26)),
        "build": build_rows(device, QUICK_BUILD_N if quick else BUILD_N, bandwidth),
        "draw": draw_rows(device, QUICK_DRAW_GRID if quick else DRAW_GRID, bandwidth),
        "oneshot": oneshot_rows(device),
        "sync": sync_checks(device),
    }


BUILD_COLUMNS = [
    ("N", "N", "d"),
    ("build ms", "build_ms", ".4f"),
    ("x one read of w", "x_one_read", ".1f"),
    ("sum ms", "sum_ms", ".4f"),
]
DRAW_COLUMNS = [
    ("N", "N", "d"),
    ("n", "n", "d"),
    ("fastis ms", "fastis_ms", ".4f"),
    ("draws/s", "draws_per_s", ".3g"),
    ("GB/s", "GBps", ".0f"),
    ("of copy", "fraction_of_copy", ".0%"),
    ("multinomial ms", "multinomial_ms", ".4f"),
    ("x", "speedup_vs_multinomial", ".1f"),
]
ONESHOT_COLUMNS = [
    ("B", "B", "d"),
    ("b", "b", "d"),
    ("fastis ms", "fastis_ms", ".4f"),
    ("multinomial ms", "multinomial_ms", ".4f"),
    ("x", "speedup_vs_multinomial", ".1f"),
    ("kernels", "kernels", "s"),
]


def markdown(res: dict) -> list[str]:
    return [
        "## fastis.AliasTable and fastis.sample",
        "",
        f"Exactness: `{res['exactness']}`",
        "",
        *table(res["build"], BUILD_COLUMNS),
        "",
        *table(res["draw"], DRAW_COLUMNS),
        "",
        *table(res["oneshot"], ONESHOT_COLUMNS),
        "",
        f"Synchronisation: `{json.dumps(res['sync'])}`",
    ]


PARTS = [Part("alias", measure, markdown)]
