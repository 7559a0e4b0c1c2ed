"""Uniform vs importance sampling of whole sequences at equal wall-clock, on a tiny LM.

``python -m bench.lm_sequences`` trains ``fastis.demo.lm``'s causal transformer on the
Python standard library's source bytes (test split: held-out files) with each method:

- ``uniform``: shuffled passes, ``b`` sequences a step;
- ``importance``: ``fastis.ImportanceSampler`` with its default switch (on while
  ``tau > (B + 3b) / (3b)``), scores from ``linear_cross_entropy(return_score=True)``;
- ``importance-always``: the same, always on (``tau_th = -inf``), to see what an
  importance step costs and gives here even where the switch would stay off.

All runs of a stage live in one process and advance in alternating slices of about
``--slice`` seconds of their own training (each run's clock counts its own steps only;
evaluations excluded), on one intra-op thread. Stage 1: every method at every rate of
``--lrs`` (seed 0), the grid extended by a factor 2 beyond an edge that wins (up to
``--max-extend`` times per method), so that every method's best rate is strictly inside.
Stage 2: each method at its best rate on ``--seeds``. The final training loss (on a fixed
held-in subset of training sequences) and the test loss (held-out files), mean and spread,
steps, ms/step and the share of importance steps go to ``bench/results/<name>.md``.
"""

import argparse
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastis.demo.interleave import intra_op_threads
from fastis.demo.lm import LMConfig, LMRun, eval_subset, load_corpus

METHODS = {
    "uniform": ("uniform", {}),
    "importance": ("importance", {}),
    "importance-always": ("importance", {"tau_th": -math.inf}),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    p.add_argument("--lrs", nargs="+", type=float, default=[2e-3, 4e-3, 8e-3, 1.6e-2])
    p.add_argument("--max-extend", type=int, default=2, help="grid extensions per method")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--budget", type=float, default=40.0, help="training seconds per run")
    p.add_argument("--slice", type=float, default=0.5, help="seconds per run per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--eval-size", type=int, default=512, help="held-in training sequences")
    p.add_argument("--test-size", type=int, default=None, help="cap on test sequences")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="lm_sequences_cpu")
    return p.parse_args(argv)


def run_stage(runs: list[LMRun], slice_seconds: float, held_in, label: str) -> list[dict]:
    """Advances ``runs`` in alternating slices to their budgets; their records."""
    t0 = time.perf_counter()
    while not all(r.done for r in runs):
        for r in runs:
            if not r.done:
                r.advance(slice_seconds)
        trained = sum(r.clock.total for r in runs)
        print(
            f"  [{label}] {trained:7.1f} s trained, {time.perf_counter() - t0:7.1f} s wall",
            end="\r",
        )
    print()
    records = []
    for r in runs:
        rec = {"method_label": r.label, **r.record(), **r.evaluate(held_in)}
        records.append(rec)
        print(
            f"  {rec['method_label']:18s} lr {rec['lr']:.4g} seed {rec['seed']}: "
            f"train {rec['train_loss']:.4f} test {rec['test_loss']:.4f} "
            f"{rec['steps']} steps {rec['ms_per_step']:.1f} ms/step "
            f"importance {rec['importance_fraction']:.0%}",
            flush=True,
        )
    return records


def main(argv=None) -> dict:
    args = parse(argv)
    started = datetime.now(timezone.utc)
    device = torch.device(args.device)
    corpus = load_corpus(args.seq_len, args.max_bytes)
    if args.test_size is not None:
        corpus.x_test, corpus.y_test = (
            corpus.x_test[: args.test_size],
            corpus.y_test[: args.test_size],
        )
    corpus = corpus.to(device)
    held_in = eval_subset(len(corpus.x_train), args.eval_size).to(device)
    model_cfg = LMConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers)

    def make(label, lr, seed, budget=args.budget):
        method, options = METHODS[label]
        run = LMRun(
            method, corpus, budget, lr, seed=seed, batch_size=args.batch_size,
            model_cfg=model_cfg, **options,
        )  # fmt: skip
        run.label = label
        return run

    def stage(specs, label):
        return run_stage([make(m, lr, seed) for m, lr, seed in specs], args.slice, held_in, label)

    with intra_op_threads(args.threads):
        for label in args.methods:  # no run pays the process's first calls in its budget
            warm = make(label, args.lrs[0], 0, budget=math.inf)
            for _ in range(3):
                warm.step()
        grid = {m: sorted(args.lrs) for m in args.methods}
        results = {m: {} for m in args.methods}
        todo = [(m, lr, 0) for m in args.methods for lr in grid[m]]
        for extension in range(args.max_extend + 1):
            if not todo:
                break
            print(f"grid, round {extension}: {len(todo)} runs of {args.budget} s")
            for rec in stage(todo, f"grid {extension}"):
                results[rec["method_label"]][rec["lr"]] = rec
            todo = []
            if extension == args.max_extend:
                break
            for m in args.methods:
                lrs = sorted(results[m])
                best = min(lrs, key=lambda lr: results[m][lr]["train_loss"])
                if best == lrs[0]:
                    todo.append((m, lrs[0] / 2, 0))
                elif best == lrs[-1]:
                    todo.append((m, lrs[-1] * 2, 0))
        best = {
            m: min(results[m], key=lambda lr: results[m][lr]["train_loss"]) for m in args.methods
        }
        print("best rates: " + ", ".join(f"{m} {lr:.4g}" for m, lr in best.items()))
        specs = [(m, best[m], s) for s in args.seeds for m in args.methods]
        print(f"seeds: {len(specs)} runs of {args.budget} s")
        seeds = stage(specs, "seeds")
    finished = datetime.now(timezone.utc)
    report = {
        "args": vars(args),
        "grid": results,
        "best": best,
        "seeds": seeds,
        "started": started,
        "finished": finished,
        "threads_used": args.threads,
        "corpus": corpus,
    }
    path = Path(args.out) / f"{args.name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(report, argv))
    print(f"wrote {path}")
    return report


