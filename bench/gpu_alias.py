"""GPU check of fastis.AliasTable / fastis.sample, for a session with a lent GPU.

    python bench/gpu_alias.py                        # on the GPU machine, from the repo root
    python bench/gpu_alias.py --device cpu --quick   # smoke run of this script (torch path)

Or from ``bench/gpu_check.py``: append ``alias_section`` to its ``SECTIONS`` (same
signature as ``score_section``); it fills ``report["extra_alias"]``.

What it measures (medians of ``triton.testing.do_bench`` on CUDA), against issue 4's goals:

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

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastis.alias as fa  # noqa: E402
from bench.gpu_check import bench_ms, copy_bandwidth  # noqa: E402

BUILD_N = [2**16, 2**20, 2**24, 2**26]
DRAW_GRID = [(2**20, 2**20), (2**24, 2**20), (2**24, 2**22), (2**26, 2**22)]
ONESHOT_B = [384, 1024, 4096]
QUICK_BUILD_N = [2**12, 2**16]
QUICK_DRAW_GRID = [(2**12, 2**12), (2**16, 2**14)]


def _weights(n, device, spread=4.0, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return 10.0 ** (torch.rand(n, generator=g, device=device) * spread)


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # a baseline out of memory or out of range must not end the run
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def exactness(device, n):
    """Max relative error of the table's implied distribution (30 orders of magnitude)."""
    w = _weights(n, device, spread=30.0, seed=1)
    w[::101] = 0.0
    table = fa.AliasTable(w)
    m = table.prob.clone()
    m.index_add_(0, table.alias.long(), 1.0 - table.prob)
    m /= n
    p = w.double() / w.double().sum()
    pos = p > 0
    rel = ((m[pos] - p[pos]).abs() / p[pos]).max().item()
    zero_ok = bool((m[~pos] == 0).all())
    split = table.prob < 1  # buckets that can hand over to their alias
    light_targets = int((table.probs[table.alias.long()][split] * n <= 1).sum())
    return {"N": n, "max_rel_error": rel, "weight0_never_drawn": zero_ok,
            "buckets_aliasing_a_light_item": light_targets, "goal": 1e-6}


def build_rows(device, sizes, bandwidth):
    rows = []
    for n in sizes:
        w = _weights(n, device)
        table = fa.AliasTable(w)
        ms = bench_ms(lambda w=w, t=table: t.rebuild(w), device)
        read_ms = 4 * n / (bandwidth * 1e6)  # one read of float32 weights at copy speed
        rows.append({"N": n, "build_ms": ms, "x_one_read": ms / read_ms,
                     "sum_ms": bench_ms(lambda w=w: torch.sum(w, dtype=torch.float64), device)})
        del w, table
    return rows


def draw_rows(device, grid, bandwidth):
    rows = []
    for n_cat, n in grid:
        w = _weights(n_cat, device)
        table = fa.AliasTable(w)
        g = torch.Generator(device).manual_seed(0)
        ms = bench_ms(lambda t=table, n=n, g=g: t.sample(n, generator=g), device)
        # per draw: one table row (8 + 4 bytes) read, 8 bytes of index written
        row = {"N": n_cat, "n": n, "fastis_ms": ms, "draws_per_s": n / ms * 1e3,
               "GBps": 20 * n / ms / 1e6}
        row["fraction_of_copy"] = row["GBps"] / bandwidth
        mult = _try(lambda w=w, n=n, g=g: bench_ms(
            lambda: torch.multinomial(w, n, replacement=True, generator=g), device))
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
        row = {"B": big, "b": b,
               "fastis_ms": bench_ms(lambda w=w, b=b, g=g: fa.sample(
                   w, b, generator=g, return_probs=True), device),
               "multinomial_ms": bench_ms(lambda w=w, b=b, g=g: torch.multinomial(
                   w, b, replacement=True, generator=g), device)}
        row["speedup_vs_multinomial"] = row["multinomial_ms"] / row["fastis_ms"]
        if device == "cuda":
            row["kernels"] = _kernels(lambda w=w, b=b: fa.sample(w, b, return_probs=True))
        rows.append(row)
    return rows


