"""What defines a demo run: the workloads, methods, schedules, tuned rates, ``RunConfig``."""

import math
from dataclasses import dataclass

# Algorithm 1's opt-in variants (fastis.demo.methods), each ``upper-bound`` plus:
VARIANTS = {
    # MeasuredSwitch, noise_share = current rate / initial rate (off in a schedule's tail)
    "upper-bound-measured": ("measured",),
    # draws_per_presample = reuse_draws (2) from a presample of reuse_presample (8 b)
    "upper-bound-reuse": ("reuse",),
    # constant_noise=True: the noise of a uniform batch of b, fewer rows backpropagated
    "upper-bound-constant-noise": ("constant_noise",),
    # both of the first two
    "upper-bound-measured-reuse": ("measured", "reuse"),
    # fastis.LRGain(max_gain=cfg.max_gain): the rate scaled by AdaScale's gain on importance
    # steps (the base rate cfg.lr, the schedule's, on uniform steps)
    "upper-bound-gain": ("gain",),
    # the measured switch and the gain
    "upper-bound-measured-gain": ("measured", "gain"),
}
GAINED = tuple(m for m, options in VARIANTS.items() if "gain" in options)
METHODS = ("uniform", "upper-bound", "history", "history-stable", "loss", *VARIANTS)
# the peers' rules (fastis.demo.baselines), for the end-to-end benchmark
BASELINES = ("infobatch", "selective-backprop")
# 'step': the demo's own, x0.1 at 50% of the budget, x0.01 at 75% (kept as it was tuned);
# 'paper-step': Katharopoulos & Fleuret's rule, x0.2 at 50%, x0.04 at 80%;
# 'cosine': lr (1 + cos(pi f)) / 2, to zero at the end; 'constant'.
SCHEDULES = ("step", "constant", "paper-step", "cosine")
# the network and data (fastis.demo.models.build, fastis.demo.data.load): 'demo', the 1-D
# CNN on MNIST-1D; 'wide-cnn', a wider, deeper 1-D CNN on MNIST-1D (compute-bound steps);
# 'tabular-mlp', an MLP on a generated imbalanced, noisy table
WORKLOADS = ("demo", "wide-cnn", "tabular-mlp")

# Learning rates per schedule and method (SGD, momentum 0.9, b = 128): each method's best
# of a small sweep on this project's 2-core CPU machines (bench/results/e2e_lr_sweep_*.md).
# Under the step schedule they agree; with a constant rate, importance sampling is stable
# at (and needs) a rate five times uniform's. 'paper-step' and 'cosine' start from the
# 'step' rates, and the variants from upper-bound's, until swept.
_TUNED = {
    "step": {
        "uniform": 0.1,
        "upper-bound": 0.1,
        "history": 0.05,
        "history-stable": 0.05,
        "loss": 0.2,
        "infobatch": 0.1,
        "selective-backprop": 0.1,
    },
    "constant": {
        "uniform": 0.02,
        "upper-bound": 0.1,
        "history": 0.02,
        "history-stable": 0.02,
        "loss": 0.1,
        "infobatch": 0.02,
        "selective-backprop": 0.02,
    },
}
_TUNED["paper-step"] = dict(_TUNED["step"])
_TUNED["cosine"] = dict(_TUNED["step"])

# The gain variants' base rates, each tuned on seed 0 over a grid with its optimum inside
# (bench/results/e2e_lr_sweep_<mnist1d|tabular-mlp>_cpu_gain_<schedule>.md; the comparison
# at them in e2e_<...>_cpu_gain_<schedule>.md). Where not tuned, upper bound's rate over
# the cap (RunConfig.max_gain = 2): importance steps at gain 2 then take upper bound's own
# tuned rate, and no step a rate above it.
_GAIN_LR = {
    "demo": {
        "paper-step": {"upper-bound-gain": 0.1, "upper-bound-measured-gain": 0.1},
        # measured-gain: 0.2 won seed 0 by 7% but stalled one seed of three (its steps are
        # mostly uniform, and 0.2 is above uniform's best); 0.1 held on all three
        # (e2e_mnist1d_cpu_gain_cosine_measured-gain_lr0.1.md)
        "cosine": {"upper-bound-gain": 0.2, "upper-bound-measured-gain": 0.1},
    },
    "tabular-mlp": {
        "paper-step": {"upper-bound-gain": 0.1, "upper-bound-measured-gain": 0.05},
        "cosine": {"upper-bound-gain": 0.1, "upper-bound-measured-gain": 0.1},
    },
}


