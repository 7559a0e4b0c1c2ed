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

    where an example never scored counts at the maximum score (1 before any score).
    ``snapshot(j)`` keeps a copy for the table ``j`` (see ``HistorySampler``), taken on the
    history's device without synchronisation.

    Attributes:
        scores: ``[n]`` float32 (None before the first ``record``), on the scores' device;
        seen: ``[n]`` bool; invalid: float64 0-d count of invalid scores.
    """

    def __init__(self, n: int, uniform_mix: float):
        self.n, self.uniform_mix = n, uniform_mix
        self.scores: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.invalid = torch.zeros((), dtype=torch.float64)
        self.snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, pos: torch.Tensor, s: torch.Tensor) -> None:
        """Stores float32 scores ``s`` ``[b]`` of the shard positions ``pos`` ``[b]``."""
        if self.scores is None:
            self.scores = torch.zeros(self.n, device=s.device)
            self.seen = torch.zeros(self.n, dtype=torch.bool, device=s.device)
        elif self.scores.device != s.device:
            self.scores, self.seen = self.scores.to(s.device), self.seen.to(s.device)
            self.snapshots = {
                j: (h.to(s.device), v.to(s.device)) for j, (h, v) in self.snapshots.items()
            }
        self.invalid = self.invalid.to(s.device)
        pos = pos.to(s.device, non_blocking=True)
        ok = torch.isfinite(s) & (s >= 0)
        self.scores[pos] = torch.where(ok, s, self.scores[pos])
        self.seen[pos] |= ok
        self.invalid = self.invalid + (~ok).sum()

    def snapshot(self, j: int) -> None:
        """Keeps the current history for table ``j``."""
        self.snapshots[j] = (self.scores.clone(), self.seen.clone())

    def probabilities(self, j: int | None) -> torch.Tensor:
        """``p`` ``[n]`` float64 from snapshot ``j`` (dropped with older ones), the current
        history where there is none, or uniform for ``j is None`` (nothing recorded yet)."""
        if j is None:
            return torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        hist, seen = self.snapshots.pop(j, (self.scores, self.seen))
        self.snapshots = {i: v for i, v in self.snapshots.items() if i > j}
        if hist is None:
            return self.probabilities(None)
        top = torch.where(seen, hist, 0.0).amax().double()
        s = torch.where(seen, hist.double(), torch.where(top > 0, top, 1.0))
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
        return {
            "history": None if self.scores is None else self.scores.cpu().clone(),
            "seen": None if self.seen is None else self.seen.cpu().clone(),
            "snapshots": [
                {"index": j, "history": h.cpu().clone(), "seen": v.cpu().clone()}
                for j, (h, v) in sorted(self.snapshots.items())
            ],
            "invalid": self.invalid.cpu().clone(),
        }

    def _parse_pair(self, state: dict, where: str) -> tuple:
        if state["history"] is None and state["seen"] is None:
            return None, None
        if state["history"] is None or state["seen"] is None:
            raise ValueError(f"{where}'s 'history' and 'seen' must both be None or both set")
        return (
            state_tensor(state, "history", (self.n,), torch.float32),
            state_tensor(state, "seen", (self.n,), torch.bool, check_values=False),
        )

    def parse_state(self, state: dict) -> dict:
        """The history, its snapshots and the invalid count of ``state``, checked: float32
        ``[n]`` finite non-negative scores, bool ``[n]`` ``seen``."""
        scores, seen = self._parse_pair(state, "state_dict")
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
            pair = self._parse_pair(snap, "a snapshot")
            if pair[0] is None:
                raise ValueError("state_dict['snapshots'] entries must hold a history")
            snapshots[state_int(snap, "index", 2)] = pair
        invalid = state_tensor(state, "invalid", (), torch.float64)
        return {"scores": scores, "seen": seen, "snapshots": snapshots, "invalid": invalid}

    def restore(self, parsed: dict) -> None:
        dev = self.scores.device if self.scores is not None else torch.device("cpu")
        on = lambda t: None if t is None else t.to(dev)  # noqa: E731
        self.scores, self.seen = on(parsed["scores"]), on(parsed["seen"])
        self.snapshots = {j: (on(h), on(v)) for j, (h, v) in parsed["snapshots"].items()}
        self.invalid = on(parsed["invalid"])
