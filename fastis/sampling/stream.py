"""The index stream shared by the samplers: shards, seeds, the queue of yielded batches
and its resume.

A sampler here is a ``torch.utils.data.Sampler`` of index lists (a ``DataLoader``'s
``batch_sampler``); ``index_tensors()`` iterates the same batches as int64 tensors, which
a hand-written loop can index with directly (no Python list in between). Every batch it
yields is remembered, in order, until ``select`` takes it, so a prefetching
``DataLoader`` (``num_workers > 0``) may draw several batches ahead; ``state_dict`` saves
those batches and, after ``load_state_dict``, the next iteration yields them again first,
then continues the interrupted epoch. ``BatchStream`` holds that machinery; a subclass
supplies ``_draw_batch`` (the next batch) and the per-step work.
"""

import hashlib
import warnings
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from fastis._checks import int_arg
from fastis.sampling.batches import num_rows
from fastis.sampling.checks import check_scores, dataset_size, seed_arg, state_int

STATE_VERSION = 2
STREAM_KEYS = ("pending", "epoch_yielded", "steps", "missing_updates")


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the generator named by ``keys`` (a stream, a pass, a rank), hashed
    from all 64 bits of ``seed``.

    Hashing (BLAKE2b) rather than adding offsets keeps seeds that agree in their low bits
    apart (torch's CPU generator keeps only 32 bits of what ``manual_seed`` gets) and keeps
    ``seed + 1``'s passes from being ``seed``'s shifted by one. Two seeds' CPU streams still
    coincide with probability about ``2^-32``, as any two 32-bit seeds do.
    """
    data = b"".join(int(k).to_bytes(8, "little") for k in (seed, *keys))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def distributed_setup(num_replicas, rank, seed, *, need_group: bool):
    """``(num_replicas, rank, seed, distributed)`` with ``DistributedSampler``'s defaults
    (from the process group when one is initialised); ``seed=None`` draws one from torch's
    default generator, broadcast from rank 0 so that all ranks agree."""
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    num_replicas = int_arg("num_replicas", num_replicas)
    rank = int_arg("rank", rank, minimum=0)
    if rank >= num_replicas:
        raise ValueError(
            f"rank must be in [0, num_replicas - 1] = [0, {num_replicas - 1}], got {rank}"
        )
    if num_replicas > 1 and need_group and not initialised:
        raise ValueError(
            f"num_replicas={num_replicas} needs an initialised torch.distributed process group "
            "(tau is averaged across ranks); call init_process_group first"
        )
    if seed is not None:
        return num_replicas, rank, seed_arg(seed), initialised and num_replicas > 1
    # torch.manual_seed makes the run reproducible; ranks must agree on the seed (their
    # shards come from one permutation), so rank 0's is broadcast
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
    return num_replicas, rank, seed, initialised and num_replicas > 1


@dataclass
class Batch:
    """One yielded batch: its data set indices (what the ``DataLoader`` loads),
    ``source[start : start + size]`` of an int64 CPU tensor that the sampler never hands
    out nor changes. For a batch of the index stream, ``source`` is the permutation of
    pass ``pass_`` itself, so a batch costs no tensor operation until its indices are
    needed; otherwise ``pass_`` is -1 (e.g. ``Batch.of(index)``)."""

    source: torch.Tensor
    start: int
    size: int
    pass_: int = -1

    @classmethod
    def of(cls, index: torch.Tensor, **fields):
        """A batch of the indices ``index`` (int64 ``[n]``, CPU), not a pass's slice."""
        return cls(index, 0, index.shape[0], -1, **fields)

    @property
    def index(self) -> torch.Tensor:
        """The indices, int64 ``[size]`` (a view of ``source``: not to be changed)."""
        if self.start == 0 and self.size == self.source.shape[0]:
            return self.source
        return self.source.narrow(0, self.start, self.size)

    def state(self) -> dict:
        return {"indices": self.index.tolist()}


class BatchStream(Sampler):
    """The queue of yielded batches, the epoch counter and their checkpoint.

    Args:
        data_source: a sized data set or its size ``N``.
        batch_size: ``b``.
        seed, num_replicas, rank: see ``distributed_setup``.
        need_group: ``num_replicas > 1`` requires an initialised process group.

    Attributes:
        num_samples: ``N``; shard_size: ``ceil(N / num_replicas)`` (padded by wrapping, as
        ``DistributedSampler`` with ``drop_last=False``); steps: batches selected;
        missing_updates: steps whose ``update`` was owed but never came.
    """

    def __init__(self, data_source, batch_size, *, seed, num_replicas, rank, need_group):
        super().__init__()
        self.num_samples = dataset_size(data_source)
        self.batch_size = int_arg("batch_size", batch_size)
        self.num_replicas, self.rank, self.seed, self.distributed = distributed_setup(
            num_replicas, rank, seed, need_group=need_group
        )
        self.shard_size = -(-self.num_samples // self.num_replicas)
        self.epoch = 0
        self.steps = 0
        self.missing_updates = 0
        self._pending: deque[Batch] = deque()  # yielded, not yet selected
        self._replay: list[Batch] = []  # loaded from a checkpoint, yielded first
        self._resumed = False
        self._epoch_yielded = 0
        self._owed_update: int | None = None  # rows the next update() must have
        self._owed_needed = False  # and whether a missing update() is worth a warning

    # -- what a subclass supplies ---------------------------------------------------------

    def _draw_batch(self) -> Batch:
        raise NotImplementedError

    def _batch_from_state(self, state) -> Batch:
        raise NotImplementedError

    # -- iteration ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch (see the sampler's docstring for its rule)."""
        raise NotImplementedError

    def _dropped(self) -> None:
        """Called when a new iterator drops batches yielded but never selected (a subclass
        that links consecutive batches resets that link here)."""

    def __iter__(self):
        """The batches of one epoch, each a list of data set indices (what a
        ``DataLoader``'s ``batch_sampler`` yields)."""
        return self._iterate(None)

    def index_tensors(self, device=None):
        """The batches of one epoch as ``iter(self)`` yields them, each an int64 tensor
        ``[n]`` on ``device`` (default: the CPU), the caller's to keep or change: nothing
        of the sampler's refers to it. (A batch of an index stream's pass is a view of a
        copy of that pass's permutation, made once per pass and device, so a step pays
        for no copy, and on CUDA for no host-to-device transfer; the view keeps that copy,
        8 bytes per example of the shard, alive.) Starting it starts a new epoch's
        iteration exactly as ``iter(self)`` does (the two share one stream: use one of
        them at a time).

        Example:
            >>> for idx in sampler.index_tensors(device=X.device):
            ...     x, y, w = sampler.select(model, X[idx], Y[idx])
        """
        return self._iterate(torch.device("cpu") if device is None else torch.device(device))

    def _iterate(self, device: torch.device | None):
        if self._pending:  # batches of an abandoned iterator never train
            self._pending.clear()
            self._dropped()
        replay, self._replay = self._replay, []
        if self._resumed and (replay or self._epoch_yielded < len(self)):
            self._epoch_yielded -= len(replay)  # finish the interrupted epoch
        else:
            self._epoch_yielded = 0
        self._resumed = False
        for batch in replay:
            yield self._emit(batch, device)
        while self._epoch_yielded < len(self):
            yield self._emit(self._draw_batch(), device)

    def _emit(self, batch: Batch, device: torch.device | None):
        self._pending.append(batch)
        self._epoch_yielded += 1
        if device is None:
            return batch.index.tolist()
        view = self._yield_view(batch, device)
        if view is not None:
            return view
        if device.type == "cpu":  # a copy: the batch's own stays the sampler's
            return batch.index.clone()
        # from pageable memory: staged at once, no wait for the device's queue
        return batch.index.to(device, non_blocking=True)

    def _yield_view(self, batch: Batch, device: torch.device) -> torch.Tensor | None:
        """What ``index_tensors`` yields for ``batch`` if not a copy of its indices: a
        tensor of the caller's (a subclass with per-pass copies returns a view of one);
        None: a copy."""
        return None

    def set_epoch(self, epoch: int) -> None:
        """Accepted for loops written for ``DistributedSampler`` and otherwise ignored: the
        draws already continue across epochs (``__iter__`` picks up where the last epoch
        stopped, and every rank advances in lockstep), so the epoch number is not needed to
        vary them, and a resumed run continues from ``load_state_dict``, not from it. The
        value is kept as ``self.epoch``."""
        self.epoch = int_arg("epoch", epoch, minimum=0)

    # -- the per-step protocol ------------------------------------------------------------

    def _peek(self, inputs, targets) -> Batch:
        """The batch ``select`` must take now, checked against ``inputs`` / ``targets``;
        it stays queued until ``_commit`` (a ``select`` that raises can be retried)."""
        if not self._pending:
            raise RuntimeError(
                "select() has no batch to take: iterate the sampler (for idx in sampler, or a "
                "DataLoader with batch_sampler=sampler) and call select() once per batch"
            )
        batch = self._pending[0]
        n = num_rows(inputs)
        if n != batch.size:
            raise ValueError(
                f"inputs has {n} rows but the batch the sampler yielded for this step has "
                f"{batch.size} indices: call select() once per yielded batch, in order"
            )
        if targets is not None and num_rows(targets) != n:
            raise ValueError(f"targets has {num_rows(targets)} rows but inputs {n}")
        return batch

    def _commit(self, rows_out: int, *, needs_update: bool = True) -> None:
        """Takes the peeked batch off the queue: ``select`` returned ``rows_out`` rows, and
        ``update`` is owed their scores (``needs_update``: a missing one is counted)."""
        if self._owed_update is not None and self._owed_needed:
            self.missing_updates += 1
            if self.missing_updates == 1:
                warnings.warn(
                    f"{type(self).__name__}.update(scores) was not called after the previous "
                    "step: pass it the scores of fastis.cross_entropy(..., return_score=True) "
                    "every step, or the sampler never learns the scores",
                    stacklevel=3,
                )
        self._pending.popleft()
        self._owed_update, self._owed_needed = rows_out, needs_update
        self.steps += 1

    def _take_update(self, scores, *, detach: bool = True) -> torch.Tensor:
        """``scores`` (detached unless ``detach=False``), checked to match the rows the last
        ``select`` returned."""
        if self._owed_update is None:
            raise RuntimeError("update() must follow select(), once per step")
        scores = check_scores(scores, self._owed_update, "scores", detach=detach)
        self._owed_update = None
        return scores

    # -- checkpoints ----------------------------------------------------------------------

    def _stream_state(self) -> dict:
        return {
            "pending": [b.state() for b in self._pending],
            "epoch_yielded": self._epoch_yielded,
            "steps": self.steps,
            "missing_updates": self.missing_updates,
        }

    def _parse_stream_state(self, state: dict) -> dict:
        """The stream part of a ``state_dict()``, checked (nothing is changed here)."""
        pending = state["pending"]
        if not isinstance(pending, (list, tuple)):
            raise TypeError(f"state_dict['pending'] must be a list, got {type(pending).__name__}")
        replay = [self._batch_from_state(b) for b in pending]
        steps = state_int(state, "steps")
        return {
            "replay": replay,
            "epoch_yielded": state_int(state, "epoch_yielded", len(replay), len(self)),
            "steps": steps,
            "missing_updates": state_int(state, "missing_updates", 0, steps),
        }

    def _restore_stream(self, parsed: dict) -> None:
        """Restores what ``_parse_stream_state`` returned: the next iteration yields the
        saved pending batches first, then finishes the interrupted epoch."""
        self._pending.clear()
        self._replay = parsed["replay"]
        self._epoch_yielded = parsed["epoch_yielded"]
        self._resumed = True
        self.steps = parsed["steps"]
        self.missing_updates = parsed["missing_updates"]
        self._owed_update, self._owed_needed = None, False


class Permutations:
    """The index stream of one rank: a random permutation of the ``N`` indices per pass,
    the same on every rank (seeded from ``seed`` and the pass number), of which the rank
    takes ``perm[rank::num_replicas]`` (padded by wrapping, as ``DistributedSampler``),
    consumed ``n`` at a time. A take never straddles two passes: the rest of a pass
    shorter than ``n`` is skipped, so a take holds distinct examples and the ranks' takes
    are disjoint when they take the same sizes in lockstep.

    Attributes:
        pass_, cursor: the pass number and the position in its shard.
    """

    def __init__(self, num_samples: int, num_replicas: int, rank: int, seed: int, key: int):
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.key = seed, key
        self.shard_size = -(-num_samples // num_replicas)
        self.pass_ = 0
        self.cursor = 0
        self._cache: tuple[int, torch.Tensor] | None = None
        self._copies: dict = {}  # device -> a copy of the cached shard, for index_tensors

    def take(self, n: int) -> tuple[torch.Tensor, int, int]:
        """The next ``n`` indices (``n <= shard_size``) as ``(shard, start, pass)``: they
        are ``shard[start : start + n]``, with ``shard`` the int64 CPU permutation of pass
        ``pass``, which is never changed in place (a new pass gets a new one), so the
        caller must not change it either."""
        if self.cursor + n > self.shard_size:
            self.pass_, self.cursor = self.pass_ + 1, 0
        start, self.cursor = self.cursor, self.cursor + n
        cache = self._cache
        hit = cache is not None and cache[0] == self.pass_
        return (cache[1] if hit else self._shard(self.pass_)), start, self.pass_

    def view(self, pass_: int, start: int, n: int, device: torch.device) -> torch.Tensor | None:
        """``shard[start : start + n]`` of pass ``pass_`` as a view of a copy of the shard on
        ``device`` (made once per pass and device; the views are the callers'); None if
        ``pass_`` is no longer the current pass."""
        if self._cache is None or self._cache[0] != pass_:
            return None
        copy = self._copies.get(device)
        if copy is None:  # contiguous, and on CUDA staged at once (no wait)
            copy = self._cache[1].clone(memory_format=torch.contiguous_format)
            copy = copy.to(device, non_blocking=True)
            self._copies[device] = copy
        return copy.narrow(0, start, n)

    def _shard(self, k: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != k:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.key, k))
            perm = torch.randperm(self.num_samples, generator=g)
            pad = self.shard_size * self.num_replicas - self.num_samples
            if pad:
                perm = torch.cat([perm, perm.repeat(-(-pad // self.num_samples))[:pad]])
            self._cache = (k, perm[self.rank :: self.num_replicas])
            self._copies = {}
        return self._cache[1]

    def __getstate__(self) -> dict:
        # the copies are the yielded views' (a copy of the sampler makes its own)
        return dict(self.__dict__, _copies={})

    def state_dict(self) -> dict:
        return {"pass": self.pass_, "cursor": self.cursor}

    def parse_state(self, state: dict) -> tuple:
        """``(pass, cursor)`` of ``state``, checked."""
        return state_int(state, "pass"), state_int(state, "cursor", 0, self.shard_size)

    def restore(self, parsed: tuple) -> None:
        self.pass_, self.cursor = parsed


def indices_from_state(b, key: str, sizes: tuple, high: int) -> list:
    """A saved batch's ``b[key]``: a list of ints in ``[0, high)`` of a length in ``sizes``."""
    if not isinstance(b, dict) or key not in b:
        raise ValueError(f"state_dict['pending'] entries must be dicts with {key!r}, got {b!r}")
    idx = b[key]
    if not isinstance(idx, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in idx
    ):
        raise TypeError(f"state_dict['pending'][...][{key!r}] must be a list of ints")
    if len(idx) not in sizes:
        raise ValueError(
            f"state_dict['pending'][...][{key!r}] must have a length in {sizes}, got {len(idx)}"
        )
    if idx and not (0 <= min(idx) and max(idx) < high):
        raise ValueError(
            f"state_dict['pending'][...][{key!r}] must be in [0, {high - 1}], got "
            f"[{min(idx)}, {max(idx)}]"
        )
    return list(idx)