def _stat(values):
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def markdown(report: dict, argv) -> str:
    args, corpus = report["args"], report["corpus"]
    cmd = "python -m bench.lm_sequences" + ("".join(f" {a}" for a in argv) if argv else "")
    if argv is None:
        cmd = "python -m bench.lm_sequences" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        "# Sequence importance sampling on a tiny causal LM, equal wall-clock (CPU)",
        "",
        f"- Date: {report['started']:%Y-%m-%d %H:%M} to {report['finished']:%H:%M} UTC",
        f"- Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads available, {args['threads']} used "
        f"(2-core AMD EPYC, shared); torch {torch.__version__}, Python "
        f"{platform.python_version()}",
        f"- Command: `{cmd}`",
        f"- Corpus: the first {len(corpus.train_files) + len(corpus.test_files)} top-level "
        f"standard library files ({args['max_bytes']} bytes at most), bytes as tokens; "
        f"{len(corpus.x_train)} training sequences ({len(corpus.train_files)} files), "
        f"{len(corpus.x_test)} test sequences (held-out files: "
        f"{', '.join(corpus.test_files)}), T = {args['seq_len']}",
        f"- Model: 2-layer pre-norm transformer, D = {args['d_model']}, tied output "
        f"embedding, `fastis.linear_cross_entropy` over `[B, T, D]`; AdamW (weight decay "
        f"0.01), cosine decay over each run's own training time; b = {args['batch_size']} "
        f"sequences, presample B = {3 * args['batch_size']}",
        f"- Each run: {args['budget']} s of its own training (slices of {args['slice']} s, "
        "all runs of a stage interleaved in one process; evaluation excluded). Train loss: "
        f"mean token loss (nats/byte) on a fixed subset of {args['eval_size']} training "
        "sequences; test loss: on the held-out files.",
        "",
        "## Learning-rate grid (seed 0)",
        "",
        "| method | lr | train loss | test loss | steps | ms/step | importance steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, by_lr in report["grid"].items():
        for lr in sorted(by_lr):
            r = by_lr[lr]
            edge = lr in (min(by_lr), max(by_lr))
            mark = (
                (" **(best, at the grid's edge)**" if edge else " **(best)**")
                if lr == report["best"][m]
                else ""
            )
            lines.append(
                f"| {m} | {lr:.4g}{mark} | {r['train_loss']:.4f} | {r['test_loss']:.4f} | "
                f"{r['steps']} | {r['ms_per_step']:.1f} | {r['importance_fraction']:.1%} |"
            )
    seeds = report["seeds"]
    lines += [
        "",
        f"## Each method at its best rate, seeds {', '.join(map(str, args['seeds']))}",
        "",
        "Mean ± standard deviation over the seeds.",
        "",
        "| method | lr | train loss | test loss | steps | ms/step | importance steps |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for m in report["best"]:
        rows = [r for r in seeds if r["method_label"] == m]
        tr, te = _stat([r["train_loss"] for r in rows]), _stat([r["test_loss"] for r in rows])
        summary[m] = tr, te
        steps = _stat([r["steps"] for r in rows])
        ms = _stat([r["ms_per_step"] for r in rows])
        frac = _stat([r["importance_fraction"] for r in rows])
        lines.append(
            f"| {m} | {report['best'][m]:.4g} | {tr[0]:.4f} ± {tr[1]:.4f} | "
            f"{te[0]:.4f} ± {te[1]:.4f} | {steps[0]:.0f} | {ms[0]:.1f} | {frac[0]:.1%} |"
        )
    lines += ["", "Per seed:", "", "| method | seed | train loss | test loss | steps |"]
    lines.append("|---|---|---|---|---|")
    for r in seeds:
        lines.append(
            f"| {r['method_label']} | {r['seed']} | {r['train_loss']:.4f} | "
            f"{r['test_loss']:.4f} | {r['steps']} |"
        )
    if "uniform" in summary:
        lines += ["", "## Difference to uniform (negative: better than uniform)", ""]
        for m, (tr, te) in summary.items():
            if m != "uniform":
                u_tr, u_te = summary["uniform"]
                lines.append(
                    f"- {m}: train {tr[0] - u_tr[0]:+.4f}, test {te[0] - u_te[0]:+.4f} nats/byte"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
