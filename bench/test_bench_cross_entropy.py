"""Forward + backward of fastis.cross_entropy (with its score) against torch (pytest-benchmark).

Baselines (``bench/providers.py``): ``F.cross_entropy(reduction='none')`` weighted by hand
plus a separate eager score pass (what a user writes without fastis), and Liger-Kernel's
cross-entropy when it is installed (GPU only). ``python -m bench.gpu_check`` reports the
GPU figures (GB/s, peak memory; ``bench/gpu_cross_entropy.py``).
"""

import pytest
import torch

from bench._timing import sync
from bench.providers import cross_entropy_providers, inputs
from bench.shapes import DTYPES, score_shapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = cross_entropy_providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", score_shapes(DEVICE), ids=lambda s: f"{s[0]}x{s[1]}")
def test_cross_entropy_forward_backward(benchmark, provider, dtype, shape):
    N, C = shape
    leaf, target, weight = inputs(N, C, dtype, DEVICE)
    leaf.requires_grad_(True)
    step = PROVIDERS[provider]
    benchmark.group = f"cross_entropy fwd+bwd {N}x{C} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(bytes=2 * leaf.numel() * leaf.element_size(), device=DEVICE)

    def setup():
        leaf.grad = None
        # the in-place variant consumes its input: give it a fresh non-leaf copy, untimed
        z = leaf.clone() if provider == "fastis_inplace" else leaf
        sync(DEVICE)
        return (z, target, weight), {}

    def run(z, y, w):
        step(z, y, w)
        sync(DEVICE)

    benchmark.pedantic(run, setup=setup, rounds=7 if N * C >= 2**24 else 30, warmup_rounds=1)
