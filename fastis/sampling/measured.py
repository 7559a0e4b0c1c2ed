r"""A switch that measures: importance sampling on while its variance reduction pays for
its measured cost.

The fixed threshold ``tau > (B + 3b) / (3b)`` assumes an importance step costs exactly one
extra forward pass of ``B`` and that every step is limited by gradient noise. This switch
replaces both assumptions with measurements:

- **Cost.** Each step is timed online, from one ``select`` to the next (so a step's time
  holds its training work, forward, backward, optimizer step, whatever the loop does, and
  the loading of the next batch), per kind of step: uniform, scored presample, and reuse
  of a presample (``draws_per_presample > 1``). With smoothed times ``t_u``, ``t_p``,
  ``t_c`` the cost of an importance step over a cycle of ``k`` draws per presample is
  ``(t_p + (k - 1) t_c) / k`` and the cost ratio is ``r = that / t_u``. Until both modes
  have been timed ``min_steps`` times, ``r`` is the model's ``(B / k + 3n) / (3b)`` (a
  backward costs two forwards; ``n = b`` rows trained, fewer in the constant-noise
  mode). On the CPU the clock is the host's (``clock``); on CUDA a timing event is
  recorded on the current stream at each ``select`` and read once a later event has
  completed (``Event.query``, never a wait): one step late or more.
- **Variance reduction.** ``tau^2 = |U| sum g_i^2`` is the ratio of the second moments of
  a uniform and an importance-sampled draw from the same presample (``g`` the normalised
  scores). Against fresh uniform batches the presample's own sampling noise counts too: a
  presample of ``B`` serving ``k`` steps adds the variance of a batch of ``B / k`` per step,
  so the effective reduction is ``VR = 1 / (1 / tau^2 + k b / B)`` (at most ``B / (k b)``;
  with ``n < b`` rows per step, the constant-noise mode, ``(1 / b) / (1 / (n tau^2) +
  k / B)``: see ``fastis.sampling.noise``).
- **Does noise limit progress?** One SGD step lowers the loss by about
  ``eta |g|^2 - eta^2 L (|g|^2 + tr(Sigma) / b) / 2``; with ``phi`` the share of the
  step's progress that gradient noise costs, an importance step is worth
  ``benefit = 1 / ((1 - phi) + phi / VR)`` uniform steps (``VR`` when noise dominates,
  ``phi = 1``; 1 when progress is step-limited, ``phi = 0``, as in the low-rate tail of a
  decaying schedule). ``phi`` comes from ``noise_share()``, a callback of the user's
  (default: always 1). The noise term grows with the rate relative to the first-order
  term, so the rate relative to its initial value is a simple proxy:
  ``noise_share=lambda: opt.param_groups[0]["lr"] / lr0``.

Importance sampling is on while ``benefit > r`` (turning on needs
``benefit > (1 + margin) r``, so that a ratio near 1 does not flap).

Distributed: the ranks must decide alike. Their cost ratios ride on the all-reduce that
already averages ``tau_new`` (``SmoothedTau.observe(..., shared=r)``), so every rank
decides from the same mean ratio, bit for bit; ``noise_share`` must return the same value
on every rank (a learning rate does).
"""

import math
import time
from collections import deque
from collections.abc import Callable

import torch

from fastis._checks import float_arg, int_arg
from fastis.sampling.checks import state_float, state_int
from fastis.sampling.noise import variance_reduction

KINDS = ("uniform", "presample", "reuse")


class StepClock:
    """Times the interval between consecutive ``mark`` calls, per kind of step.

    ``mark(kind, device)`` starts a step and returns the ``(kind, seconds)`` intervals that
    have become known: on the CPU (or without CUDA), the previous step's, from
    ``clock()``; on CUDA, those whose end event has completed (checked with
    ``Event.query``, no synchronisation), so usually the step before the previous one. At
    most ``depth`` events wait to be read; older ones are dropped unread.
    """

    def __init__(self, clock: Callable[[], float] | None = None, depth: int = 8):
        self.clock = clock if clock is not None else time.perf_counter
        self.depth = depth
        self._host: tuple[str, float] | None = None  # (kind, start) of the running step
        self._events: deque = deque()  # (kind, CUDA event), oldest first

    def mark(self, kind: str, device: torch.device) -> list:
        if device.type != "cuda":
            self._events.clear()
            now = float(self.clock())
            done = [] if self._host is None else [(self._host[0], now - self._host[1])]
            self._host = (kind, now)
            return done
        self._host = None
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        self._events.append((kind, event))
        done = []
        while len(self._events) >= 2 and self._events[1][1].query():
            k, start = self._events.popleft()
            done.append((k, start.elapsed_time(self._events[0][1]) / 1000.0))
        while len(self._events) > self.depth:
            self._events.popleft()
        return done

    def reset(self) -> None:
        """Forgets the running step (after a resume, the gap is no step of anyone's)."""
        self._host = None
        self._events.clear()

    def __getstate__(self) -> dict:
        # CUDA events cannot be pickled or copied: a copy starts timing afresh
        return dict(self.__dict__, _host=None, _events=deque())


