"""Peers' selection rules, re-implemented from their papers for the end-to-end benchmark.

- InfoBatch (Qin et al., ICLR 2024): each pass, drop a random share ``r`` of the examples
  whose last loss is below the mean loss, scale the gradient of the kept below-mean
  examples by ``1 / (1 - r)``, and train on the full data for the last ``anneal`` share of
  the budget.
- Selective-Backprop (Jiang et al., 2019): score candidates with a forward pass, keep each
  with probability ``percentile(loss)^beta`` among recent losses, and backpropagate
  (unweighted: biased) once ``b`` have been kept.

Both drive a step with the demo's interface: ``step(model, x, y, fraction) -> loss``.
"""

import torch
import torch.nn.functional as F


def infobatch_keep(losses: torch.Tensor, prune: float, generator: torch.Generator):
    """One pass's InfoBatch selection.

    Args:
        losses: ``[N]`` last known loss per example (``inf`` for never seen: always kept).
        prune: ``r``, the share of below-mean examples dropped.

    Returns:
        ``(kept, weight)``: indices kept for this pass, and ``[N]`` gradient factors
        (``1 / (1 - r)`` for the kept below-mean examples, 1 otherwise).
    """
    seen = torch.isfinite(losses)
    mean = losses[seen].mean() if seen.any() else torch.tensor(0.0)
    below = seen & (losses < mean)
    drop = below & (torch.rand(losses.shape, generator=generator) < prune)
    weight = torch.where(below, 1.0 / (1.0 - prune), 1.0)
    return torch.nonzero(~drop).squeeze(1), weight


def selective_backprop_probability(
    losses: torch.Tensor, history: torch.Tensor, beta: float
) -> torch.Tensor:
    """``P(keep) = F(loss)^beta``, ``F`` the empirical CDF of the recent ``history`` of losses
    (the loss itself counted, so the largest loss seen is kept with probability 1)."""
    pool = torch.cat([history, losses])
    cdf = (pool[None, :] <= losses[:, None]).float().mean(1)
    return cdf.pow(beta)


class InfoBatch:
    def __init__(self, n, cfg, prune: float = 0.5, anneal: float = 0.125):
        self.n, self.b, self.prune, self.anneal = n, cfg.batch_size, prune, anneal
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.losses = torch.full((n,), float("inf"))
        self.order, self.weight, self.pos = None, torch.ones(n), 0
        self.kept_share = []

    def _new_pass(self, fraction):
        if fraction >= 1.0 - self.anneal:  # the last share of the budget: full data
            kept, self.weight = torch.arange(self.n), torch.ones(self.n)
        else:
            kept, self.weight = infobatch_keep(self.losses, self.prune, self.gen)
        self.kept_share.append(len(kept) / self.n)
        self.order = kept[torch.randperm(len(kept), generator=self.gen)]
        self.pos = 0

    def step(self, model, x, y, fraction):
        if self.order is None or self.pos + self.b > len(self.order):
            self._new_pass(fraction)
        idx = self.order[self.pos : self.pos + self.b]
        self.pos += self.b
        w = self.weight[idx].to(x.device)
        dev = idx.to(x.device)
        rows = F.cross_entropy(model(x[dev]), y[dev], reduction="none")
        self.losses[idx] = rows.detach().float().cpu()
        return (rows * w).mean()

    def state(self):
        return {"mode": f"kept {self.kept_share[-1]:.0%}" if self.kept_share else "infobatch"}

    def summary(self):
        return {
            "passes": len(self.kept_share),
            "mean_kept_share": sum(self.kept_share) / max(len(self.kept_share), 1),
        }


class SelectiveBackprop:
    def __init__(self, n, cfg, beta: float = 1.0, history: int = 1024):
        self.n, self.b, self.beta, self.history_size = n, cfg.batch_size, beta, history
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0
        self.history = torch.empty(0)
        self.pool = torch.empty(0, dtype=torch.long)
        self.forwarded = self.kept = 0

    def step(self, model, x, y, fraction):
        while len(self.pool) < self.b:
            if self.pos + self.b > self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            cand = self.perm[self.pos : self.pos + self.b]
            self.pos += self.b
            with torch.no_grad():
                dev = cand.to(x.device)
                losses = F.cross_entropy(model(x[dev]), y[dev], reduction="none").float().cpu()
            p = selective_backprop_probability(losses, self.history, self.beta)
            keep = torch.rand(len(cand), generator=self.gen) < p
            self.pool = torch.cat([self.pool, cand[keep]])
            self.history = torch.cat([self.history, losses])[-self.history_size :]
            self.forwarded += len(cand)
            self.kept += int(keep.sum())
        idx, self.pool = self.pool[: self.b].to(x.device), self.pool[self.b :]
        return F.cross_entropy(model(x[idx]), y[idx])

    def state(self):
        return {"mode": f"kept {self.kept / max(self.forwarded, 1):.0%}"}

    def summary(self):
        return {"forwarded": self.forwarded, "kept": self.kept}
