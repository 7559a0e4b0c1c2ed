"""Samplers of training examples: ``ImportanceSampler`` (Algorithm 1 of Katharopoulos &
Fleuret, ICML 2018) and ``HistorySampler`` (stale scores, no extra forward pass).

Both are ``torch.utils.data.Sampler`` s of index lists, usable as a ``DataLoader``'s
``batch_sampler`` or iterated directly in a hand-written loop (``index_tensors(device)``
yields the same batches as int64 tensors), and share one per-step protocol::

    for idx in sampler:                                  # a list of indices
        x, y = X[idx], Y[idx]                            # or a DataLoader's batch
        x, y, w = sampler.select(model, x, y)            # training batch and weights
        loss, g = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
        sampler.update(g)                                # scores of the training batch
        optimizer.zero_grad(); loss.backward(); optimizer.step()

The modules, one job each:

- ``importance``: ``ImportanceSampler``, the wiring of one step; ``importance_state``:
  its checkpoint format; ``importance_report``: what a user reads (``tau``, ``stats()``);
- ``history``: ``HistorySampler``;
- ``switch``: ``compute_tau``, ``default_tau_th`` and the smoothed ``tau`` with its host
  read;
- ``measured``: ``MeasuredSwitch``, the opt-in switch from measured step costs, the
  variance reduction and a progress signal;
- ``lr_gain``: ``LRGain``, the opt-in learning-rate gain while importance sampling is
  on (AdaScale's, from the variance reduction and the gradients' noise share);
- ``reuse``: amortised scoring, one scored presample serving ``draws_per_presample``
  steps;
- ``noise``: an importance step's gradient noise against a uniform batch, and the
  constant-noise batch size;
- ``draw``: an importance step's scoring pass, draw, weights and counters;
- ``score_history``: the per-example scores and the probabilities built from them;
- ``stream``: the queue of yielded batches, epochs, seeds, the per-pass permutations and
  their resume;
- ``batches``: cutting rows out of nested inputs (tensors, tuples, dicts);
- ``checks``: argument and checkpoint validation.
"""

from fastis.sampling.history import HistorySampler
from fastis.sampling.importance import ImportanceSampler
from fastis.sampling.lr_gain import LRGain
from fastis.sampling.measured import MeasuredSwitch
from fastis.sampling.switch import compute_tau, default_tau_th

__all__ = [
    "HistorySampler",
    "ImportanceSampler",
    "LRGain",
    "MeasuredSwitch",
    "compute_tau",
    "default_tau_th",
]
