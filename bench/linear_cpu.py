"""CPU forward + backward of ``fastis.linear_cross_entropy`` against the naive composition.

    python -m bench.linear_cpu [--rows 2048] [--dim 512] [--classes 32000,64000,128000]
        [--dtypes float32,bfloat16] [--threads 1,2] [--rounds 2] [--memory]

Per dtype, vocabulary size and intra-op thread count, in one process: ``fused``, the public
function with the score and the mean reduction (its gradients formed in forward,
``linear_xent_fused``: three ``[N, D] x [D, V]`` products); ``recompute``, the same loss
through ``linear_xent`` and its recomputing backward (four products: the path before the
gradients moved into forward, still the one for ``reduction='none'``); ``naive``,
``F.cross_entropy(F.linear(h, w).float(), y)`` (three products in the inputs' dtype); and,
as the unit of cost, one such product in float32. Timed in alternating rounds after one
warm-up call each (the machine's drift hits every variant alike).

``--memory``: the peak resident memory that one step of each variant adds to a fresh
process that holds the inputs and has run the variant once at a tiny size (imports,
first-call setup): the step's buffers, its gradients included.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastis
from fastis import linear_ops


def variants(N, D, V, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    h32, w32 = h.detach().float(), w.detach().float()

    def fused():
        loss, _ = fastis.linear_cross_entropy(h, w, y, return_score=True)
        loss.backward()
        h.grad = w.grad = None

    def recompute():
        loss, _, _ = linear_ops.linear_xent(h, w, None, y, -100, 0.0, True)
        (loss.sum() / N).backward()
        h.grad = w.grad = None

    def naive():
        F.cross_entropy(F.linear(h, w).float(), y).backward()
        h.grad = w.grad = None

    def product():
        torch.mm(h32, w32.T)

    return {"fused": fused, "recompute": recompute, "naive": naive, "product": product}


def measure(N, D, V, dtype, threads, rounds) -> tuple[dict, dict]:
    """Medians of the wall-clock and of the process's CPU time per step, by variant."""
    torch.set_num_threads(threads)
    steps = variants(N, D, V, dtype)
    for step in steps.values():
        step()
    wall, cpu = ({name: [] for name in steps} for _ in range(2))
    for _ in range(rounds):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return tuple({k: statistics.median(v) for k, v in t.items()} for t in (wall, cpu))


def peak_rss_step(N, D, V, dtype, name) -> float:
    """MiB of peak resident memory one step of ``name`` adds (run in this process)."""
    torch.set_num_threads(1)
    variants(8, 4, 16, getattr(torch, dtype))[name]()  # imports, first-call setup
    step = variants(N, D, V, getattr(torch, dtype))[name]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_table(N, D, dtypes, classes):
    print(f"\nPeak resident memory added by one step (MiB), N={N} D={D}, one process each")
    print("| dtype | V | fused | recompute | naive | [N, V] float32 | [V, D] float32 |")
    print("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for V in classes:
            row = {}
            for name in ("fused", "recompute", "naive"):
                code = (
                    "import json, bench.linear_cpu as b; "
                    f"print(json.dumps(b.peak_rss_step({N}, {D}, {V}, {dtype!r}, {name!r})))"
                )
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                row[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {dtype} | {V} | {row['fused']:.0f} | {row['recompute']:.0f} | "
                  f"{row['naive']:.0f} | {N * V * 4 / 2**20:.0f} | {V * D * 4 / 2**20:.0f} |",
                  flush=True)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", default="32000,64000,128000")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args(argv)
    classes = [int(v) for v in args.classes.split(",")]
    dtypes = args.dtypes.split(",")
    if args.memory:
        memory_table(args.rows, args.dim, dtypes, classes)
        return
    print(f"N={args.rows} D={args.dim}, median of {args.rounds} rounds, seconds per step "
          "(wall clock; CPU: the process's CPU time, all threads)")  # fmt: skip
    print("| dtype | V | threads | fused | recompute | naive | product | fused / naive "
          "| recompute / naive | fused / naive, CPU | recompute / naive, CPU "
          "| naive / product, CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for V in classes:
            for threads in (int(t) for t in args.threads.split(",")):
                t, c = measure(args.rows, args.dim, V, getattr(torch, dtype), threads,
                               args.rounds)  # fmt: skip
                print(f"| {dtype} | {V} | {threads} | {t['fused']:.2f} | {t['recompute']:.2f} "
                      f"| {t['naive']:.2f} | {t['product']:.2f} "
                      f"| {t['fused'] / t['naive']:.2f} | {t['recompute'] / t['naive']:.2f} "
                      f"| {c['fused'] / c['naive']:.2f} | {c['recompute'] / c['naive']:.2f} "
                      f"| {c['naive'] / c['product']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
