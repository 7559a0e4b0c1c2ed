"""The ``fastis`` command (also ``python -m fastis``).

    fastis demo [--budget S] [--seed N] [--methods a,b] [--out DIR] [--device cpu|cuda] ...
    fastis info

Every argument is checked before any training starts (budgets and rates finite and
positive, the device usable, the output folder writable), so a mistake costs seconds, not
a whole comparison; and finished runs are never lost: the table is printed first, if the
output folder cannot be written at the end the results go to a new temporary folder, named
on the terminal, and if a method fails or is interrupted, the methods before it are still
reported and saved.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastis
from fastis.demo.config import BASELINES, DEFAULT_LR, METHODS, SCHEDULES, RunConfig

SEED_MAX = 2**32 - 1


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS + BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(METHODS + BASELINES)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is listed twice: {text}")
    return names


def _positive(kind):
    """A parser of finite numbers > 0 (``inf``, ``1e400``, ``nan``, 0 and below refused)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**32 - 1, got {text}")
    return value


def _lrs(text: str) -> dict:
    """``0.1`` for every method (key ``"*"``), or ``uniform=0.05,upper-bound=0.1``."""
    if "=" not in text:
        return {"*": _positive(float)(text)}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = _methods(name)[0]
        if name in out:
            raise argparse.ArgumentTypeError(f"two rates for {name}: {text}")
        out[name] = _positive(float)(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastis", description="fast importance sampling")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="uniform vs importance sampling at equal wall-clock on MNIST-1D",
        description="Trains the same 1-D CNN on MNIST-1D for the same wall-clock budget with "
        "each method and compares training loss, test error and speed-up.",
    )
    demo.add_argument(
        "--budget",
        type=_positive(float),
        default=30.0,
        help="seconds of training per method, finite and > 0 (default 30)",
    )
    demo.add_argument("--seed", type=_seed, default=0, help="0 to 2**32 - 1 (default 0)")
    demo.add_argument(
        "--methods",
        type=_methods,
        default=["uniform", "upper-bound", "history", "loss"],
        help="comma-separated, from: "
        + ", ".join(METHODS + BASELINES)
        + " (default uniform,upper-bound,history,loss)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder, created or checked before training (default: a "
        "new fastis-demo-* folder here)",
    )
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument(
        "--lr",
        type=_lrs,
        action="append",
        default=[],
        help="learning rate, for all methods or per method of --methods "
        "(uniform=0.05,upper-bound=0.1; a per-method rate overrides an "
        "all-methods one); default: each method's tuned rate",
    )
    demo.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="step",
        help="'step' (default): rate / 10 at half the budget, / 100 at three quarters; "
        "'paper-step': x0.2 at half, x0.04 at 80%%; 'cosine': to zero; 'constant'",
    )
    demo.add_argument(
        "--num-samples",
        type=_positive(int),
        default=40_000,
        help="MNIST-1D examples, 80%% for training (default 40000)",
    )
    demo.add_argument("--batch-size", type=_positive(int), default=128)
    demo.add_argument(
        "--presample",
        type=_positive(int),
        default=None,
        help="Algorithm 1's presample size B (default 3 x batch size)",
    )
    demo.add_argument(
        "--evals",
        type=_positive(int),
        default=30,
        help="evaluations over each budget (they pause the clock)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("info", help="versions, backends and devices")
    return parser


def info() -> None:
    from fastis._backend import triton_available

    print(
        f"fastis {fastis.__version__}, torch {torch.__version__}, "
        f"triton {'available' if triton_available() else 'absent'}"
    )
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
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
    bar = tqdm(
        total=round(budget, 1),
        desc=f"{name:>11}",
        unit="s",
        leave=True,
        bar_format="{desc} {bar} {n:.0f}/{total:.0f} s {postfix}",
    )

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


def _device(parser, text: str) -> torch.device:
    """The ``--device``, refused with a message unless a tensor can be made and read there."""
    if text.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {text}: no CUDA device is available")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device {text}: {exc}")
    if device.type == "meta":
        parser.error(
            f"--device {text}: meta tensors hold no data, so nothing can be trained "
            "there; use cpu or cuda"
        )
    try:
        torch.ones(2, device=device).sum().item()
    except Exception as exc:  # any backend's refusal: say it, no traceback
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        parser.error(f"--device {text}: cannot compute there ({type(exc).__name__}: {reason})")
    return device


