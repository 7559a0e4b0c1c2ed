"""Importance sampling of training examples: ``ImportanceSampler`` and ``HistorySampler``.

``ImportanceSampler`` is Algorithm 1 of Katharopoulos & Fleuret (ICML 2018): while the
smoothed variance-reduction estimate ``tau`` is at most ``tau_th`` it yields ``b`` uniform
indices per step (unit weights, ``tau`` updated from the scores the training loss returns);
above it, it yields a presample of ``B`` indices, scores them with a forward pass without
gradient, keeps ``b`` of them drawn with probabilities ``g = G / sum(G)`` (with replacement,
``fastis.sample``) and weights them ``1 / (B g_i)``, which keeps the mini-batch gradient an
unbiased estimate of the presample's mean gradient.

``HistorySampler`` (``fastis.history``, on the same machinery) keeps one score per
example, refreshed from the scores the training loss returns (no extra forward pass), and
draws every batch from the whole data set (shard) through an ``AliasTable`` rebuilt every
``k`` steps, mixed with uniform so that the unbiased weights ``1 / (N p_i)`` stay below
``1 / uniform_mix``.

Both are ``torch.utils.data.Sampler`` s of index lists, usable as a ``DataLoader``'s
``batch_sampler`` or iterated directly in a hand-written loop, and share one per-step
protocol::

    for idx in sampler:                                  # a list of indices
        x, y = X[idx], Y[idx]                            # or a DataLoader's batch
        x, y, w = sampler.select(model, x, y)            # training batch and weights
        loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
        sampler.update(g)                                # scores of the training batch
        optimizer.zero_grad(); loss.backward(); optimizer.step()

Each yielded batch is remembered until ``select`` takes it (in order), so a ``DataLoader``
with ``num_workers > 0`` can prefetch: the on/off decision for a batch is taken when the
batch's indices are drawn, up to ``num_workers * prefetch_factor`` steps before it trains,
and ``select`` follows the decision recorded with the batch (see ``ImportanceSampler``).
"""

import math
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from fastis._checks import int_arg
from fastis.alias import sample
from fastis.score import score as _default_score

STATE_VERSION = 1
_STREAM_KEYS = ("pending", "epoch_yielded", "steps", "missing_updates")


# --------------------------------------------------------------------------------------
# the switch


def compute_tau(scores: torch.Tensor) -> torch.Tensor:
    r"""The variance-reduction estimate of one scored set ``U`` (the switch's ``tau_new``).

    With ``g = scores / sum(scores)`` and ``u = 1 / |U|``, the reference implementation's

        ``tau_new = 1 / sqrt(1 - sum (g_i - u)^2 / sum g_i^2)``

    which equals ``sqrt(|U| sum g_i^2) = sqrt(|U| / ESS)`` (``sum (g - u)^2 = sum g^2 - u``);
    this form is computed, in float64, since it cannot cancel. It is 1 for equal scores,
    ``sqrt(|U|)`` when one score holds everything, and 1 for all-zero scores (uniform
    sampling is then what runs).

    Args:
        scores: ``[n]`` non-negative scores, ``n >= 1`` (not checked here).

    Returns:
        float64 0-d tensor on the scores' device (no host synchronisation).
    """
    s = scores.detach().to(torch.float64)
    total = s.sum()
    g = s / torch.where(total > 0, total, 1.0)
    tau = torch.sqrt(s.shape[0] * (g * g).sum())
    return torch.where(total > 0, tau, 1.0)


def default_tau_th(batch_size: int, presample_size: int) -> float:
    """The break-even ``tau_th = (B + 3b) / (3b)`` (a backward costs about two forwards)."""
    return (presample_size + 3 * batch_size) / (3 * batch_size)


# --------------------------------------------------------------------------------------
# helpers


def _float_arg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _dataset_size(data_source) -> int:
    if isinstance(data_source, bool):
        raise TypeError("data_source must be a sized data set or an int, got a bool")
    if isinstance(data_source, int):
        return int_arg("data_source", data_source)
    try:
        n = len(data_source)
    except TypeError:
        raise TypeError(
            f"data_source must be a sized (map-style) data set or an int, got "
            f"{type(data_source).__name__}"
        ) from None
    if n < 1:
        raise ValueError(f"data_source must hold at least one example, got length {n}")
    return n


