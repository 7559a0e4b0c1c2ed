"""What the score and cross-entropy benchmarks time: fastis and its baselines.

Shared by the pytest benchmarks (``bench/test_bench_*.py``, on the CPU) and the GPU check's
sections (``bench/gpu_score.py``, ``bench/gpu_cross_entropy.py``), so both time the same
calls.

- ``eager_score``: ``||softmax(z) - one_hot(y)||`` per row, what a user writes without
  fastis (a float32 softmax ``[N, C]`` and an int64 one-hot ``[N, C]`` as temporaries);
- ``inputs``: the seeded logits, targets and sample weights of a shape;
- ``cross_entropy_providers``: one weighted forward + backward with the per-sample score,
  by fastis (out of place and in place), by torch with a separate eager score pass, and by
  Liger-Kernel where it is installed (GPU only).
"""

import importlib.util

import torch
import torch.nn.functional as F

import fastis


def eager_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` logits, ``[N]`` int64 targets -> ``[N]`` float32 gradient-norm bounds."""
    return (torch.softmax(logits.float(), 1) - F.one_hot(target, logits.shape[1])).norm(dim=1)


def fastis_step(z, y, w):
    loss, score = fastis.cross_entropy(z, y, sample_weight=w, return_score=True)
    loss.backward()
    return score


def fastis_inplace_step(z, y, w):
    """Overwrites ``z`` with its gradient: hand it a copy (a non-leaf) each call."""
    loss, score = fastis.cross_entropy(z, y, sample_weight=w, return_score=True, inplace=True)
    loss.backward()
    return score


def _with_eager_score(loss_rows, z, y, w):
    loss = (loss_rows * w).mean()
    with torch.no_grad():
        score = eager_score(z, y)
    loss.backward()
    return score


def torch_step(z, y, w):
    return _with_eager_score(F.cross_entropy(z, y, reduction="none"), z, y, w)


def liger_step(z, y, w):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return _with_eager_score(liger_cross_entropy(z, y, reduction="none"), z, y, w)


def cross_entropy_providers(device) -> dict:
    """``{name: step(z, y, w) -> score}``; Liger only on CUDA and when installed."""
    providers = {"fastis": fastis_step, "fastis_inplace": fastis_inplace_step, "torch": torch_step}
    if torch.device(device).type == "cuda" and importlib.util.find_spec("liger_kernel"):
        providers["liger"] = liger_step
    return providers


def inputs(N: int, C: int, dtype: torch.dtype, device):
    """Seeded ``(logits [N, C] dtype, target [N] int64, weight [N] float32)`` made on
    ``device``; the logits are ``3 * randn`` so that the softmax is neither flat nor
    one-hot. The cross-entropy benchmarks make the logits a leaf that requires grad."""
    g = torch.Generator(device).manual_seed(0)
    logits = (torch.randn(N, C, generator=g, device=device) * 3).to(dtype)
    target = torch.randint(0, C, (N,), generator=g, device=device)
    weight = torch.rand(N, generator=g, device=device)
    return logits, target, weight
