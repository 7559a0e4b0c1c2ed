"""What defines a demo run: the methods, their tuned learning rates, ``RunConfig``."""

from dataclasses import dataclass

METHODS = ("uniform", "upper-bound", "history", "loss")
# the peers' rules (fastis.demo.baselines), for the end-to-end benchmark
BASELINES = ("infobatch", "selective-backprop")
SCHEDULES = ("step", "constant")

# Learning rates per schedule and method (SGD, momentum 0.9, b = 128): each method's best
# of a small sweep on this project's 2-core CPU machines (bench/results/e2e_lr_sweep_*.md).
# Under the step schedule they agree; with a constant rate, importance sampling is stable
# at (and needs) a rate five times uniform's.
DEFAULT_LR = {
    "step": {
        "uniform": 0.1,
        "upper-bound": 0.1,
        "history": 0.05,
        "loss": 0.2,
        "infobatch": 0.1,
        "selective-backprop": 0.1,
    },
    "constant": {
        "uniform": 0.02,
        "upper-bound": 0.1,
        "history": 0.02,
        "loss": 0.1,
        "infobatch": 0.02,
        "selective-backprop": 0.02,
    },
}


@dataclass
class RunConfig:
    """Everything that defines one run (shared by all methods of a comparison)."""

    method: str
    budget: float  # seconds of training
    lr: float
    batch_size: int = 128
    presample_size: int = 384
    momentum: float = 0.9
    schedule: str = "step"  # 'step': lr / 10 at 50% of the budget, / 100 at 75%; 'constant'
    seed: int = 0
    device: str = "cpu"
    evals: int = 30  # evaluations spread over the budget
    history_rebuild_every: int = 10
    # HistorySampler's uniform share: weights <= 1 / mix. At its default 0.1 (weights up to
    # 10) the stale scores of examples it rarely revisits make SGD diverge on this problem.
    history_uniform_mix: float = 0.5

    def lr_at(self, fraction: float) -> float:
        """The rate after ``fraction`` (0 to 1) of the budget."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * (1.0 if fraction < 0.5 else 0.1 if fraction < 0.75 else 0.01)