def _distributed_setup(num_replicas, rank, seed, need_group: bool):
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    num_replicas = int_arg("num_replicas", num_replicas)
    rank = int_arg("rank", rank, minimum=0)
    if rank >= num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas - 1] = [0, {num_replicas - 1}], "
                         f"got {rank}")
    if num_replicas > 1 and need_group and not initialised:
        raise ValueError(
            f"num_replicas={num_replicas} needs an initialised torch.distributed process group "
            "(tau is averaged across ranks); call init_process_group first"
        )
    if seed is None:
        # torch.manual_seed makes the run reproducible; ranks must agree on the seed
        # (their shards come from one permutation), so rank 0's is broadcast.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        if num_replicas > 1:
            if not initialised:
                raise ValueError(
                    f"seed must be given when num_replicas={num_replicas} without an "
                    "initialised process group (all ranks must use the same seed)"
                )
            box = [seed]
            dist.broadcast_object_list(box, src=0)
            seed = int(box[0])
    else:
        seed = int_arg("seed", seed, minimum=0)
    return num_replicas, rank, seed, initialised and num_replicas > 1


def _rank_seed(seed: int, rank: int, stream: int) -> int:
    """A seed per (seed, rank, stream) for the per-rank generators."""
    return (seed * 0x9E3779B1 + (rank + 1) * 0x85EBCA77 + stream * 0xC2B2AE3D) % (2**63)


def _rows(obj) -> int:
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise ValueError("inputs and targets must have a leading batch dimension")
        return obj.shape[0]
    if isinstance(obj, (tuple, list)) and obj:
        return _rows(obj[0])
    if isinstance(obj, dict) and obj:
        return _rows(next(iter(obj.values())))
    raise TypeError(
        f"inputs and targets must be tensors (or tuples/lists/dicts of tensors), got "
        f"{type(obj).__name__}"
    )


