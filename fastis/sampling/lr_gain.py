r"""An opt-in learning-rate gain while importance sampling is on, in the spirit of AdaScale
(Johnson, Agrawal, Gu & Guestrin, "AdaScale SGD: A User-Friendly Algorithm for Distributed
Training", ICML 2020).

**The gain.** Let a uniform batch of ``b`` give the gradient estimate ``G`` with mean ``g``
and noise ``sigma^2 = E |G - g|^2`` (the trace of its covariance). An importance step's
estimate has the noise ``sigma^2 / rho``, ``rho`` its variance reduction
(``ImportanceSampler.variance_reduction``, from ``tau``): in noise it behaves like a
uniform batch of ``rho b``, a batch scale ``S = rho``. AdaScale's gain for a scale ``S``,

    ``r = (sigma^2 + |g|^2) / (sigma^2 / S + |g|^2) = 1 / ((1 - phi) + phi / S)``,
    ``phi = sigma^2 / (sigma^2 + |g|^2)``,

is the ratio of the expected squared norms ``E |G|^2`` of the two estimates; to first order
in the rate, one step at ``r lr`` on the scaled batch makes the progress of ``r`` steps at
``lr`` on uniform batches. ``r`` lies in ``[1, S]``: ``S`` when noise dominates
(``phi -> 1``), 1 when the gradient does (``phi -> 0``, the step-limited low-rate tail,
where a larger rate buys nothing). It is the ``benefit`` of the measured switch
(``fastis.sampling.measured``), there with the user's ``noise_share`` for ``phi``.

The rate applied on a step is ``min(r, max_gain) * lr`` on an importance step with
``rho > 1``; exactly ``lr`` (gain 1.0) on a uniform step, when ``rho <= 1``, and until
``min_steps`` gradient pairs have been measured.

**Estimating phi without synchronisation.** From the gradient ``G_t`` that
``optimizer.step`` is about to apply and the previous step's ``G_{t-1}`` (independent
batches): ``E[G_t . G_{t-1}] ~ |g|^2`` and ``E |G_t|^2 = |g|^2 + sigma^2 / rho_t``
(``rho_t = 1`` on a uniform step, the step's own reduction otherwise). So

    ``y_t = G_t . G_{t-1}`` estimates ``|g|^2``; ``x_t = rho_t (|G_t|^2 - y_t)``, ``sigma^2``;

each is averaged exponentially (``a_noise``, bias-corrected) into ``X`` and ``Y``, and
``phi = X / (X + max(Y, 0))`` (0 when ``X <= 0``). The dot products are formed on the
device (the gradients flattened into a float32 buffer; a second one holds ``G_{t-1}``),
as one 2-element tensor, copied to pinned memory asynchronously on CUDA, and read on the
host at the next step's hook (on CUDA waiting only for the previous step's gradients):
the gain of step ``t`` uses the pairs up to step ``t - 1``, on every device alike. Under
DDP the gradients are all-reduced (the same on every rank) and the sampler's ``tau`` is
the same on every rank, bit for bit, so every rank applies the same gain; with sharded
gradients (FSDP, ZeRO) the dot products would differ per rank: not supported.

Biases, all bounded by ``max_gain``: consecutive gradients differ by the step between
them (and ``G_{t-1}``'s own noise moved the weights ``G_t`` is taken at), so ``y``
underestimates ``|g|^2`` at high rates and ``phi`` leans high (on the demo CNN, against
the truth from the whole training set's gradient: 0.80 for 0.64 at step 250, then 0.88
and 0.94 for 0.94 and 0.93 at steps 1,000 and 2,500; ``bench/results/lr_gain_cpu.md``); with
``draws_per_presample k > 1`` consecutive importance steps share a presample, whose noise
(about ``sigma^2 b / B``) adds to ``y`` and lowers ``phi``. Cost per measured step: one copy
of the gradients into the buffer and two dot products (memory-bound, about one more pass
over the gradients than the optimizer makes), and one float32 buffer of the gradients'
size kept between steps. By default only importance steps are measured (pairs of
consecutive ones; ``x_t``'s factor ``rho_t`` makes them estimate the same ``sigma^2``), so
that a run whose switch stays off pays nothing: measured on every step, the tabular MLP's
uniform step cost 10-14 % more (``bench/results/e2e_cpu_gain_summary.md``).
"""

