"""``ImportanceDataLoader``: a ``DataLoader`` over a fastis sampler that checkpoints it."""

from torch.utils.data import DataLoader

from fastis.integrations.common import is_sampler, load_rank_state, rank_states


class ImportanceDataLoader(DataLoader):
    """A ``DataLoader`` whose ``batch_sampler`` is a fastis sampler, with the sampler's
    ``state_dict`` / ``load_state_dict`` as its own.

    Frameworks that checkpoint stateful loaders (PyTorch Lightning saves the ``state_dict``
    of a training loader that has one and loads it before the loader's first iteration;
    Accelerate's ``register_for_checkpointing``) thereby save the index stream and resume
    it exactly, prefetched batches included.

    The state holds every rank's sampler state (``rank_states``: a collective when
    distributed, run on every rank as those frameworks save), since only rank 0 writes the
    checkpoint; each rank loads its own entry.

    Args:
        dataset: the map-style data set the sampler's indices address.
        batch_sampler: a ``fastis.ImportanceSampler`` or ``fastis.HistorySampler``.
        **kwargs: the other ``DataLoader`` arguments (``collate_fn``, ``num_workers``,
            ``pin_memory``, ...); ``batch_size``, ``shuffle``, ``sampler`` and ``drop_last``
            do not apply (the sampler decides them).

    Example:
        >>> sampler = fastis.ImportanceSampler(len(train_set), batch_size=64, seed=0)
        >>> loader = ImportanceDataLoader(train_set, batch_sampler=sampler, num_workers=2)
    """

    def __init__(self, dataset, batch_sampler, **kwargs):
        if not is_sampler(batch_sampler):
            raise TypeError(
                "batch_sampler must be a fastis sampler (ImportanceSampler, HistorySampler), "
                f"got {type(batch_sampler).__name__}"
            )
        for key in ("batch_size", "shuffle", "sampler", "drop_last"):
            value = kwargs.pop(key, None)
            if value is not None and value is not False:
                raise ValueError(
                    f"{key}={value!r} does not apply: the fastis sampler yields the "
                    "batches (its batch_size, its shuffling, its shards)"
                )
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    def state_dict(self) -> dict:
        """Every rank's sampler state (see ``fastis.integrations.common.rank_states``)."""
        return rank_states(self.batch_sampler)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads this rank's sampler state; the next iteration continues the stream."""
        load_rank_state(self.batch_sampler, state_dict)