def _take(obj, pos: torch.Tensor):
    """Rows ``pos`` of a tensor, or of every tensor in a tuple/list/dict (None stays None)."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, pos.to(obj.device, non_blocking=True))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(o, pos) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, pos) for k, v in obj.items()}
    raise TypeError(f"cannot select rows of a {type(obj).__name__}")


def _slice(obj, start: int, stop: int):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj[start:stop]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(o, start, stop) for o in obj)
    if isinstance(obj, dict):
        return {k: _slice(v, start, stop) for k, v in obj.items()}
    raise TypeError(f"cannot slice a {type(obj).__name__}")


def _device_of(obj) -> torch.device:
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, (tuple, list)) and obj:
        return _device_of(obj[0])
    if isinstance(obj, dict) and obj:
        return _device_of(next(iter(obj.values())))
    return torch.device("cpu")


def _check_scores(scores, n: int, who: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{who} must be a tensor of [{n}] scores, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{who} must be floating point, got {scores.dtype}")
    if tuple(scores.shape) != (n,):
        raise ValueError(f"{who} must have shape ({n},), one score per row, got "
                         f"{tuple(scores.shape)}")
    return scores.detach()


@dataclass
class _Batch:
    indices: list  # data set indices yielded for this step
    active: bool  # importance sampling (a presample) or uniform
    local: list | None = None  # HistorySampler: positions in the shard
    weights: torch.Tensor | None = None  # HistorySampler: importance weights (CPU)
    positions: torch.Tensor | None = None  # ``indices`` as a CPU tensor, when at hand


class _StepSampler(Sampler):
    """Shared machinery: shard sizes, the epoch length, the queue of yielded batches that
    ``select`` takes in order, and the replay of that queue after ``load_state_dict``."""

    def _setup_stream(self, data_source, batch_size, num_replicas, rank, seed, need_group):
        self.num_samples = _dataset_size(data_source)
        self.batch_size = int_arg("batch_size", batch_size)
        (self.num_replicas, self.rank, self.seed,
         self._distributed) = _distributed_setup(num_replicas, rank, seed, need_group)
        # as DistributedSampler (drop_last=False): pad to a multiple of the ranks by wrapping
        self.shard_size = -(-self.num_samples // self.num_replicas)
        self._pending: deque[_Batch] = deque()
        self._replay: list[_Batch] = []
        self._resumed = False
        self._epoch_yielded = 0
        self._current: _Batch | None = None  # the batch last selected
        self._awaiting_update = False
        self.steps = 0  # batches selected (training steps)
        self.missing_updates = 0

    def __len__(self) -> int:
        """Steps (batches) per epoch: ``ceil(shard_size / batch_size)``; the draws continue
        across epochs (no ``set_epoch`` is needed)."""
        return -(-self.shard_size // self.batch_size)

    def __iter__(self):
        self._pending.clear()  # batches of an abandoned iterator never train
        replay, self._replay = self._replay, []
        if self._resumed and (replay or self._epoch_yielded < len(self)):
            self._epoch_yielded -= len(replay)  # finish the interrupted epoch
        else:
            self._epoch_yielded = 0
        self._resumed = False
        for batch in replay:
            yield self._emit(batch)
        while self._epoch_yielded < len(self):
            yield self._emit(self._next_batch())

    def _emit(self, batch: _Batch) -> list:
        self._pending.append(batch)
        self._epoch_yielded += 1
        return list(batch.indices)

    def _pop(self, inputs, targets) -> _Batch:
        if not self._pending:
            raise RuntimeError(
                "select() has no batch to take: iterate the sampler (for idx in sampler, or a "
                "DataLoader with batch_sampler=sampler) and call select() once per batch"
            )
        n = _rows(inputs)
        batch = self._pending[0]
        if n != len(batch.indices):
            raise ValueError(
                f"inputs has {n} rows but the batch the sampler yielded for this step has "
                f"{len(batch.indices)} indices: call select() once per yielded batch, in order"
            )
        if targets is not None and _rows(targets) != n:
            raise ValueError(f"targets has {_rows(targets)} rows but inputs {n}")
        if self._awaiting_update and self._current is not None and self._needs_update():
            self.missing_updates += 1
            if self.missing_updates == 1:
                warnings.warn(
                    f"{type(self).__name__}.update(scores) was not called after the previous "
                    "step: pass it the scores of fastis.cross_entropy(..., return_score=True) "
                    "every step, or the sampler never learns the scores", stacklevel=3)
        self._pending.popleft()
        self._current = batch
        self._awaiting_update = True
        self.steps += 1
        return batch

    def _needs_update(self) -> bool:
        return True

    def _take_update(self, scores) -> _Batch:
        if self._current is None or not self._awaiting_update:
            raise RuntimeError("update() must follow select(), once per step")
        b = self._current
        n = self.batch_size if b.active else len(b.indices)  # the rows select() returned
        _check_scores(scores, n, "scores")
        self._awaiting_update = False
        return self._current

    def _stream_state(self) -> dict:
        return {
            "pending": [
                {"indices": list(b.indices), "active": b.active,
                 "local": None if b.local is None else list(b.local),
                 "weights": None if b.weights is None else b.weights.clone()}
                for b in self._pending
            ],
            "epoch_yielded": self._epoch_yielded,
            "steps": self.steps,
            "missing_updates": self.missing_updates,
        }

    def _load_stream_state(self, state: dict) -> None:
        self._pending.clear()
        self._replay = [
            _Batch(list(b["indices"]), bool(b["active"]), b.get("local"), b.get("weights"))
            for b in state["pending"]
        ]
        self._epoch_yielded = int(state["epoch_yielded"])
        self._resumed = True
        self.steps = int(state["steps"])
        self.missing_updates = int(state["missing_updates"])
        self._current = None
        self._awaiting_update = False

    def _check_state(self, state_dict, config: dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        kind = state_dict.get("kind")
        if kind != type(self).__name__:
            raise ValueError(f"state_dict is from a {kind!r}, not a {type(self).__name__!r}")
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"state_dict has version {state_dict.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        missing = sorted(set(self._state_keys()) - set(state_dict))
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        saved = state_dict.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if diff:
            text = ", ".join(f"{k}: saved {a!r} vs this {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"state_dict is from another configuration ({text})")


# --------------------------------------------------------------------------------------
# Algorithm 1


class ImportanceSampler(_StepSampler):
    r"""Importance sampling with the variance-reduction switch (Algorithm 1 of Katharopoulos
    & Fleuret, ICML 2018), as a ``torch.utils.data`` batch sampler.

    Each step (one yielded batch, one ``select``, one ``update``):

    - off (``tau <= tau_th``): yields ``b`` indices; ``select`` returns the batch with unit
      weights; ``update(scores)`` smooths ``tau`` with the training batch's scores (those
      that ``fastis.cross_entropy(..., return_score=True)`` returns: no extra pass).
    - on (``tau > tau_th``): yields a presample of ``B`` indices; ``select`` scores them
      with a forward pass without gradient (``chunk_size`` rows at a time), updates
      ``tau`` from those scores, draws ``b`` of the ``B`` with probabilities
      ``g_i = G_i / sum G`` (``fastis.sample``, with replacement) and returns them with the
      weights ``w_i = 1 / (B g_i)``; ``update`` is then a no-op.

    ``tau = a_tau * tau + (1 - a_tau) * compute_tau(scores)``, starting at 0, so with
    constant scores of ``compute_tau = c`` it switches on at the first step ``t`` with
    ``c (1 - a_tau^t) > tau_th``. Indices come from one random permutation of the data set
    per pass (seeded with ``seed + pass``, as ``DistributedSampler``), consumed ``b`` or
    ``B`` at a time across steps and epochs; a presample is thus ``B`` distinct examples
    (a batch never straddles two passes: the rest of a pass too short for it is skipped),
    and the weighted batch is unbiased for the presample's mean.

    Synchronisation: the on/off decision reads ``tau`` on the host once per yielded batch.
    On CUDA each ``tau`` update copies it to pinned memory and records an event, and the
    decision waits for that event alone: for the work queued up to the last update (the
    scoring pass, or the training forward when off), not for the backward pass and
    optimizer step queued after it, which keep the GPU busy meanwhile. Nothing else in
    ``select``/``update`` synchronises: counters stay on the device until ``stats()``.

    ``DataLoader`` with ``num_workers > 0``: the loader draws indices ahead of training
    (``num_workers * prefetch_factor`` batches), so a batch's mode is decided from ``tau``
    as it was that many steps earlier; the switch takes effect with that lag (the estimate
    stays unbiased: ``select`` follows the mode recorded with each batch). The batch
    sampler runs in the main process, so ``select`` sees the same object.

    Bad scores: a score function that returns a non-tensor, a non-floating tensor or the
    wrong shape raises (``TypeError`` / ``ValueError``). NaN, infinite or negative scores
    (checked on the device, no synchronisation) make that step fall back to uniform
    selection among the presample (unit weights) and leave ``tau`` unchanged; they are
    counted in ``stats()['invalid_score_steps']``. All-zero scores select uniformly too
    (``'zero_score_steps'``) and count as ``compute_tau = 1``. An example scored exactly 0
    is never selected, which is unbiased only if its gradient is 0 (true for the default
    score; for a score function of your own, make zero mean zero gradient).

    Distributed (``torch.distributed`` initialised; ``num_replicas > 1`` requires it): each
    rank draws from its own shard of every permutation (``perm[rank::num_replicas]``,
    padded as ``DistributedSampler``), and as the ranks consume their shards in lockstep
    their batches are disjoint at every step. Each ``tau`` update all-reduces the ranks'
    ``tau_new`` (the mean over the ranks whose scores were valid; one 2-element
    ``all_reduce`` on the scores' device), so every rank holds the same ``tau``, bit for
    bit, and switches at the same step: ``select`` (when on) and ``update`` (when off) are
    collectives, to be called every step on every rank. With FSDP the scoring forward pass
    is a collective too, which the common switch keeps aligned.

    Args:
        data_source: a sized (map-style) data set, or its size ``N``.
        batch_size: ``b``, the training batch size.
        presample_size: ``B >= b`` (default ``3 b``), at most the shard size.
        tau_th: the switch threshold (default ``(B + 3b) / (3b)``); ``float('inf')`` never
            switches on, a negative value switches on from the first step.
        a_tau: smoothing of ``tau``, in ``[0, 1)`` (default 0.9; 0: no smoothing).
        score_fn: ``score_fn(outputs, targets) -> [n]`` scores, ``outputs = model(inputs)``
            (default ``fastis.score``, the gradient-norm bound from logits). E.g. the exact
            last-layer norm with a model returning ``(features, logits)``:
            ``lambda out, y: fastis.score(out[1], y, features=out[0])``; a regression's
            ``lambda out, y: (out - y).flatten(1).norm(dim=1)``; or the loss (biased
            baseline).
        chunk_size: score the presample this many rows at a time (default: all at once).
        eval_scoring: score an ``nn.Module`` in eval mode (no dropout, no BatchNorm
            statistics update), restoring its mode after (default True; a
            ``torch.compile``d module then keeps one graph per mode).
        seed: seeds the permutations (the same on all ranks) and the per-rank draw
            generator; default: drawn from torch's default generator (``torch.manual_seed``
            makes runs reproducible), broadcast from rank 0 when distributed.
        num_replicas, rank: as ``DistributedSampler`` (default: from the process group).

    Attributes:
        tau, tau_th, is_active: the switch (``tau`` and ``is_active`` read the device).
        steps, steps_importance, steps_uniform: selected batches, in all and per mode.
        last_indices: data set indices of the batch ``select`` last returned (a tensor on
            the batch's device).

    Example:
        >>> sampler = fastis.ImportanceSampler(len(X), batch_size=128, seed=0)
        >>> for idx in sampler:
        ...     x, y, w = sampler.select(model, X[idx], Y[idx])
        ...     loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
        ...     sampler.update(g)
        ...     opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(
        self,
        data_source,
        batch_size: int,
        *,
        presample_size: int | None = None,
        tau_th: float | None = None,
        a_tau: float = 0.9,
        score_fn: Callable | None = None,
        chunk_size: int | None = None,
        eval_scoring: bool = True,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__()
        b = int_arg("batch_size", batch_size)
        big_b = 3 * b if presample_size is None else int_arg("presample_size", presample_size)
        if big_b < b:
            raise ValueError(f"presample_size must be >= batch_size={b}, got {big_b}")
        self.presample_size = big_b
        self.tau_th = (default_tau_th(b, big_b) if tau_th is None
                       else _float_arg("tau_th", tau_th))
        self.a_tau = _float_arg("a_tau", a_tau)
        if not 0.0 <= self.a_tau < 1.0:
            raise ValueError(f"a_tau must be in [0, 1), got {self.a_tau}")
        if score_fn is not None and not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.score_fn = score_fn if score_fn is not None else _default_score
        self.chunk_size = None if chunk_size is None else int_arg("chunk_size", chunk_size)
        self.eval_scoring = bool(eval_scoring)
        self._setup_stream(data_source, b, num_replicas, rank, seed, need_group=True)
        if self.shard_size < big_b:
            what = "data set" if self.num_replicas == 1 else f"shard of rank {self.rank}"
            raise ValueError(
                f"the {what} has {self.shard_size} examples, fewer than presample_size={big_b}"
                f" (data set of {self.num_samples}, {self.num_replicas} replicas)"
            )
        # the index stream: pass number and cursor into that pass's shard
        self._pass = 0
        self._cursor = 0
        self._shard_cache: tuple[int, torch.Tensor] | None = None
        # device state, created on the scores' device at the first update
        self._tau = torch.zeros((), dtype=torch.float64)
        self._tau_new = torch.full((), float("nan"), dtype=torch.float64)
        self._counts = torch.zeros(4, dtype=torch.float64)  # w sum, w count, invalid, zero
        self._w_max = torch.zeros((), dtype=torch.float64)
        self._gen: torch.Generator | None = None
        self._gen_state: tuple[str, torch.Tensor] | None = None  # loaded, not yet applied
        self._tau_host: torch.Tensor | None = None  # pinned copy of a CUDA tau
        self._tau_ready: torch.cuda.Event | None = None  # recorded after that copy
        self.steps_importance = 0
        self.steps_uniform = 0
        self.last_indices: torch.Tensor | None = None

    # -- the index stream ---------------------------------------------------------------

    def _shard(self, k: int) -> torch.Tensor:
        if self._shard_cache is None or self._shard_cache[0] != k:
            g = torch.Generator().manual_seed(self.seed + k)
            perm = torch.randperm(self.num_samples, generator=g)
            pad = self.shard_size * self.num_replicas - self.num_samples
            if pad:
                perm = torch.cat([perm, perm.repeat(-(-pad // self.num_samples))[:pad]])
            self._shard_cache = (k, perm[self.rank::self.num_replicas])
        return self._shard_cache[1]

    def _take_stream(self, n: int) -> torch.Tensor:
        # a batch never straddles two passes: the rest of a pass shorter than the batch is
        # skipped (as drop_last), so a presample holds distinct examples and the ranks'
        # batches are disjoint at every step
        if self._cursor + n > self.shard_size:
            self._pass, self._cursor = self._pass + 1, 0
        start, self._cursor = self._cursor, self._cursor + n
        return self._shard(self._pass)[start:self._cursor].clone()

    def __len__(self) -> int:
        """Steps per epoch: ``shard_size // batch_size`` (one pass at ``b`` per step; the
        index stream continues across epochs, so no ``set_epoch`` is needed)."""
        return self.shard_size // self.batch_size

    def _next_batch(self) -> _Batch:
        active = self._host_tau() > self.tau_th  # the one host read of tau per step
        positions = self._take_stream(self.presample_size if active else self.batch_size)
        return _Batch(positions.tolist(), active, positions=positions)

    def _host_tau(self) -> float:
        """``tau`` on the host. On CUDA, each update also copies ``tau`` to pinned memory
        and records an event (``_publish_tau``); this waits for that event only, i.e. for
        the work queued up to the last update (the scoring pass, or the training forward
        when off), not for the backward and optimizer step queued after it."""
        if self._tau_ready is None:
            return float(self._tau)
        self._tau_ready.synchronize()
        return float(self._tau_host)

    def _publish_tau(self) -> None:
        if not self._tau.is_cuda:
            self._tau_ready = None
            return
        if self._tau_host is None:
            self._tau_host = torch.empty((), dtype=torch.float64, pin_memory=True)
        self._tau_host.copy_(self._tau, non_blocking=True)
        self._tau_ready = torch.cuda.Event()
        self._tau_ready.record(torch.cuda.current_stream(self._tau.device))

    # -- per step -------------------------------------------------------------------------

    def select(self, model, inputs, targets):
        """The training batch of this step, and its importance weights.

        Args:
            model: a callable ``inputs -> outputs`` (the model, or e.g.
                ``lambda b: hf_model(**b).logits``); called without gradient on the
                presample when importance sampling is on, unused otherwise.
            inputs: the rows of the yielded indices (a tensor, or a tuple/list/dict of
                tensors with one leading row each), on the model's device.
            targets: the matching targets (or None when ``score_fn`` needs none).

        Returns:
            ``(inputs, targets, weights)``: the batch itself with unit weights when off; the
            ``b`` rows drawn from the presample (same structure) with float32 weights
            ``1 / (B g_i)`` when on. ``last_indices`` holds their data set indices.
        """
        batch = self._pop(inputs, targets)
        dev = _device_of(targets if targets is not None else inputs)
        positions = batch.positions if batch.positions is not None \
            else torch.as_tensor(batch.indices)
        positions = positions.to(dev, non_blocking=True)
        if not batch.active:
            self.steps_uniform += 1
            self.last_indices = positions
            return inputs, targets, torch.ones(len(batch.indices), device=dev)
        self.steps_importance += 1
        scores = self._score(model, inputs, targets)
        n = scores.shape[0]
        finite = (torch.isfinite(scores) & (scores >= 0)).all()
        usable = finite & (scores.sum() > 0)
        self._update_tau(scores, finite)
        # NaN / negative / all-zero: uniform over the presample for this step (counted)
        safe = torch.where(usable, scores.double(), 1.0)
        pos, p = sample(safe, self.batch_size, generator=self._generator(safe.device),
                        return_probs=True)
        w = torch.where(usable, 1.0 / (n * p), 1.0).float()
        w64 = w.double()
        # a fill, not new_tensor: a blocking host-to-device copy would drain the stream
        count = torch.full((), float(w.shape[0]), dtype=torch.float64, device=w.device)
        self._counts = self._counts.to(w.device) + torch.stack(
            [w64.sum(), count, (~finite).double(), (finite & ~usable).double()])
        self._w_max = torch.maximum(self._w_max.to(w.device), w.max().double())
        self.last_indices = positions.index_select(0, pos.to(positions.device))
        return _take(inputs, pos), _take(targets, pos), w

    def update(self, scores: torch.Tensor) -> None:
        """Feeds back the training batch's scores (``[n]``, one per row that ``select``
        returned, e.g. from ``fastis.cross_entropy(..., return_score=True)``).

        When off this updates ``tau`` (all-reduced when distributed); when on ``tau`` was
        already updated from the presample and the scores are only checked. Call it once
        per step, after ``select``.
        """
        batch = self._take_update(scores)
        if batch.active:
            return
        s = scores.detach()
        finite = (torch.isfinite(s) & (s >= 0)).all()
        self._counts = self._counts.to(s.device)
        self._counts[2] += (~finite).double()
        self._update_tau(s, finite)

    def _needs_update(self) -> bool:
        return not self._current.active

    def _score(self, model, inputs, targets) -> torch.Tensor:
        if not callable(model):
            raise TypeError(f"model must be callable (inputs -> outputs), got "
                            f"{type(model).__name__}")
        n = _rows(inputs)
        chunk = self.chunk_size or n
        module = isinstance(model, torch.nn.Module) and self.eval_scoring and model.training
        if module:
            model.eval()
        try:
            with torch.no_grad():
                parts = []
                for start in range(0, n, chunk):
                    stop = min(start + chunk, n)
                    out = model(_slice(inputs, start, stop))
                    s = self.score_fn(out, _slice(targets, start, stop))
                    parts.append(_check_scores(s, stop - start, "score_fn's result"))
        finally:
            if module:
                model.train()
        scores = torch.cat(parts) if len(parts) > 1 else parts[0]
        return scores if scores.dtype == torch.float64 else scores.float()

    def _update_tau(self, scores: torch.Tensor, valid: torch.Tensor) -> None:
        dev = scores.device
        tau_new = compute_tau(scores)
        both = torch.stack([torch.where(valid, tau_new, 0.0), valid.double()])
        if self._distributed:
            dist.all_reduce(both)
        count = both[1]
        mean_new = both[0] / torch.where(count > 0, count, 1.0)
        tau = self._tau.to(dev)
        self._tau = torch.where(count > 0, self.a_tau * tau + (1.0 - self.a_tau) * mean_new,
                                tau)
        self._tau_new = torch.where(count > 0, mean_new, float("nan"))
        self._publish_tau()

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device.type != device.type:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(_rank_seed(self.seed, self.rank, 1))
            if self._gen_state is not None:
                kind, state = self._gen_state
                if kind == device.type:
                    self._gen.set_state(state)
                self._gen_state = None
        return self._gen

    def __getstate__(self) -> dict:
        # a CUDA event cannot be pickled or copied; without it the next read of tau waits
        # on tau itself (one synchronisation), and the next update publishes it again
        state = self.__dict__.copy()
        state["_tau_ready"] = state["_tau_host"] = None
        return state

    # -- what a user logs -------------------------------------------------------------

    @property
    def tau(self) -> float:
        """The smoothed variance-reduction estimate (reads it on the host)."""
        return float(self._tau)

    @property
    def is_active(self) -> bool:
        """Whether the next batch drawn will be a presample (``tau > tau_th``)."""
        return self.tau > self.tau_th

    def stats(self) -> dict:
        """Plain values to log (one host synchronisation): ``tau``, ``tau_new`` (the last
        update's, NaN if skipped), ``tau_th``, ``is_active``, ``steps``,
        ``steps_importance``, ``steps_uniform``, ``mean_weight`` / ``max_weight`` (over the
        importance-sampled examples; NaN / 0 before any), ``invalid_score_steps`` (NaN,
        inf or negative scores: tau kept, uniform fallback), ``zero_score_steps``,
        ``missing_updates`` (off steps whose scores were never fed back: tau cannot rise)."""
        vals = torch.cat([
            torch.stack([self._tau.cpu(), self._tau_new.cpu(), self._w_max.cpu()]),
            self._counts.cpu(),
        ]).tolist()
        tau, tau_new, w_max, w_sum, w_n, invalid, zero = vals
        return {
            "tau": tau,
            "tau_new": tau_new,
            "tau_th": self.tau_th,
            "is_active": tau > self.tau_th,
            "steps": self.steps,
            "steps_importance": self.steps_importance,
            "steps_uniform": self.steps_uniform,
            "mean_weight": w_sum / w_n if w_n else float("nan"),
            "max_weight": w_max,
            "invalid_score_steps": int(invalid),
            "zero_score_steps": int(zero),
            "missing_updates": self.missing_updates,
        }

    def __repr__(self) -> str:
        return (f"ImportanceSampler(num_samples={self.num_samples}, batch_size={self.batch_size}"
                f", presample_size={self.presample_size}, tau_th={self.tau_th:.4g}, "
                f"a_tau={self.a_tau}, num_replicas={self.num_replicas}, rank={self.rank})")

    # -- checkpoints ------------------------------------------------------------------

    def _state_keys(self) -> tuple:
        return ("config", "tau", "tau_new", "counts", "w_max", "pass", "cursor",
                "steps_importance", "steps_uniform", "generator", *_STREAM_KEYS)

    def _config(self) -> dict:
        return {"num_samples": self.num_samples, "batch_size": self.batch_size,
                "presample_size": self.presample_size, "tau_th": self.tau_th,
                "a_tau": self.a_tau, "seed": self.seed, "num_replicas": self.num_replicas,
                "rank": self.rank}

    def state_dict(self) -> dict:
        """Plain values and CPU tensors: the configuration (checked on load), ``tau``, the
        stream position, the batches yielded but not yet selected (a prefetching
        ``DataLoader``'s, replayed first after a resume), the draw generator's state and the
        counters. Reads the device state once (a synchronisation)."""
        gen = None
        if self._gen is not None:
            gen = {"device": self._gen.device.type, "state": self._gen.get_state()}
        elif self._gen_state is not None:
            gen = {"device": self._gen_state[0], "state": self._gen_state[1]}
        return {
            "kind": type(self).__name__,
            "version": STATE_VERSION,
            "config": self._config(),
            "tau": self._tau.cpu().clone(),
            "tau_new": self._tau_new.cpu().clone(),
            "counts": self._counts.cpu().clone(),
            "w_max": self._w_max.cpu().clone(),
            "pass": self._pass,
            "cursor": self._cursor,
            "steps_importance": self.steps_importance,
            "steps_uniform": self.steps_uniform,
            "generator": gen,
            **self._stream_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()`` of a sampler with the same configuration (data set
        size, sizes, ``tau_th``, ``a_tau``, seed, ranks; else ``ValueError``). The next
        iteration continues the interrupted epoch, replaying the batches that were yielded
        but not selected, so a resumed run draws what the uninterrupted one would have.
        The draw generator's state applies when its device type matches (otherwise it is
        re-seeded). Take ``state_dict()`` between steps (after ``update``)."""
        self._check_state(state_dict, self._config())
        cursor = int(state_dict["cursor"])
        if not 0 <= cursor <= self.shard_size:
            raise ValueError(f"state_dict['cursor'] must be in [0, {self.shard_size}], got "
                             f"{cursor}")
        dev = self._tau.device
        self._tau = state_dict["tau"].to(dev, torch.float64).clone()
        self._tau_new = state_dict["tau_new"].to(dev, torch.float64).clone()
        self._counts = state_dict["counts"].to(dev, torch.float64).clone()
        self._w_max = state_dict["w_max"].to(dev, torch.float64).clone()
        self._publish_tau()
        self._pass = int(state_dict["pass"])
        self._cursor = cursor
        self.steps_importance = int(state_dict["steps_importance"])
        self.steps_uniform = int(state_dict["steps_uniform"])
        gen = state_dict["generator"]
        self._gen = None
        self._gen_state = None if gen is None else (gen["device"], gen["state"])
        self._load_stream_state(state_dict)
