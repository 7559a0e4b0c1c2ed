r"""Amortised scoring: one scored presample serves ``k`` consecutive steps.

A presample of ``B`` is yielded once as a fresh importance batch (``draw = 0``) and then
``k - 1`` more times as its reuses (``draw = 1 .. k - 1``, the same ``B`` indices), so a
``DataLoader`` with ``batch_sampler=`` still loads one batch per step and a prefetching
loader needs no knowledge of the scores. ``select`` scores the fresh batch once, draws
``k b`` positions with replacement from its probabilities ``g`` in one call, and serves
them ``b`` at a time: row ``j`` of the plan on the ``j``-th step, with the weights
``1 / (B g_i)`` of the probabilities actually used. Each step's weighted batch is then
unbiased for the presample's mean gradient, as with ``k = 1``; the ``k`` steps share one
presample, so its own sampling noise (that of a batch of ``B``) is shared by them too.

The link between the steps has a yield side (the presample to yield again, and how many
times) and a select side (the plan of drawn positions and weights, and the next row); both
are checkpointed, so a run resumed mid-amortisation continues the same draws.
"""

from dataclasses import dataclass

import torch

from fastis.sampling.checks import state_int, state_tensor
from fastis.sampling.stream import Batch, indices_from_state


@dataclass
class PresampleBatch(Batch):
    """A yielded batch of ``ImportanceSampler``: ``b`` indices (off) or a presample of
    ``B`` (``active``); ``draw`` is 0 for a fresh batch and ``j >= 1`` for the ``j``-th
    reuse of the last scored presample; ``rows`` is the number of rows an importance step
    trains on (``b``, or fewer in the constant-noise mode)."""

    active: bool = False
    draw: int = 0
    rows: int = 0

    def state(self) -> dict:
        return {
            "indices": self.index.tolist(),
            "active": self.active,
            "draw": self.draw,
            "rows": self.rows,
        }


