"""CPU forward + backward of ``fastis.linear_cross_entropy`` against the naive composition.

    python -m bench.linear_cpu [--rows 2048] [--dim 512] [--classes 32000] [--rounds 2]

Per dtype and intra-op thread count, in one process: the fused op (chunked torch path,
with the score), ``F.cross_entropy(F.linear(h, w).float(), y)`` and, as the unit of
cost, one ``[N, D] x [D, V]`` product in the fused path's compute dtype (float32), timed
in alternating rounds after one warm-up call each (the machine's drift hits every
variant alike). The fused path does four such products (forward logits, backward
logits again, ``dh``, ``dW``), the naive one three (in the inputs' dtype): the ratio of
the two is bounded below by about 4/3 in float32.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastis


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

    def naive():
        F.cross_entropy(F.linear(h, w).float(), y).backward()
        h.grad = w.grad = None

    def product():
        torch.mm(h32, w32.T)

    return {"fused": fused, "naive": naive, "product": product}


def measure(N, D, V, dtype, threads, rounds) -> dict:
    torch.set_num_threads(threads)
    steps = variants(N, D, V, dtype)
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"N={args.rows} D={args.dim} V={args.classes}, median of {args.rounds} rounds")
    print("| dtype | threads | fused s | naive s | fused / naive | product s | fused / product "
          "| naive / product |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for threads in (1, 2):
            t = measure(args.rows, args.dim, args.classes, dtype, threads, args.rounds)
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {threads} | {t['fused']:.2f} | {t['naive']:.2f} | "
                  f"{t['fused'] / t['naive']:.2f} | {t['product']:.2f} | "
                  f"{t['fused'] / t['product']:.1f} | {t['naive'] / t['product']:.1f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
