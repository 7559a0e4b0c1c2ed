"""What a training step costs on the demo model, with importance sampling off and on.

``python -m bench.step_cost`` (one intra-op thread, glibc's malloc thresholds pinned) times,
in alternating slices of one process (``bench._timing.interleaved_ms``), each variant a
full training step of the demo's CNN (``fastis.demo.models.MNIST1DCNN``, MNIST-1D-shaped
random data, ``b = 128``, ``B = 384``, SGD with momentum, ``zero_grad`` / ``backward`` /
``step`` as ``fastis.demo.train.Trainer.step``):

- ``plain``: ``fastis.demo.methods.Uniform``, the user's loop with ``F.cross_entropy``;
- ``forward_B``: one forward of ``B`` rows under ``torch.inference_mode`` (no step);
- ``off`` / ``on``: ``fastis.demo.methods.Sampled`` over an ``ImportanceSampler`` that
  never switches on (``tau_th = inf``: ``select``, ``fastis.cross_entropy`` with the
  score, ``update``) or is always on (``tau_th = -1``: the scoring forward of ``B``, the
  draw, the weighted step of ``b``), once per backend (``FASTIS_BACKEND=torch``, and
  ``native`` when the library is built).

Reported: ``off / plain`` (goal <= 1.05) and ``on / ideal`` with ``ideal = forward_B +
plain`` (goal <= 1.1), and the ATen calls of one step of each (the torch profiler's
count, nested calls included).

Clock: ``--clock thread`` (default) counts this thread's CPU time (``time.thread_time``;
with one intra-op thread every op and the CPU autograd engine run on it), which a shared
machine's other processes do not inflate: on this project's 2-core machines under load
the wall clock of a step varied 2-3x between runs and the thread clock within ~20%.
``--clock wall`` uses ``bench._timing.interleaved_ms`` itself (the same slices, host
clock).
"""

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fastis
from bench._timing import interleaved_ms, malloc_label, pin_glibc_malloc
from fastis.demo.config import RunConfig
from fastis.demo.methods import Sampled, Uniform
from fastis.demo.models import MNIST1DCNN

BATCH, PRESAMPLE, LENGTH, CLASSES = 128, 384, 40, 10
RESULTS = Path(__file__).parent / "results" / "step_cost_cpu.md"


def native_built() -> bool:
    from fastis import _native

    return _native.available()


def _train_step(model, opt, method, x, y):
    """One step of ``method`` as the demo's trainer takes it (its clock aside)."""
    loss = method.step(model, x, y, 0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _runner(model, method, x, y, backend=None):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        # the backend is read per call; set once per slice in effect (a dict lookup after)
        if backend is not None and os.environ.get("FASTIS_BACKEND") != backend:
            os.environ["FASTIS_BACKEND"] = backend
        _train_step(model, opt, method, x, y)

    return step


def variants(n: int, backends, seed: int = 0) -> dict:
    """The step callables, by name (``plain``, ``forward_B``, ``off[backend]``, ...)."""
    torch.manual_seed(seed)
    x = torch.randn(n, LENGTH)
    y = torch.randint(0, CLASSES, (n,))
    model = MNIST1DCNN()
    cfg = RunConfig(method="uniform", budget=1.0, lr=0.01, batch_size=BATCH, seed=seed)
    steps = {"plain": _runner(model, Uniform(n, cfg), x, y)}
    fwd_model = copy.deepcopy(model)
    cursor = [0]

    def forward_b():
        i = cursor[0]
        cursor[0] = (i + PRESAMPLE) % (n - PRESAMPLE)
        with torch.inference_mode():
            fwd_model(x[i : i + PRESAMPLE])

    steps["forward_B"] = forward_b
    for backend in backends:
        for mode, tau_th in (("off", float("inf")), ("on", -1.0)):
            sampler = fastis.ImportanceSampler(
                n, BATCH, presample_size=PRESAMPLE, tau_th=tau_th, seed=seed
            )
            method = Sampled(sampler, feedback="score")
            steps[f"{mode}[{backend}]"] = _runner(model, method, x, y, backend)
    return steps


def aten_calls(step, warmup: int = 3) -> int:
    """ATen calls in one ``step()`` (profiler events named ``aten::``, nested included)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def measure(steps: int, rounds: int, n: int, backends=None, clock: str = "thread") -> dict:
    """Milliseconds per step of each variant, the ratios and the ATen call counts."""
    if backends is None:
        backends = ["torch"] + (["native"] if native_built() else [])
    saved = os.environ.get("FASTIS_BACKEND")
    try:
        fns = variants(n, backends)
        timer = time.thread_time if clock == "thread" else time.perf_counter
        ms = interleaved_ms(fns, steps, "cpu", rounds=rounds, clock=timer)
        calls = {name: aten_calls(fn) for name, fn in fns.items()}
    finally:
        if saved is None:
            os.environ.pop("FASTIS_BACKEND", None)
        else:
            os.environ["FASTIS_BACKEND"] = saved
    ideal = ms["forward_B"] + ms["plain"]
    rows = [
        {
            "backend": be,
            "plain_ms": ms["plain"],
            "off_ms": ms[f"off[{be}]"],
            "on_ms": ms[f"on[{be}]"],
            "forward_B_ms": ms["forward_B"],
            "ideal_ms": ideal,
            "off_over_plain": ms[f"off[{be}]"] / ms["plain"],
            "on_over_ideal": ms[f"on[{be}]"] / ideal,
            "calls_plain": calls["plain"],
            "calls_off": calls[f"off[{be}]"],
            "calls_on": calls[f"on[{be}]"],
        }
        for be in backends
    ]
    return {"steps": steps, "rounds": rounds, "n": n, "clock": clock, "ms": ms, "rows": rows}


COLUMNS = [
    ("backend", "backend", "s"),
    ("plain", "plain_ms", ".3f"),
    ("IS off", "off_ms", ".3f"),
    ("IS on", "on_ms", ".3f"),
    ("forward of B", "forward_B_ms", ".3f"),
    ("ideal (fwd B + plain)", "ideal_ms", ".3f"),
    ("off / plain", "off_over_plain", ".3f"),
    ("on / ideal", "on_over_ideal", ".3f"),
    ("ATen calls plain / off / on", "calls", "s"),
]


def markdown(result: dict, title: str) -> list[str]:
    """The result as a markdown table under ``title``."""
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---" * len(COLUMNS) + "|",
    ]
    for r in result["rows"]:
        r = dict(r, calls=f"{r['calls_plain']} / {r['calls_off']} / {r['calls_on']}")
        lines.append("| " + " | ".join(format(r[k], f) for _, k, f in COLUMNS) + " |")
    return lines


def header(argv, clock: str) -> list[str]:
    cpu = platform.processor() or platform.machine()
    return [
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{cpu}, {os.cpu_count()} cores (shared); torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread; malloc: {malloc_label(PINNED[0])}; "
        f"clock: {clock}.",
        f"Command: `python -m bench.step_cost {' '.join(argv)}`".rstrip() + "",
    ]


PINNED = [False]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=10, help="alternating slices")
    p.add_argument("--num-samples", type=int, default=40_000, help="data set size")
    p.add_argument("--backends", nargs="+", default=None, help="default: torch (+ native)")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread")
    p.add_argument("--title", default="step costs (ms per step)")
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    PINNED[0] = pin_glibc_malloc()
    result = measure(args.steps, args.rounds, args.num_samples, args.backends, args.clock)
    lines = [*header(argv, args.clock), "", *markdown(result, args.title), ""]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
