"""What every framework integration shares: finding the sampler, one training step, and
the sampler's state across ranks."""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastis.loss import cross_entropy

_PROTOCOL = ("select", "update", "state_dict", "load_state_dict", "stats")
# attributes through which loaders and samplers hold what they wrap
_WRAPPED = ("batch_sampler", "sampler", "dataset", "data_source")
RANKS_KIND = "fastis-sampler-ranks"


def is_sampler(obj) -> bool:
    """Whether ``obj`` follows the fastis samplers' per-step protocol (``select``,
    ``update``, ``state_dict``, ``load_state_dict``, ``stats``)."""
    return obj is not None and all(callable(getattr(obj, a, None)) for a in _PROTOCOL)


def _find_wrapped(obj, depth: int = 3):
    """The attribute path to a fastis sampler inside ``obj``, or None."""
    if depth == 0 or obj is None:
        return None
    for attr in _WRAPPED:
        inner = getattr(obj, attr, None)
        if inner is obj or inner is None or isinstance(inner, torch.Tensor):
            continue
        if is_sampler(inner):
            return [attr]
        path = _find_wrapped(inner, depth - 1)
        if path is not None:
            return [attr, *path]
    return None


def sampler_of(loader, *, where: str = "the training loader"):
    """The fastis sampler that ``loader`` (a ``DataLoader``) uses as its ``batch_sampler``.

    The samplers shard themselves across ranks (``perm[rank::num_replicas]``), so a loader
    that wraps one again (``DistributedSampler``, Accelerate's ``BatchSamplerShard``, a
    ``BatchSampler`` taking it as ``sampler=``) would train each rank on a fraction of its
    own shard, and ``select`` would pair batches with the wrong queued indices.

    Raises:
        ValueError: the sampler is there but wrapped (names the wrapper).
        TypeError: no fastis sampler in ``loader``.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if is_sampler(batch_sampler):
        return batch_sampler
    for attr in ("batch_sampler", "sampler"):
        outer = getattr(loader, attr, None)
        path = None if outer is None else _find_wrapped(outer)
        if path is not None:
            chain = ".".join([attr, *path])
            raise ValueError(
                f"{where}'s {attr} is a {type(outer).__name__} that wraps a fastis sampler "
                f"(at loader.{chain}): the sampler shards itself across ranks and must be "
                "the loader's batch_sampler, not wrapped again (for Lightning: "
                "Trainer(use_distributed_sampler=False); for Accelerate: "
                "fastis.integrations.accelerate.prepare_loader, not accelerator.prepare)"
            )
    raise TypeError(
        f"{where} must be a DataLoader with batch_sampler=<a fastis.ImportanceSampler or "
        f"HistorySampler>, got {type(loader).__name__} with batch_sampler "
        f"{type(batch_sampler).__name__}"
    )


def per_example(losses, rows: int, name: str = "loss_fn") -> torch.Tensor:
    """``losses`` checked to be one value per training row (``[rows]``)."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{name} must return a tensor of per-example losses, got {losses!r}")
    if losses.dim() != 1 or losses.shape[0] != rows:
        raise ValueError(
            f"{name} must return per-example losses of shape [{rows}] (reduction='none'), "
            f"got shape {tuple(losses.shape)}: the importance weights multiply each "
            "example's loss, so a reduced loss cannot be weighted"
        )
    return losses


