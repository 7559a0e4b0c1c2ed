"""The checkpoint of ``ImportanceSampler``: its configuration, ``state_dict`` and
``load_state_dict`` (format version 3).

A mixin: it reads and restores the parts an ``ImportanceSampler`` wires together (the
smoothed ``tau`` ``_switch``, the draw counters ``_draw``, the permutations ``_stream``,
the presample cycle ``_reuse``, the optional measured ``switch``, and the queue of
yielded batches of ``BatchStream``), so that the format is written in one place.
"""

from fastis.sampling.checks import check_header, state_int
from fastis.sampling.draw import PresampleDraw
from fastis.sampling.stream import STREAM_KEYS

STATE_VERSION = 3  # 3: draws_per_presample, switch (2 had neither)


class ImportanceState:
    """``state_dict`` / ``load_state_dict`` of ``ImportanceSampler`` (see there)."""

    _STATE_KEYS = (
        "config",
        "tau",
        "tau_new",
        *PresampleDraw.COUNTERS,
        "pass",
        "cursor",
        "steps_importance",
        "steps_uniform",
        "presamples",
        "weighted_rows",
        "rows",
        "generator",
        "reuse",
        "plan",
        "switch",
        *STREAM_KEYS,
    )

    def _config(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "presample_size": self.presample_size,
            "tau_th": self.tau_th,
            "a_tau": self.a_tau,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "draws_per_presample": self.draws_per_presample,
            "switch": None if self.switch is None else "measured",
            "constant_noise": self.constant_noise,
            "min_batch_size": self.min_batch_size,
        }

    def state_dict(self) -> dict:
        """Plain values and CPU tensors under named keys: the configuration (checked on
        load), ``tau`` / ``tau_new``, the counters behind ``stats()``, the stream position
        (``pass``, ``cursor``), the batches yielded but not yet selected (a prefetching
        ``DataLoader``'s, replayed first after a resume), the draw generator's state, the
        presample cycle in progress (``reuse``: the presample still to be yielded again;
        ``plan``: its drawn positions and weights not yet served) and the measured
        switch's state (``switch``: step times, counts, last decision, and across ranks the
        shared cost ratio; None without one). Reads the device state once (a
        synchronisation). Format version 3."""
        return {
            "kind": type(self).__name__,
            "version": STATE_VERSION,
            "config": self._config(),
            **self._switch.state_dict(),
            **self._draw_state(),
            **self._stream.state_dict(),
            "steps_importance": self.steps_importance,
            "steps_uniform": self.steps_uniform,
            "presamples": self.presamples,
            "weighted_rows": self.weighted_rows,
            "rows": self._rows,
            **self._reuse.state_dict(),
            "switch": None if self.switch is None else self.switch.state_dict(self._switch),
            **self._stream_state(),
        }

    def _draw_state(self) -> dict:
        # the steps' invalid and all-zero scores are counted on the host as tau is folded
        st = self._draw.state_dict()
        st["invalid_steps"] = st["invalid_steps"] + self._switch.host_invalid()
        st["zero_steps"] = st["zero_steps"] + self._switch.host_zero()
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()`` of a sampler with the same configuration (data set
        size, sizes, ``tau_th``, ``a_tau``, seed, ranks; else ``ValueError``), validating
        every value as the constructor validates its arguments (types, ranges, shapes; a
        refused state leaves the sampler unchanged). The next iteration continues the
        interrupted epoch, replaying the batches that were yielded but not selected, so a
        resumed run draws what the uninterrupted one would have. The draw generator's
        state applies when its device type matches (otherwise it is re-seeded). Take
        ``state_dict()`` between steps (after ``update``)."""
        check_header(
            state_dict, type(self).__name__, STATE_VERSION, self._STATE_KEYS, self._config()
        )
        st = state_dict
        position = self._stream.parse_state(st)
        steps_importance = state_int(st, "steps_importance")
        steps_uniform = state_int(st, "steps_uniform")
        draws = self._draw.parse_state(st)
        if (
            float(draws["zero_steps"]) > steps_importance
            or float(draws["invalid_steps"]) > steps_importance + steps_uniform
        ):
            raise ValueError("state_dict's invalid_steps / zero_steps exceed its step counts")
        tau = self._switch.parse_state(st)
        presamples = state_int(st, "presamples", 0, steps_importance)
        weighted_rows = state_int(st, "weighted_rows", 0, steps_importance * self.batch_size)
        rows = state_int(st, "rows", 1, self.batch_size)
        reuse = self._reuse.parse_state(st)
        if self.switch is None and st["switch"] is not None:
            raise ValueError("state_dict['switch'] must be None without a switch")
        switch = None if self.switch is None else self.switch.parse_state(st["switch"])
        stream = self._parse_stream_state(st)
        if stream["steps"] != steps_importance + steps_uniform:
            raise ValueError(
                f"state_dict['steps']={stream['steps']} must equal steps_importance + "
                f"steps_uniform = {steps_importance + steps_uniform}"
            )
        # all checked: restore
        self._switch.restore(*tau, None if switch is None else switch["shared"])
        self._tau_read = float(tau[0])  # the reduction of a replayed importance batch
        if switch is not None:
            self.switch.restore(switch)
        self._reuse.restore(reuse)
        self.presamples, self.weighted_rows, self._rows = presamples, weighted_rows, rows
        self._draw.restore(draws)
        self._stream.restore(position)
        self.steps_importance, self.steps_uniform = steps_importance, steps_uniform
        self._restore_stream(stream)
