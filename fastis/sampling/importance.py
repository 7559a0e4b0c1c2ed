"""``ImportanceSampler``: Algorithm 1 of Katharopoulos & Fleuret (ICML 2018)."""

from collections.abc import Callable

import torch

from fastis._backend import use_triton
from fastis._checks import float_arg, int_arg
from fastis.sampling.batches import device_of, take_rows
from fastis.sampling.draw import PresampleDraw, score_presample
from fastis.sampling.importance_report import ImportanceReport
from fastis.sampling.importance_state import ImportanceState
from fastis.sampling.measured import MeasuredSwitch
from fastis.sampling.noise import constant_noise_rows, noise_args, variance_reduction
from fastis.sampling.reuse import PresampleBatch, PresampleReuse
from fastis.sampling.stream import BatchStream, Permutations, derive_seed
from fastis.sampling.switch import SmoothedTau, default_tau_th
from fastis.score import score as default_score

_PERMUTATION, _DRAWS = 1, 2  # derive_seed keys of the two streams


class ImportanceSampler(ImportanceReport, ImportanceState, BatchStream):
    r"""Importance sampling with the variance-reduction switch (Algorithm 1 of Katharopoulos
    & Fleuret, ICML 2018), as a ``torch.utils.data`` batch sampler.

    Each step (one yielded batch, one ``select``, one ``update``):

    - off (``tau <= tau_th``): yields ``b`` indices; ``select`` returns the batch with unit
      weights; ``update(scores)`` smooths ``tau`` with the training batch's scores (those
      that ``fastis.cross_entropy(..., return_score=True)`` returns: no extra pass).
    - on (``tau > tau_th``): yields a presample of ``B`` indices; ``select`` scores them
      with a forward pass under ``torch.inference_mode`` (``chunk_size`` rows at a time),
      updates ``tau`` from those scores, draws ``b`` of the ``B`` with probabilities
      ``g_i = G_i / sum G`` (``fastis.sample``, with replacement) and returns them with the
      weights ``w_i = 1 / (B g_i)``; ``update`` is then a no-op.

    ``tau = a_tau * tau + (1 - a_tau) * compute_tau(scores)``, starting at 0, so with
    constant scores of ``compute_tau = c`` it switches on at the first step ``t`` with
    ``c (1 - a_tau^t) > tau_th``.

    The index stream: one random permutation of the data set per pass, consumed ``b`` or
    ``B`` at a time across steps and epochs; a presample is thus ``B`` distinct examples,
    and the weighted batch is unbiased for the presample's mean. A batch never straddles
    two passes: the rest of a pass too short for the next batch is skipped (as with
    ``drop_last=True``, a different rest each pass), so ``len(sampler)``, the batches per
    epoch, is ``shard_size // b`` (one pass at ``b`` per step; importance steps consume
    ``B`` each, so an epoch of ``len`` batches covers more than a pass when on). The
    permutation of pass ``k`` and the per-rank draw generator are seeded from a hash of all
    64 bits of ``seed`` with ``k`` and the rank (``fastis.sampling.stream.derive_seed``).

    Synchronisation: the on/off decision reads ``tau`` on the host once per yielded batch
    (waiting, on CUDA, only for the work queued up to the last update; see
    ``SmoothedTau``). Nothing else in ``select``/``update`` synchronises: counters stay on
    the device until ``stats()``. (CPU scores, one process: the presample's validity,
    ``tau_new`` and the weight counters are computed on the host from one read of the
    ``B`` scores, which costs less there than the dozen small tensor operations it
    replaces; the draw itself is the same.) The smoothing itself runs on the host: an off step's
    ``update`` only reads the ``b`` scores (on CUDA: an asynchronous copy to pinned
    memory), and the next decision folds them into ``tau``, so ``tau`` is exactly the
    per-step recursion above whenever it is read, and an off step costs the sampler a
    handful of tensor operations (``index_tensors`` below: one; ``select``: one;
    ``update``: one).

    ``DataLoader`` with ``num_workers > 0``: the loader draws indices ahead of training
    (``num_workers * prefetch_factor`` batches), so a batch's mode is decided from ``tau``
    as it was that many steps earlier (still unbiased: ``select`` follows the mode recorded
    with each batch). The batch sampler runs in the main process, so ``select`` sees the
    same object.

    Bad scores: a score function that returns a non-tensor, a non-floating tensor or the
    wrong shape raises (``TypeError`` / ``ValueError``). A ``select`` that raises (there, or
    in ``model`` or ``score_fn``) leaves the sampler as it was: the batch stays queued and
    the call can be retried. NaN, infinite or negative scores (checked on the device) make
    that step fall back to uniform selection among the presample (unit weights) and leave
    ``tau`` unchanged; they are counted in ``stats()['invalid_score_steps']``. All-zero
    scores select uniformly too (``'zero_score_steps'``) and count as ``compute_tau = 1``.
    An example scored exactly 0 is never selected, which is unbiased only if its gradient
    is 0 (true for the default score; for a score function of your own, make zero mean
    zero gradient).

    Distributed (``torch.distributed`` initialised; ``num_replicas > 1`` requires it): each
    rank draws from its own shard of every permutation (``perm[rank::num_replicas]``,
    padded as ``DistributedSampler``); the ranks consume their shards in lockstep, so their
    batches are disjoint at every step. Each ``tau`` update all-reduces the ranks'
    ``tau_new`` (the mean over the ranks whose scores were valid), so every rank holds the
    same ``tau``, bit for bit, and switches at the same step: ``select`` (when on) and
    ``update`` (when off) are collectives, to be called every step on every rank.
    ``set_epoch`` is accepted and ignored (the stream continues across epochs).

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
            statistics update), restoring each submodule's own mode after (one frozen in
            eval mode stays so; default True).
        inference_mode: score under ``torch.inference_mode`` (default True: no autograd
            bookkeeping at all); False scores under ``torch.no_grad``, for models that
            cache tensors during a forward pass (e.g. lazily built tables), which would
            otherwise be inference tensors that training cannot use.
        seed: an int in ``[0, 2^64 - 1]``; seeds the permutations (the same on all ranks)
            and the per-rank draw generator; default: drawn from torch's default generator
            (``torch.manual_seed`` makes runs reproducible), broadcast from rank 0 when
            distributed.
        num_replicas, rank: as ``DistributedSampler`` (default: from the process group).
        draws_per_presample: ``k >= 1`` (default 1, the paper's algorithm): one scored
            presample serves ``k`` consecutive steps. It is yielded ``k`` times (the same
            ``B`` indices: the loader still gives a batch per step), scored on the first,
            and each of the ``k`` steps trains on ``b`` rows drawn with replacement from
            the same probabilities ``g`` with weights ``1 / (B g_i)``, so each step is
            unbiased for the presample's mean; the scoring forward is paid once per ``k``
            steps. ``tau`` is updated once per presample; ``update`` is a check on every
            importance step. The steps share the presample's own sampling noise (that of a
            batch of ``B``): choose ``B`` well above ``k b`` (see ``MeasuredSwitch``).
            A cycle, once started, runs its ``k`` steps whatever ``tau`` does
            (``fastis.sampling.reuse``).
        switch: None (default: ``tau > tau_th``) or a ``fastis.sampling.MeasuredSwitch``:
            on while the estimated variance reduction pays for the measured cost of an
            importance step, optionally off in the step-limited tail of a schedule
            (``noise_share``). ``tau_th`` is then unused. Steps are timed from one
            ``select`` to the next (host clock on the CPU, CUDA events read late on a GPU).
        constant_noise: spend the variance reduction on fewer backpropagated rows (default
            False): an importance step trains on ``n = 1 / (tau^2 (1 / b - k / B))`` rows
            (the noise of a uniform batch of ``b``, counting the presample's own; see
            ``fastis.sampling.noise``), rounded up to a multiple of ``min_batch_size``,
            within ``[min_batch_size, b]``, with the same weights ``1 / (B g_i)`` (a mean
            over ``n`` rows is unbiased). ``n`` is fixed when the batch is yielded, from
            the ``tau`` read for the decision; ``select`` returns ``n`` rows and ``update``
            takes ``n`` scores. Uniform steps keep ``b``.
        min_batch_size: the floor and granularity of ``n`` (default ``ceil(b / 8)``: at
            most 8 batch shapes).

    Attributes:
        tau, tau_th, is_active: the switch (``tau`` and ``is_active`` read the device).
        steps, steps_importance, steps_uniform: selected batches, in all and per mode.
        last_indices: data set indices of the batch ``select`` last returned (a tensor on
            the batch's device, built when first read).
        variance_reduction: the estimated variance reduction of that batch against a
            uniform batch of ``b`` (a host float; exactly 1.0 when it was uniform), the
            batch scale of ``fastis.LRGain``'s learning-rate gain.

    Iteration: ``iter(sampler)`` yields lists of indices (what a ``DataLoader``'s
    ``batch_sampler`` must yield); ``sampler.index_tensors(device)`` yields the same
    batches as int64 tensors on ``device``, for a loop that indexes tensors itself (no
    Python list per step; a batch of the stream is a view of a per-pass copy of the
    permutation on ``device``, the caller's).

    Example:
        >>> sampler = fastis.ImportanceSampler(len(X), batch_size=128, seed=0)
        >>> for idx in sampler.index_tensors(X.device):  # or: for idx in sampler
        ...     x, y, w = sampler.select(model, X[idx], Y[idx])
        ...     loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
        ...     sampler.update(g)
        ...     opt.zero_grad(); loss.backward(); opt.step()

    (Most of this class is this docstring, the user's one reference for Algorithm 1 and
    its options; what stays here is the wiring of one step. The parts live in their own
    modules: the index stream in ``stream``, the switch in ``switch`` / ``measured``, the
    draw in ``draw``, the amortised presample in ``reuse``, the constant-noise sizes in
    ``noise``, the checkpoint format in ``importance_state`` and what a user reads
    (``tau``, ``stats()``, ``last_indices``, the ``repr``) in ``importance_report``.)
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
        inference_mode: bool = True,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        draws_per_presample: int = 1,
        switch: MeasuredSwitch | None = None,
        constant_noise: bool = False,
        min_batch_size: int | None = None,
    ):
        b = int_arg("batch_size", batch_size)
        big_b = 3 * b if presample_size is None else int_arg("presample_size", presample_size)
        if big_b < b:
            raise ValueError(f"presample_size must be >= batch_size={b}, got {big_b}")
        self.presample_size = big_b
        self.tau_th = default_tau_th(b, big_b) if tau_th is None else float_arg("tau_th", tau_th)
        self.a_tau = float_arg("a_tau", a_tau)
        if not 0.0 <= self.a_tau < 1.0:
            raise ValueError(f"a_tau must be in [0, 1), got {self.a_tau}")
        if score_fn is not None and not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.score_fn = score_fn if score_fn is not None else default_score
        self.chunk_size = None if chunk_size is None else int_arg("chunk_size", chunk_size)
        self.eval_scoring = bool(eval_scoring)
        self.inference_mode = bool(inference_mode)
        self.draws_per_presample = int_arg("draws_per_presample", draws_per_presample)
        if switch is not None and not isinstance(switch, MeasuredSwitch):
            raise TypeError(f"switch must be None or a MeasuredSwitch, got {type(switch).__name__}")
        self.switch = switch
        self.constant_noise, self.min_batch_size = noise_args(constant_noise, min_batch_size, b)
        self._rows = b  # rows of an importance step, as last decided
        super().__init__(
            data_source, b, seed=seed, num_replicas=num_replicas, rank=rank, need_group=True
        )
        if self.shard_size < big_b:
            what = "data set" if self.num_replicas == 1 else f"shard of rank {self.rank}"
            raise ValueError(
                f"the {what} has {self.shard_size} examples, fewer than presample_size={big_b}"
                f" (data set of {self.num_samples}, {self.num_replicas} replicas)"
            )
        self._switch = SmoothedTau(self.distributed)
        self._stream = Permutations(
            self.num_samples, self.num_replicas, self.rank, self.seed, _PERMUTATION
        )
        self._draw = PresampleDraw(derive_seed(self.seed, _DRAWS, self.rank))
        self._reuse = PresampleReuse(self.draws_per_presample, b, big_b, self.num_samples)
        self.presamples = 0  # scored presamples
        self.weighted_rows = 0  # rows returned by importance steps
        self.steps_importance = 0
        self.steps_uniform = 0
        # what last_indices is built from: (batch, drawn positions or None, device), or
        # the tensor once built
        self._last: tuple | torch.Tensor | None = None
        self._tau_read = 0.0  # tau as the last decision read it
        self._last_vr = 1.0  # the variance reduction of the batch select last returned

    # -- the index stream ---------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch: ``shard_size // batch_size`` (one pass at ``b`` per step; the
        stream continues across epochs)."""
        return self.shard_size // self.batch_size

    def _draw_batch(self) -> PresampleBatch:
        reuse = self._reuse.next_reuse()
        if reuse is not None:  # the cycle of the last presample goes on
            return reuse
        active = self._decide()
        n = self.presample_size if active else self.batch_size
        shard, start, pass_ = self._stream.take(n)
        batch = PresampleBatch(shard, start, n, pass_, active, 0, self._rows)
        if active:
            self._reuse.yielded(batch)
        return batch

    def _yield_view(self, batch, device):
        # a fresh batch: a view of the pass's copy (a reuse is a copy: the caller may
        # have changed its view of the presample)
        if batch.pass_ < 0 or batch.draw:
            return None
        return self._stream.view(batch.pass_, batch.start, batch.size, device)

    def _decide(self) -> bool:
        """The mode of the next fresh batch (and its rows when on): the one host read of
        ``tau`` per decision."""
        tau = self._tau_read = self._switch.host_value()
        k, b, big_b = self.draws_per_presample, self.batch_size, self.presample_size
        if self.constant_noise:
            self._rows = constant_noise_rows(tau, b, big_b, k, self.min_batch_size)
        if self.switch is None:
            return tau > self.tau_th
        r = self._switch.host_shared() if self.distributed else None
        if r is None:
            r = self.switch.cost_ratio(b, big_b, k, self._rows)
        return self.switch.decide(tau, r, b, big_b, k, self._rows)

    def _dropped(self) -> None:
        self._reuse.reset_yield()

    def _batch_from_state(self, b) -> PresampleBatch:
        return self._reuse.batch_from_state(b)

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
            ``b`` rows (``n`` in the constant-noise mode) drawn from the presample (same
            structure) with float32 weights ``1 / (B g_i)`` when on, the presample scored
            by this call or, for its reuses (``draws_per_presample > 1``), by the call
            that took its first batch (``model`` is then not called). ``last_indices``
            holds their data set indices.
        """
        batch = self._peek(inputs, targets)
        dev = device_of(targets if targets is not None else inputs)
        if self.switch is not None:
            kind = "reuse" if batch.draw else "presample" if batch.active else "uniform"
            self.switch.start_step(kind, dev)
        if not batch.active:
            n = batch.size
            self._commit(n)
            self.steps_uniform += 1
            self._selected(batch, None, dev)
            return inputs, targets, torch.ones(n, device=dev)  # fresh: the caller's to keep
        if batch.draw:  # a reuse: no scoring, the next row of the presample's draws
            pos, w = self._reuse.take(batch.draw)
            w = w.to(dev, non_blocking=True)
            self._draw.count_weights(w)
            self._commit(batch.rows, needs_update=False)
            self.steps_importance += 1
            self.weighted_rows += batch.rows
            self._selected(batch, pos, dev)
            return take_rows(inputs, pos), take_rows(targets, pos), w
        scores = score_presample(  # may raise: nothing has changed yet
            model,
            self.score_fn,
            inputs,
            targets,
            chunk_size=self.chunk_size,
            eval_mode=self.eval_scoring,
            inference=self.inference_mode,
        )
        k = self.draws_per_presample
        rows = batch.rows
        if scores.device.type == "cpu" and not self.distributed and not use_triton(scores):
            # the summary on the host (a read of CPU memory, no synchronisation)
            pos, w, tau_new, valid, usable = self._draw.draw_host(scores, k * rows)
            self._switch.observe_presample_host(tau_new, valid, usable, self.a_tau)
        else:
            pos, w, norm_g, valid, usable = self._draw.draw(scores, k * rows)
            self._switch.observe_presample(
                norm_g, valid, usable, self.presample_size, self.a_tau, self._shared_ratio()
            )
        pos, w = self._reuse.start(pos, w, rows)
        self._draw.count_weights(w)
        self._commit(rows, needs_update=False)
        self.presamples += 1
        self.steps_importance += 1
        self.weighted_rows += rows
        self._selected(batch, pos, dev)
        return take_rows(inputs, pos), take_rows(targets, pos), w

    def _selected(self, batch: PresampleBatch, pos, dev: torch.device) -> None:
        # what last_indices and variance_reduction read: the batch, its drawn positions
        # (None when off), and its reduction from the tau that decided it (host floats)
        self._last = (batch, pos, dev)
        self._last_vr = 1.0
        if batch.active:
            k, b, big_b = self.draws_per_presample, self.batch_size, self.presample_size
            self._last_vr = variance_reduction(self._tau_read, batch.rows, b, big_b, k)

    def update(self, scores: torch.Tensor) -> None:
        """Feeds back the training batch's scores (``[n]``, one per row that ``select``
        returned, e.g. from ``fastis.cross_entropy(..., return_score=True)``).

        When off this updates ``tau`` (all-reduced when distributed): the scores are read
        now (on CUDA, copied asynchronously) and folded into ``tau`` at its next read;
        the caller may reuse the tensor. When on ``tau`` was already updated from the
        presample and the scores are only checked. Call it once per step, after
        ``select``.
        """
        on = self._owed_update is not None and not self._owed_needed
        scores = self._take_update(scores, detach=False)  # read or copied, never kept
        if not on:
            self._switch.observe_scores(scores, self.a_tau, self._shared_ratio())

    def _shared_ratio(self) -> float | None:
        # with a measured switch across ranks, this rank's cost ratio rides on the
        # all-reduce of tau_new, so that every rank decides from the same mean ratio
        if self.switch is None or not self.distributed:
            return None
        k, b, big_b = self.draws_per_presample, self.batch_size, self.presample_size
        return self.switch.cost_ratio(b, big_b, k, self._rows)
