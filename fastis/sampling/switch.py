"""The variance-reduction switch: ``tau``, its smoothing, and its one host read per step.

With ``g = scores / sum(scores)`` over a scored set ``U``, the reference implementation's
estimate is ``tau_new = 1 / sqrt(1 - sum (g_i - u)^2 / sum g_i^2) = sqrt(|U| sum g_i^2)``
(``u = 1 / |U|``), smoothed as ``tau = a_tau * tau + (1 - a_tau) * tau_new`` from
``tau = 0``; importance sampling pays while ``tau > tau_th``.
"""

import math

import torch
import torch.distributed as dist

from fastis.sampling.checks import state_tensor


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


class SmoothedTau:
    """``tau`` on the scores' device, its smoothing, and a host read that waits for little.

    ``observe`` folds one ``tau_new`` in (averaged over the ranks when ``distributed``);
    ``host_value`` reads ``tau`` for the on/off decision of the next batch. On CUDA each
    ``observe`` copies ``tau`` to pinned memory and records an event, and ``host_value``
    waits for that event only, i.e. for the work queued up to the last update (the scoring
    pass, or the training forward), not for the backward and optimizer step queued after.

    ``observe(..., shared=x)`` also averages a host value ``x`` over the ranks in the same
    all-reduce (the measured switch's cost ratio, so that every rank decides from the same
    number); ``host_shared`` reads the last mean (None before any, or when not
    distributed).

    Attributes:
        tau: float64 0-d tensor (starts at 0). tau_new: the last ``observe``'s mean
            ``tau_new`` (NaN when it had none valid).
    """

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.tau = torch.zeros((), dtype=torch.float64)
        self.tau_new = torch.full((), float("nan"), dtype=torch.float64)
        self.shared: torch.Tensor | None = None  # the ranks' mean of observe's ``shared``
        self._host: torch.Tensor | None = None  # pinned copy of a CUDA tau (and shared)
        self._ready: torch.cuda.Event | None = None  # recorded after that copy

    def observe(
        self, tau_new: torch.Tensor, valid: torch.Tensor, a_tau: float, shared=None
    ) -> None:
        """``tau <- a_tau tau + (1 - a_tau) tau_new`` when ``valid`` (a bool 0-d tensor; with
        ``distributed``, the mean over the ranks whose scores were valid, one
        ``all_reduce`` of 2 elements, 3 with ``shared``); otherwise ``tau`` is kept and
        ``tau_new`` is NaN."""
        if self.distributed:
            parts = [torch.where(valid, tau_new, 0.0), valid.double()]
            if shared is not None:  # a fill, not a host-to-device copy
                parts.append(
                    torch.full((), float(shared), dtype=torch.float64, device=valid.device)
                )
            both = torch.stack(parts)
            dist.all_reduce(both)
            count = both[1]
            valid = count > 0
            tau_new = both[0] / torch.where(valid, count, 1.0)
            if shared is not None:
                self.shared = both[2] / dist.get_world_size()
        tau = self.tau.to(tau_new.device)
        self.tau = torch.where(valid, torch.lerp(tau, tau_new, 1.0 - a_tau), tau)
        self.tau_new = torch.where(valid, tau_new, math.nan)
        self._publish()

    def host_value(self) -> float:
        """``tau`` as a Python float (on CUDA: waits for the last ``observe``'s event)."""
        if self._ready is None:
            return float(self.tau)
        self._ready.synchronize()
        return float(self._host if self._host.dim() == 0 else self._host[0])

    def host_shared(self) -> float | None:
        """The ranks' mean of the last ``observe``'s ``shared`` (waits as ``host_value``)."""
        if self.shared is None:
            return None
        if self._ready is None:
            return float(self.shared)
        self._ready.synchronize()
        return float(self._host[1])

    def _publish(self) -> None:
        if not self.tau.is_cuda:
            self._ready = None
            return
        values = self.tau if self.shared is None else torch.stack([self.tau, self.shared])
        if self._host is None or self._host.shape != values.shape:
            self._host = torch.empty(values.shape, dtype=torch.float64, pin_memory=True)
        self._host.copy_(values, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(self.tau.device))

    def __getstate__(self) -> dict:
        # a CUDA event cannot be pickled or copied; without it the next read of tau waits
        # on tau itself (one synchronisation), and the next observe publishes it again
        return dict(self.__dict__, _ready=None, _host=None)

    def state_dict(self) -> dict:
        return {"tau": self.tau.cpu().clone(), "tau_new": self.tau_new.cpu().clone()}

    @staticmethod
    def parse_state(state: dict) -> tuple:
        """``(tau, tau_new)`` of a ``state_dict()``, checked: float64 0-d tensors, finite and
        >= 0 (``tau_new`` may be NaN)."""
        return (
            state_tensor(state, "tau", (), torch.float64),
            state_tensor(state, "tau_new", (), torch.float64, nan=True),
        )

    def restore(self, tau: torch.Tensor, tau_new: torch.Tensor, shared=None) -> None:
        """Sets ``tau`` and ``tau_new`` (from ``parse_state``) on the current device, and the
        shared mean (a float, or None)."""
        dev = self.tau.device
        self.tau, self.tau_new = tau.to(dev), tau_new.to(dev)
        self.shared = None if shared is None else torch.full((), shared, dtype=torch.float64)
        if self.shared is not None:
            self.shared = self.shared.to(dev)
        self._publish()
