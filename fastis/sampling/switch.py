"""The variance-reduction switch: ``tau``, its smoothing, and its one host read per step.

With ``g = scores / sum(scores)`` over a scored set ``U``, the reference implementation's
estimate is ``tau_new = 1 / sqrt(1 - sum (g_i - u)^2 / sum g_i^2) = sqrt(|U| sum g_i^2)``
(``u = 1 / |U|``), smoothed as ``tau = a_tau * tau + (1 - a_tau) * tau_new`` from
``tau = 0``; importance sampling pays while ``tau > tau_th``.

Where the arithmetic runs: the smoothing runs on the host, in float64, when ``tau`` is
next read (the on/off decision of the next batch), over the updates queued since, oldest
first. The recursion is sequential in Python floats, so ``tau`` does not depend on when it
is read: a run that reads it every step and one that reads it once get the same value,
bit for bit. An off step's update costs one device operation: the training batch's
scores are copied to the host (on CUDA to pinned memory, asynchronously, with an event
recorded after the copy), and their ``tau_new`` is computed there when folded (``b``
values: a few microseconds for ``b`` in the hundreds).
"""

import math
from collections import deque

import torch
import torch.distributed as dist

from fastis.sampling.checks import state_tensor


def score_summary(scores: torch.Tensor):
    """``(s, total, valid, usable)`` of scores ``[n]``: ``s`` in float64, its sum, whether
    all are finite and non-negative, and whether they are also not all zero (0-d bool
    tensors; no synchronisation). A NaN fails ``amin >= 0``; a NaN or inf makes the sum
    fail ``< inf`` (cheaper than ``isfinite``, which is four ops)."""
    s = scores.to(torch.float64)
    total = s.sum()
    valid = (s.amin() >= 0) & (total < math.inf)
    return s, total, valid, valid & (total > 0)


