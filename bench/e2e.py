"""End-to-end training benchmark: the demo's methods and the peers' rules, several seeds.

    python -m bench.e2e --budget 30 --seeds 0 1 2                 # MNIST-1D on the CPU
    python -m bench.e2e --sweep 0.02 0.05 0.1 0.2 --budget 20     # per-method learning rates
    python -m bench.e2e --cifar ~/data/cifar-10-batches-py --device cuda --budget 300

Every run trains for the same wall-clock budget (the clock pauses for evaluations) with
``fastis.demo.train.run``. Writes ``bench/results/e2e_<name>.md`` (mean and spread over the
seeds of the final training loss, test error, steps and speed-up over uniform sampling)
and the raw records as ``.json``. CIFAR-10 runs use ``bench/cifar10.py`` (ResNet-18).
"""

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from bench import cifar10
from bench._timing import pin_glibc_malloc
from fastis.demo import data as demo_data
from fastis.demo import report
from fastis.demo.config import BASELINES, DEFAULT_LR, METHODS, SCHEDULES, RunConfig
from fastis.demo.train import run


def mean_spread(values):
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never" if values else "n/a"
    mean = statistics.fmean(finite)
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{mean:.3g} ± {spread:.2g}" + (
        "" if len(finite) == len(values) else f" ({len(values) - len(finite)} never)"
    )


def compare(args, data, model_fn, lrs):
    records = {m: [] for m in args.methods}
    for seed in args.seeds:
        runs = {}
        for m in args.methods:
            cfg = RunConfig(
                method=m,
                budget=args.budget,
                lr=lrs[m],
                seed=seed,
                device=args.device,
                schedule=args.schedule,
                evals=args.evals,
            )
            runs[m] = run(cfg, data, model_fn=model_fn)
            print(
                f"seed {seed} {m:>18}: loss {runs[m]['final_train_loss']:.3e}, "
                f"error {runs[m]['final_test_error']:.2%}, {runs[m]['steps']} steps",
                flush=True,
            )
        for row in report.summarise(runs):
            records[row["method"]].append({**row, "run": runs[row["method"]]})
    return records


def write_compare(path, args, records, lrs):
    lines = [
        f"# End-to-end: {args.name}",
        "",
        f"{time.strftime('%Y-%m-%d')}; {report.machine()}; glibc malloc thresholds: {args.malloc}",
        "",
        f"Budget {args.budget:g} s of training per run, {args.schedule} schedule, seeds "
        f"{args.seeds}; data {args.data_desc}. Mean ± standard deviation over the seeds. "
        "Speed-up: uniform's time to reach its final training loss over the method's "
        "(averaged over the seeds where the method reached it).",
        "",
        "| method | lr | train loss | test error | steps | IS steps | ms/step | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, rows in records.items():
        lines.append(
            f"| {m} | {lrs[m]:g} | {mean_spread([r['train_loss'] for r in rows])} | "
            f"{mean_spread([100 * r['test_error'] for r in rows])} % | "
            f"{mean_spread([r['steps'] for r in rows])} | "
            f"{mean_spread([100 * r['importance_share'] for r in rows])} % | "
            f"{mean_spread([r['ms_per_step'] for r in rows])} | "
            f"{mean_spread([r.get('speedup', float('nan')) for r in rows])} |"
        )
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(
        report.to_json(
            {
                m: [
                    {k: v for k, v in r.items() if k != "run"}
                    | {"curve": r["run"]["curve"], "sampler": r["run"]["sampler"]}
                    for r in rows
                ]
                for m, rows in records.items()
            }
        )
    )
    print(path.read_text())


def sweep(args, data, model_fn):
    results = {m: {} for m in args.methods}
    for lr in args.sweep:
        for seed in args.seeds:
            for m in args.methods:
                cfg = RunConfig(
                    method=m,
                    budget=args.budget,
                    lr=lr,
                    seed=seed,
                    device=args.device,
                    schedule=args.schedule,
                    evals=args.evals,
                )
                r = run(cfg, data, model_fn=model_fn)
                results[m].setdefault(lr, []).append(r["final_train_loss"])
                print(
                    f"lr {lr:g} seed {seed} {m:>18}: loss {r['final_train_loss']:.3e}", flush=True
                )
    lines = [
        f"# Learning-rate sweep: {args.name}",
        "",
        f"{time.strftime('%Y-%m-%d')}; {report.machine()}; glibc malloc thresholds: {args.malloc}",
        "",
        f"Final training loss (geometric mean over seeds {args.seeds}) after "
        f"{args.budget:g} s, {args.schedule} schedule; data {args.data_desc}.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in args.sweep) + " | best |",
        "|---|" + "---|" * (len(args.sweep) + 1),
    ]
    best = {}
    for m, by_lr in results.items():
        geo = {
            lr: math.exp(statistics.fmean(math.log(max(v, 1e-30)) for v in vals))
            for lr, vals in by_lr.items()
        }
        best[m] = min(geo, key=geo.get)
        lines.append(
            f"| {m} | " + " | ".join(f"{geo[lr]:.3e}" for lr in args.sweep) + f" | {best[m]:g} |"
        )
    path = Path(args.out) / f"e2e_lr_sweep_{args.name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS + BASELINES), choices=METHODS + BASELINES
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=30.0)
    parser.add_argument("--schedule", choices=SCHEDULES, default="step")
    parser.add_argument("--evals", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=40_000)
    parser.add_argument("--cifar", help="a CIFAR-10 python-format directory (ResNet-18)")
    parser.add_argument("--lr", type=float, nargs="*", help="one rate per method, in order")
    parser.add_argument("--sweep", type=float, nargs="*", help="learning rates to sweep")
    parser.add_argument("--name", default=None, help="results file suffix")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--malloc",
        choices=("pinned", "default"),
        default="pinned",
        help="pin glibc's malloc thresholds for stable timings (bench/_timing.py)",
    )
    args = parser.parse_args(argv)
    if args.lr and len(args.lr) != len(args.methods):
        parser.error(f"--lr gives {len(args.lr)} rates for {len(args.methods)} methods")
    if args.malloc == "pinned" and not pin_glibc_malloc():
        args.malloc = "default (no glibc)"
    device = torch.device(args.device)
    if args.cifar:
        data = cifar10.load(args.cifar)
        model_fn = cifar10.ResNet18
        args.data_desc = f"CIFAR-10 from {args.cifar}, ResNet-18"
    else:
        data = demo_data.mnist1d(args.num_samples)
        model_fn = None
        args.data_desc = f"MNIST-1D, {args.num_samples} examples, the demo's 1-D CNN"
    data = tuple(t.to(device) for t in data)
    args.name = args.name or ("cifar10" if args.cifar else "mnist1d") + f"_{device.type}"
    if args.sweep:
        best = sweep(args, data, model_fn)
        print("best rates:", best)
        return best
    lrs = (
        dict(zip(args.methods, args.lr, strict=True))
        if args.lr
        else {m: DEFAULT_LR[args.schedule][m] for m in args.methods}
    )
    records = compare(args, data, model_fn, lrs)
    write_compare(Path(args.out) / f"e2e_{args.name}.md", args, records, lrs)
    return records


if __name__ == "__main__":
    main()