import math

import torch

from fastis._checks import bool_arg, float_arg, int_arg
from fastis.sampling.checks import check_header, state_float, state_int

_VERSION = 1
_KEYS = ("config", "gain", "noise_avg", "grad_avg", "count", "pending", "prev_grad")


def adascale_gain(noise_share: float, scale: float) -> float:
    """AdaScale's ``r = 1 / ((1 - phi) + phi / S)`` for a noise share ``phi`` in ``[0, 1]``
    and a batch scale ``S >= 1`` (host floats): in ``[1, S]``, non-decreasing in both."""
    return max(1.0, 1.0 / ((1.0 - noise_share) + noise_share / scale))


class LRGain:
    r"""Scales the optimizer's learning rates by AdaScale's gain while importance sampling
    is on (see the module docstring for the math): ``min(r, max_gain)`` on an importance
    step, exactly 1 otherwise.

    How it applies: a pre-hook of ``optimizer.step`` multiplies each param group's
    ``lr`` by the step's gain, and a post-hook puts back the very values it found (a float,
    or in place a tensor ``lr``). Outside ``optimizer.step`` the groups hold the rates of
    the user's own schedule, untouched: any ``torch.optim.lr_scheduler`` (chained or not,
    stepped before or after) reads and sets its own values, ``get_last_lr()`` reports them,
    and the gain composes with them as a factor. With a gain of 1.0 the rates are not
    touched at all. The gain is read at each step from ``sampler.variance_reduction``, the
    batch ``select`` last returned: one ``select`` per ``optimizer.step`` (with gradient
    accumulation, the last one counts). The schedule's progress is not changed (AdaScale
    also advances it by ``r`` per step; here the schedule stays the user's).

    Why hooks: a wrapper in the form of an ``lr_scheduler`` would have to own the user's
    schedule, and a chainable scheduler that multiplies the group's current ``lr`` would
    compound a gain left in it; a float that the loop multiplies in would have to be
    undone after every step. The hooks scale the step itself, and nothing else.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to scale (hooks are registered on it;
            ``remove()`` takes them off). Its parameters on one device.
        sampler: the ``ImportanceSampler`` that selects each step's batch (anything with a
            float ``variance_reduction``).
        max_gain: the cap, a float in ``[1, inf)`` (default 2.0; 1.0 disables the gain).
        a_noise: smoothing of the gradient statistics ``X``, ``Y``, in ``[0, 1)`` (default
            0.95).
        min_steps: gradient pairs averaged before the gain may leave 1 (default 10).
        measure_uniform: also measure the gradients of uniform steps (the estimate is then
            warm when importance sampling turns on, but every step pays the measurement);
            by default only pairs of consecutive importance steps are measured, and a
            uniform step costs nothing (it also breaks the pair).

    Attributes:
        gain: the gain of the last ``optimizer.step`` (1.0 before any).
        noise_share: ``phi`` as estimated from the pairs read so far (NaN before any).

    Example:
        >>> sampler = fastis.ImportanceSampler(len(X), batch_size=128, seed=0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        >>> gain = fastis.LRGain(opt, sampler, max_gain=2.0)
        >>> for idx in sampler.index_tensors(X.device):
        ...     x, y, w = sampler.select(model, X[idx], Y[idx])
        ...     loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
        ...     sampler.update(g)
        ...     opt.zero_grad(); loss.backward(); opt.step(); sched.step()

    Checkpoints: ``state_dict()`` / ``load_state_dict()`` as for a scheduler (plain values,
    the pair not yet read, and the last gradient as a CPU tensor), so a resumed run applies
    the gains the uninterrupted one would have.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sampler,
        *,
        max_gain: float = 2.0,
        a_noise: float = 0.95,
        min_steps: int = 10,
        measure_uniform: bool = False,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        vr = getattr(sampler, "variance_reduction", None)
        if isinstance(vr, bool) or not isinstance(vr, (int, float)):
            raise TypeError(
                "sampler must be an ImportanceSampler (a float variance_reduction), got "
                f"{type(sampler).__name__}"
            )
        self.max_gain = float_arg("max_gain", max_gain)
        if not 1.0 <= self.max_gain < math.inf:
            raise ValueError(f"max_gain must be finite and >= 1, got {self.max_gain}")
        self.a_noise = float_arg("a_noise", a_noise)
        if not 0.0 <= self.a_noise < 1.0:
            raise ValueError(f"a_noise must be in [0, 1), got {self.a_noise}")
        self.min_steps = int_arg("min_steps", min_steps)
        self.measure_uniform = bool_arg("measure_uniform", measure_uniform)
        self.optimizer, self.sampler = optimizer, sampler
        self.gain = 1.0
        self._x = self._y = 0.0  # exponential averages of x_t, y_t (not bias-corrected)
        self._count = 0
        # the last pair not yet read: (host values or a pinned tensor, CUDA event, rho)
        self._pending: tuple | None = None
        self._pinned: torch.Tensor | None = None
        self._prev: torch.Tensor | None = None  # G_{t-1}, flat float32
        self._spare: torch.Tensor | None = None  # the buffer G_t is written to
        self._saved: list | None = None  # the groups' rates while step() runs
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # -- the estimate ---------------------------------------------------------------------

    @property
    def noise_share(self) -> float:
        """``phi = X / (X + max(Y, 0))`` from the pairs read so far (NaN before any; reads
        no device state)."""
        if self._count == 0:
            return math.nan
        if self._x <= 0.0:  # (bias correction is a common factor of X and Y)
            return 0.0
        return self._x / (self._x + max(self._y, 0.0))

    def _fold(self) -> None:
        # reads the last step's pair (on CUDA: waits for its event) into X and Y
        if self._pending is None:
            return
        values, event, rho = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
            values = values.tolist()
        sq, dot = values
        if not (math.isfinite(sq) and math.isfinite(dot)):
            return  # a non-finite gradient (e.g. a skipped mixed-precision step) counts not
        a = self.a_noise
        self._x = a * self._x + (1.0 - a) * rho * (sq - dot)
        self._y = a * self._y + (1.0 - a) * dot
        self._count += 1

    def _measure(self, rho: float) -> None:
        # G_t flattened into the spare buffer; [|G_t|^2, G_t . G_{t-1}] queued for a late read
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        grads = [t.detach().reshape(-1) for t in grads if t is not None]
        if not grads:
            self._prev = None
            return
        n, dev = sum(t.numel() for t in grads), grads[0].device
        buf = self._spare
        if buf is None or buf.numel() != n or buf.device != dev:
            buf = torch.empty(n, dtype=torch.float32, device=dev)
        torch.cat(grads, out=buf)
        prev = self._prev
        if prev is not None and prev.numel() == n:
            prev = prev.to(dev)  # after a resume, from the CPU
            pair = torch.stack([buf.dot(buf), buf.dot(prev)])
            if pair.is_cuda:
                if self._pinned is None:
                    self._pinned = torch.empty(2, dtype=pair.dtype, pin_memory=True)
                self._pinned.copy_(pair, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(dev))
                self._pending = (self._pinned, event, rho)
            else:
                self._pending = (pair.tolist(), None, rho)
        self._spare, self._prev = prev, buf

    def _step_gain(self, rho: float) -> float:
        if not rho > 1.0 or self._count < self.min_steps:
            return 1.0
        return min(self.max_gain, adascale_gain(self.noise_share, rho))

    # -- the hooks --------------------------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._restore()  # a step that raised left its rates scaled
        rho = float(self.sampler.variance_reduction)
        self._fold()
        if rho > 1.0 or self.measure_uniform:
            self._measure(rho)
        else:  # a uniform step, not measured: the next pair starts after it
            self._prev = None
        self.gain = gain = self._step_gain(rho)
        if gain == 1.0:
            return
        self._saved = []
        for group in optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                self._saved.append(lr.clone())
                lr.mul_(gain)
            else:
                self._saved.append(lr)
                group["lr"] = lr * gain

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is None:
            return
        for group, lr in zip(self.optimizer.param_groups, self._saved, strict=True):
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr
        self._saved = None

    def remove(self) -> None:
        """Takes the hooks off the optimizer (its rates are then the schedule's alone)."""
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- checkpoints ------------------------------------------------------------------------

    def _config(self) -> dict:
        return {
            "max_gain": self.max_gain,
            "a_noise": self.a_noise,
            "min_steps": self.min_steps,
            "measure_uniform": self.measure_uniform,
        }

    def state_dict(self) -> dict:
        """Plain values and a CPU tensor: the configuration (checked on load), ``gain``,
        the averages ``noise_avg`` (``X``) / ``grad_avg`` (``Y``) and ``count``, the last
        pair not yet read (``pending``: ``[|G|^2, G . G_prev, rho]`` or None; reading it
        is a synchronisation) and the last gradient (``prev_grad``, float32 ``[P]``, or
        None). Take it between steps."""
        pending = None
        if self._pending is not None:
            values, event, rho = self._pending
            if event is not None:
                event.synchronize()
                values = values.tolist()
            # a non-finite pair is skipped when read: saved as NaN
            pending = [v if math.isfinite(v) else math.nan for v in map(float, values)] + [rho]
        prev = None if self._prev is None else self._prev.detach().to("cpu", copy=True)
        return {
            "kind": type(self).__name__,
            "version": _VERSION,
            "config": self._config(),
            "gain": self.gain,
            "noise_avg": self._x,
            "grad_avg": self._y,
            "count": self._count,
            "pending": pending,
            "prev_grad": prev,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()`` of a gain with the same configuration (else
        ``ValueError``), every value checked first (a refused state changes nothing)."""
        check_header(state_dict, type(self).__name__, _VERSION, _KEYS, self._config())
        st = state_dict
        gain = state_float(st, "gain", 1.0)
        if gain > self.max_gain:
            raise ValueError(f"state_dict['gain'] must be <= max_gain={self.max_gain}, got {gain}")
        x, y = state_float(st, "noise_avg", -math.inf), state_float(st, "grad_avg", -math.inf)
        count = state_int(st, "count")
        pending = st["pending"]
        if pending is not None:
            if not isinstance(pending, (list, tuple)) or len(pending) != 3:
                raise ValueError(f"state_dict['pending'] must be None or 3 floats, got {pending!r}")
            named = {f"pending[{i}]": v for i, v in enumerate(pending)}
            sq = state_float(named, "pending[0]", nan=True)
            dot = state_float(named, "pending[1]", -math.inf, nan=True)
            rho = state_float(named, "pending[2]")
            pending = ([sq, dot], None, rho)
        prev = st["prev_grad"]
        if prev is not None:
            if not isinstance(prev, torch.Tensor) or prev.dtype != torch.float32 or prev.dim() != 1:
                raise TypeError("state_dict['prev_grad'] must be None or a 1-d float32 tensor")
            prev = prev.detach().to("cpu", copy=True)
        # all checked: restore
        self._restore()
        self.gain, self._x, self._y, self._count = gain, x, y, count
        self._pending, self._prev, self._spare = pending, prev, None

    def __repr__(self) -> str:
        return (
            f"LRGain(max_gain={self.max_gain}, a_noise={self.a_noise}, "
            f"min_steps={self.min_steps}, measure_uniform={self.measure_uniform}, "
            f"gain={self.gain:.4g})"
        )
