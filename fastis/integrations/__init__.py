"""Importance sampling inside the common training frameworks, through their public hooks.

One module per framework, each importing its framework only when imported itself
(``import fastis`` and ``import fastis.integrations`` import none of them):

- ``fastis.integrations.lightning``: PyTorch Lightning 2.x (``pip install 'fastis[lightning]'``);
- ``fastis.integrations.transformers``: the Hugging Face ``Trainer``
  (``pip install 'fastis[transformers]'``);
- ``fastis.integrations.accelerate``: Accelerate (``pip install 'fastis[accelerate]'``).

What they share, framework-free:

- ``ImportanceDataLoader``: a ``DataLoader`` over a fastis sampler (its ``batch_sampler``)
  whose ``state_dict`` holds the sampler's state of every rank, for frameworks that
  checkpoint stateful loaders;
- ``weighted_step``: one step of the per-step protocol (``select``, the weighted
  per-example loss, ``update``), with a check that a custom loss is per example;
- ``sampler_of``: the fastis sampler of a loader, refusing one wrapped a second time (a
  ``DistributedSampler``, Accelerate's ``BatchSamplerShard``, a ``BatchSampler`` around it).
"""

from fastis.integrations.common import sampler_of, weighted_step
from fastis.integrations.loader import ImportanceDataLoader

__all__ = ["ImportanceDataLoader", "sampler_of", "weighted_step"]
