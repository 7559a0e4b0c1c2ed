"""``HistorySampler``: importance sampling from stale scores, with no extra forward pass."""

from dataclasses import dataclass

import torch

from fastis._checks import float_arg, int_arg
from fastis.alias import AliasTable
from fastis.sampling.batches import device_of
from fastis.sampling.checks import (
    check_header,
    cpu_generator_state,
    state_float,
    state_int,
    state_tensor,
)
from fastis.sampling.score_history import ScoreHistory, table_from_state
from fastis.sampling.stream import (
    STATE_VERSION,
    STREAM_KEYS,
    Batch,
    BatchStream,
    derive_seed,
    indices_from_state,
)
from fastis.sampling.switch import compute_tau

_DRAWS = 3  # derive_seed key of the draw generator


@dataclass
class HistoryBatch(Batch):
    """A yielded batch of ``HistorySampler``: ``index``, the data set indices of ``local``,
    the drawn positions in the shard (int64 ``[b]``), and their importance weights
    ``1 / (N p)`` (float32 ``[b]``, CPU)."""

    local: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def state(self) -> dict:
        return {
            "indices": self.index.tolist(),
            "local": self.local.tolist(),
            "weights": self.weights.clone(),
        }


class HistorySampler(BatchStream):
    r"""Importance sampling from stale scores: no extra forward pass.

    Keeps one score per example of the shard, refreshed by ``update`` from the scores the
    training loss returns for the examples it trained on, and draws every batch of ``b``
    from the whole shard through an ``AliasTable`` of

        ``p_i = (1 - uniform_mix) s_i / sum(s) + uniform_mix / N``

    rebuilt every ``rebuild_every`` (``k``) batches; ``select`` returns the weights
    ``w_i = 1 / (N p_i) <= 1 / uniform_mix``, so the weighted batch is unbiased for the
    shard's mean gradient whatever the scores. An example never scored counts at the
    current maximum score (1 before any score): it is among the likeliest to be drawn
    (in the stable mode below, at the mean score instead).
    Invalid scores (NaN, inf, negative) leave that example's history unchanged and are
    counted (``stats()['invalid_scores']``).

    The table that serves batches ``jk .. jk + k - 1`` is built from the history as it was
    after ``(j - 1) k`` updates (uniform for ``j <= 1``), one period behind: a prefetching
    ``DataLoader`` draws batches before the latest updates arrive, and this way how far it
    draws ahead (up to ``k`` batches) does not change what is drawn, so a run gives the
    same batches with any ``num_workers``, and a run checkpointed with one loader and
    resumed with another continues the uninterrupted stream. (Drawing further ahead than
    ``k`` batches falls back to the history at the time of the draw.) Staleness only costs
    variance: the weights come from the table actually used.

    Draws run on the CPU (``N`` may be large; the indices feed a ``DataLoader``); the
    history lives on the scores' device. Synchronisation: one per rebuild (the table is
    built and checked where the history lives, then copied to the CPU), none in
    ``select`` / ``update``.

    ``len(sampler)`` is ``ceil(shard_size / b)``: batches are drawn with replacement from
    the whole shard, so an epoch is just ``shard_size`` draws rounded up to whole batches
    (``DistributedSampler``'s count with ``drop_last=False``); ``set_epoch`` is accepted and
    ignored (the stream continues across epochs).

    Stable mode (``max_staleness = L``): a score more than ``L`` steps old at a draw is
    stale for that draw's table, and every example without a fresh score (stale, or never
    scored) counts at the mean ``m`` of the fresh scores. (Age: the steps taken since the
    update that recorded the score, ``d - t`` at draw ``d``, the batch of step ``d + 1``,
    for a score of step ``t``; the table of draws ``jk .. jk + k - 1`` keeps the scores
    with ``t >= (j + 1) k - 1 - L``, so ``L >= 2k - 1`` is required, as a table lags one
    period.) Why: with ``g_i`` the per-example gradients and ``gbar`` their mean, the
    estimate ``(1/b) sum_r w_r g_r`` is unbiased for any ``p > 0`` (``E[w g] = sum_i p_i
    g_i / (N p_i) = gbar``), so staleness costs variance only, through

        ``Var = (1/b) ((1/N^2) sum_i |g_i|^2 / p_i - |gbar|^2)``.

    A stale score may have fallen far below the example's gradient norm, and its term
    ``|g_i|^2 / p_i`` is then up to ``1 / a`` times what uniform sampling pays for it.
    Pulled to the mean, the scores sum to ``N m``, so an example without a fresh score has
    ``p_i = (1 - a) / N + a / N = 1 / N`` and weight 1: the stale examples cost
    exactly what uniform sampling costs for them (``sum_stale |g_i|^2 / N``), whatever
    their gradients have become, while the fresh scores (at most ``L`` steps old) keep
    their ratios ``p_i = ((1 - a) s_i / m + a) / N`` and steer the rest. (Counting them at
    the maximum instead, as unscored examples are without the bound, bounds their weights
    by 1 too, but takes probability from the fresh high scores; keeping the old score
    bounds nothing.) A stale example is drawn at the uniform rate, and then refreshed by
    that step's training forward: no extra forward pass. Over ``P`` passes the bound is
    ``L = P * len(sampler)``. ``stats()['stale_fraction']`` is the share of examples the
    current table counts as stale.

    Distributed: rank ``r`` owns the fixed shard ``{i : i % num_replicas == r}`` (padded as
    ``DistributedSampler``), its history and its generator; there is no collective.

    Args:
        data_source: a sized (map-style) data set, or its size ``N``.
        batch_size: ``b``.
        uniform_mix: ``a`` in ``(0, 1]``, the uniform share (default 0.1: weights <= 10).
        rebuild_every: ``k``, batches between table rebuilds (default 10). A rebuild is
            O(N) (about 3 ms for N = 5e4 on one CPU core, measured) plus, for a history on
            a GPU, the table's copy to the CPU (20 bytes per example).
        max_staleness: ``L`` steps, at least ``2 k - 1``: the stable mode above (default
            None: scores never expire).
        seed, num_replicas, rank: as ``ImportanceSampler`` (the draws use a per-rank seed
            hashed from the full seed).

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
        max_staleness: int | None = None,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        self.uniform_mix = float_arg("uniform_mix", uniform_mix)
        if not 0.0 < self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in (0, 1], got {self.uniform_mix}")
        self.rebuild_every = int_arg("rebuild_every", rebuild_every)
        self.max_staleness = None
        if max_staleness is not None:
            self.max_staleness = int_arg("max_staleness", max_staleness, minimum=0)
            if self.max_staleness < 2 * self.rebuild_every - 1:
                raise ValueError(
                    f"max_staleness must be >= 2 * rebuild_every - 1 = "
                    f"{2 * self.rebuild_every - 1} (a table lags one period of "
                    f"rebuild_every={self.rebuild_every} steps), got {self.max_staleness}"
                )
        super().__init__(
            data_source,
            batch_size,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            need_group=False,
        )
        n = self.shard_size
        # the shard: positions 0..n-1 stand for data set indices shard[pos]
        self._shard = (torch.arange(n) * self.num_replicas + self.rank) % self.num_samples
        self._gen = torch.Generator().manual_seed(derive_seed(self.seed, _DRAWS, self.rank))
        self._history = ScoreHistory(n, self.uniform_mix, self.max_staleness is not None)
        self._table: AliasTable | None = None
        self._local: torch.Tensor | None = None  # positions of the batch last selected
        self._draws = 0
        self.rebuilds = 0
        self._weight_sum = 0.0
        self._weight_count = 0
        self._weight_max = 0.0
        self.tau = 1.0  # compute_tau of the current table (diagnostic: how skewed it is)
        self.last_indices: torch.Tensor | None = None

    def __len__(self) -> int:
        """Batches per epoch: ``ceil(shard_size / batch_size)``."""
        return -(-self.shard_size // self.batch_size)

    # -- the table ------------------------------------------------------------------------

    def _rebuild(self) -> None:
        k = self.rebuild_every
        j = self._draws // k
        # stable mode: keep the scores of steps t with (j + 1) k - 1 - t <= L, the last
        # draw this table serves
        fresh_from = None if self.max_staleness is None else (j + 1) * k - 1 - self.max_staleness
        p = self._history.probabilities(None if j <= 1 else j, fresh_from)  # tables 0, 1: uniform
        self._table = AliasTable(p).to("cpu")  # one synchronisation on CUDA
        self.tau = float(compute_tau(self._table.probs))
        self.rebuilds += 1

    def _draw_batch(self) -> HistoryBatch:
        if self._table is None or self._draws % self.rebuild_every == 0:
            self._rebuild()
        self._draws += 1
        local, p = self._table.sample(self.batch_size, generator=self._gen, return_probs=True)
        w = (1.0 / (self.shard_size * p)).float()
        return HistoryBatch.of(self._shard[local], local=local, weights=w)

    def _batch_from_state(self, b) -> HistoryBatch:
        local = indices_from_state(b, "local", (self.batch_size,), self.shard_size)
        local = torch.tensor(local, dtype=torch.int64)
        idx = self._shard[local]
        if b.get("indices") != idx.tolist():
            raise ValueError(
                "state_dict['pending'] entry's 'indices' do not match its 'local' "
                "positions in this shard"
            )
        w = state_tensor(b, "weights", (self.batch_size,), torch.float32)
        if not bool((w > 0).all()):
            raise ValueError("state_dict['pending'] weights must be positive")
        return HistoryBatch.of(idx, local=local, weights=w)

    # -- per step -------------------------------------------------------------------------

    def select(self, model, inputs, targets):
        """The batch and its weights ``1 / (N p_i)`` (float32, on the targets' device, or
        the inputs' when ``targets`` is None). ``model`` is not used (pass None): the
        signature is ``ImportanceSampler.select``'s so the two swap."""
        batch = self._peek(inputs, targets)
        dev = device_of(targets if targets is not None else inputs)
        w = batch.weights
        self._commit(batch.size)
        self._weight_sum += float(w.double().sum())
        self._weight_count += w.shape[0]
        self._weight_max = max(self._weight_max, float(w.max()))
        self._local = batch.local
        # the batch's own tensor: nothing of the sampler's refers to it once selected
        self.last_indices = batch.index.to(dev, non_blocking=True)
        return inputs, targets, w.to(dev, non_blocking=True)

    def update(self, scores: torch.Tensor) -> None:
        """Stores the training batch's scores (``[b]``) as its examples' history."""
        s = self._take_update(scores).float()
        self._history.record(self._local, s, self.steps)
        # the history after m updates builds the tables of draws (m / k + 1) k and on
        m, k = self.steps, self.rebuild_every
        if m % k == 0 and self._draws <= (m // k + 1) * k:
            self._history.snapshot(m // k + 1)

    @property
    def is_active(self) -> bool:
        """Always True: every batch is importance sampled (the uniform share bounds the
        weights instead of a switch)."""
        return True

    def stats(self) -> dict:
        """Plain values to log (one synchronisation): ``steps``, ``rebuilds``, ``tau`` (of
        the current table; 1 = uniform), ``mean_weight``, ``max_weight``,
        ``seen_fraction`` (examples with a score), ``stale_fraction`` (examples the current
        table counts as stale; 0 without ``max_staleness``), ``invalid_scores``,
        ``missing_updates``."""
        h = self._history
        seen, invalid, stale = torch.stack(
            [h.seen_fraction().cpu(), h.invalid.cpu(), h.stale.cpu()]
        ).tolist()
        return {
            "steps": self.steps,
            "rebuilds": self.rebuilds,
            "tau": self.tau,
            "mean_weight": self._weight_sum / self._weight_count
            if self._weight_count
            else float("nan"),
            "max_weight": self._weight_max,
            "seen_fraction": seen,
            "stale_fraction": stale,
            "invalid_scores": int(invalid),
            "missing_updates": self.missing_updates,
        }

    def __repr__(self) -> str:
        return (
            f"HistorySampler(num_samples={self.num_samples}, batch_size={self.batch_size}"
            f", uniform_mix={self.uniform_mix}, rebuild_every={self.rebuild_every}, "
            f"max_staleness={self.max_staleness}, "
            f"num_replicas={self.num_replicas}, rank={self.rank})"
        )

    # -- checkpoints ----------------------------------------------------------------------

    _STATE_KEYS = (
        "config",
        "history",
        "seen",
        "snapshots",
        "invalid",
        "table",
        "draws",
        "rebuilds",
        "tau",
        "weight_sum",
        "weight_count",
        "weight_max",
        "generator",
        *STREAM_KEYS,
    )

    def _config(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "uniform_mix": self.uniform_mix,
            "rebuild_every": self.rebuild_every,
            "max_staleness": self.max_staleness,  # None matches states saved without it
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
        }

    def state_dict(self) -> dict:
        """The configuration, the history and the snapshots the next tables are built from
        (CPU copies; with ``max_staleness``, the step of each score too), the current
        table, the generator's state, the counters and the batches yielded but not yet
        selected. Format version 2."""
        return {
            "kind": type(self).__name__,
            "version": STATE_VERSION,
            "config": self._config(),
            **self._history.state_dict(),
            "table": None
            if self._table is None
            else {k: v.clone() for k, v in self._table.state_dict().items()},
            "draws": self._draws,
            "rebuilds": self.rebuilds,
            "tau": self.tau,
            "weight_sum": self._weight_sum,
            "weight_count": self._weight_count,
            "weight_max": self._weight_max,
            "generator": self._gen.get_state(),
            **self._stream_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()`` of a sampler with the same configuration (else
        ``ValueError``), validating every value as the constructor validates its arguments
        (a refused state leaves the sampler unchanged); continues exactly where it stopped
        (see ``ImportanceSampler``)."""
        check_header(
            state_dict, type(self).__name__, STATE_VERSION, self._STATE_KEYS, self._config()
        )
        st = state_dict
        if self.max_staleness is not None:  # after the configuration: its error is clearer
            missing = sorted({"stamps", "stale"} - set(st))
            if missing:
                raise ValueError(f"state_dict is missing {missing} (max_staleness is set)")
        history = self._history.parse_state(st, state_int(st, "steps"))
        draws = state_int(st, "draws")
        table = table_from_state(st["table"], self.shard_size)
        if table is None and draws:
            raise ValueError(f"state_dict['table'] is None after {draws} draws")
        counts = {k: state_float(st, k) for k in ("tau", "weight_sum", "weight_max")}
        counts["rebuilds"] = state_int(st, "rebuilds")
        counts["weight_count"] = state_int(st, "weight_count")
        gen = cpu_generator_state(st["generator"])
        stream = self._parse_stream_state(st)
        # all checked: restore
        self._history.restore(history)
        self._table, self._draws = table, draws
        self.tau, self.rebuilds = counts["tau"], counts["rebuilds"]
        self._weight_sum, self._weight_max = counts["weight_sum"], counts["weight_max"]
        self._weight_count = counts["weight_count"]
        self._gen.set_state(gen)
        self._local = None
        self._restore_stream(stream)
