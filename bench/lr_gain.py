"""The learning-rate gain (``fastis.LRGain``) on the demo: Algorithm 1 (upper bound) with
and without it, and uniform sampling, at equal training time.

    python -m bench.lr_gain --phi-check        # paper-step and cosine, as in the results
    python -m bench.lr_gain --schedules constant --plain-lr 0.1 --uniform-lr 0.02 --seeds 1 2

Per schedule, the gain's base rate is first tuned on ``--tune-seed`` (a grid of
``--gain-lrs``; upper bound without the gain runs there too, at its tuned rate, for
reference), then the three methods, each at its tuned rate (uniform's and upper bound's
from ``bench/results/e2e_lr_sweep_mnist1d_cpu_*_tuned.md``, the gain's from the first
part), train on ``--seeds``. The runs of a seed train in one process in alternating
slices of ``--slice`` seconds of their own training (``fastis.demo.interleave``'s rule:
each run's clock counts its own steps only), on one intra-op thread. The demo's
``Trainer`` sets each step's scheduled rate; the gain's hooks scale it inside
``optimizer.step`` only. ``--phi-check`` also compares the gain's noise-share estimate
with the truth (``phi_check``). Writes ``--out`` (markdown) and its ``.json``
(``bench/results/lr_gain_cpu.md``: about 11 minutes at the defaults).
"""

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastis
from bench._timing import pin_glibc_malloc
from bench.e2e import geometric_mean, mean_spread, ratio_summary
from fastis.demo import data as demo_data
from fastis.demo import models, report
from fastis.demo.config import RunConfig
from fastis.demo.interleave import intra_op_threads
from fastis.demo.train import Trainer, warm_up

GAINED = "upper-bound + gain"


class GainLog:
    """The gains ``LRGain`` applied, one per optimizer step (a post-hook after its own)."""

    def __init__(self, gain: fastis.LRGain):
        self.gain, self.values = gain, []
        gain.optimizer.register_step_post_hook(lambda *a: self.values.append(gain.gain))

    def summary(self) -> dict:
        on = [g for g in self.values if g != 1.0]
        return {
            "gained_steps": len(on),
            "mean_gain_when_gained": statistics.fmean(on) if on else 1.0,
            "noise_share": self.gain.noise_share,
        }


def train(runs, data, args):
    """``runs``: ``[(label, RunConfig, max_gain or None)]``; their records, interleaved."""
    warm_up([cfg for _, cfg, _ in runs], data, args.warmup)
    trainers = []
    for label, cfg, max_gain in runs:
        t = Trainer(cfg, data)
        log = None
        if max_gain is not None:
            log = GainLog(fastis.LRGain(t.opt, t.method.sampler, max_gain=max_gain))
        trainers.append((label, t, log))
    while not all(t.done for _, t, _ in trainers):
        for _, t, _ in trainers:
            if not t.done:
                t.advance(args.slice)
    out = {}
    for label, t, log in trainers:
        r = t.result()
        r["gain"] = None if log is None else log.summary()
        out[label] = r
        print(
            f"  {label:>20} lr {t.cfg.lr:g}: loss {r['final_train_loss']:.3e}, error "
            f"{r['final_test_error']:.2%}, {r['steps']} steps, gain {r['gain']}",
            flush=True,
        )
    return out


def cfg(args, method, lr, seed, schedule):
    return RunConfig(
        method=method, budget=args.budget, lr=lr, seed=seed, schedule=schedule, evals=args.evals
    )


def tune(args, data, schedule):
    runs = [
        ("upper-bound", cfg(args, "upper-bound", args.plain_lr, args.tune_seed, schedule), None)
    ]
    runs += [
        (f"gain lr {lr:g}", cfg(args, "upper-bound", lr, args.tune_seed, schedule), args.max_gain)
        for lr in args.gain_lrs
    ]
    print(f"{schedule}: tuning the gain's rate on seed {args.tune_seed}", flush=True)
    recs = train(runs, data, args)
    losses = {lr: recs[f"gain lr {lr:g}"]["final_train_loss"] for lr in args.gain_lrs}
    finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else args.gain_lrs[0]
    return best, recs


