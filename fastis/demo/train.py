"""Training one method of the demo for a wall-clock budget of its own training time.

``Trainer`` holds one run (model, optimiser, method, curve, clock) and advances it by a
number of seconds of training; ``run`` trains one method to its budget in one go, and
``fastis.demo.interleave`` advances several in alternating time slices. The methods are
in ``fastis.demo.methods`` (same model, data, optimiser and schedule; they differ in which
examples each step trains on).

The clock counts training steps only (``TrainingClock``): evaluations, and in an
interleaved comparison the other methods' slices, pause it. A method's learning rate
follows ``cfg.schedule`` as a function of its own trained share of the budget.
"""

import math
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F

from fastis.demo import models
from fastis.demo.config import RunConfig
from fastis.demo.methods import make_method

__all__ = ["Trainer", "TrainingClock", "evaluate", "make_method", "run", "warm_up"]


def evaluate(model, x, y, x_test, y_test, batch: int = 1024) -> tuple[float, float]:
    """(mean training loss over the whole training set, test error), ``batch`` rows at a
    time (1024: the wide CNN's activations of 8192 rows, 84 MB a layer, ran at half the
    speed on the CPU, out of cache)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(
            F.cross_entropy(model(x[i : i + batch]), y[i : i + batch], reduction="sum")
            for i in range(0, len(x), batch)
        ) / len(x)
        wrong = sum(
            (model(x_test[i : i + batch]).argmax(1) != y_test[i : i + batch]).sum()
            for i in range(0, len(x_test), batch)
        )
    model.train(was_training)
    return float(loss), float(wrong) / len(x_test)


class TrainingClock:
    """Seconds of one method's training: runs between ``start()`` and ``stop()`` only.

    Calling it reads the training seconds so far (including the running step's), so it
    can serve as another component's clock (the measured switch's step timer) that never
    sees evaluations or other methods' time.

    Args:
        base: the wall clock read at ``start`` / ``stop`` (default ``time.perf_counter``; a
            fake one in tests).
    """

    def __init__(self, base: Callable[[], float] | None = None):
        self.base = base if base is not None else time.perf_counter
        self.total = 0.0  # seconds of finished steps
        self._since: float | None = None

    def start(self) -> None:
        self._since = float(self.base())

    def stop(self) -> float:
        """Ends the running interval; returns its seconds."""
        seconds = float(self.base()) - self._since
        self.total += seconds
        self._since = None
        return seconds

    def __call__(self) -> float:
        running = 0.0 if self._since is None else float(self.base()) - self._since
        return self.total + running


class Trainer:
    """One method's run: build with ``Trainer(cfg, data)``, ``advance`` it, read ``result()``.

    The model is built right after ``torch.manual_seed(cfg.seed)``, so the methods of a
    comparison with the same seed start from the same weights; the methods' own
    generators are seeded from ``cfg.seed`` too. The curve is evaluated at 0 and every
    ``budget / evals`` seconds of training (evaluation outside the clock).

    Args:
        cfg: the run.
        data: ``(x_train, y_train, x_test, y_test)`` on ``cfg.device``.
        model_fn: builds the model (default: ``fastis.demo.models.build(cfg.workload)``).
        clock: the wall clock under the training clock (default ``time.perf_counter``).
        curve: evaluate the curve (default True; False for a throwaway warm-up run).
    """

    def __init__(
        self,
        cfg: RunConfig,
        data,
        model_fn: Callable[[], torch.nn.Module] | None = None,
        clock: Callable[[], float] | None = None,
        curve: bool = True,
    ):
        self.cfg, self.data, self._evaluates = cfg, data, curve
        x = data[0]
        torch.manual_seed(cfg.seed)
        self.model = (model_fn() if model_fn else models.build(cfg.workload)).to(cfg.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        self.clock = TrainingClock(clock)
        # the optimizer goes to the method too: the '-gain' variants hook its step
        self.method = make_method(
            cfg, len(x), lr_share=self._lr_share, clock=self.clock, optimizer=self.opt
        )
        self.cuda = torch.device(cfg.device).type == "cuda"
        self.curve = {"time": [], "train_loss": [], "test_error": [], "step": []}
        self.steps, self.slices = 0, 0
        self._running, self._last_report = None, 0.0
        if curve:
            self._record()
        self._next_eval = cfg.budget / cfg.evals if curve else math.inf

    @property
    def trained(self) -> float:
        """Seconds of training so far."""
        return self.clock.total

    @property
    def done(self) -> bool:
        return self.clock.total >= self.cfg.budget

    def _lr_share(self) -> float:
        return self.opt.param_groups[0]["lr"] / self.cfg.lr

    def _record(self) -> None:
        loss, err = evaluate(self.model, *self.data)
        for key, value in zip(self.curve, (self.clock.total, loss, err, self.steps), strict=True):
            self.curve[key].append(value)

    def step(self) -> torch.Tensor:
        """One timed training step (the rate set from the trained share); its loss."""
        x, y = self.data[0], self.data[1]
        fraction = self.clock.total / self.cfg.budget
        self.clock.start()
        lr = self.cfg.lr_at(fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.method.step(self.model, x, y, fraction)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.cuda:
            torch.cuda.synchronize()
        self.clock.stop()
        self.steps += 1
        return loss

    def advance(
        self, seconds: float = math.inf, progress: Callable[[float, dict], None] | None = None
    ) -> float:
        """Trains for about ``seconds`` more of training time (until the step that passes
        them ends) or to the budget, evaluating at the curve's points; returns the seconds
        trained.

        Args:
            progress: called as ``progress(seconds_trained, state)`` about twice a second
                of training (``state``: a running loss and the method's state).
        """
        start = self.clock.total
        self.slices += 1
        while not self.done and self.clock.total - start < seconds:
            loss = self.step()
            clock = self.clock.total
            if self._evaluates and (clock >= self._next_eval or clock >= self.cfg.budget):
                self._record()
                self._next_eval += self.cfg.budget / self.cfg.evals
            if progress is not None and clock - self._last_report >= 0.5:
                value = float(loss.detach())
                running = self._running
                self._running = (
                    value
                    if running is None or not math.isfinite(running)
                    else 0.9 * running + 0.1 * value
                )
                progress(clock, {"loss": self._running, **self.method.state()})
                self._last_report = clock
        return self.clock.total - start

    def result(self) -> dict:
        """The run's record (see ``run``)."""
        summary = self.method.summary()
        # the history sampler draws every batch by its scores; Algorithm 1 only while on
        steps = self.steps
        importance = (
            steps if self.cfg.method.startswith("history") else summary.get("steps_importance", 0)
        )
        return {
            "config": asdict(self.cfg),
            "curve": self.curve,
            "steps": steps,
            "steps_importance": int(importance),
            "final_train_loss": self.curve["train_loss"][-1],
            "final_test_error": self.curve["test_error"][-1],
            "seconds_per_step": self.clock.total / max(steps, 1),
            "sampler": summary,
        }


def warm_up(cfgs: list[RunConfig], data, steps: int, model_fn=None) -> None:
    """Trains a discarded copy of the first run of each method of ``cfgs`` for ``steps``
    steps (no curve), so that no run pays the process's first calls (kernel set-up,
    allocations: a first step can take a hundred times a step) in its budget."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {steps!r}")
    if steps == 0:
        return
    firsts = {}
    for cfg in cfgs:
        firsts.setdefault(cfg.method, cfg)
    for cfg in firsts.values():
        throwaway = Trainer(cfg, data, model_fn=model_fn, curve=False)
        for _ in range(steps):
            throwaway.step()


def run(
    cfg: RunConfig,
    data,
    progress: Callable[[float, dict], None] | None = None,
    model_fn: Callable[[], torch.nn.Module] | None = None,
    clock: Callable[[], float] | None = None,
    warmup_steps: int = 2,
) -> dict:
    """Trains ``cfg.method`` for ``cfg.budget`` seconds of training in one go; its record.

    Args:
        data: ``(x_train, y_train, x_test, y_test)`` on ``cfg.device``.
        progress: called as ``progress(seconds_trained, state)`` about twice a second.
        model_fn: builds the model (default: ``fastis.demo.models.build(cfg.workload)``).
        clock: the wall clock (default ``time.perf_counter``).
        warmup_steps: untimed steps of a discarded copy first (``warm_up``; default 2).

    Returns:
        A dict: the config, ``curve`` (``time``, ``train_loss``, ``test_error``, ``step``
        lists), ``steps``, ``steps_importance``, ``final_train_loss``, ``final_test_error``,
        ``sampler`` (the sampler's stats) and ``seconds_per_step``.
    """
    warm_up([cfg], data, warmup_steps, model_fn)
    trainer = Trainer(cfg, data, model_fn=model_fn, clock=clock)
    trainer.advance(progress=progress)
    return trainer.result()
