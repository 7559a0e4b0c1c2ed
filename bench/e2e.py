"""End-to-end training benchmark: the demo's methods and the peers' rules, several seeds.

    python -m bench.e2e --budget 30 --seeds 0 1 2                 # MNIST-1D on the CPU
    python -m bench.e2e --schedule constant paper-step cosine     # one table per schedule
    python -m bench.e2e --sweep 0.02 0.05 0.1 0.2 --budget 20     # per-method learning rates
    python -m bench.e2e --sweep 0.05 0.1 0.2 --seeds 0 --compare-seeds 1 2 3   # then compare
    python -m bench.e2e --workload tabular-mlp --sweep 0.02 0.05 0.1 --seeds 0  # other nets
    python -m bench.e2e --workload wide-cnn --step-times 10       # ms per step, two modes
    python -m bench.e2e --cifar ~/data/cifar-10-batches-py --device cuda --budget 300

Every run trains for the same budget of its own training time (evaluations excluded).
By default (``--interleave``) the runs of one seed (its methods, or for ``--sweep`` its
whole grid of methods and rates) train in one process in alternating slices of
``--slice`` seconds each (``fastis.demo.interleave``), on ``--threads`` intra-op threads
(default 1), so that the load of a shared machine falls on all of them alike;
``--no-interleave`` trains them one after the other (``fastis.demo.train.run``). Writes
``bench/results/e2e_<name>.md`` (mean and spread over the seeds of the final training
loss, test error, steps and speed-up over uniform sampling) and the raw records as
``.json``; ``--sweep`` writes ``e2e_lr_sweep_<name>.md`` and flags a best rate at an edge
of the grid (the best is trusted only strictly inside it). The comparison table gives,
per method, the mean ± standard deviation over the seeds, and two paired ratios against
uniform sampling of the same seed (``fastis.demo.report.summarise``), each as a geometric
mean and the range over the seeds: the final training loss over uniform's, and the speed-up
(> 1: reaches uniform's final loss sooner; < 1: uniform reached the method's final loss
sooner), so that no seed drops out of either.

``--workload`` picks the network and data (``fastis.demo.config.WORKLOADS``): ``demo``,
the demo's CNN on MNIST-1D (results ``e2e_mnist1d_<device>...``); ``wide-cnn``, a wider,
deeper CNN on MNIST-1D whose step is compute-bound; ``tabular-mlp``, an MLP on a generated
table (results ``e2e_<workload>_<device>...``). ``--step-times S`` times a uniform step and
an importance step (importance sampling forced on) instead, interleaved, S seconds each.
CIFAR-10 runs use ``bench/cifar10.py`` (ResNet-18).
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
from fastis.demo import models, report
from fastis.demo.config import BASELINES, METHODS, SCHEDULES, WORKLOADS, RunConfig, default_lr
from fastis.demo.interleave import intra_op_threads, run_interleaved
from fastis.demo.train import Trainer, run

# the default comparison: the demo's first methods and the peers (the opt-in variants of
# Algorithm 1, fastis.demo.config.VARIANTS, on request with --methods)
DEFAULT_METHODS = ("uniform", "upper-bound", "history", "loss", *BASELINES)


def mean_spread(values):
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never" if values else "n/a"
    mean = statistics.fmean(finite)
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{mean:.3g} ± {spread:.2g}" + (
        "" if len(finite) == len(values) else f" ({len(values) - len(finite)} never)"
    )


def ratio_summary(values):
    """Paired ratios over seeds: the geometric mean and the range, non-finite ones counted."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if not finite:
        return "n/a"
    text = f"{geometric_mean(finite):.3g} [{min(finite):.3g}, {max(finite):.3g}]"
    missing = len(values) - len(finite)
    return text + (f" ({missing} n/a)" if missing else "")


def config(args, method, lr, seed, budget=None):
    return RunConfig(
        method=method,
        budget=args.budget if budget is None else budget,
        lr=lr,
        seed=seed,
        device=args.device,
        schedule=args.schedule,
        evals=args.evals,
        workload=args.workload,
    )


