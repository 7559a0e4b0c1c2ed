"""One score per example of a shard, and the sampling probabilities built from it."""

import torch

from fastis.alias import AliasTable
from fastis.sampling.checks import state_int, state_tensor


def table_from_state(state, n: int) -> AliasTable | None:
    """A saved ``AliasTable`` (or None) over ``n`` categories, checked, on the CPU."""
    if state is None:
        return None
    if not isinstance(state, dict) or {"prob", "alias", "probs"} - set(state):
        raise ValueError("state_dict['table'] must be a dict with 'prob', 'alias', 'probs'")
    # checked as AliasTable.load_state_dict checks: dtypes, ranges, probs consistent
    table = AliasTable._from_parts(
        state["prob"].clone(), state["alias"].clone(), state["probs"].clone(), check=True
    )
    if table.prob.dim() != 1 or len(table) != n:
        raise ValueError(
            f"state_dict['table'] must have {n} categories, got shape {tuple(table.prob.shape)}"
        )
    return table.to("cpu")


class ScoreHistory:
    """The last valid score of each of ``n`` examples, and snapshots of it for later tables.

    ``record`` stores a training batch's scores (invalid ones, NaN / inf / negative, leave
    the example's score unchanged and are counted); ``probabilities`` turns a history into

        ``p_i = (1 - a) s_i / sum(s) + a / n``

    where an example never scored counts at the maximum score (1 before any score). With
    ``track_age`` and a ``fresh_from`` given to ``probabilities``, a score recorded before
    that update is stale, and every example without a fresh score counts at the mean of the
    fresh scores instead (1 if there is none).
    ``snapshot(j)`` keeps a copy for the table ``j`` (see ``HistorySampler``), taken on the
    history's device without synchronisation.

    Attributes:
        scores: ``[n]`` float32 (None before the first ``record``), on the scores' device;
        seen: ``[n]`` bool; stamps: ``[n]`` int64, the update (1, 2, ...) that recorded
        each score, 0 for none (None without ``track_age``); invalid: float64 0-d count of
        invalid scores; stale: float64 0-d, the share of examples the last
        ``probabilities`` counted as stale.
    """

    def __init__(self, n: int, uniform_mix: float, track_age: bool = False):
        self.n, self.uniform_mix, self.track_age = n, uniform_mix, track_age
        self.scores: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.stamps: torch.Tensor | None = None
        self.invalid = torch.zeros((), dtype=torch.float64)
        self.stale = torch.zeros((), dtype=torch.float64)
        # j -> (scores, seen, stamps or None)
        self.snapshots: dict[int, tuple] = {}

    def record(self, pos: torch.Tensor, s: torch.Tensor, step: int = 0) -> None:
        """Stores float32 scores ``s`` ``[b]`` of the shard positions ``pos`` ``[b]``,
        recorded by update ``step`` (>= 1; used with ``track_age`` only)."""
        dev = s.device
        if self.scores is None:
            self.scores = torch.zeros(self.n, device=dev)
            self.seen = torch.zeros(self.n, dtype=torch.bool, device=dev)
            if self.track_age:
                self.stamps = torch.zeros(self.n, dtype=torch.int64, device=dev)
        elif self.scores.device != dev:
            on = lambda t: None if t is None else t.to(dev)  # noqa: E731
            self.scores, self.seen, self.stamps = on(self.scores), on(self.seen), on(self.stamps)
            self.snapshots = {j: tuple(map(on, v)) for j, v in self.snapshots.items()}
        self.invalid = self.invalid.to(dev)
        pos = pos.to(dev, non_blocking=True)
        ok = torch.isfinite(s) & (s >= 0)
        self.scores[pos] = torch.where(ok, s, self.scores[pos])
        self.seen[pos] |= ok
        if self.stamps is not None:
            # a Python int: no host synchronisation
            self.stamps[pos] = torch.where(ok, step, self.stamps[pos])
        self.invalid = self.invalid + (~ok).sum()

    def snapshot(self, j: int) -> None:
        """Keeps the current history for table ``j``."""
        stamps = None if self.stamps is None else self.stamps.clone()
        self.snapshots[j] = (self.scores.clone(), self.seen.clone(), stamps)

    def probabilities(self, j: int | None, fresh_from: int | None = None) -> torch.Tensor:
        """``p`` ``[n]`` float64 from snapshot ``j`` (dropped with older ones), the current
        history where there is none, or uniform for ``j is None`` (nothing recorded yet).
        With ``track_age`` and ``fresh_from``, see the class docstring."""
        if j is None:
            self.stale = torch.zeros((), dtype=torch.float64)
            return torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        hist, seen, stamps = self.snapshots.pop(j, (self.scores, self.seen, self.stamps))
        self.snapshots = {i: v for i, v in self.snapshots.items() if i > j}
        if hist is None:
            return self.probabilities(None)
        if stamps is not None and fresh_from is not None:
            # stable mode: stale and unscored examples count at the mean fresh score
            fresh = seen & (stamps >= fresh_from)
            self.stale = (seen & ~fresh).double().mean()
            count = fresh.sum()
            mean = torch.where(fresh, hist, 0.0).double().sum() / count.clamp_min(1)
            fill = torch.where(count > 0, mean, 1.0)
            seen = fresh
        else:
            top = torch.where(seen, hist, 0.0).amax().double()
            fill = torch.where(top > 0, top, 1.0)
        s = torch.where(seen, hist.double(), fill)
        total = s.sum()
        s = torch.where(total > 0, s / torch.where(total > 0, total, 1.0), 1.0 / self.n)
        return (1.0 - self.uniform_mix) * s + self.uniform_mix / self.n

    def seen_fraction(self) -> torch.Tensor:
        """Float64 0-d: the share of examples with a score (no synchronisation)."""
        if self.seen is None:
            return torch.zeros((), dtype=torch.float64)
        return self.seen.double().mean()

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        cpu = lambda t: None if t is None else t.cpu().clone()  # noqa: E731
        state = {
            "history": cpu(self.scores),
            "seen": cpu(self.seen),
            "snapshots": [
                {"index": j, "history": cpu(h), "seen": cpu(v)}
                | ({} if t is None else {"stamps": cpu(t)})
                for j, (h, v, t) in sorted(self.snapshots.items())
            ],
            "invalid": cpu(self.invalid),
        }
        if self.track_age:  # absent otherwise: states saved before it existed still load
            state["stamps"] = cpu(self.stamps)
            state["stale"] = cpu(self.stale)
        return state

    def _parse_pair(self, state: dict, where: str, steps: int) -> tuple:
        if state["history"] is None and state["seen"] is None:
            if self.track_age and state.get("stamps") is not None:
                raise ValueError(f"{where}'s 'stamps' must be None when 'history' is")
            return None, None, None
        if state["history"] is None or state["seen"] is None:
            raise ValueError(f"{where}'s 'history' and 'seen' must both be None or both set")
        scores = state_tensor(state, "history", (self.n,), torch.float32)
        seen = state_tensor(state, "seen", (self.n,), torch.bool, check_values=False)
        if not self.track_age:
            return scores, seen, None
        if "stamps" not in state:
            raise ValueError(f"{where} is missing 'stamps' (max_staleness is set)")
        stamps = state_tensor(state, "stamps", (self.n,), torch.int64)
        # every score was recorded by an update already made, and only scores have stamps
        if not bool((stamps <= steps).all()) or not torch.equal(stamps > 0, seen):
            raise ValueError(
                f"{where}'s 'stamps' must be in [1, steps={steps}] where 'seen' is set, 0 elsewhere"
            )
        return scores, seen, stamps

    def parse_state(self, state: dict, steps: int) -> dict:
        """The history, its snapshots and the invalid count of ``state``, checked: float32
        ``[n]`` finite non-negative scores, bool ``[n]`` ``seen`` and, with ``track_age``,
        int64 ``[n]`` ``stamps`` (at most ``steps``, the updates made)."""
        scores, seen, stamps = self._parse_pair(state, "state_dict", steps)
        snaps = state["snapshots"]
        if not isinstance(snaps, (list, tuple)):
            raise TypeError("state_dict['snapshots'] must be a list")
        snapshots = {}
        for snap in snaps:
            if not isinstance(snap, dict) or not {"index", "history", "seen"} <= set(snap):
                raise ValueError(
                    "state_dict['snapshots'] entries must be dicts with 'index', 'history' "
                    "and 'seen'"
                )
            triple = self._parse_pair(snap, "a snapshot", steps)
            if triple[0] is None:
                raise ValueError("state_dict['snapshots'] entries must hold a history")
            snapshots[state_int(snap, "index", 2)] = triple
        invalid = state_tensor(state, "invalid", (), torch.float64)
        stale = state_tensor(state, "stale", (), torch.float64) if self.track_age else None
        if stale is not None and float(stale) > 1.0:
            raise ValueError(f"state_dict['stale'] must be in [0, 1], got {float(stale)}")
        return {
            "scores": scores,
            "seen": seen,
            "stamps": stamps,
            "snapshots": snapshots,
            "invalid": invalid,
            "stale": stale,
        }

    def restore(self, parsed: dict) -> None:
        dev = self.scores.device if self.scores is not None else torch.device("cpu")
        on = lambda t: None if t is None else t.to(dev)  # noqa: E731
        self.scores, self.seen = on(parsed["scores"]), on(parsed["seen"])
        self.stamps = on(parsed["stamps"])
        self.snapshots = {j: tuple(map(on, v)) for j, v in parsed["snapshots"].items()}
        self.invalid = on(parsed["invalid"])
        if parsed["stale"] is not None:
            self.stale = parsed["stale"]
