"""The demo's methods: how each picks the examples a step trains on.

Every method has ``step(model, x, y, fraction) -> loss`` (a scalar to backpropagate),
``state()`` (a dict for the progress line) and ``summary()`` (its stats for the record).

- ``uniform``: shuffled passes over the training set, ``b`` examples a step, with
  ``torch.nn.functional.cross_entropy``: the loop users already have.
- ``upper-bound``: ``fastis.ImportanceSampler`` (Algorithm 1): scores a presample of ``B``
  with the gradient-norm bound ``fastis.score`` while its ``tau`` says it pays.
- ``history``: ``fastis.HistorySampler``: draws from the whole set by stale scores that the
  training loss returned; no extra forward pass.
- ``history-stable``: ``HistorySampler(max_staleness=...)`` (one pass over the set by
  default): a score older than that is replaced by the mean of the fresh ones, so a stale
  example is drawn at the uniform rate, with weight 1.
- ``loss``: Algorithm 1 with the per-sample loss as the score (the earlier heuristic; its
  weights keep the gradient unbiased, but the loss is not the gradient norm, so the
  variance it removes is not the one that matters).
- ``upper-bound-measured``: Algorithm 1 with ``fastis.MeasuredSwitch``, its
  ``noise_share`` the current rate over the initial one, its step times read from the
  method's own training clock (so evaluations and other methods' time slices never count).
- ``upper-bound-reuse``: ``draws_per_presample = cfg.reuse_draws`` (2) from a presample of
  ``cfg.reuse_presample`` (default ``8 b``).
- ``upper-bound-constant-noise``: ``constant_noise=True`` (the noise of a uniform batch of
  ``b``, fewer rows backpropagated).
- ``upper-bound-measured-reuse``: the measured switch and the reuse together.
- ``upper-bound-gain``: Algorithm 1 with ``fastis.LRGain(optimizer, sampler,
  max_gain=cfg.max_gain)``: the run's rate times AdaScale's gain (up to the cap) on an
  importance step, the schedule's own on a uniform one.
- ``upper-bound-measured-gain``: the measured switch and the gain together.
- ``infobatch``, ``selective-backprop``: the peers' rules (``fastis.demo.baselines``).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastis
from fastis.demo import baselines
from fastis.demo.config import BASELINES, METHODS, VARIANTS, RunConfig


class Uniform:
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
        # index_select, as Sampled: a third of x[idx]'s cost (its indexing machinery)
        return F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))

    def state(self):
        return {"mode": "uniform"}

    def summary(self):
        return {"steps_importance": 0}


class GainLog:
    """What a ``fastis.LRGain`` did: the optimizer steps whose rate it scaled and their
    mean gain (read by a step post-hook registered after the gain's own, so each step's
    gain is final when it is read; host floats only, no synchronisation)."""

    def __init__(self, gain: fastis.LRGain):
        self.gain, self.gained_steps, self._sum = gain, 0, 0.0
        gain.optimizer.register_step_post_hook(self._log)

    def _log(self, optimizer, args, kwargs) -> None:
        if self.gain.gain != 1.0:
            self.gained_steps += 1
            self._sum += self.gain.gain

    def summary(self) -> dict:
        return {
            "max_gain": self.gain.max_gain,
            "gained_steps": self.gained_steps,
            "mean_gain_when_gained": self._sum / self.gained_steps if self.gained_steps else 1.0,
            "noise_share": self.gain.noise_share,  # NaN before any gradient pair
        }


class Sampled:
    """A fastis sampler driving the steps: select, train, feed the scores back; with
    ``gain`` (a ``fastis.LRGain`` on the run's optimizer), its gains reported too."""

    def __init__(self, sampler, feedback: str, gain: fastis.LRGain | None = None):
        self.sampler, self.feedback = sampler, feedback
        self.batches = None  # index tensors, on the data's device (no Python lists)
        self.gain = gain
        self.gain_log = None if gain is None else GainLog(gain)

    def step(self, model, x, y, fraction):
        if self.batches is None:
            self.batches = self.sampler.index_tensors(device=x.device)
        try:
            idx = next(self.batches)
        except StopIteration:  # one pass (a batch sampler's "epoch") is over
            self.batches = self.sampler.index_tensors(device=x.device)
            idx = next(self.batches)
        # index_select: a third of x[idx]'s cost, which parses a general indexing expression
        xb, yb, w = self.sampler.select(model, x.index_select(0, idx), y.index_select(0, idx))
        if self.feedback == "loss":
            rows = fastis.cross_entropy(model(xb), yb, sample_weight=w, reduction="none")
            self.sampler.update((rows / w).detach())  # the unweighted per-sample losses
            return rows.mean()
        loss, g = fastis.cross_entropy(model(xb), yb, sample_weight=w, return_score=True)
        self.sampler.update(g)
        return loss

    def state(self):
        s = self.sampler
        if not isinstance(s, fastis.ImportanceSampler):
            return {"tau": s.tau, "mode": "history"}
        state = {"tau": s.tau, "mode": "IS" if s.is_active else "uniform"}
        if self.gain is not None:
            state["gain"] = self.gain.gain  # the last optimizer step's
        return state

    def summary(self):
        stats = self.sampler.stats()
        if self.gain_log is not None:
            stats["lr_gain"] = self.gain_log.summary()
        return stats


def _per_sample_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _noise_share(lr_share: Callable[[], float] | None) -> Callable[[], float]:
    """``phi`` for the measured switch: the rate's share of its initial value, in [0, 1]."""
    if lr_share is None:
        return lambda: 1.0
    return lambda: min(max(float(lr_share()), 0.0), 1.0)


def _importance(cfg: RunConfig, n: int, lr_share, clock) -> fastis.ImportanceSampler:
    """Algorithm 1 with the options of ``cfg.method`` (``VARIANTS``)."""
    options = VARIANTS.get(cfg.method, ())
    kwargs = {"presample_size": cfg.presample_size}
    if cfg.method == "loss":
        kwargs["score_fn"] = _per_sample_loss
    if "measured" in options:
        kwargs["switch"] = fastis.MeasuredSwitch(noise_share=_noise_share(lr_share), clock=clock)
    if "reuse" in options:
        kwargs["draws_per_presample"] = cfg.reuse_draws
        kwargs["presample_size"] = cfg.reuse_presample or 8 * cfg.batch_size
    if "constant_noise" in options:
        kwargs["constant_noise"] = True
    return fastis.ImportanceSampler(n, cfg.batch_size, seed=cfg.seed, **kwargs)


def make_method(
    cfg: RunConfig,
    n: int,
    lr_share: Callable[[], float] | None = None,
    clock: Callable[[], float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
):
    """The method ``cfg.method`` over a training set of ``n`` examples.

    Args:
        lr_share: ``() -> current rate / initial rate`` (the measured switch's
            ``noise_share``; default: always 1).
        clock: the host clock of the measured switch's step times (default
            ``time.perf_counter``; the trainer passes its own training clock).
        optimizer: the run's optimizer, which the ``-gain`` variants' ``fastis.LRGain``
            hooks (required for them, unused by the others).
    """
    if cfg.method == "uniform":
        return Uniform(n, cfg)
    if cfg.method in ("history", "history-stable"):
        max_staleness = None
        if cfg.method == "history-stable":
            one_pass = -(-n // cfg.batch_size)
            max_staleness = cfg.history_max_staleness or max(
                one_pass, 2 * cfg.history_rebuild_every - 1
            )
        return Sampled(
            fastis.HistorySampler(
                n,
                cfg.batch_size,
                seed=cfg.seed,
                rebuild_every=cfg.history_rebuild_every,
                uniform_mix=cfg.history_uniform_mix,
                max_staleness=max_staleness,
            ),
            feedback="score",
        )
    if cfg.method in ("upper-bound", "loss") or cfg.method in VARIANTS:
        sampler = _importance(cfg, n, lr_share, clock)
        gain = None
        if "gain" in VARIANTS.get(cfg.method, ()):
            if optimizer is None:
                raise ValueError(
                    f"method {cfg.method!r} scales the optimizer's rates: pass optimizer"
                )
            gain = fastis.LRGain(optimizer, sampler, max_gain=cfg.max_gain)
        feedback = "loss" if cfg.method == "loss" else "score"
        return Sampled(sampler, feedback=feedback, gain=gain)
    if cfg.method == "infobatch":
        return baselines.InfoBatch(n, cfg)
    if cfg.method == "selective-backprop":
        return baselines.SelectiveBackprop(n, cfg)
    raise ValueError(f"unknown method {cfg.method!r}; choose from {METHODS + BASELINES}")
