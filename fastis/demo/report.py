"""The demo's outputs: the comparison table, ``results.json`` and the plot."""

import json
import math
import platform
from pathlib import Path

import torch


def time_to_reach(curve: dict, target: float) -> float:
    """Training seconds at which the training loss first reaches ``target`` (inf if never).

    Between the last evaluation above ``target`` and the first at or below it, the time is
    interpolated linearly in the log of the loss (losses fall about exponentially over a
    stretch), so that the answer does not jump by a whole evaluation interval; at a
    non-finite or non-positive loss it is the evaluation's own time.
    """
    if math.isnan(target):
        return math.inf  # a NaN target is never reached
    before = None
    for t, loss in zip(curve["time"], curve["train_loss"], strict=True):
        if loss <= target:
            if before is None or not (target > 0 and loss > 0 and math.isfinite(before[1])):
                return t
            t0, l0 = before
            share = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(loss))
            return t0 + (t - t0) * share
        before = (t, loss)
    return math.inf


def speedup(curve: dict, base_curve: dict) -> float:
    """How much faster a run reaches a loss than uniform's ``base_curve`` (> 1 faster).

    If the run ends at or below uniform's final loss ``L_u``: uniform's time to reach
    ``L_u`` over the run's. Otherwise (the run ends above, at ``L_m``): uniform's time to
    reach ``L_m`` over the run's own, which is < 1. So a slower method gets a number too,
    and no seed drops out of an average. NaN if either final loss is not finite.
    """
    final, base = curve["train_loss"][-1], base_curve["train_loss"][-1]
    if not (math.isfinite(final) and math.isfinite(base)):
        return math.nan
    target = base if final <= base else final
    mine, theirs = time_to_reach(curve, target), time_to_reach(base_curve, target)
    if mine == 0:  # reached at the start: only where uniform never trained below it
        return math.inf if theirs > 0 else 1.0
    return theirs / mine


def summarise(runs: dict) -> list[dict]:
    """One row per method, against uniform sampling (if run) of the same seed.

    ``time_to_uniform_loss``: training seconds to reach uniform's final training loss (inf
    if never); ``speedup``: ``speedup(curve, uniform's curve)`` (> 1 faster, < 1 slower);
    ``loss_ratio``: the final training loss over uniform's (< 1 lower).
    """
    base = runs.get("uniform")
    target = base["final_train_loss"] if base else None
    rows = []
    for name, r in runs.items():
        row = {
            "method": name,
            "train_loss": r["final_train_loss"],
            "test_error": r["final_test_error"],
            "steps": r["steps"],
            "importance_share": r["steps_importance"] / max(r["steps"], 1),
            "ms_per_step": 1e3 * r["seconds_per_step"],
        }
        if target is not None:
            row["time_to_uniform_loss"] = time_to_reach(r["curve"], target)
            row["speedup"] = speedup(r["curve"], base["curve"])
            final = r["final_train_loss"]
            finite = math.isfinite(final) and math.isfinite(target) and target > 0
            row["loss_ratio"] = final / target if finite else math.nan
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table a person reads in a terminal or a README."""
    head = (
        "| method | train loss | test error | steps | IS steps | ms/step "
        "| time to uniform's loss | speed-up |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = r.get("time_to_uniform_loss")
        reach = "-" if reach is None else ("never" if math.isinf(reach) else f"{reach:.1f} s")
        speed = r.get("speedup")
        speed = "-" if speed is None or math.isnan(speed) else f"{speed:.2f}x"
        lines.append(
            f"| {r['method']} | {r['train_loss']:.3e} | {r['test_error']:.2%} | "
            f"{r['steps']} | {r['importance_share']:.0%} | {r['ms_per_step']:.2f} | "
            f"{reach} | {speed} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"], info["cores"] = (names[0] if names else ""), len(names)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def collect(runs: dict, settings: dict) -> dict:
    """What ``results.json`` holds: the settings, the machine, the summary and the runs."""
    return {"settings": settings, "machine": machine(), "summary": summarise(runs), "runs": runs}


def to_json(obj) -> str:
    """Strict JSON (no ``NaN`` or ``Infinity`` tokens): non-finite floats, such as the
    loss of a diverged run or a speed-up that was never reached, become the strings
    ``"nan"``, ``"inf"`` and ``"-inf"``."""
    return json.dumps(_finite(obj), indent=1, allow_nan=False)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(out: Path, results: dict) -> Path:
    """Writes ``out/results.json`` (creating ``out``); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(to_json(results))
    return path


def plot(path: Path, runs: dict, settings: dict) -> None:
    """Training loss (log scale) and test error against training time, one line a method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in runs.items():
        c = r["curve"]
        ax_loss.plot(c["time"], c["train_loss"], label=name, lw=1.8)
        ax_err.plot(c["time"], [100 * e for e in c["test_error"]], label=name, lw=1.8)
    ax_loss.set_yscale("log")
    ax_err.set_yscale("log")  # from 90 % at the start to ~1 %: both ends matter
    ax_loss.set_xlabel("training time (s)")
    ax_loss.set_ylabel("training loss (whole training set)")
    ax_err.set_xlabel("training time (s)")
    ax_err.set_ylabel("test error (%)")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(
        f"MNIST-1D, {settings.get('num_samples', '?')} examples, "
        f"{settings.get('budget', '?')} s per method, "
        f"{settings.get('schedule', '?')} schedule, seed {settings.get('seed', '?')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
