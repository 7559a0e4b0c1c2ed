"""What a user reads off ``ImportanceSampler``: ``last_indices``, ``tau``, ``is_active``,
``stats()`` and its ``repr``.

A mixin over the parts an ``ImportanceSampler`` wires together (the smoothed ``tau``
``_switch``, the draw counters ``_draw``, the optional measured ``switch``, the step
counters and ``_last``, what ``select`` last returned); nothing here changes them but the
host folds of ``tau`` that every read makes and the tensor ``last_indices`` builds once.
"""

import torch


class ImportanceReport:
    """The read-only views of ``ImportanceSampler`` (see there)."""

    @property
    def last_indices(self) -> torch.Tensor | None:
        """Data set indices (int64) of the batch ``select`` last returned, on the batch's
        device (None before any): built at the first read after each ``select`` (so a step
        that never reads it pays nothing for it), the caller's to keep."""
        if self._last is None or isinstance(self._last, torch.Tensor):
            return self._last
        batch, pos, dev = self._last
        index = batch.index
        if pos is not None:  # from pageable memory: staged at once, no wait
            out = index.to(dev, non_blocking=True).index_select(0, pos)
        elif dev.type == "cpu":
            out = index.clone()
        else:
            out = index.to(dev, non_blocking=True)
        self._last = out
        return out

    @property
    def tau(self) -> float:
        """The smoothed variance-reduction estimate (reads it on the host: on CUDA, waits
        for the work queued up to the last update)."""
        return self._switch.host_value()

    @property
    def variance_reduction(self) -> float:
        """The estimated variance reduction of the batch ``select`` last returned, against
        a uniform batch of ``b`` (a host float, no synchronisation): exactly 1.0 for a
        uniform batch (and before any ``select``); for an importance batch
        ``VR = (1 / b) / (1 / (n tau^2) + k / B)`` (``fastis.sampling.noise``), ``n`` its
        rows and ``tau`` as read by the decision that drew it (``tau`` below 1 counts as
        1); below 1 when ``tau`` is near 1 (the presample's own noise, a batch of ``B``
        shared by ``k`` steps, then outweighs the reduction) and about 1 in the
        constant-noise mode. The batch scale of ``fastis.LRGain``'s learning-rate gain."""
        return self._last_vr

    @property
    def is_active(self) -> bool:
        """Whether the next batch drawn will be a presample (``tau > tau_th``); with a
        ``MeasuredSwitch``, its last decision (``switch.on``)."""
        return self.tau > self.tau_th if self.switch is None else self.switch.on

    def stats(self) -> dict:
        """Plain values to log (one host synchronisation): ``tau``, ``tau_new`` (the last
        update's, NaN if skipped), ``tau_th``, ``is_active``, ``steps``,
        ``steps_importance``, ``steps_uniform``, ``mean_weight`` / ``max_weight`` (over the
        importance-sampled examples; NaN / 0 before any), ``invalid_score_steps`` (NaN,
        inf or negative scores: tau kept, uniform fallback), ``zero_score_steps``,
        ``missing_updates`` (off steps whose scores were never fed back: tau cannot rise),
        ``presamples`` (scored presamples; ``steps_importance / draws_per_presample`` or
        a little more), ``weighted_rows`` (rows returned by importance steps:
        ``steps_importance * b`` but in the constant-noise mode); with a
        ``MeasuredSwitch``, ``switch``: its last decision's ``tau``,
        ``variance_reduction``, ``noise_share``, ``benefit``, ``cost_ratio``, and the
        smoothed step times ``seconds_uniform`` / ``_presample`` / ``_reuse`` (None
        before any)."""
        tau, tau_new = self._switch.host_value(), self._switch.host_new()
        counts = self._draw.values()
        n_weights = self.weighted_rows
        return {
            "tau": tau,
            "tau_new": tau_new,
            "tau_th": self.tau_th,
            "is_active": tau > self.tau_th if self.switch is None else self.switch.on,
            "steps": self.steps,
            "steps_importance": self.steps_importance,
            "steps_uniform": self.steps_uniform,
            "mean_weight": counts["weight_sum"] / n_weights if n_weights else float("nan"),
            "max_weight": counts["weight_max"],
            "invalid_score_steps": int(counts["invalid_steps"]) + self._switch.host_invalid(),
            "zero_score_steps": int(counts["zero_steps"]) + self._switch.host_zero(),
            "missing_updates": self.missing_updates,
            "presamples": self.presamples,
            "weighted_rows": self.weighted_rows,
            **({} if self.switch is None else {"switch": self._switch_stats()}),
        }

    def _switch_stats(self) -> dict:
        sw = self.switch
        times = {f"seconds_{k}": sw.seconds(k) for k in ("uniform", "presample", "reuse")}
        return {**sw.last, **times}

    def __repr__(self) -> str:
        return (
            f"ImportanceSampler(num_samples={self.num_samples}, batch_size={self.batch_size}"
            f", presample_size={self.presample_size}, tau_th={self.tau_th:.4g}, "
            f"a_tau={self.a_tau}, num_replicas={self.num_replicas}, rank={self.rank}"
            + (f", draws_per_presample={k}" if (k := self.draws_per_presample) > 1 else "")
            + ("" if self.switch is None else f", switch={self.switch!r}")
            + (
                f", constant_noise=True, min_batch_size={self.min_batch_size}"
                if self.constant_noise
                else ""
            )
            + ")"
        )