def train_all(args, cfgs, data, model_fn):
    """The records of ``cfgs``: interleaved in one go, or one after the other."""
    if args.interleave:
        return run_interleaved(
            cfgs,
            data,
            slice_seconds=args.slice,
            model_fn=model_fn,
            warmup_steps=args.warmup,
        )
    return [run(cfg, data, model_fn=model_fn, warmup_steps=args.warmup) for cfg in cfgs]


def timing_desc(args) -> str:
    threads = torch.get_num_threads()
    if args.interleave:
        return (
            f"the runs of a seed interleaved in one process, {args.slice:g} s slices of "
            f"training each, {threads} intra-op thread(s), {args.warmup} warm-up steps"
        )
    return (
        f"the runs one after the other, {threads} intra-op thread(s), {args.warmup} "
        "warm-up steps each"
    )


def compare(args, data, model_fn, lrs, seeds=None):
    records = {m: [] for m in args.methods}
    for seed in seeds or args.seeds:
        cfgs = [config(args, m, lrs[m], seed) for m in args.methods]
        runs = dict(zip(args.methods, train_all(args, cfgs, data, model_fn), strict=True))
        for m, r in runs.items():
            print(
                f"{args.schedule} seed {seed} {m:>26}: loss {r['final_train_loss']:.3e}, "
                f"error {r['final_test_error']:.2%}, {r['steps']} steps",
                flush=True,
            )
        for row in report.summarise(runs):
            records[row["method"]].append({**row, "run": runs[row["method"]]})
    return records


def _header(args, title):
    return [
        f"# {title}: {args.name}",
        "",
        f"{time.strftime('%Y-%m-%d')}; {report.machine()}; glibc malloc thresholds: {args.malloc}",
        "",
    ]


