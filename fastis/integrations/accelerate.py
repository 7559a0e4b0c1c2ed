"""Accelerate: a fastis sampler's loader, prepared without being sharded twice.

``accelerator.prepare(loader)`` on several processes wraps the loader's batch sampler in
a ``BatchSamplerShard`` that keeps every ``num_processes``-th batch; a fastis sampler
already yields this rank's shard, so that would train each rank on a fraction of it and
pair the batches with the wrong queued indices. ``prepare_loader`` gives the loader
Accelerate's device placement and end-of-loader tracking (for ``accelerator.accumulate``)
without that wrapper. The recipe::

    from fastis.integrations import ImportanceDataLoader, weighted_step
    from fastis.integrations.accelerate import prepare_loader

    accelerator = Accelerator()
    sampler = fastis.ImportanceSampler(len(train_set), batch_size=64, seed=0)  # after Accelerator()
    loader = ImportanceDataLoader(train_set, batch_sampler=sampler)
    accelerator.register_for_checkpointing(loader)   # the sampler's state in save_state
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = prepare_loader(accelerator, loader)     # not accelerator.prepare(loader)
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = weighted_step(sampler, model, x, y)   # select, weighted loss, update
            accelerator.backward(loss)
            optimizer.step(); optimizer.zero_grad()

``accelerator.save_state`` / ``load_state`` then save and restore every rank's sampler
state (``ImportanceDataLoader.state_dict``, a collective that ``save_state`` runs on every
process). Do not skip batches on resume (``accelerator.skip_first_batches``): the sampler
resumes its interrupted epoch itself.
"""

from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader

from fastis.integrations.common import sampler_of

__all__ = ["check_prepared", "prepare_loader"]


def _check_ranks(accelerator: Accelerator, sampler) -> None:
    if (sampler.num_replicas, sampler.rank) != (
        accelerator.num_processes,
        accelerator.process_index,
    ):
        raise ValueError(
            f"the fastis sampler was built for rank {sampler.rank} of {sampler.num_replicas} "
            f"but this is process {accelerator.process_index} of {accelerator.num_processes}: "
            "build it after Accelerator() (which initialises the process group)"
        )


def prepare_loader(accelerator: Accelerator, loader, *, device_placement: bool | None = None):
    """``loader`` (its ``batch_sampler`` a fastis sampler) prepared for ``accelerator``:
    batches moved to ``accelerator.device`` (unless ``device_placement=False``; default
    the accelerator's), the sampler not wrapped again.

    Raises:
        ValueError: the sampler is already wrapped, or was built for other ranks.
        TypeError: the loader has no fastis sampler.
    """
    sampler = sampler_of(loader)
    _check_ranks(accelerator, sampler)
    place = accelerator.device_placement if device_placement is None else bool(device_placement)
    prepared = prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=1,  # the sampler holds this process's shard already
        process_index=0,
        split_batches=False,
        put_on_device=place,
        dispatch_batches=False,
        non_blocking=accelerator.non_blocking,
    )
    return check_prepared(prepared, accelerator)


def check_prepared(loader, accelerator: Accelerator | None = None):
    """``loader`` itself once checked: its ``batch_sampler`` is a fastis sampler that no
    wrapper shards again (e.g. after ``accelerator.prepare(loader)``, which is safe on one
    process only); with ``accelerator``, also built for this process's rank."""
    sampler = sampler_of(loader, where="the prepared loader")
    if accelerator is not None:
        _check_ranks(accelerator, sampler)
    return loader