class MeasuredSwitch:
    r"""The measured on/off rule of ``ImportanceSampler`` (pass as ``switch=``, one instance
    per sampler: it holds that sampler's step times); see the module docstring for the
    math. Until it has timed importance steps it relies on the model's cost ratio, and
    once off it keeps its last importance-step time (it does not probe the mode it is not
    in), so a cost that changes while off goes unseen.

    Args:
        noise_share: a callable ``() -> float`` in ``[0, 1]``, ``phi``, the share of a step's
            progress lost to gradient noise (default: always 1, importance sampling on
            whenever ``VR > r``). Called once per decision on the host; return a Python
            float (a tensor would synchronise). E.g. ``lambda: opt.param_groups[0]['lr'] /
            lr0`` turns importance sampling off in a schedule's low-rate tail.
        a_cost: smoothing of the step times, in ``[0, 1)`` (default 0.9); the average is
            bias-corrected, so the first timed step counts in full.
        min_steps: steps of each mode timed before its time is trusted (default 3; until
            then the cost ratio is the model's ``(B / k + 3b) / (3b)``).
        margin: relative margin to turn on, ``benefit > (1 + margin) r`` (default 0.05);
            once on, it stays on while ``benefit > r``.
        clip: a timed interval counts at most ``clip`` times the current estimate of its
            kind (default 4: an evaluation or a checkpoint between two steps is not a step).
        clock: the host clock for steps on the CPU (default ``time.perf_counter``), e.g. a
            fake one in tests or ``time.process_time``.

    Attributes:
        on: the last decision. last: ``{'tau', 'variance_reduction', 'noise_share',
            'benefit', 'cost_ratio'}`` of the last decision (for logging).
    """

    def __init__(
        self,
        *,
        noise_share: Callable[[], float] | None = None,
        a_cost: float = 0.9,
        min_steps: int = 3,
        margin: float = 0.05,
        clip: float = 4.0,
        clock: Callable[[], float] | None = None,
    ):
        if noise_share is not None and not callable(noise_share):
            raise TypeError(f"noise_share must be callable, got {type(noise_share).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self.noise_share = noise_share
        self.a_cost = float_arg("a_cost", a_cost)
        if not 0.0 <= self.a_cost < 1.0:
            raise ValueError(f"a_cost must be in [0, 1), got {self.a_cost}")
        self.min_steps = int_arg("min_steps", min_steps)
        self.margin = float_arg("margin", margin)
        if not 0.0 <= self.margin:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        self.clip = float_arg("clip", clip)
        if not self.clip > 1.0:
            raise ValueError(f"clip must be > 1, got {self.clip}")
        self.timer = StepClock(clock)
        self.on = False
        self.last: dict = {}
        # per kind: (exponential average of the seconds, not bias-corrected; samples)
        self._avg = dict.fromkeys(KINDS, 0.0)
        self._count = dict.fromkeys(KINDS, 0)

    # -- the cost -------------------------------------------------------------------------

    def start_step(self, kind: str, device: torch.device) -> None:
        """Called by ``select``: a step of ``kind`` starts now; folds in the intervals the
        clock has read."""
        for k, seconds in self.timer.mark(kind, device):
            self.observe(k, seconds)

    def observe(self, kind: str, seconds: float) -> None:
        """Folds one timed step of ``kind`` (one of ``KINDS``) into its average."""
        if not (math.isfinite(seconds) and seconds >= 0.0):
            return
        est = self.seconds(kind)
        if est is not None:
            seconds = min(seconds, self.clip * est)
        a = self.a_cost
        self._avg[kind] = a * self._avg[kind] + (1.0 - a) * seconds
        self._count[kind] += 1

    def seconds(self, kind: str) -> float | None:
        """The smoothed time of a step of ``kind`` (bias-corrected), None before any."""
        n = self._count[kind]
        if n == 0:
            return None
        return self._avg[kind] / (1.0 - self.a_cost**n)

    def cost_ratio(self, b: int, big_b: int, k: int, rows: int | None = None) -> float:
        """``r``: the measured time of an importance step (over a cycle of ``k`` draws per
        presample) over a uniform step's; the model's ``(B / k + 3 rows) / (3b)`` until
        both have ``min_steps`` samples (``rows`` trained per step, default ``b``)."""
        prior = (big_b / k + 3 * (b if rows is None else rows)) / (3 * b)
        need = ("uniform", "presample") + (("reuse",) if k > 1 else ())
        if any(self._count[kind] < self.min_steps for kind in need):
            return prior
        t_i = self.seconds("presample")
        if k > 1:
            t_i = (t_i + (k - 1) * self.seconds("reuse")) / k
        t_u = self.seconds("uniform")
        return t_i / t_u if t_u > 0 else prior

    # -- the decision ---------------------------------------------------------------------

    def decide(
        self, tau: float, r: float, b: int, big_b: int, k: int, rows: int | None = None
    ) -> bool:
        """Whether the next fresh batch is an importance step, from the smoothed ``tau``
        and the cost ratio ``r`` (this rank's, or the ranks' mean), for steps of ``rows``
        rows (default ``b``); sets ``on``/``last``."""
        phi = 1.0 if self.noise_share is None else self._phi()
        vr = variance_reduction(tau, b if rows is None else rows, b, big_b, k)
        benefit = 1.0 / ((1.0 - phi) + phi / vr)
        self.on = benefit > (r if self.on else (1.0 + self.margin) * r)
        self.last = {
            "tau": tau,
            "variance_reduction": vr,
            "noise_share": phi,
            "benefit": benefit,
            "cost_ratio": r,
        }
        return self.on

    def _phi(self) -> float:
        phi = self.noise_share()
        if isinstance(phi, bool) or not isinstance(phi, (int, float)):
            raise TypeError(f"noise_share() must return a float, got {type(phi).__name__}")
        phi = float(phi)
        if not 0.0 <= phi <= 1.0:  # also refuses NaN
            raise ValueError(f"noise_share() must return a value in [0, 1], got {phi}")
        return phi

    # -- checkpoints ----------------------------------------------------------------------

    STATE_KEYS = ("on", "shared", *(f"seconds_{k}" for k in KINDS), *(f"count_{k}" for k in KINDS))

    def state_dict(self, tau=None) -> dict:
        """Plain values: ``on``, the averages and counts per kind, and ``shared``, the
        ranks' mean cost ratio held by ``tau`` (a ``SmoothedTau``; None if none)."""
        shared = None if tau is None else tau.host_shared()
        return {
            "on": self.on,
            "shared": shared,
            **{f"seconds_{k}": self._avg[k] for k in KINDS},
            **{f"count_{k}": self._count[k] for k in KINDS},
        }

    def parse_state(self, state) -> dict:
        """The saved ``state_dict()`` (a dict with ``STATE_KEYS``), checked; ``shared`` is
        None or a float >= 0."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict['switch'] must be a dict, got {type(state).__name__}")
        missing = sorted(set(self.STATE_KEYS) - set(state))
        if missing:
            raise ValueError(f"state_dict['switch'] is missing {missing}")
        if not isinstance(state["on"], bool):
            raise TypeError("state_dict['switch']['on'] must be a bool")
        shared = state["shared"]
        return {
            "on": state["on"],
            "shared": None if shared is None else state_float(state, "shared"),
            **{f"seconds_{k}": state_float(state, f"seconds_{k}") for k in KINDS},
            **{f"count_{k}": state_int(state, f"count_{k}") for k in KINDS},
        }

    def restore(self, parsed: dict) -> None:
        self.on = parsed["on"]
        for k in KINDS:
            self._avg[k] = parsed[f"seconds_{k}"]
            self._count[k] = parsed[f"count_{k}"]
        self.timer.reset()

    def __repr__(self) -> str:
        return (
            f"MeasuredSwitch(a_cost={self.a_cost}, min_steps={self.min_steps}, "
            f"margin={self.margin}, clip={self.clip}, noise_share={self.noise_share!r})"
        )