def weighted_step(
    sampler,
    forward: Callable,
    inputs,
    targets,
    *,
    loss_fn: Callable | None = None,
    score_fn: Callable | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    r"""One step of the samplers' protocol: ``select``, the weighted loss, ``update``.

    With ``(x, y, w) = sampler.select(forward, inputs, targets)`` and ``out = forward(x)``:

    - default: ``loss, g = fastis.cross_entropy(out, y, sample_weight=w,
      return_score=True, **loss_kwargs)`` (``out`` are logits ``[b, C]`` or ``[b, T, C]``);
    - ``loss_fn(out, y) -> [b]`` per-example losses: ``loss = mean_i w_i L_i`` and the
      scores ``g = score_fn(out.detach(), y)`` (default: the sampler's ``score_fn``, else
      ``fastis.score``); a reduced (scalar) loss raises ``ValueError``.

    ``forward`` may be a ``DistributedDataParallel`` model: the presample is scored with the
    module it wraps. ``sampler.update(g)`` follows, so call this once per yielded batch (it
    is a collective for a distributed ``ImportanceSampler``: every rank, every step).

    Returns:
        the scalar loss to backpropagate.
    """
    # the no-grad scoring pass skips DDP's wrapper (its hooks and buffer broadcasts)
    scorer = forward.module if isinstance(forward, DistributedDataParallel) else forward
    x, y, w = sampler.select(scorer, inputs, targets)
    out = forward(x)
    if loss_fn is None:
        loss, g = cross_entropy(out, y, sample_weight=w, return_score=True, **loss_kwargs)
    else:
        if loss_kwargs:
            raise TypeError(f"loss_fn does not take the options {sorted(loss_kwargs)}")
        losses = per_example(loss_fn(out, y), len(w))
        loss = (losses * w.to(losses.dtype)).mean()
        if score_fn is None:
            from fastis.score import score as default_score

            score_fn = getattr(sampler, "score_fn", default_score)
        with torch.no_grad():
            g = score_fn(_detached(out), y)
    sampler.update(g)
    return loss


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_detached(o) for o in out)
    return out


def sampler_stats(sampler, prefix: str = "fastis/") -> dict:
    """``tau``, ``importance_share`` and ``mean_weight`` of ``sampler.stats()`` (one host
    synchronisation) as floats, under ``prefix``."""
    st = sampler.stats()
    steps = st.get("steps", 0)
    # HistorySampler has no uniform steps: every batch is importance sampled
    done = st.get("steps_importance", steps)
    share = done / steps if steps else 0.0
    return {
        f"{prefix}tau": float(st["tau"]),
        f"{prefix}importance_share": float(share),
        f"{prefix}mean_weight": float(st["mean_weight"]),
    }


# -- the sampler's state of every rank in one checkpoint --------------------------------


def _gatherable(sampler) -> bool:
    return sampler.num_replicas > 1 and dist.is_available() and dist.is_initialized()


def rank_states(sampler) -> dict:
    """The samplers' ``state_dict()`` of all ranks, for a checkpoint that only rank 0 writes
    (Lightning, Accelerate): ``{"kind", "num_replicas", "ranks": {rank: state}}``.

    With a process group (``num_replicas > 1``) this is a collective (``all_gather_object``):
    call it on every rank, as those frameworks do when they save. Without one it holds this
    rank's state only.
    """
    own = sampler.state_dict()
    if _gatherable(sampler):
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, (sampler.rank, own))
        ranks = dict(every)
    else:
        ranks = {sampler.rank: own}
    return {"kind": RANKS_KIND, "num_replicas": sampler.num_replicas, "ranks": ranks}


def load_rank_state(sampler, state: dict) -> None:
    """Loads this rank's entry of a ``rank_states`` checkpoint into ``sampler``."""
    if not isinstance(state, dict) or state.get("kind") != RANKS_KIND:
        raise ValueError(
            f"the sampler checkpoint must come from rank_states() (kind {RANKS_KIND!r}), got "
            f"{type(state).__name__} with kind {getattr(state, 'get', lambda k: None)('kind')!r}"
        )
    if state["num_replicas"] != sampler.num_replicas:
        raise ValueError(
            f"the checkpoint was saved with num_replicas={state['num_replicas']} but the "
            f"sampler has num_replicas={sampler.num_replicas}: resume on as many ranks"
        )
    ranks = state["ranks"]
    if sampler.rank not in ranks:
        raise ValueError(
            f"the checkpoint holds the sampler state of ranks {sorted(ranks)}, not of rank "
            f"{sampler.rank}"
        )
    sampler.load_state_dict(ranks[sampler.rank])