def compare(args, data, schedule, gain_lr):
    rows = {m: [] for m in ("uniform", "upper-bound", GAINED)}
    for seed in args.seeds:
        print(f"{schedule}: seed {seed}", flush=True)
        runs = [
            ("uniform", cfg(args, "uniform", args.uniform_lr, seed, schedule), None),
            ("upper-bound", cfg(args, "upper-bound", args.plain_lr, seed, schedule), None),
            (GAINED, cfg(args, "upper-bound", gain_lr, seed, schedule), args.max_gain),
        ]
        recs = train(runs, data, args)
        for row in report.summarise(recs):
            rows[row["method"]].append({**row, "gain": recs[row["method"]]["gain"]})
    return rows


class _Uniform:
    variance_reduction = 1.0  # every step uniform: the gain measures, never scales


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def phi_check(args, data, steps=(250, 1000, 2500), lr=0.1, repeats=32):
    """The gain's noise-share estimate against the truth on the demo CNN trained with
    uniform batches of 128 (SGD, momentum 0.9, ``lr``): at each of ``steps``, ``|g|^2``
    from the whole training set's gradient and ``sigma^2`` from ``repeats`` batch
    gradients about it."""
    x, y = data[0], data[1]
    torch.manual_seed(0)
    model = models.build("demo")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gain = fastis.LRGain(opt, _Uniform(), max_gain=1.0, measure_uniform=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(1, max(steps) + 1):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step not in steps:
            continue
        opt.zero_grad()
        for i in range(0, len(x), 4096):  # the mean over the set, in chunks
            F.cross_entropy(model(x[i : i + 4096]), y[i : i + 4096], reduction="sum").backward()
        g = _flat_grad(model) / len(x)
        sigma2 = 0.0
        for _ in range(repeats):
            idx = torch.randint(0, len(x), (128,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            sigma2 += float((_flat_grad(model) - g).square().sum()) / repeats
        opt.zero_grad()
        st = gain.state_dict()
        bias = 1.0 - gain.a_noise ** st["count"]
        g2 = float(g.square().sum())
        rows.append(
            {
                "step": step,
                "true_phi": sigma2 / (sigma2 + g2),
                "phi": gain.noise_share,
                "sigma2": sigma2,
                "grad2": g2,
                "est_sigma2": st["noise_avg"] / bias,
                "est_grad2": st["grad_avg"] / bias,
            }
        )
        print(f"  phi check {rows[-1]}", flush=True)
    return rows


def write(args, results, phi, seconds):
    lines = [
        "# The learning-rate gain (fastis.LRGain) on the demo, CPU",
        "",
        f"{time.strftime('%Y-%m-%d')}; {report.machine()}; 2-core AMD EPYC, shared with "
        "other work; glibc malloc thresholds pinned; command: "
        f"`{' '.join(['python -m bench.lr_gain', *args.argv])}` "
        f"({seconds / 60:.1f} min in all).",
        "",
        f"MNIST-1D ({args.num_samples} examples), the demo's 1-D CNN, SGD momentum 0.9, "
        f"b = 128, B = 384; {args.budget:g} s of training per run; the runs of a seed "
        f"interleaved in one process, {args.slice:g} s slices, 1 intra-op thread, "
        f"{args.evals} evaluations. Gain: `LRGain(max_gain={args.max_gain:g})` (defaults "
        "otherwise). Final training loss mean ± sd over the seeds; loss / uniform and "
        "speed-up paired with uniform of the same seed (geometric mean [min, max]); "
        "gained steps: optimizer steps whose rate the gain scaled, with their mean gain; "
        "phi: the gain's noise-share estimate at the end.",
        "",
    ]
    for schedule, (gain_lr, tuning, rows) in results.items():
        lines += [f"## {schedule}", "", f"Tuning on seed {args.tune_seed}:", ""]
        lines += [
            "| run | lr | train loss | gained steps | mean gain | phi |",
            "|---|---|---|---|---|---|",
        ]
        for label, r in tuning.items():
            g = r["gain"] or {}
            lines.append(
                f"| {label} | {r['config']['lr']:g} | {r['final_train_loss']:.3e} | "
                f"{g.get('gained_steps', 0)} / {r['steps']} | "
                f"{g.get('mean_gain_when_gained', 1.0):.3g} | "
                f"{g.get('noise_share', math.nan):.3g} |"
            )
        lrs = {"uniform": args.uniform_lr, "upper-bound": args.plain_lr, GAINED: gain_lr}
        lines += [
            "",
            f"Seeds {args.seeds}, each method at its tuned rate:",
            "",
            "| method | lr | train loss | loss / uniform | test error | steps | IS steps | "
            "speed-up | mean gain |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m, rs in rows.items():
            gains = [r["gain"]["mean_gain_when_gained"] for r in rs if r["gain"]]
            lines.append(
                f"| {m} | {lrs[m]:g} | {mean_spread([r['train_loss'] for r in rs])} | "
                f"{ratio_summary([r.get('loss_ratio', math.nan) for r in rs])} | "
                f"{mean_spread([100 * r['test_error'] for r in rs])} % | "
                f"{mean_spread([r['steps'] for r in rs])} | "
                f"{mean_spread([100 * r['importance_share'] for r in rs])} % | "
                f"{ratio_summary([r.get('speedup', math.nan) for r in rs])} | "
                + (f"{geometric_mean(gains):.3g} |" if gains else "none |")
            )
        lines.append("")
    if phi:
        lines += [
            "## The noise-share estimate against the truth",
            "",
            "Uniform batches of 128, SGD lr 0.1, momentum 0.9; the truth from the whole "
            "training set's gradient (|g|^2) and 32 batch gradients about it (sigma^2); the "
            "estimate, the gain's (consecutive gradients), at the same step:",
            "",
            "| step | phi (true) | phi (estimate) | sigma^2 true / est. | abs(g)^2 true / est. |",
            "|---|---|---|---|---|",
        ]
        for r in phi:
            lines.append(
                f"| {r['step']} | {r['true_phi']:.3g} | {r['phi']:.3g} | {r['sigma2']:.3g} / "
                f"{r['est_sigma2']:.3g} | {r['grad2']:.3g} / {r['est_grad2']:.3g} |"
            )
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(report.to_json({"runs": results, "phi": phi}))
    print(Path(args.out).read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedules", nargs="+", default=["paper-step", "cosine"])
    p.add_argument("--budget", type=float, default=20.0)
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--gain-lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    p.add_argument("--plain-lr", type=float, default=0.2, help="upper bound's tuned rate")
    p.add_argument("--uniform-lr", type=float, default=0.1, help="uniform's tuned rate")
    p.add_argument("--max-gain", type=float, default=2.0)
    p.add_argument("--slice", type=float, default=0.25)
    p.add_argument("--evals", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=40_000)
    p.add_argument("--out", default="bench/results/lr_gain_cpu.md")
    p.add_argument(
        "--phi-check", action="store_true", help="also the noise-share estimate against the truth"
    )
    args = p.parse_args(argv)
    args.argv = [] if argv is None else list(argv)
    start = time.perf_counter()
    pin_glibc_malloc()  # as bench.e2e: the allocator's adaptive thresholds pinned
    with intra_op_threads(1):
        data = demo_data.load("demo", args.num_samples)
        results = {}
        phi = phi_check(args, data) if args.phi_check else None
        for schedule in args.schedules:
            gain_lr, tuning = tune(args, data, schedule)
            results[schedule] = (gain_lr, tuning, compare(args, data, schedule, gain_lr))
        write(args, results, phi, time.perf_counter() - start)
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