def write_compare(path, args, records, lrs, seeds=None):
    edges = getattr(args, "sweep_edges", {})
    lines = _header(args, "End-to-end") + [
        f"Budget {args.budget:g} s of training per run, {args.schedule} schedule, seeds "
        f"{seeds or args.seeds}; data {args.data_desc}; {timing_desc(args)}. Mean ± "
        "standard deviation over the seeds. Paired with uniform sampling of the same seed, "
        "each as the geometric mean [min, max] over the seeds: loss / uniform, the final "
        "training loss over uniform's; speed-up, uniform's time to reach its final training "
        "loss over the method's when the method reaches it, else uniform's time to reach "
        "the method's final loss over the method's (< 1), the times interpolated between "
        f"the {args.evals} evaluations in log loss; n/a: a diverged run.",
        "",
        "| method | lr | train loss | loss / uniform | test error | steps | IS steps | "
        "ms/step | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, rows in records.items():
        edge = " (grid edge)" if edges.get(m, "inside") != "inside" else ""
        lines.append(
            f"| {m} | {lrs[m]:g}{edge} | {mean_spread([r['train_loss'] for r in rows])} | "
            f"{ratio_summary([r.get('loss_ratio', math.nan) for r in rows])} | "
            f"{mean_spread([100 * r['test_error'] for r in rows])} % | "
            f"{mean_spread([r['steps'] for r in rows])} | "
            f"{mean_spread([100 * r['importance_share'] for r in rows])} % | "
            f"{mean_spread([r['ms_per_step'] for r in rows])} | "
            f"{ratio_summary([r.get('speedup', math.nan) for r in rows])} |"
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


def geometric_mean(values):
    return math.exp(statistics.fmean(math.log(max(v, 1e-30)) for v in values))


def grid_position(grid, geo, best):
    """Where ``best`` lies in the sorted ``grid`` of rates, given ``{rate: loss}``:
    ``'inside'`` (strictly: a rate on each side), ``'lower edge'`` / ``'upper edge'``
    (extend the grid that way), ``'one rate'`` or ``'all diverged'``."""
    if not math.isfinite(geo[best]):
        return "all diverged"
    if len(grid) == 1:
        return "one rate"
    if best == grid[0]:
        return "lower edge"
    if best == grid[-1]:
        return "upper edge"
    return "inside"


def sweep(args, data, model_fn):
    """Each method at each rate of ``--sweep``; a seed's whole grid interleaved. Returns
    ``{method: best rate}`` (the lowest geometric mean of the final training loss)."""
    grid = sorted(set(args.sweep))
    results = {m: {lr: [] for lr in grid} for m in args.methods}
    for seed in args.seeds:
        pairs = [(m, lr) for lr in grid for m in args.methods]
        cfgs = [config(args, m, lr, seed) for m, lr in pairs]
        for (m, lr), r in zip(pairs, train_all(args, cfgs, data, model_fn), strict=True):
            loss = r["final_train_loss"]
            results[m][lr].append(loss if math.isfinite(loss) else math.inf)
            print(f"{args.schedule} lr {lr:g} seed {seed} {m:>26}: loss {loss:.3e}", flush=True)
    lines = _header(args, "Learning-rate sweep") + [
        f"Final training loss (geometric mean over seeds {args.seeds}) after "
        f"{args.budget:g} s, {args.schedule} schedule; data {args.data_desc}; "
        f"{timing_desc(args)}. The best rate is trusted only strictly inside the grid; "
        "one at an edge is flagged: extend the grid there.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best | where |",
        "|---|" + "---|" * (len(grid) + 2),
    ]
    best, args.sweep_edges = {}, {}
    for m, by_lr in results.items():
        geo = {lr: geometric_mean(vals) for lr, vals in by_lr.items()}
        best[m] = min(geo, key=geo.get)
        where = args.sweep_edges[m] = grid_position(grid, geo, best[m])
        flag = "inside" if where == "inside" else f"**{where}**"
        lines.append(
            f"| {m} | " + " | ".join(f"{geo[lr]:.3e}" for lr in grid) + f" | {best[m]:g} | {flag} |"
        )
    inside = [m for m, w in args.sweep_edges.items() if w == "inside"]
    edge = [f"{m} ({w})" for m, w in args.sweep_edges.items() if w != "inside"]
    verdict = f"Best rate strictly inside the grid: {', '.join(inside) or 'none'}."
    if edge:
        verdict += f" Not inside (extend the grid there): {', '.join(edge)}."
    lines += ["", verdict]
    if edge:
        print(f"{args.schedule}: best rate not inside the grid for {', '.join(edge)}", flush=True)
    path = Path(args.out) / f"e2e_lr_sweep_{args.name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return best


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS + BASELINES
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=30.0)
    parser.add_argument(
        "--schedule",
        nargs="+",
        choices=SCHEDULES,
        default=["step"],
        help="one or more; each gets its own tables (fastis.demo.config.schedule_factor)",
    )
    parser.add_argument("--evals", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-samples", type=int, default=40_000)
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="demo",
        help="the network and data (default demo: the demo's CNN on MNIST-1D)",
    )
    parser.add_argument("--cifar", help="a CIFAR-10 python-format directory (ResNet-18)")
    parser.add_argument(
        "--step-times",
        type=float,
        metavar="SECONDS",
        help="instead of training to a budget: time uniform and importance steps "
        "(importance sampling forced on), interleaved, SECONDS of steps each",
    )
    parser.add_argument("--lr", type=float, nargs="*", help="one rate per method, in order")
    parser.add_argument("--sweep", type=float, nargs="*", help="learning rates to sweep")
    parser.add_argument(
        "--compare-seeds",
        type=int,
        nargs="+",
        help="with --sweep: then compare the methods at their best rates on these seeds",
    )
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train a seed's runs in one process in alternating slices (default); "
        "--no-interleave: one after the other",
    )
    parser.add_argument(
        "--slice", type=float, default=0.5, help="seconds of training per run per slice"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads while training (default 1, steadier on a shared CPU; "
        "0: torch's default)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed throwaway steps per method first"
    )
    parser.add_argument(
        "--name",
        default=None,
        help="results file suffix (default <data>_<device>_<schedule>; with several "
        "schedules, _<schedule> is appended to it)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--malloc",
        choices=("pinned", "default"),
        default="pinned",
        help="pin glibc's malloc thresholds for stable timings (bench/_timing.py)",
    )
    return parser


def check(parser, args):
    if args.lr and len(args.lr) != len(args.methods):
        parser.error(f"--lr gives {len(args.lr)} rates for {len(args.methods)} methods")
    if args.lr and args.sweep:
        parser.error("--lr and --sweep exclude each other")
    if args.compare_seeds and not args.sweep:
        parser.error("--compare-seeds needs --sweep")
    if not (math.isfinite(args.slice) and args.slice > 0):
        parser.error(f"--slice must be finite and > 0, got {args.slice}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not (math.isfinite(args.budget) and args.budget > 0):
        parser.error(f"--budget must be finite and > 0, got {args.budget}")
    if args.cifar and args.workload != "demo":
        parser.error(f"--cifar trains its own ResNet-18; drop --workload {args.workload}")
    if args.step_times is not None and not (math.isfinite(args.step_times) and args.step_times > 0):
        parser.error(f"--step-times must be finite and > 0, got {args.step_times}")
    if args.step_times is not None and (args.sweep or args.lr):
        parser.error("--step-times times the default rates; drop --sweep and --lr")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    # the whole benchmark on --threads (restored after, for callers in the same process)
    with intra_op_threads(args.threads or None):
        return benchmark(args)


def benchmark(args):
    if args.malloc == "pinned" and not pin_glibc_malloc():
        args.malloc = "default (no glibc)"
    device = torch.device(args.device)
    if args.cifar:
        data = cifar10.load(args.cifar)
        model_fn = cifar10.ResNet18
        args.data_desc = f"CIFAR-10 from {args.cifar}, ResNet-18"
    else:
        data = demo_data.load(args.workload, args.num_samples)
        model_fn = None  # each run's Trainer builds fastis.demo.models.build(workload)
        args.data_desc = workload_desc(args.workload, args.num_samples)
    data = tuple(t.to(device) for t in data)
    schedules, named, out = args.schedule, args.name, {}
    data_name = {"demo": "mnist1d"}.get(args.workload, args.workload)
    base = named or ("cifar10" if args.cifar else data_name) + f"_{device.type}"
    if args.step_times is not None:
        args.schedule, args.name = schedules[0], base
        return step_times(args, data, model_fn)
    for schedule in schedules:
        exact = named is not None and len(schedules) == 1
        args.schedule, args.name = schedule, base if exact else f"{base}_{schedule}"
        out[schedule] = run_schedule(args, data, model_fn)
    return out[schedules[0]] if len(schedules) == 1 else out


def workload_desc(workload, num_samples):
    """A line for the results files: the data and the network, with its parameter count."""
    params = sum(p.numel() for p in models.build(workload).parameters())
    if workload == "tabular-mlp":
        return (
            f"the generated table (fastis.demo.data.tabular), {num_samples} rows, "
            f"{demo_data.TABULAR_FEATURES} features, {demo_data.TABULAR_CLASSES} "
            f"imbalanced classes, {demo_data.TABULAR_LABEL_NOISE:.0%} label noise; an MLP "
            f"(fastis.demo.models.TabularMLP, {params} parameters)"
        )
    net = "the demo's 1-D CNN" if workload == "demo" else "the wide 1-D CNN (WideCNN1D)"
    return f"MNIST-1D, {num_samples} examples, {net}, {params} parameters"


def step_times(args, data, model_fn):
    """Milliseconds per training step of uniform sampling and of Algorithm 1 with
    importance sampling on at every step (``tau_th = -1``: a presample forward of ``B``,
    then a step of ``b``), in alternating slices of ``--slice`` seconds, ``--step-times``
    seconds of steps each after ``--warmup`` untimed ones, the first seed.

    Each step is timed twice: in CPU seconds of the training thread (``time.thread_time``,
    the trainers' clock: with one intra-op thread all of a step's work, and the time that
    other processes take from it is not counted, so it holds on a loaded machine), and
    in wall seconds. Returns ``{mode: CPU ms per step}``; writes
    ``e2e_step_times_<name>.md``."""
    if torch.get_num_threads() != 1:
        print("--step-times: CPU time counts the calling thread only; use --threads 1")
    seed = args.seeds[0]
    modes = {"uniform": "uniform", "importance (IS every step)": "upper-bound"}
    trainers, wall = {}, dict.fromkeys(modes, 0.0)
    for mode, method in modes.items():
        lr = default_lr(args.workload, args.schedule, method)
        cfg = config(args, method, lr, seed, budget=args.step_times)
        t = trainers[mode] = Trainer(
            cfg, data, model_fn=model_fn, clock=time.thread_time, curve=False
        )
        if method != "uniform":
            t.method.sampler.tau_th = -1.0  # tau >= 0 > tau_th: importance steps only
        for _ in range(args.warmup):
            t.step()
    start = {mode: (t.clock.total, t.steps) for mode, t in trainers.items()}

    def trained(mode):
        return trainers[mode].clock.total - start[mode][0]

    while any(trained(mode) < args.step_times for mode in trainers):
        for mode, t in trainers.items():
            until = min(trained(mode) + args.slice, args.step_times)
            while trained(mode) < until:
                began = time.perf_counter()
                t.step()
                wall[mode] += time.perf_counter() - began
    steps = {mode: t.steps - start[mode][1] for mode, t in trainers.items()}
    ms = {mode: 1e3 * trained(mode) / steps[mode] for mode in trainers}
    lines = _header(args, "Step times") + [
        f"Data {args.data_desc}; b = {RunConfig.batch_size}, B = {RunConfig.presample_size}; "
        f"{args.step_times:g} s of CPU time of steps per mode after {args.warmup} untimed, "
        f"interleaved in {args.slice:g} s slices, {torch.get_num_threads()} intra-op "
        f"thread(s), seed {seed}. CPU: the training thread's CPU time per step; wall: the "
        "wall-clock time per step (includes the time other processes took).",
        "",
        "| mode | steps | CPU ms/step | / uniform | wall ms/step | / uniform |",
        "|---|---|---|---|---|---|",
    ]
    wall_ms = {mode: 1e3 * wall[mode] / steps[mode] for mode in trainers}
    for mode in trainers:
        lines.append(
            f"| {mode} | {steps[mode]} | {ms[mode]:.2f} | {ms[mode] / ms['uniform']:.2f} | "
            f"{wall_ms[mode]:.2f} | {wall_ms[mode] / wall_ms['uniform']:.2f} |"
        )
    path = Path(args.out) / f"e2e_step_times_{args.name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return ms


def run_schedule(args, data, model_fn):
    """One schedule's sweep and/or comparison; what it returns (best rates or records)."""
    if args.sweep:
        best = sweep(args, data, model_fn)
        print(f"{args.schedule}: best rates {best}", flush=True)
        if not args.compare_seeds:
            return best
        records = compare(args, data, model_fn, best, args.compare_seeds)
        path = Path(args.out) / f"e2e_{args.name}.md"
        write_compare(path, args, records, best, args.compare_seeds)
        return records
    lrs = (
        dict(zip(args.methods, args.lr, strict=True))
        if args.lr
        else {m: default_lr(args.workload, args.schedule, m) for m in args.methods}
    )
    records = compare(args, data, model_fn, lrs)
    write_compare(Path(args.out) / f"e2e_{args.name}.md", args, records, lrs)
    return records


if __name__ == "__main__":
    main()