def _learning_rates(parser, args) -> dict:
    """``{method: rate}`` for the methods run, from the ``--lr`` entries and the defaults."""
    given = {}
    for entry in args.lr:
        for name, value in entry.items():
            if name in given:
                which = "all methods" if name == "*" else name
                parser.error(f"--lr: two rates for {which} ({given[name]:g} and {value:g})")
            given[name] = value
    not_run = [name for name in given if name != "*" and name not in args.methods]
    if not_run:
        parser.error(
            f"--lr names {', '.join(not_run)}, which --methods does not run "
            f"({','.join(args.methods)})"
        )
    return {
        name: given.get(name, given.get("*", DEFAULT_LR[args.schedule][name]))
        for name in args.methods
    }


def _output_folder(parser, out: Path) -> bool:
    """Creates ``out`` (or checks the existing folder) and proves it writable; returns
    whether it was created here."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        parser.error(f"--out {out}: exists and is not a folder")
    except OSError as exc:
        parser.error(f"--out {out}: cannot write there ({exc.strerror or exc})")
    return created


def _save(out: Path, results: dict, runs: dict, settings: dict) -> int:
    """Writes ``results.json`` and the plot; if ``out`` fails, a new temporary folder."""
    from fastis.demo import report

    try:
        path = report.write_json(out, results)
    except OSError as exc:
        print(f"\nCould not write {out / 'results.json'} ({exc.strerror or exc}).", file=sys.stderr)
        try:
            path = report.write_json(Path(tempfile.mkdtemp(prefix="fastis-demo-")), results)
        except OSError as again:
            print(
                f"Nor a temporary folder ({again.strerror or again}): the results are only "
                "in the table above.",
                file=sys.stderr,
            )
            return 1
        print(f"Wrote the results to {path} instead.", file=sys.stderr)
        return 1
    try:
        report.plot(path.parent / "results.png", runs, settings)
    except Exception as exc:  # matplotlib missing, a full disk: the numbers are saved
        print(f"\nWrote {path}; no plot ({type(exc).__name__}: {exc})")
        return 0
    print(f"\nWrote {path} and {path.parent / 'results.png'}")
    return 0


def demo(args, parser) -> int:
    from fastis.demo import data as demo_data
    from fastis.demo import report, train

    device = _device(parser, args.device)
    presample = args.presample or 3 * args.batch_size
    if presample < args.batch_size:
        parser.error(f"--presample {presample} is smaller than --batch-size {args.batch_size}")
    if args.num_samples < demo_data.MIN_SAMPLES:
        parser.error(
            f"--num-samples must be at least {demo_data.MIN_SAMPLES}, got {args.num_samples}"
        )
    train_size = int(args.num_samples * 0.8)
    largest = presample
    if any("reuse" in m for m in args.methods):
        largest = max(presample, 8 * args.batch_size)  # the reuse methods' presample
    if train_size < largest:
        parser.error(
            f"--num-samples {args.num_samples} leaves {train_size} training examples, "
            f"fewer than the presample ({largest})"
        )
    lrs = _learning_rates(parser, args)
    out = args.out or Path(f"fastis-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    created = _output_folder(parser, out)
    runs, failure = {}, None
    try:
        print(
            f"MNIST-1D: {args.num_samples} examples (generated once, cached in "
            f"{demo_data.cache_dir()})",
            flush=True,
        )
        data = tuple(t.to(device) for t in demo_data.mnist1d(args.num_samples))
        print(
            f"{len(data[0])} training and {len(data[2])} test examples; a 1-D CNN, SGD with "
            f"momentum, {args.schedule} schedule, {args.budget:g} s of training per method "
            f"on {device}",
            flush=True,
        )
        for name in args.methods:
            cfg = RunConfig(
                method=name,
                budget=args.budget,
                lr=lrs[name],
                batch_size=args.batch_size,
                presample_size=presample,
                schedule=args.schedule,
                seed=args.seed,
                device=str(device),
                evals=args.evals,
            )
            progress, close = _progress_bar(name, args.budget, not args.no_progress)
            try:
                runs[name] = train.run(cfg, data, progress)
            except (Exception, KeyboardInterrupt) as exc:
                if not runs:
                    raise
                failure = (name, exc)  # the methods that finished are still reported
                break
            finally:
                close()
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # no empty folder left behind by a run that did not finish
        raise
    settings = {
        "budget": args.budget,
        "seed": args.seed,
        "schedule": args.schedule,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "presample_size": presample,
        "device": str(device),
        "lr": {name: lrs[name] for name in runs},
    }
    results = report.collect(runs, settings)
    print()
    print(report.table(results["summary"]))
    code = _save(out, results, runs, settings)
    if failure is None:
        return code
    name, exc = failure
    print(
        f"\n{name} did not finish ({type(exc).__name__}: {exc}); the results are of the "
        f"methods before it ({', '.join(runs)}).",
        file=sys.stderr,
    )
    if isinstance(exc, KeyboardInterrupt):
        return 130
    raise exc


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    return demo(args, parser)


if __name__ == "__main__":
    sys.exit(main())
