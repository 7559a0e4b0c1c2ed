"""The ``fastis`` command (also ``python -m fastis``).

    fastis demo [--budget S] [--seed N] [--methods a,b] [--out DIR] [--device cpu|cuda] ...
    fastis info
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import fastis

# Learning rates per schedule and method for the demo (SGD, momentum 0.9, b = 128): each
# method's best of a small sweep on this project's 2-core CPU machines
# (bench/results/e2e_lr_sweep_*.md). Under the step schedule they agree; with a constant
# rate, importance sampling is stable at (and needs) a rate five times uniform's.
DEFAULT_LR = {
    "step": {"uniform": 0.1, "upper-bound": 0.1, "history": 0.05, "loss": 0.2,
             "infobatch": 0.1, "selective-backprop": 0.1},
    "constant": {"uniform": 0.02, "upper-bound": 0.1, "history": 0.02, "loss": 0.1,
                 "infobatch": 0.02, "selective-backprop": 0.02},
}


def _methods(text: str) -> list[str]:
    from fastis.demo.train import BASELINES, METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS + BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(METHODS + BASELINES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is listed twice: {text}")
    return names


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _lrs(text: str) -> dict:
    """``0.1`` for every method, or ``uniform=0.05,upper-bound=0.1``."""
    if "=" not in text:
        return {"*": _positive(float)(text)}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[_methods(name)[0]] = _positive(float)(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastis", description="fast importance sampling")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="uniform vs importance sampling at equal wall-clock on MNIST-1D",
        description="Trains the same 1-D CNN on MNIST-1D for the same wall-clock budget with "
                    "each method and compares training loss, test error and speed-up.")
    demo.add_argument("--budget", type=_positive(float), default=30.0,
                      help="seconds of training per method (default 30)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--methods", type=_methods,
                      default=["uniform", "upper-bound", "history", "loss"],
                      help="comma-separated: uniform, upper-bound, history, loss (and the "
                           "baselines infobatch, selective-backprop)")
    demo.add_argument("--out", type=Path, default=None,
                      help="output folder (default: a new fastis-demo-* folder here)")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--lr", type=_lrs, default={},
                      help="learning rate, for all methods or per method "
                           "(uniform=0.05,upper-bound=0.1); default: each method's tuned rate")
    demo.add_argument("--schedule", choices=("step", "constant"), default="step",
                      help="'step': rate / 10 at half the budget, / 100 at three quarters")
    demo.add_argument("--num-samples", type=_positive(int), default=40_000,
                      help="MNIST-1D examples, 80%% for training (default 40000)")
    demo.add_argument("--batch-size", type=_positive(int), default=128)
    demo.add_argument("--presample", type=_positive(int), default=None,
                      help="Algorithm 1's presample size B (default 3 x batch size)")
    demo.add_argument("--evals", type=_positive(int), default=30,
                      help="evaluations over each budget (they pause the clock)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("info", help="versions, backends and devices")
    return parser


def info() -> None:
    from fastis._backend import triton_available

    print(f"fastis {fastis.__version__}, torch {torch.__version__}, "
          f"triton {'available' if triton_available() else 'absent'}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    import os

    print(f"FASTIS_BACKEND={os.environ.get('FASTIS_BACKEND', 'auto')}")


def _progress_bar(name, budget, enabled):
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        def report(clock, state):
            print(f"{name}: {clock:5.1f}/{budget:.0f} s  loss {state['loss']:.4f}", flush=True)
        return report, lambda: None
    bar = tqdm(total=round(budget, 1), desc=f"{name:>11}", unit="s", leave=True,
               bar_format="{desc} {bar} {n:.0f}/{total:.0f} s {postfix}")

    def report(clock, state):
        bar.n = round(min(clock, budget), 1)
        post = {"loss": f"{state['loss']:.4f}"}
        if "tau" in state:
            post["tau"] = f"{state['tau']:.2f}"
        post["mode"] = state["mode"]
        bar.set_postfix(post, refresh=True)

    def close():
        bar.n = bar.total
        bar.refresh()
        bar.close()
    return report, close


def demo(args, parser) -> int:
    from fastis.demo import data as demo_data
    from fastis.demo import report
    from fastis.demo.train import RunConfig, run

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device}: {exc}")
    presample = args.presample or 3 * args.batch_size
    if presample < args.batch_size:
        parser.error(f"--presample {presample} is smaller than --batch-size {args.batch_size}")
    train_size = int(args.num_samples * 0.8)
    if train_size < presample:
        parser.error(f"--num-samples {args.num_samples} leaves {train_size} training examples, "
                     f"fewer than the presample ({presample})")
    out = args.out or Path(f"fastis-demo-{time.strftime('%Y%m%d-%H%M%S')}")

    print(f"MNIST-1D: {args.num_samples} examples (generated once, cached in "
          f"{demo_data.cache_dir()})", flush=True)
    data = tuple(t.to(device) for t in demo_data.mnist1d(args.num_samples))
    print(f"{len(data[0])} training and {len(data[2])} test examples; a 1-D CNN, SGD with "
          f"momentum, {args.schedule} schedule, {args.budget:g} s of training per method on "
          f"{device}", flush=True)
    runs = {}
    for name in args.methods:
        lr = args.lr.get(name, args.lr.get("*", DEFAULT_LR[args.schedule][name]))
        cfg = RunConfig(method=name, budget=args.budget, lr=lr, batch_size=args.batch_size,
                        presample_size=presample, schedule=args.schedule, seed=args.seed,
                        device=str(device), evals=args.evals)
        progress, close = _progress_bar(name, args.budget, not args.no_progress)
        runs[name] = run(cfg, data, progress)
        close()
    settings = {"budget": args.budget, "seed": args.seed, "schedule": args.schedule,
                "num_samples": args.num_samples, "batch_size": args.batch_size,
                "presample_size": presample, "device": str(device),
                "lr": {n: r["config"]["lr"] for n, r in runs.items()}}
    results = report.write(out, runs, settings)
    print()
    print(report.table(results["summary"]))
    print(f"\nWrote {out / 'results.json'} and {out / 'results.png'}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    return demo(args, parser)


if __name__ == "__main__":
    sys.exit(main())