def _kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def sync_checks(device):
    """Draws must not synchronise; a one-shot draw must capture in a CUDA graph."""
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    out = {}
    w = torch.rand(4096, device=device)
    table = fa.AliasTable(w)
    for name, fn in (("table.sample", lambda: table.sample(1 << 16)),
                     ("sample b-of-B", lambda: fa.sample(w, 1365, return_probs=True)),
                     ("sample large", lambda: fa.sample(torch.rand(1 << 20, device=device),
                                                        1 << 12))):
        fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            out[name] = "no sync"
        except RuntimeError as exc:
            out[name] = f"SYNC: {str(exc)[:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fa.sample(w, 1365)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g):
            idx = fa.sample(w, 1365)
        g.replay()
        torch.cuda.synchronize()
        out["cuda_graph"] = f"captured and replayed ({int(idx.max())} < 4096)"
    except Exception as exc:
        out["cuda_graph"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
    return out


def run(report, device="cuda", quick=False, bandwidth=None):
    """Fills ``report["extra_alias"]`` with the sections above; returns it."""
    if bandwidth is None:
        bandwidth = copy_bandwidth(device, 1 << (24 if quick else 30))
    res = {"copy_GBps": bandwidth}
    res["exactness"] = _try(lambda: exactness(device, 2**14 if quick else 2**26))
    res["build"] = build_rows(device, QUICK_BUILD_N if quick else BUILD_N, bandwidth)
    res["draw"] = draw_rows(device, QUICK_DRAW_GRID if quick else DRAW_GRID, bandwidth)
    res["oneshot"] = oneshot_rows(device)
    res["sync"] = sync_checks(device)
    report["extra_alias"] = res
    return res


def alias_section(report, device, shapes, bandwidth):
    """``bench/gpu_check.py`` SECTIONS entry (``shapes`` is unused: the sizes are N, n)."""
    run(report, device, quick=len(shapes) <= 2, bandwidth=bandwidth)


def to_markdown(res, title):
    lines = [f"# {title}", "", f"copy bandwidth {res['copy_GBps']:.0f} GB/s (read + write)", "",
             f"Exactness: `{res['exactness']}`", "",
             "| N | build ms | x one read of w | sum ms |", "|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['build_ms']:.4f} | {r['x_one_read']:.1f} | {r['sum_ms']:.4f} |"
              for r in res["build"]]
    lines += ["", "| N | n | fastis ms | Gdraws/s | GB/s | of copy | multinomial ms | x |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["draw"]:
        mult = r["multinomial_ms"]
        mult = f"{mult:.4f}" if isinstance(mult, float) else "refused"
        lines.append(f"| {r['N']} | {r['n']} | {r['fastis_ms']:.4f} | "
                     f"{r['draws_per_s'] / 1e9:.2f} | {r['GBps']:.0f} | "
                     f"{r['fraction_of_copy']:.0%} | {mult} | "
                     f"{r.get('speedup_vs_multinomial', float('nan')):.1f} |")
    lines += ["", "| B | b | fastis ms | multinomial ms | x | kernels |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['b']} | {r['fastis_ms']:.4f} | {r['multinomial_ms']:.4f} | "
              f"{r['speedup_vs_multinomial']:.1f} | {r.get('kernels', 'n/a')} |"
              for r in res["oneshot"]]
    lines += ["", f"Synchronisation: `{json.dumps(res['sync'])}`", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --quick for a smoke run")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu smoke run"
    res = run({}, args.device, args.quick)
    card = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    text = to_markdown(res, f"fastis alias on {name}, "
                            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.device == "cuda":
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu_alias_{card}.md").write_text(text)
        (args.out / f"gpu_alias_{card}.json").write_text(json.dumps(res, indent=1))
    print(text)


if __name__ == "__main__":
    main()