class PresampleReuse:
    """The presample shared by ``k`` steps (``k = draws_per_presample``).

    Yield side: ``next_reuse()`` is the next reuse batch to yield (None when the last
    presample has been yielded ``k`` times); ``yielded(batch)`` starts a new cycle after a
    fresh importance batch. Select side: ``start(pos, w, rows)`` keeps the ``[k rows]``
    draws of a scored presample and returns the first ``rows``; ``take(j)`` returns the
    ``j``-th ``rows``.
    """

    def __init__(self, k: int, batch_size: int, presample_size: int, num_samples: int):
        self.k, self.b, self.big_b, self.num_samples = k, batch_size, presample_size, num_samples
        self._of: PresampleBatch | None = None  # the presample to yield again
        self._left = 0  # reuses of it still to yield
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None  # positions, weights
        self._rows = 0  # of each step of the plan ([k rows] draws)
        self._next = 0  # the plan's next step

    # -- yield side -----------------------------------------------------------------------

    def next_reuse(self) -> PresampleBatch | None:
        if not self._left:
            return None
        draw = self.k - self._left
        self._left -= 1
        of = self._of
        # the same indices, not marked as a pass's slice: yielded as a copy
        return PresampleBatch(of.source, of.start, of.size, -1, True, draw, of.rows)

    def yielded(self, batch: PresampleBatch) -> None:
        if batch.active and batch.draw == 0 and self.k > 1:
            self._of, self._left = batch, self.k - 1

    def reset_yield(self) -> None:
        """Drops the cycle being yielded (its batches were dropped unselected)."""
        self._of, self._left = None, 0

    # -- select side ----------------------------------------------------------------------

    def start(self, pos: torch.Tensor, w: torch.Tensor, rows: int):
        """Keeps a presample's ``k rows`` draws; returns the first step's ``(pos, w)``."""
        if self.k == 1:
            return pos, w
        self._plan, self._rows, self._next = (pos, w), rows, 1
        return pos[:rows], w[:rows]

    def take(self, draw: int):
        """Row ``draw`` of the plan: the ``(pos, w)`` of that reuse step."""
        if self._plan is None or draw != self._next:
            raise RuntimeError(
                f"a reuse batch (draw {draw}) came without its scored presample (next draw "
                f"{self._next if self._plan is not None else None}): select() every yielded "
                "batch, in order"
            )
        pos, w = (t.narrow(0, draw * self._rows, self._rows) for t in self._plan)
        self._next += 1
        if self._next == self.k:  # all served: free the plan
            self._plan = None
        return pos, w

    # -- checkpoints ----------------------------------------------------------------------

    def batch_from_state(self, b) -> PresampleBatch:
        """A saved ``PresampleBatch.state()`` (a pending entry), checked."""
        active = b.get("active") if isinstance(b, dict) else None
        if not isinstance(active, bool):
            raise TypeError(f"state_dict['pending'] entries need a bool 'active', got {b!r}")
        if not {"draw", "rows"} <= set(b):
            raise ValueError(f"state_dict['pending'] entries need 'draw' and 'rows', got {b!r}")
        draw = state_int(b, "draw", 0, self.k - 1 if active else 0)
        rows = state_int(b, "rows", 1, self.b)
        idx = indices_from_state(
            b, "indices", (self.big_b if active else self.b,), self.num_samples
        )
        index = torch.tensor(idx, dtype=torch.int64)
        return PresampleBatch.of(index, active=active, draw=draw, rows=rows)

    def state_dict(self) -> dict:
        reuse = None
        if self._left:
            reuse = {"indices": self._of.index.tolist(), "left": self._left, "rows": self._of.rows}
        plan = None
        if self._plan is not None:
            plan = {
                "positions": self._plan[0].view(self.k, self._rows).cpu().clone(),
                "weights": self._plan[1].view(self.k, self._rows).cpu().clone(),
                "next": self._next,
            }
        return {"reuse": reuse, "plan": plan}

    def parse_state(self, state: dict) -> dict:
        """The ``reuse`` / ``plan`` entries of a ``state_dict()``, checked."""
        reuse, plan = state["reuse"], state["plan"]
        parsed = {"reuse": None, "plan": None}
        if reuse is not None:
            if not isinstance(reuse, dict) or not {"left", "rows"} <= set(reuse):
                raise TypeError("state_dict['reuse'] must be None or {'indices', 'left', 'rows'}")
            idx = indices_from_state(reuse, "indices", (self.big_b,), self.num_samples)
            left = state_int(reuse, "left", 1, self.k - 1)
            parsed["reuse"] = (idx, left, state_int(reuse, "rows", 1, self.b))
        if plan is not None:
            if not isinstance(plan, dict) or not {"positions", "weights", "next"} <= set(plan):
                raise TypeError(
                    "state_dict['plan'] must be None or {'positions', 'weights', 'next'}"
                )
            pos = plan["positions"]
            rows = pos.shape[-1] if isinstance(pos, torch.Tensor) and pos.dim() == 2 else 0
            shape = (self.k, rows if 1 <= rows <= self.b else self.b)
            pos = state_tensor(plan, "positions", shape, torch.int64)
            if bool((pos >= self.big_b).any()):
                raise ValueError(f"state_dict['plan']['positions'] must be in [0, {self.big_b})")
            w = state_tensor(plan, "weights", shape, torch.float32)
            parsed["plan"] = (pos, w, state_int(plan, "next", 1, self.k - 1))
        return parsed

    def restore(self, parsed: dict) -> None:
        if parsed["reuse"] is None:
            self.reset_yield()
        else:
            idx, self._left, rows = parsed["reuse"]
            index = torch.tensor(idx, dtype=torch.int64)
            self._of = PresampleBatch.of(index, active=True, rows=rows)
        if parsed["plan"] is None:
            self._plan, self._rows, self._next = None, 0, 0
        else:
            pos, w, self._next = parsed["plan"]
            self._plan, self._rows = (pos.reshape(-1), w.reshape(-1)), pos.shape[1]
