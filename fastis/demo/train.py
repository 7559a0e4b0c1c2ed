"""One training run of the demo: a method, a model, a wall-clock budget.

Methods (same model, data, optimiser and learning-rate schedule; they differ in which
examples each step trains on):

- ``uniform``: shuffled passes over the training set, ``b`` examples a step, with
  ``torch.nn.functional.cross_entropy``: the loop users already have.
- ``upper-bound``: ``fastis.ImportanceSampler`` (Algorithm 1): scores a presample of ``B``
  with the gradient-norm bound ``fastis.score`` while its ``tau`` says it pays.
- ``history``: ``fastis.HistorySampler``: draws from the whole set by stale scores that the
  training loss returned; no extra forward pass.
- ``loss``: Algorithm 1 with the per-sample loss as the score (the earlier heuristic; its
  weights keep the gradient unbiased, but the loss is not the gradient norm, so the
  variance it removes is not the one that matters).
- ``infobatch``, ``selective-backprop``: the peers' rules (``fastis.demo.baselines``).

The clock counts training steps only: evaluations pause it.
"""

import math
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F

import fastis
from fastis.demo import baselines
from fastis.demo.config import BASELINES, METHODS, RunConfig
from fastis.demo.models import MNIST1DCNN


def evaluate(model, x, y, x_test, y_test, batch: int = 8192) -> tuple[float, float]:
    """(mean training loss over the whole training set, test error)."""
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


class _Uniform:
    """Shuffled passes, ``b`` at a time (the baseline every user already has)."""

    def __init__(self, n, cfg):
        self.n, self.b = n, cfg.batch_size
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def step(self, model, x, y, fraction):
        if self.pos + self.b > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.b].to(x.device)
        self.pos += self.b
        return F.cross_entropy(model(x[idx]), y[idx])

    def state(self):
        return {"mode": "uniform"}

    def summary(self):
        return {"steps_importance": 0}


class _Sampled:
    """A fastis sampler driving the steps: select, train, feed the scores back."""

    def __init__(self, sampler, feedback: str):
        self.sampler, self.feedback = sampler, feedback
        self.batches = iter(sampler)

    def step(self, model, x, y, fraction):
        try:
            batch = next(self.batches)
        except StopIteration:  # one pass (an "epoch" of the batch sampler) is over
            self.batches = iter(self.sampler)
            batch = next(self.batches)
        idx = torch.as_tensor(batch, device=x.device)
        xb, yb, w = self.sampler.select(model, x[idx], y[idx])
        if self.feedback == "loss":
            rows = fastis.cross_entropy(model(xb), yb, sample_weight=w, reduction="none")
            self.sampler.update((rows / w).detach())  # the unweighted per-sample losses
            return rows.mean()
        loss, g = fastis.cross_entropy(model(xb), yb, sample_weight=w, return_score=True)
        self.sampler.update(g)
        return loss

    def state(self):
        s = self.sampler
        if isinstance(s, fastis.ImportanceSampler):
            return {"tau": s.tau, "mode": "IS" if s.is_active else "uniform"}
        return {"tau": s.tau, "mode": "history"}

    def summary(self):
        return self.sampler.stats()


def _per_sample_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def make_method(cfg: RunConfig, n: int):
    if cfg.method == "uniform":
        return _Uniform(n, cfg)
    if cfg.method == "history":
        return _Sampled(
            fastis.HistorySampler(
                n,
                cfg.batch_size,
                seed=cfg.seed,
                rebuild_every=cfg.history_rebuild_every,
                uniform_mix=cfg.history_uniform_mix,
            ),
            feedback="score",
        )
    if cfg.method in ("upper-bound", "loss"):
        score_fn = _per_sample_loss if cfg.method == "loss" else None
        sampler = fastis.ImportanceSampler(
            n, cfg.batch_size, seed=cfg.seed, presample_size=cfg.presample_size, score_fn=score_fn
        )
        return _Sampled(sampler, feedback="loss" if cfg.method == "loss" else "score")
    if cfg.method == "infobatch":
        return baselines.InfoBatch(n, cfg)
    if cfg.method == "selective-backprop":
        return baselines.SelectiveBackprop(n, cfg)
    raise ValueError(f"unknown method {cfg.method!r}; choose from {METHODS + BASELINES}")


def run(
    cfg: RunConfig,
    data,
    progress: Callable[[float, dict], None] | None = None,
    model_fn: Callable[[], torch.nn.Module] | None = None,
) -> dict:
    """Trains ``cfg.method`` for ``cfg.budget`` seconds of training; returns its record.

    Args:
        data: ``(x_train, y_train, x_test, y_test)`` on ``cfg.device``.
        progress: called as ``progress(seconds_trained, state)`` about twice a second.
        model_fn: builds the model (default: the demo's ``MNIST1DCNN``).

    Returns:
        A dict: the config, ``curve`` (``time``, ``train_loss``, ``test_error``, ``step``
        lists), ``steps``, ``steps_importance``, ``final_train_loss``, ``final_test_error``,
        ``sampler`` (the sampler's stats) and ``seconds_per_step``.
    """
    x, y, x_test, y_test = data
    torch.manual_seed(cfg.seed)
    model = (model_fn or MNIST1DCNN)().to(cfg.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    method = make_method(cfg, len(x))
    cuda = torch.device(cfg.device).type == "cuda"
    curve = {"time": [], "train_loss": [], "test_error": [], "step": []}

    def record(clock, steps):
        loss, err = evaluate(model, x, y, x_test, y_test)
        for key, value in zip(curve, (clock, loss, err, steps), strict=True):
            curve[key].append(value)

    clock, steps, running = 0.0, 0, None
    record(clock, steps)
    next_eval, last_report = cfg.budget / cfg.evals, 0.0
    while clock < cfg.budget:
        start = time.perf_counter()
        lr = cfg.lr_at(clock / cfg.budget)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = method.step(model, x, y, clock / cfg.budget)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        clock += time.perf_counter() - start
        steps += 1
        if clock >= next_eval or clock >= cfg.budget:
            record(clock, steps)
            next_eval += cfg.budget / cfg.evals
        if progress is not None and clock - last_report >= 0.5:
            value = float(loss)
            running = (
                value
                if running is None or not math.isfinite(running)
                else 0.9 * running + 0.1 * value
            )
            progress(clock, {"loss": running, **method.state()})
            last_report = clock
    summary = method.summary()
    # the history sampler draws every batch by its scores; Algorithm 1 only while on
    importance = steps if cfg.method == "history" else summary.get("steps_importance", 0)
    return {
        "config": asdict(cfg),
        "curve": curve,
        "steps": steps,
        "steps_importance": int(importance),
        "final_train_loss": curve["train_loss"][-1],
        "final_test_error": curve["test_error"][-1],
        "seconds_per_step": clock / max(steps, 1),
        "sampler": summary,
    }
