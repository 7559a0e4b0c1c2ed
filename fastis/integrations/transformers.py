r"""The Hugging Face ``Trainer`` with importance sampling: ``ImportanceTrainer``.

The diff to a working script::

    from fastis.integrations.transformers import ImportanceTrainer

    trainer = ImportanceTrainer(model=model, args=args, train_dataset=train_set,
                                sampler_kwargs={"presample_size": 96})   # was Trainer(...)

``ImportanceTrainer`` overrides the ``Trainer``'s public extension points:

- ``get_train_dataloader``: the loader's ``batch_sampler`` is a fastis sampler
  (``sampler_class``, default ``fastis.ImportanceSampler``, of ``len(train_dataset)`` with
  ``per_device_train_batch_size`` and ``args.seed``). It shards itself across processes, so
  the loader is not passed through ``accelerator.prepare`` (which would shard it again);
  ``training_step`` moves each batch to the device as usual.
- ``compute_loss``: ``select`` (scoring the presample without gradient, one score per
  sequence: ``fastis.score`` of the logits against the labels, shifted by one position for
  a causal LM, ``-100`` ignored), the forward pass of the selected rows, the weighted loss
  (``fastis.cross_entropy(..., sample_weight=w)``, each sequence's weight on all its
  tokens) and ``update``. Evaluation (``model.training`` False) uses the ``Trainer``'s own.
- ``get_batch_samples``: counts the loss's items (label tokens after the shift; rows for
  classification) over the gradient-accumulation window as the ``Trainer`` does, summed
  across processes. See ``compute_loss`` for how it normalises.
- Checkpoints: every process writes its sampler's ``state_dict()`` into each checkpoint
  folder (``fastis_sampler_rank{r}.pt``); ``train(resume_from_checkpoint=...)`` loads it
  and continues the exact index stream. The ``Trainer``'s own skipping of the batches of a
  resumed epoch would draw (and drop) batches from the stream, so ``ignore_data_skip`` is
  set: the sampler resumes the interrupted epoch itself.
- ``log``: adds ``fastis/tau``, ``fastis/importance_share``, ``fastis/mean_weight`` to each
  training log (one host synchronisation per logging step).

Supported: causal-LM models (``*ForCausalLM``) and models whose ``labels`` are class
indices matching their logits (sequence classification ``[B]`` against ``[B, C]``, token
classification ``[B, T]`` against ``[B, T, C]``); not ``label_smoothing_factor``, nor
``compute_loss_func``, nor ``DataParallel`` (several GPUs in one process: use DDP).
"""

import os

import torch
import transformers
from torch.utils.data import DataLoader
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from fastis.integrations.common import sampler_stats
from fastis.loss import cross_entropy
from fastis.sampling import ImportanceSampler

__all__ = ["ImportanceTrainer", "SAMPLER_STATE_NAME"]

SAMPLER_STATE_NAME = "fastis_sampler_rank{rank}.pt"
IGNORE_INDEX = -100


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, dict) or hasattr(outputs, "logits"):
        return outputs["logits"]
    return outputs[0]


class _SamplerCheckpoint(transformers.TrainerCallback):
    """Writes the sampler's state into the checkpoint folder the ``Trainer`` just saved."""

    def __init__(self, trainer: "ImportanceTrainer"):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        sampler = self.trainer.sampler
        if sampler is not None:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            name = SAMPLER_STATE_NAME.format(rank=sampler.rank)
            torch.save(sampler.state_dict(), os.path.join(folder, name))
        return control


class ImportanceTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with a fastis importance sampler.

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        sampler_class: ``(num_samples, batch_size, seed=..., **sampler_kwargs) -> sampler``
            (default ``fastis.ImportanceSampler``; ``fastis.HistorySampler`` swaps in).
        sampler_kwargs: its options (``presample_size``, ``tau_th``, ``seed`` to override
            ``args.seed``, ...).
        causal_lm: whether the labels are shifted by one position against the logits
            (default: from the model's class, as the ``Trainer`` decides it).

    Attributes:
        sampler: the sampler, built by the first ``get_train_dataloader``.

    Loss normalisation. The ``Trainer`` divides the summed token losses of a
    gradient-accumulation window by ``num_items_in_batch``, the window's count of label
    tokens (summed across processes; DDP then averages the processes' gradients, hence the
    factor ``world_size``). The loader yields ``n`` rows per micro-batch: ``b`` while
    importance sampling is off, the presample of ``B`` when on, and the count covers all of
    them. Of those ``n`` rows the loss trains on the ``b`` selected with weights ``w_i``,
    and ``(n / b) sum_i w_i S_i`` (``S_i`` the summed token losses of sequence ``i``) is an
    unbiased estimate of the ``n`` rows' summed loss, so each micro-batch's loss is::

        loss = world_size * (n / b) * sum_i w_i S_i / num_items_in_batch

    which is the ``Trainer``'s own loss when off (``n = b``, ``w = 1``) and its unbiased
    estimate when on, whatever the accumulation steps (the loss is marked as already
    scaled for them).
    """

    def __init__(
        self,
        *args,
        sampler_class=None,
        sampler_kwargs=None,
        causal_lm: bool | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.sampler_class = ImportanceSampler if sampler_class is None else sampler_class
        if not callable(self.sampler_class):
            raise TypeError(f"sampler_class must be callable, got {sampler_class!r}")
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.causal_lm = causal_lm
        self.sampler = None
        self._sampler_resume: str | None = None
        if self.args.n_gpu > 1:
            raise ValueError(
                f"ImportanceTrainer runs one device per process, got n_gpu={self.args.n_gpu} "
                "(DataParallel): launch with torchrun / accelerate for DDP"
            )
        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise ValueError(
                "ImportanceTrainer computes its own weighted loss: label_smoothing_factor and "
                "compute_loss_func are not supported"
            )
        # compute_loss normalises over the accumulation window (num_items_in_batch): the
        # Trainer must not divide by the accumulation steps again (the flag that says so
        # in 4.x also makes the Trainer's own loss pass num_items_in_batch to the model,
        # so evaluation restores the model's own value)
        self._model_accepts_loss_kwargs = self.model_accepts_loss_kwargs
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.add_callback(_SamplerCheckpoint(self))

    # -- the loader -----------------------------------------------------------------------

    def make_sampler(self, num_samples: int):
        """The sampler of a training set of ``num_samples`` (override to build another)."""
        kwargs = {"seed": self.args.seed, **self.sampler_kwargs}
        return self.sampler_class(num_samples, self.args.per_device_train_batch_size, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("ImportanceTrainer: training requires a train_dataset")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf = False
        if is_hf:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        if self.sampler is None:
            self.sampler = self.make_sampler(len(dataset))
        if self._sampler_resume is not None:
            self._load_sampler(self._sampler_resume)
            self._sampler_resume = None
        args = self.args
        return DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers
            and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor
            if args.dataloader_num_workers
            else None,
        )

    # -- checkpoints ----------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in output_dir={self.args.output_dir!r}")
        if resume_from_checkpoint:
            self._sampler_resume = str(resume_from_checkpoint)
            # the sampler finishes the interrupted epoch itself: skipping batches would
            # draw and discard them from its stream
            self.args.ignore_data_skip = True
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def _load_sampler(self, folder: str) -> None:
        path = os.path.join(folder, SAMPLER_STATE_NAME.format(rank=self.sampler.rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume_from_checkpoint={folder!r} has no sampler state {os.path.basename(path)}"
                " (saved by ImportanceTrainer with as many processes?)"
            )
        self.sampler.load_state_dict(torch.load(path, weights_only=False))

    # -- the loss -------------------------------------------------------------------------

    def _shifts_labels(self) -> bool:
        if self.causal_lm is not None:
            return bool(self.causal_lm)
        model = self.accelerator.unwrap_model(self.model)
        return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def _items(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.is_floating_point():
            return torch.tensor(labels.shape[0], device=labels.device)
        if self._shifts_labels():
            labels = labels[..., 1:]
        return labels.ne(IGNORE_INDEX).sum()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The next ``num_batches`` micro-batches and their count of loss items (label
        tokens after the shift, rows for classification), summed across processes."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        count = torch.zeros((), dtype=torch.int64, device=device)
        for batch in batches:
            if "labels" not in batch:
                raise ValueError("ImportanceTrainer needs 'labels' in every training batch")
            count += self._items(batch["labels"]).to(device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The importance-weighted loss of a training micro-batch (see the class docstring
        for its normalisation); the ``Trainer``'s own loss in evaluation."""
        if not model.training or self.sampler is None:
            ours, self.model_accepts_loss_kwargs = True, self._model_accepts_loss_kwargs
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.model_accepts_loss_kwargs = ours
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("ImportanceTrainer needs 'labels' in every training batch")
        if labels.is_floating_point():
            raise ValueError(
                f"labels must be class indices (got {labels.dtype}): regression and "
                "multi-label losses are not supported"
            )
        shift = self._shifts_labels()
        targets = labels[:, 1:] if shift else labels

        def scoring(batch):  # the unwrapped model: no DDP hooks for the no-grad pass
            logits = _logits(self.model(**batch))
            return logits[:, :-1] if shift else logits

        rows_in = labels.shape[0]
        x, y, w = self.sampler.select(scoring, inputs, targets)
        outputs = model(**x)
        logits = _logits(outputs)
        logits = logits[:, :-1] if shift else logits
        total, g = cross_entropy(logits, y, sample_weight=w, reduction="sum", return_score=True)
        self.sampler.update(g)
        if num_items_in_batch is None:  # a caller of our own: this micro-batch alone
            num_items_in_batch = self._items(labels) * self.current_gradient_accumulation_steps
        scale = self.accelerator.num_processes * rows_in / w.shape[0]
        loss = total * scale / num_items_in_batch
        return (loss, outputs) if return_outputs else loss

    # -- logging --------------------------------------------------------------------------

    def log(self, logs, *args, **kwargs):
        if self.sampler is not None and "loss" in logs and self.model.training:
            logs = {**logs, **sampler_stats(self.sampler)}
        return super().log(logs, *args, **kwargs)
