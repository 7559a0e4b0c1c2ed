"""GPU check section: what an importance-sampling step costs, and the demo end to end.

Run with the rest of the GPU check, or alone: ``python -m bench.gpu_check --parts sampler``
(``--device cpu --quick`` for a smoke run).

Step costs (ms per step over a run of steps with one synchronisation at its end, so the
pipelining of the GPU counts): for the demo's CNN and a wider MLP on random data, a
uniform step with ``F.cross_entropy``, an ``ImportanceSampler`` step while off
(``tau_th=inf``: ``fastis.cross_entropy`` with the score, ``update``) and while on
(``tau_th=-1``: scoring forward of ``B``, draw, weighted step), and the no-grad forward of
``B`` alone. ``on / uniform`` against ``ideal = 1 + forward_B / uniform`` is the sampler's
overhead; Algorithm 1's break-even ``tau_th = (B + 3b) / 3b`` assumes ``on / uniform``
of about ``1 + B / 3b`` (2 at ``B = 3b``).

End to end (``e2e``): ``fastis.demo.train.run`` for uniform and upper-bound on MNIST-1D,
both schedules, ``--e2e-budget`` seconds each. The data set must already be cached where
the check runs (a machine without the ``mnist1d`` package or a network cannot make it):
see ``bench/gpu_check.py``'s docstring. Without it the section says so and is skipped.
"""

import time

import torch
import torch.nn.functional as F

import fastis
from bench._section import Part, Settings, table
from bench._timing import describe, interleaved_ms
from fastis.demo import data as demo_data
from fastis.demo import report
from fastis.demo.config import DEFAULT_LR, RunConfig
from fastis.demo.models import MNIST1DCNN
from fastis.demo.train import run

BATCH, PRESAMPLE = 128, 384


def _models():
    return {
        "demo CNN (MNIST-1D, 10 classes)": (lambda: MNIST1DCNN(), (40,), 10),
        "MLP 1024-2048-2048-1000": (
            lambda: torch.nn.Sequential(
                torch.nn.Linear(1024, 2048),
                torch.nn.ReLU(),
                torch.nn.Linear(2048, 2048),
                torch.nn.ReLU(),
                torch.nn.Linear(2048, 1000),
            ),
            (1024,),
            1000,
        ),
    }


def step_costs(device, steps, n=8192):
    return [
        _model_costs(name, *spec, device=device, steps=steps, n=n)
        for name, spec in _models().items()
    ]


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
        idx = perm[i : i + BATCH]
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
        variants = {"uniform": uniform, "forward_B": forward_presample}
        for mode, tau_th in (("off", float("inf")), ("on", -1.0)):
            sampler = fastis.ImportanceSampler(
                n, BATCH, presample_size=PRESAMPLE, tau_th=tau_th, seed=0
            )
            variants[mode] = fastis_steps(sampler)
        # alternating slices: the variants share whatever the machine does meanwhile
        for key, ms in interleaved_ms(variants, steps, device).items():
            row[f"{key}_ms"] = ms
        row["off_over_uniform"] = row["off_ms"] / row["uniform_ms"]
        row["on_over_uniform"] = row["on_ms"] / row["uniform_ms"]
        row["ideal_on_over_uniform"] = 1 + row["forward_B_ms"] / row["uniform_ms"]
    except Exception as exc:  # one model failing must not end the check
        row["error"] = describe(exc)
    return row


def e2e(device, budget):
    """``{schedule: rows of fastis.demo.report.summarise}`` (or why not), one seed each."""
    path = demo_data.cache_dir() / "mnist1d_40000_42.npz"
    if not path.exists():
        return f"skipped: {path} is not cached (see bench/gpu_check.py's docstring)"
    data = tuple(t.to(device) for t in demo_data.mnist1d(40_000))
    out = {}
    for schedule in ("constant", "step"):
        try:
            runs = {
                m: run(
                    RunConfig(
                        method=m,
                        budget=budget,
                        lr=DEFAULT_LR[schedule][m],
                        schedule=schedule,
                        device=device,
                    ),
                    data,
                )
                for m in ("uniform", "upper-bound")
            }
            out[schedule] = report.summarise(runs)
        except Exception as exc:  # the step costs above must still be reported
            out[schedule] = describe(exc)
    return out


def measure(settings: Settings) -> dict:
    start = time.perf_counter()
    out = {"step_costs": step_costs(settings.device, steps=20 if settings.quick else 200)}
    out["e2e"] = (
        "skipped (--quick)" if settings.quick else e2e(settings.device, settings.e2e_budget)
    )
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


STEP_COLUMNS = [
    ("model", "model", "s"),
    ("uniform", "uniform_ms", ".3f"),
    ("forward of B", "forward_B_ms", ".3f"),
    ("off", "off_ms", ".3f"),
    ("on", "on_ms", ".3f"),
    ("off / uniform", "off_over_uniform", ".2f"),
    ("on / uniform", "on_over_uniform", ".2f"),
    ("ideal on / uniform", "ideal_on_over_uniform", ".2f"),
]


def markdown(res: dict) -> list[str]:
    lines = [
        "## Training loop (ImportanceSampler)",
        "",
        f"### Step costs (ms per step; b = {BATCH}, B = {PRESAMPLE})",
        "",
    ]
    lines += table(res["step_costs"], STEP_COLUMNS)
    lines += ["", "### Demo end to end (MNIST-1D, one seed)", ""]
    if isinstance(res["e2e"], str):
        return lines + [res["e2e"]]
    for schedule, rows in res["e2e"].items():
        lines += [
            f"{schedule} schedule:",
            "",
            rows if isinstance(rows, str) else report.table(rows),
            "",
        ]
    return lines


PARTS = [Part("sampler", measure, markdown)]
