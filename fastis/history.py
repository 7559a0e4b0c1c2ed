"""``HistorySampler``: importance sampling from stale scores, with no extra forward pass.

It shares ``ImportanceSampler``'s per-step protocol and index-stream machinery
(``fastis.sampler``): ``for idx in sampler``, ``select``, ``update``.
"""

import torch

from fastis._checks import int_arg
from fastis.alias import AliasTable
from fastis.sampler import (
    _STREAM_KEYS,
    STATE_VERSION,
    _Batch,
    _device_of,
    _float_arg,
    _rank_seed,
    _StepSampler,
    compute_tau,
)


class HistorySampler(_StepSampler):
    r"""Importance sampling from stale scores: no extra forward pass.

    Keeps one score per example of the shard, refreshed by ``update`` from the scores the
    training loss returns for the examples it trained on, and draws every batch of ``b``
    from the whole shard through an ``AliasTable`` of

        ``p_i = (1 - uniform_mix) s_i / sum(s) + uniform_mix / N``

    rebuilt every ``rebuild_every`` batches; ``select`` returns the weights
    ``w_i = 1 / (N p_i) <= 1 / uniform_mix``, so the weighted batch is unbiased for the
    shard's mean gradient whatever the scores. An example never scored counts at the
    current maximum score (1 before any score): it is among the likeliest to be drawn.
    Invalid scores (NaN, inf, negative) leave that example's history unchanged and are
    counted (``stats()['invalid_scores']``).

    Draws run on the CPU (``N`` may be large; the indices feed a ``DataLoader``); the
    history lives on the scores' device. Synchronisation: one per rebuild (the table is
    built and checked where the history lives, then copied to the CPU), none in
    ``select`` / ``update``. With a prefetching ``DataLoader`` the table used for a batch
    is the one of the moment its indices were drawn (``num_workers * prefetch_factor``
    steps earlier): still unbiased, as the weights travel with the batch.

    Distributed: rank ``r`` owns the fixed shard ``{i : i % num_replicas == r}`` (padded as
    ``DistributedSampler``), its history and its generator; there is no collective.

    Args:
        data_source: a sized (map-style) data set, or its size ``N``.
        batch_size: ``b``.
        uniform_mix: ``a`` in ``(0, 1]``, the uniform share (default 0.1: weights <= 10).
        rebuild_every: ``k``, batches between table rebuilds (default 10). A rebuild is
            O(N) (about 3 ms for N = 5e4 on one CPU core, measured) plus, for a history on
            a GPU, the table's copy to the CPU (20 bytes per example); only ``b`` scores
            change per step, so a table a few steps old loses little (and stays unbiased).
        seed, num_replicas, rank: as ``ImportanceSampler`` (the draws use a per-rank seed).

    Example:
        >>> sampler = fastis.HistorySampler(train_set, batch_size=128, seed=0)
        >>> loader = DataLoader(train_set, batch_sampler=sampler, num_workers=4)
        >>> for x, y in loader:
        ...     x, y, w = sampler.select(None, x.cuda(), y.cuda())
        ...     loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
        ...     sampler.update(g)
    """

    def __init__(
        self,
        data_source,
        batch_size: int,
        *,
        uniform_mix: float = 0.1,
        rebuild_every: int = 10,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__()
        self.uniform_mix = _float_arg("uniform_mix", uniform_mix)
        if not 0.0 < self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in (0, 1], got {self.uniform_mix}")
        self.rebuild_every = int_arg("rebuild_every", rebuild_every)
        self._setup_stream(data_source, batch_size, num_replicas, rank, seed, need_group=False)
        # the shard: positions 0..n-1 stand for data set indices shard[pos]
        self._shard = (torch.arange(self.shard_size) * self.num_replicas + self.rank) \
            % self.num_samples
        self._gen = torch.Generator().manual_seed(_rank_seed(self.seed, self.rank, 2))
        self._hist: torch.Tensor | None = None  # [n] float32, on the scores' device
        self._seen: torch.Tensor | None = None  # [n] bool
        self._invalid = torch.zeros((), dtype=torch.float64)
        self._table: AliasTable | None = None
        self._draws = 0
        self.rebuilds = 0
        self._w_sum = 0.0
        self._w_n = 0
        self._w_max = 0.0
        self.tau = 1.0  # compute_tau of the current table (diagnostic: how skewed it is)
        self.last_indices: torch.Tensor | None = None

    def _rebuild(self) -> None:
        n = self.shard_size
        if self._hist is None:
            p = torch.full((n,), 1.0 / n, dtype=torch.float64)
        else:
            seen = self._seen
            top = torch.where(seen, self._hist, 0.0).amax().double()
            s = torch.where(seen, self._hist.double(), torch.where(top > 0, top, 1.0))
            total = s.sum()
            s = torch.where(total > 0, s / torch.where(total > 0, total, 1.0), 1.0 / n)
            p = (1.0 - self.uniform_mix) * s + self.uniform_mix / n
        self._table = AliasTable(p).to("cpu")  # one synchronisation on CUDA
        self.tau = float(compute_tau(self._table.probs))
        self.rebuilds += 1

    def _next_batch(self) -> _Batch:
        if self._table is None or self._draws % self.rebuild_every == 0:
            self._rebuild()
        self._draws += 1
        local, p = self._table.sample(self.batch_size, generator=self._gen, return_probs=True)
        w = (1.0 / (self.shard_size * p)).float()
        return _Batch(self._shard[local].tolist(), True, local.tolist(), w)

    def select(self, model, inputs, targets):
        """The batch and its weights ``1 / (N p_i)`` (float32, on the targets' device, or
        the inputs' when ``targets`` is None). ``model`` is not used (pass None): the
        signature is ``ImportanceSampler.select``'s so the two swap."""
        batch = self._pop(inputs, targets)
        dev = _device_of(targets if targets is not None else inputs)
        w = batch.weights
        self._w_sum += float(w.double().sum())
        self._w_n += w.shape[0]
        self._w_max = max(self._w_max, float(w.max()))
        self.last_indices = torch.as_tensor(batch.indices).to(dev, non_blocking=True)
        return inputs, targets, w.to(dev, non_blocking=True)

    def update(self, scores: torch.Tensor) -> None:
        """Stores the training batch's scores (``[b]``) as its examples' history."""
        batch = self._take_update(scores)
        s = scores.detach().float()
        if self._hist is None or self._hist.device != s.device:
            self._hist = (torch.zeros(self.shard_size, device=s.device) if self._hist is None
                          else self._hist.to(s.device))
            self._seen = (torch.zeros(self.shard_size, dtype=torch.bool, device=s.device)
                          if self._seen is None else self._seen.to(s.device))
            self._invalid = self._invalid.to(s.device)
        pos = torch.as_tensor(batch.local).to(s.device, non_blocking=True)
        ok = torch.isfinite(s) & (s >= 0)
        self._hist[pos] = torch.where(ok, s, self._hist[pos])
        self._seen[pos] |= ok
        self._invalid = self._invalid + (~ok).sum()

    @property
    def is_active(self) -> bool:
        """Always True: every batch is importance sampled (the uniform share bounds the
        weights instead of a switch)."""
        return True

    def stats(self) -> dict:
        """Plain values to log (one synchronisation): ``steps``, ``rebuilds``, ``tau`` (of
        the current table; 1 = uniform), ``mean_weight``, ``max_weight``,
        ``seen_fraction`` (examples with a score), ``invalid_scores``,
        ``missing_updates``."""
        seen = 0.0 if self._seen is None else self._seen.double().mean()
        seen, invalid = torch.stack([torch.as_tensor(seen, dtype=torch.float64).cpu(),
                                     self._invalid.cpu()]).tolist()
        return {
            "steps": self.steps,
            "rebuilds": self.rebuilds,
            "tau": self.tau,
            "mean_weight": self._w_sum / self._w_n if self._w_n else float("nan"),
            "max_weight": self._w_max,
            "seen_fraction": seen,
            "invalid_scores": int(invalid),
            "missing_updates": self.missing_updates,
        }

    def __repr__(self) -> str:
        return (f"HistorySampler(num_samples={self.num_samples}, batch_size={self.batch_size}"
                f", uniform_mix={self.uniform_mix}, rebuild_every={self.rebuild_every}, "
                f"num_replicas={self.num_replicas}, rank={self.rank})")

    def _state_keys(self) -> tuple:
        return ("config", "history", "seen", "invalid", "table", "draws", "rebuilds", "tau",
                "weights", "generator", *_STREAM_KEYS)

    def _config(self) -> dict:
        return {"num_samples": self.num_samples, "batch_size": self.batch_size,
                "uniform_mix": self.uniform_mix, "rebuild_every": self.rebuild_every,
                "seed": self.seed, "num_replicas": self.num_replicas, "rank": self.rank}

    def state_dict(self) -> dict:
        """The configuration, the history (CPU copies), the current table, the generator's
        state, the counters and the batches yielded but not yet selected."""
        return {
            "kind": type(self).__name__,
            "version": STATE_VERSION,
            "config": self._config(),
            "history": None if self._hist is None else self._hist.cpu().clone(),
            "seen": None if self._seen is None else self._seen.cpu().clone(),
            "invalid": self._invalid.cpu().clone(),
            "table": None if self._table is None else
            {k: v.clone() for k, v in self._table.state_dict().items()},
            "draws": self._draws,
            "rebuilds": self.rebuilds,
            "tau": self.tau,
            "weights": [self._w_sum, self._w_n, self._w_max],
            "generator": self._gen.get_state(),
            **self._stream_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()`` of a sampler with the same configuration (else
        ``ValueError``); continues exactly where it stopped (see ``ImportanceSampler``)."""
        self._check_state(state_dict, self._config())
        hist, seen = state_dict["history"], state_dict["seen"]
        if hist is not None and tuple(hist.shape) != (self.shard_size,):
            raise ValueError(f"state_dict['history'] must have shape ({self.shard_size},), "
                             f"got {tuple(hist.shape)}")
        table = None
        if state_dict["table"] is not None:
            table = AliasTable.__new__(AliasTable)
            table.load_state_dict(state_dict["table"])
            if len(table) != self.shard_size:
                raise ValueError(f"state_dict['table'] has {len(table)} categories, expected "
                                 f"{self.shard_size}")
        dev = self._hist.device if self._hist is not None else torch.device("cpu")
        self._hist = None if hist is None else hist.to(dev).clone()
        self._seen = None if seen is None else seen.to(dev).clone()
        self._invalid = state_dict["invalid"].to(dev).clone()
        self._table = table
        self._draws = int(state_dict["draws"])
        self.rebuilds = int(state_dict["rebuilds"])
        self.tau = float(state_dict["tau"])
        self._w_sum, self._w_n, self._w_max = state_dict["weights"]
        self._gen.set_state(state_dict["generator"])
        self._load_stream_state(state_dict)