def _gain_rates(workload: str, schedule: str, upper_bound: float) -> dict:
    tuned = _GAIN_LR.get(workload, {}).get(schedule, {})
    return {m: tuned.get(m, upper_bound / 2.0) for m in GAINED}


DEFAULT_LR = {
    schedule: {
        **rates,
        **dict.fromkeys(VARIANTS, rates["upper-bound"]),
        **_gain_rates("demo", schedule, rates["upper-bound"]),
    }
    for schedule, rates in _TUNED.items()
}


# The other workloads' rates: uniform's and upper-bound's best of a sweep at seed 0 (20 s
# for the MLP, 30 s for the wide CNN; bench/results/e2e_cpu_tuned.md), with a constant
# rate and with a decaying one (the paper's step rule and cosine agreed, but for the wide
# CNN's upper-bound under cosine, 0.1 at the grid's edge).
_WORKLOAD_LR = {
    "wide-cnn": {
        "constant": {"uniform": 0.05, "upper-bound": 0.05},
        "decayed": {"uniform": 0.05, "upper-bound": 0.05},
    },
    "tabular-mlp": {
        "constant": {"uniform": 0.05, "upper-bound": 0.1},
        "decayed": {"uniform": 0.1, "upper-bound": 0.1},
    },
}


def default_lr(workload: str, schedule: str, method: str) -> float:
    """The rate a run of ``method`` gets unless told: ``DEFAULT_LR`` for the demo; for the
    other workloads the swept rate of ``method``'s family (upper-bound's for
    Algorithm 1, its variants and ``loss``; uniform's for the rest), constant or decayed
    as ``schedule`` is, but for the gain variants (``GAINED``): their tuned base rate
    (``_GAIN_LR``), else upper-bound's over 2."""
    if workload == "demo":
        return DEFAULT_LR[schedule][method]
    if workload not in _WORKLOAD_LR:
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    rates = _WORKLOAD_LR[workload]["constant" if schedule == "constant" else "decayed"]
    if method in GAINED:
        return _gain_rates(workload, schedule, rates["upper-bound"])[method]
    family = "upper-bound" if method in ("upper-bound", "loss", *VARIANTS) else "uniform"
    return rates[family]


def schedule_factor(schedule: str, fraction: float) -> float:
    """The rate's multiplier after ``fraction`` (0 to 1, clipped) of the budget.

    ``'constant'``: 1; ``'step'``: 1, 0.1 from 0.5, 0.01 from 0.75; ``'paper-step'``: 1,
    0.2 from 0.5, 0.04 from 0.8; ``'cosine'``: ``(1 + cos(pi f)) / 2`` (1 at 0, 0.5 at
    0.5, 0 at 1).
    """
    f = min(max(float(fraction), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if f < 0.5 else 0.1 if f < 0.75 else 0.01
    if schedule == "paper-step":
        return 1.0 if f < 0.5 else 0.2 if f < 0.8 else 0.04
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * f))
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")


@dataclass
class RunConfig:
    """Everything that defines one run (shared by all methods of a comparison)."""

    method: str
    budget: float  # seconds of training
    lr: float
    batch_size: int = 128
    presample_size: int = 384
    momentum: float = 0.9
    schedule: str = "step"  # one of SCHEDULES (see schedule_factor)
    seed: int = 0
    device: str = "cpu"
    evals: int = 30  # evaluations spread over the budget
    history_rebuild_every: int = 10
    # HistorySampler's uniform share: weights <= 1 / mix. At its default 0.1 (weights up to
    # 10) the stale scores of examples it rarely revisits make SGD diverge on this problem.
    history_uniform_mix: float = 0.5
    # 'history-stable': steps a score stays fresh (None: one pass over the set, ceil(n / b))
    history_max_staleness: int | None = None
    # the '-reuse' variants: steps per scored presample, and its size (default 8 b, well
    # above k b, so that the presample's own noise, shared by its k steps, stays small)
    reuse_draws: int = 2
    reuse_presample: int | None = None
    # the '-gain' variants: fastis.LRGain's cap on the gain (1 would disable it)
    max_gain: float = 2.0
    workload: str = "demo"  # one of WORKLOADS: the network a Trainer builds for the run

    def lr_at(self, fraction: float) -> float:
        """The rate after ``fraction`` (0 to 1) of the budget."""
        return self.lr * schedule_factor(self.schedule, fraction)
