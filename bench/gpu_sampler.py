"""GPU check of the training loop: what an importance-sampling step costs, and the demo.

    python bench/gpu_sampler.py                        # on the GPU machine, from the repo root
    python bench/gpu_sampler.py --device cpu --quick   # smoke run of this script

Or from ``bench/gpu_check.py`` (``sampler_section`` is in its ``SECTIONS``); it fills
``report["extra_sampler"]``.

Step costs (ms per step over a run of steps with one synchronisation at its end, so the
pipelining of the GPU counts): for the demo's CNN and a wider MLP on random data, a
uniform step with ``F.cross_entropy``, an ``ImportanceSampler`` step while off
(``tau_th=inf``: ``fastis.cross_entropy`` with the score, ``update``) and while on
(``tau_th=-1``: scoring forward of ``B``, draw, weighted step), and the no-grad forward of
``B`` alone. ``on / uniform`` against ``ideal = 1 + forward_B / uniform`` is the sampler's
overhead; Algorithm 1's break-even ``tau_th = (B + 3b) / 3b`` assumes ``on / uniform``
of about ``1 + B / 3b`` (2 at ``B = 3b``).

End to end (``e2e``): ``fastis.demo.train.run`` for uniform and upper-bound on MNIST-1D,
both schedules, ``--e2e-budget`` seconds each. The data set must already be cached (the
GPU machine has no ``mnist1d`` package and no network): see ``bench/gpu_check.py``'s
docstring for the two commands. Without it the section says so and is skipped.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastis  # noqa: E402
from bench.malloc import pin_glibc_malloc  # noqa: E402
from fastis.demo.models import MNIST1DCNN  # noqa: E402
from fastis.sampler import ImportanceSampler  # noqa: E402

BATCH, PRESAMPLE = 128, 384


def _models():
    return {
        "demo CNN (MNIST-1D, 10 classes)": (lambda: MNIST1DCNN(), (40,), 10),
        "MLP 1024-2048-2048-1000": (
            lambda: torch.nn.Sequential(
                torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                torch.nn.ReLU(), torch.nn.Linear(2048, 1000)),
            (1024,), 1000),
    }


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _per_step_ms(step, steps, device):
    for _ in range(max(3, steps // 10)):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def step_costs(device, steps, n=8192):
    return [_model_costs(name, *spec, device=device, steps=steps, n=n)
            for name, spec in _models().items()]


def _model_costs(name, make, shape, classes, *, device, steps, n):
    torch.manual_seed(0)
    x = torch.randn(n, *shape, device=device)
    y = torch.randint(0, classes, (n,), device=device)
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    perm = torch.randperm(n, device=device)
    cursor = [0]

    def uniform():
        i = cursor[0]
        cursor[0] = (i + BATCH) % (n - BATCH)
        idx = perm[i:i + BATCH]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward_presample():
        with torch.no_grad():
            model(x[perm[:PRESAMPLE]])

    def fastis_steps(sampler):
        batches = [iter(sampler)]

        def step():
            try:
                idx = next(batches[0])
            except StopIteration:
                batches[0] = iter(sampler)
                idx = next(batches[0])
            idx = torch.as_tensor(idx).to(device, non_blocking=True)
            xb, yb, w = sampler.select(model, x[idx], y[idx])
            loss, g = fastis.cross_entropy(model(xb), yb, sample_weight=w, return_score=True)
            sampler.update(g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    row = {"model": name, "b": BATCH, "B": PRESAMPLE}
    try:
        row["uniform_ms"] = _per_step_ms(uniform, steps, device)
        row["forward_B_ms"] = _per_step_ms(forward_presample, steps, device)
        for mode, tau_th in (("off", float("inf")), ("on", -1.0)):
            sampler = ImportanceSampler(n, BATCH, presample_size=PRESAMPLE, tau_th=tau_th,
                                        seed=0)
            row[f"{mode}_ms"] = _per_step_ms(fastis_steps(sampler), steps, device)
        row["off_over_uniform"] = row["off_ms"] / row["uniform_ms"]
        row["on_over_uniform"] = row["on_ms"] / row["uniform_ms"]
        row["ideal_on_over_uniform"] = 1 + row["forward_B_ms"] / row["uniform_ms"]
    except Exception as exc:  # one model failing must not end the check
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def e2e(device, budget):
    """``{schedule: rows of fastis.demo.report.summarise}`` (or why not), one seed each."""
    from fastis.cli import DEFAULT_LR
    from fastis.demo import data as demo_data
    from fastis.demo import report
    from fastis.demo.train import RunConfig, run

    path = demo_data.cache_dir() / "mnist1d_40000_42.npz"
    if not path.exists():
        return f"skipped: {path} is not cached (see this script's docstring)"
    data = tuple(t.to(device) for t in demo_data.mnist1d(40_000))
    out = {}
    for schedule in ("constant", "step"):
        try:
            runs = {m: run(RunConfig(method=m, budget=budget, lr=DEFAULT_LR[schedule][m],
                                     schedule=schedule, device=device), data)
                    for m in ("uniform", "upper-bound")}
            out[schedule] = report.summarise(runs)
        except Exception as exc:  # the step costs above must still be reported
            out[schedule] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def run_checks(report, device="cuda", quick=False, e2e_budget=10.0):
    start = time.perf_counter()
    out = {"step_costs": step_costs(device, steps=20 if quick else 200)}
    out["e2e"] = "skipped (--quick)" if quick else e2e(device, e2e_budget)
    out["seconds"] = round(time.perf_counter() - start, 1)
    report["extra_sampler"] = out
    return out


def sampler_section(report, device, shapes, bandwidth):
    """``bench/gpu_check.py`` SECTIONS entry (``shapes`` only tells a quick run)."""
    run_checks(report, device, quick=len(shapes) <= 2)


STEP_COLUMNS = [("model", "model", "s"), ("uniform", "uniform_ms", ".3f"),
                ("forward of B", "forward_B_ms", ".3f"), ("off", "off_ms", ".3f"),
                ("on", "on_ms", ".3f"), ("off / uniform", "off_over_uniform", ".2f"),
                ("on / uniform", "on_over_uniform", ".2f"),
                ("ideal on / uniform", "ideal_on_over_uniform", ".2f")]
def _table(rows, columns) -> list[str]:
    """Markdown rows; a row with an ``error`` shows it after its first column."""
    out = ["| " + " | ".join(c[0] for c in columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        cells = [format(r[key], fmt) for _, key, fmt in columns] if "error" not in r \
            else [str(r[columns[0][1]]), r["error"]]
        out.append("| " + " | ".join(cells) + " |")
    return out


def to_markdown(res: dict, title: str) -> str:
    lines = [f"# {title}", "", "## Step costs (ms per step; b = 128, B = 384)", ""]
    lines += _table(res["step_costs"], STEP_COLUMNS)
    lines += ["", "## Demo end to end (MNIST-1D, one seed)", ""]
    if isinstance(res["e2e"], str):
        lines.append(res["e2e"])
    else:
        from fastis.demo.report import table

        for schedule, rows in res["e2e"].items():
            lines += [f"{schedule} schedule:", "",
                      rows if isinstance(rows, str) else table(rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--e2e-budget", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="also write this markdown file")
    args = parser.parse_args(argv)
    pin_glibc_malloc()  # stable host timings (bench/malloc.py)
    report = {}
    res = run_checks(report, args.device, args.quick, args.e2e_budget)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(to_markdown(res, f"Training-loop check on {args.device}"))
    return report


if __name__ == "__main__":
    main()
