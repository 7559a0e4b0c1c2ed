"""PyTorch Lightning 2.x: importance sampling in a working ``LightningModule``.

The diff to a working module (``lightning`` 2.x, ``import lightning as L``)::

    from fastis.integrations.lightning import (
        ImportanceDataLoader, ImportanceSampling, importance_loss)

    def train_dataloader(self):
        sampler = fastis.ImportanceSampler(len(self.train_set), batch_size=64, seed=0)
        return ImportanceDataLoader(self.train_set, batch_sampler=sampler)  # was DataLoader(...)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return importance_loss(self, x, y)                    # was F.cross_entropy(self(x), y)

    trainer = L.Trainer(use_distributed_sampler=False, callbacks=[ImportanceSampling()])

- The sampler is the loader's ``batch_sampler``: it yields ``b`` indices, or a presample of
  ``B`` when importance sampling is on, and shards itself across ranks, so Lightning must
  not inject its ``DistributedSampler`` (``use_distributed_sampler=False``; the callback
  raises a clear error otherwise). Build it in ``train_dataloader`` (on every rank, after
  the process group is up), not in ``__init__``.
- ``importance_loss`` runs ``select`` (scoring the presample without gradient), the
  weighted per-example loss and ``update``: ``fastis.cross_entropy`` by default, or
  ``loss_fn(out, y) -> [b]``.
- ``ImportanceDataLoader`` is a stateful loader: Lightning saves its ``state_dict`` (every
  rank's sampler state) in each checkpoint and loads it before the first batch of
  ``trainer.fit(ckpt_path=...)``, which so continues the exact index stream.
- ``ImportanceSampling`` checks the setup when fitting starts and logs ``stats()`` through
  ``LightningModule.log`` every ``log_every_n_steps``: ``fastis/tau``,
  ``fastis/importance_share`` (share of importance-sampled steps), ``fastis/mean_weight``.
"""

from collections.abc import Callable

import lightning.pytorch as pl

from fastis.integrations.common import sampler_of, sampler_stats, weighted_step
from fastis.integrations.loader import ImportanceDataLoader

__all__ = ["ImportanceDataLoader", "ImportanceSampling", "importance_loss", "sampler_stats"]


def _train_loader(trainer: "pl.Trainer"):
    loader = trainer.train_dataloader
    if loader is None:
        raise RuntimeError("the trainer has no training loader yet: call this during fit")
    return loader


def importance_loss(
    module: "pl.LightningModule",
    inputs,
    targets,
    *,
    forward: Callable | None = None,
    loss_fn: Callable | None = None,
    score_fn: Callable | None = None,
    **loss_kwargs,
):
    """The importance-weighted loss of this training step (call it from ``training_step``).

    Selects the training rows of the batch the loader yielded (all of them with unit
    weights while importance sampling is off; ``b`` of the presample with weights
    ``1 / (B g_i)`` when on), computes the weighted per-example loss and feeds the scores
    back (``fastis.integrations.weighted_step``).

    Args:
        module: the ``LightningModule`` (its trainer's training loader holds the sampler).
        inputs, targets: the batch as the loader yielded it (on the module's device).
        forward: ``inputs -> outputs`` (default: ``module`` itself).
        loss_fn: ``loss_fn(outputs, targets) -> [b]`` per-example losses (default:
            ``fastis.cross_entropy`` of the logits ``outputs``); a scalar raises.
        score_fn: scores for ``update`` with ``loss_fn`` (default: the sampler's).
        **loss_kwargs: options of ``fastis.cross_entropy`` (``label_smoothing``, ...).

    Returns:
        the scalar loss to return from ``training_step``.
    """
    sampler = sampler_of(_train_loader(module.trainer))
    return weighted_step(
        sampler,
        module if forward is None else forward,
        inputs,
        targets,
        loss_fn=loss_fn,
        score_fn=score_fn,
        **loss_kwargs,
    )


class ImportanceSampling(pl.Callback):
    """Checks a fit's importance-sampling setup and logs the sampler's statistics.

    - ``setup``: refuses ``Trainer(use_distributed_sampler=True)`` on more than one process
      (Lightning would wrap the self-sharding sampler in a ``DistributedSampler``).
    - ``on_train_start``: the training loader's ``batch_sampler`` is a fastis sampler,
      not wrapped (``fastis.integrations.sampler_of``), built for as many ranks as the
      trainer runs (a sampler built before the process group would give every rank the
      same batches).
    - ``on_train_batch_end``: every ``log_every_n_steps`` optimizer steps (default: the
      trainer's), ``pl_module.log_dict(sampler_stats(sampler))``; ``0`` turns logging off.

    Args:
        log_every_n_steps: logging period in optimizer steps (``None``: the trainer's).
        prefix: prefix of the logged names.
    """

    def __init__(self, log_every_n_steps: int | None = None, prefix: str = "fastis/"):
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or log_every_n_steps < 0
        ):
            raise ValueError(f"log_every_n_steps must be an int >= 0, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self.prefix = str(prefix)
        self.sampler = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or trainer.world_size <= 1:
            return
        connector = getattr(trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "Trainer(use_distributed_sampler=True) with "
                f"{trainer.world_size} processes would wrap the fastis sampler in a "
                "DistributedSampler, but it shards itself across ranks: pass "
                "Trainer(use_distributed_sampler=False)"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        sampler = sampler_of(_train_loader(trainer), where="the train_dataloader()")
        if sampler.num_replicas != trainer.world_size:
            raise ValueError(
                f"the fastis sampler was built for num_replicas={sampler.num_replicas} but "
                f"the trainer runs {trainer.world_size} processes: build it in "
                "train_dataloader() (after the process group is initialised)"
            )
        self.sampler = sampler

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = (
            trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        )
        if not every or self.sampler is None or trainer.global_step % every:
            return
        pl_module.log_dict(sampler_stats(self.sampler, self.prefix), on_step=True, on_epoch=False)