def tau_from_sum(s: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``compute_tau`` of float64 scores ``s`` ``[n]`` whose sum ``total`` is at hand."""
    tau = math.sqrt(s.shape[0]) * torch.linalg.vector_norm(s / total)
    return torch.where(total > 0, tau, 1.0)


def compute_tau(scores: torch.Tensor) -> torch.Tensor:
    r"""The variance-reduction estimate of one scored set ``U`` (the switch's ``tau_new``).

    With ``g = scores / sum(scores)`` and ``u = 1 / |U|``, the reference implementation's

        ``tau_new = 1 / sqrt(1 - sum (g_i - u)^2 / sum g_i^2)``

    which equals ``sqrt(|U| sum g_i^2) = sqrt(|U| / ESS)`` (``sum (g - u)^2 = sum g^2 - u``);
    this form is computed, in float64 (as ``sqrt(|U|) ||g||_2``), since it cannot cancel. It
    is 1 for equal scores, ``sqrt(|U|)`` when one score holds everything, and 1 for all-zero
    scores (uniform sampling is then what runs).

    Args:
        scores: ``[n]`` non-negative scores, ``n >= 1`` (not checked here).

    Returns:
        float64 0-d tensor on the scores' device (no host synchronisation).
    """
    s = scores.detach().to(torch.float64)
    return tau_from_sum(s, s.sum())


def default_tau_th(batch_size: int, presample_size: int) -> float:
    """The break-even ``tau_th = (B + 3b) / (3b)`` (a backward costs about two forwards)."""
    return (presample_size + 3 * batch_size) / (3 * batch_size)


def tau_from_values(values: list) -> tuple[float, bool]:
    """``(tau_new, valid)`` of scores given as Python floats: ``compute_tau`` on the host,
    in float64 (on this project's CPUs, for ``n`` in the hundreds, cheaper than even one
    more tensor operation inside a training step).

    ``valid``: every score finite and non-negative (a NaN or an infinity makes the sum
    NaN or infinite; so does a sum of finite float64 scores that overflows, as on the
    device). ``tau_new = sqrt(n) ||s||_2 / sum(s)`` (``math.hypot``: no overflow, no
    underflow), 1 for all-zero scores, NaN when not ``valid``.
    """
    total = sum(values)
    if not (total < math.inf and min(values) >= 0.0):  # NaN fails both comparisons
        return math.nan, False
    if total == 0.0:
        return 1.0, True
    return math.sqrt(len(values)) * math.hypot(*values) / total, True


def _lerp(tau: float, tau_new: float, weight: float) -> float:
    # torch.lerp's two forms: each exact at its end of the weight range
    if weight < 0.5:
        return tau + weight * (tau_new - tau)
    return tau_new - (tau_new - tau) * (1.0 - weight)


class SmoothedTau:
    """``tau``, smoothed on the host from device values read late.

    Each update queues a record: host values, or on CUDA a pinned copy of device values
    and an event recorded after it. ``host_value`` folds the queued records, oldest first,
    into ``tau`` (on CUDA waiting for each one's event only, i.e. for the work queued up
    to that update: the scoring pass, or the training forward, not the backward and
    optimizer step queued after).

    - ``observe_scores(scores, a_tau)``: an off step (the training batch's scores); the
      fold counts it in ``invalid`` if they are not all finite and non-negative.
    - ``observe(tau_new, valid, a_tau)``: a ``tau_new`` computed elsewhere (not counted);
    - ``observe_presample(norm_g, valid, usable, size, a_tau)``: a scored presample, as
      ``PresampleDraw.draw`` returns it; the fold computes ``tau_new = sqrt(size) norm_g``
      (1 for all-zero scores) and counts the presample in ``invalid`` or ``zero``. One
      device operation (the three values stacked), where counting on the device took four.

    An invalid update keeps ``tau`` and sets ``tau_new`` to NaN.

    ``distributed``: each update all-reduces ``[valid tau_new, valid]`` (and ``shared``,
    a host value such as the measured switch's cost ratio) on the device, and the fold
    uses the mean ``tau_new`` over the ranks whose scores were valid (kept if none), so
    every rank folds the same numbers and holds the same ``tau``, bit for bit.
    ``host_shared`` reads the last mean of ``shared`` (None before any).

    Attributes:
        invalid: off steps and presamples whose own scores were invalid, zero: presamples
            whose scores were all 0 (folded so far; host ints).
    """

    # record layouts: what the values of a record hold
    HOST, SCORES, TAU, REDUCED, REDUCED_SCORES = range(5)
    PRESAMPLE, REDUCED_PRESAMPLE, HOST_PRESAMPLE = range(5, 8)

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self._tau = 0.0
        self._tau_new = math.nan
        self._shared: float | None = None  # the ranks' mean of observe's ``shared``
        self.invalid = 0
        self.zero = 0
        # (a_tau, layout, values, event, scale): values are (tau_new, valid) already computed
        # (HOST), or a CPU tensor, or on CUDA a pinned tensor filled by a copy that
        # ``event`` follows: the scores (SCORES), [valid tau_new, valid] (TAU), that
        # summed over the ranks and the mean shared value (REDUCED), the same after this
        # rank's own validity (REDUCED_SCORES), [norm_g, valid, usable] (PRESAMPLE; scale:
        # sqrt(size)), that after this rank's [valid, usable] (REDUCED_PRESAMPLE), or
        # (tau_new, valid, usable) already computed (HOST_PRESAMPLE)
        self._pending: deque = deque()
        self._free: list[torch.Tensor] = []  # pinned buffers whose copy has been read

    # -- updates ----------------------------------------------------------------------------

    def observe_scores(self, scores: torch.Tensor, a_tau: float, shared=None) -> None:
        """Queues an off step's scores ``[n]`` (any floating dtype, any device; read now
        on the CPU, copied on CUDA: the caller may reuse the tensor)."""
        if not self.distributed:
            if scores.is_cuda:
                self._push(a_tau, self.SCORES, scores.detach())
            else:  # the caller may reuse the tensor: read now (no device to wait for)
                self._push(a_tau, self.HOST, tau_from_values(scores.tolist()))
            return
        # each rank's tau_new on the device, for the all-reduce (one collective)
        s, total, valid, _ = score_summary(scores.detach())
        reduced = self._reduce(tau_from_sum(s, total), valid, shared)
        local = valid.to(torch.float64).reshape(1)
        self._push(a_tau, self.REDUCED_SCORES, torch.cat([local, reduced]))

    def observe(
        self, tau_new: torch.Tensor, valid: torch.Tensor, a_tau: float, shared=None
    ) -> None:
        """Queues ``tau <- a_tau tau + (1 - a_tau) tau_new`` when ``valid`` (a bool 0-d
        tensor; with ``distributed``, the mean over the ranks whose scores were valid, one
        ``all_reduce`` of 2 elements, 3 with ``shared``); otherwise ``tau`` is kept and
        ``tau_new`` is NaN."""
        if self.distributed:
            self._push(a_tau, self.REDUCED, self._reduce(tau_new, valid, shared))
        else:
            both = torch.stack([torch.where(valid, tau_new, 0.0), valid.to(torch.float64)])
            self._push(a_tau, self.TAU, both)

    def observe_presample(self, norm_g, valid, usable, size: int, a_tau: float, shared=None):
        """Queues a scored presample of ``size`` rows (``PresampleDraw.draw``'s ``norm_g``,
        ``valid``, ``usable``): ``tau_new = sqrt(size) norm_g``, 1 when the scores are all
        0, and as ``observe`` for invalid scores; counted in ``invalid`` / ``zero``."""
        if not self.distributed:
            record = torch.stack([norm_g, valid, usable])  # bools promoted to float64
            self._push(a_tau, self.PRESAMPLE, record, math.sqrt(size))
            return
        tau_new = torch.where(usable, math.sqrt(size) * norm_g, 1.0)
        reduced = self._reduce(tau_new, valid, shared)
        local = torch.stack([valid, usable]).to(torch.float64)
        self._push(a_tau, self.REDUCED_PRESAMPLE, torch.cat([local, reduced]))

    def observe_presample_host(
        self, tau_new: float, valid: bool, usable: bool, a_tau: float
    ) -> None:
        """``observe_presample`` with the summary already on the host (CPU scores, one
        process: ``PresampleDraw.draw_host``): no tensor operation at all."""
        self._push(a_tau, self.HOST_PRESAMPLE, (tau_new, valid, usable))

    def _reduce(self, tau_new, valid, shared) -> torch.Tensor:
        """``[sum of valid tau_new, valid ranks(, mean shared)]`` over the ranks."""
        parts = [torch.where(valid, tau_new, 0.0), valid.to(torch.float64)]
        if shared is not None:  # a fill, not a host-to-device copy
            parts.append(torch.full((), float(shared), dtype=torch.float64, device=valid.device))
        both = torch.stack(parts)
        dist.all_reduce(both)
        if shared is not None:
            both[2:].div_(dist.get_world_size())
        return both

    def _push(self, a_tau: float, layout: int, values, scale: float = 1.0) -> None:
        event = None
        if isinstance(values, torch.Tensor) and values.is_cuda:
            host = self._pinned(values)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(values.device))
            values = host
        self._pending.append((a_tau, layout, values, event, scale))

    def _pinned(self, like: torch.Tensor) -> torch.Tensor:
        for i, t in enumerate(self._free):
            if t.shape == like.shape and t.dtype == like.dtype:
                return self._free.pop(i)
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    # -- host reads ---------------------------------------------------------------------------

    def _fold(self) -> None:
        while self._pending:
            a_tau, layout, values, event, scale = self._pending.popleft()
            if event is not None:
                event.synchronize()
                self._free.append(values)
            if layout == self.HOST or layout == self.SCORES:
                if layout == self.SCORES:
                    values = tau_from_values(values.tolist())
                tau_new, valid = values
                self.invalid += not valid
            elif layout == self.HOST_PRESAMPLE:
                tau_new, valid, usable = values
                self.invalid += not valid
                self.zero += valid and not usable
            elif layout == self.PRESAMPLE:
                norm_g, valid, usable = values.tolist()
                valid, usable = valid > 0.0, usable > 0.0
                self.invalid += not valid
                self.zero += valid and not usable
                # the device's where(total > 0, sqrt(n) * ||g||, 1), bit for bit
                tau_new = (scale * norm_g if usable else 1.0) if valid else math.nan
            else:
                values = values.tolist()
                if layout == self.REDUCED_SCORES:
                    self.invalid += values[0] == 0.0  # this rank's own scores
                    values = values[1:]
                elif layout == self.REDUCED_PRESAMPLE:  # this rank's own [valid, usable]
                    self.invalid += values[0] == 0.0
                    self.zero += values[0] > 0.0 and values[1] == 0.0
                    values = values[2:]
                valid = values[1] > 0.0
                tau_new = values[0] / values[1] if valid else math.nan
                if len(values) > 2:
                    self._shared = values[2]
            if valid:
                self._tau = _lerp(self._tau, tau_new, 1.0 - a_tau)
            self._tau_new = tau_new

    def host_value(self) -> float:
        """``tau`` as a Python float, every queued update folded in."""
        self._fold()
        return self._tau

    def host_new(self) -> float:
        """The last update's ``tau_new`` (the ranks' mean; NaN if it had none valid)."""
        self._fold()
        return self._tau_new

    def host_shared(self) -> float | None:
        """The ranks' mean of the last ``observe``'s ``shared`` (None before any)."""
        self._fold()
        return self._shared

    def host_invalid(self) -> int:
        """``invalid``, every queued update folded in."""
        self._fold()
        return self.invalid

    def host_zero(self) -> int:
        """``zero``, every queued update folded in."""
        self._fold()
        return self.zero

    def __getstate__(self) -> dict:
        # CUDA events cannot be pickled or copied: a copy folds what is queued first
        self._fold()
        return dict(self.__dict__, _pending=deque(), _free=[])

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``tau`` and ``tau_new`` as float64 0-d CPU tensors (every update folded in)."""
        self._fold()
        return {
            "tau": torch.tensor(self._tau, dtype=torch.float64),
            "tau_new": torch.tensor(self._tau_new, dtype=torch.float64),
        }

    @staticmethod
    def parse_state(state: dict) -> tuple:
        """``(tau, tau_new)`` of a ``state_dict()``, checked: float64 0-d tensors, finite and
        >= 0 (``tau_new`` may be NaN)."""
        return (
            state_tensor(state, "tau", (), torch.float64),
            state_tensor(state, "tau_new", (), torch.float64, nan=True),
        )

    def restore(self, tau: torch.Tensor, tau_new: torch.Tensor, shared=None) -> None:
        """Sets ``tau`` and ``tau_new`` (from ``parse_state``) and the shared mean (a float,
        or None); drops what is queued (``invalid`` and ``zero`` restart at 0: the
        checkpoint counts the steps before it)."""
        self._pending.clear()
        self._tau, self._tau_new = float(tau), float(tau_new)
        self._shared = None if shared is None else float(shared)
        self.invalid = self.zero = 0
