"""Forward + backward of fastis.cross_entropy (with its score) against torch (pytest-benchmark).

Baselines: ``F.cross_entropy(reduction='none')`` weighted by hand plus a separate eager
score pass (what a user writes without fastis), and Liger-Kernel's cross-entropy when it
is installed (GPU only). ``bench/gpu_check.py`` reports the GPU figures (GB/s, peak memory).
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fastis
from bench.shapes import DTYPES, score_shapes
from bench.test_bench_score import eager_score

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fastis_step(z, y, w):
    loss, score = fastis.cross_entropy(z, y, sample_weight=w, return_score=True)
    loss.backward()
    return score


def fastis_inplace_step(z, y, w):
    loss, score = fastis.cross_entropy(z, y, sample_weight=w, return_score=True, inplace=True)
    loss.backward()
    return score


def torch_step(z, y, w):
    loss = (F.cross_entropy(z, y, reduction="none") * w).mean()
    with torch.no_grad():
        score = eager_score(z, y)
    loss.backward()
    return score


def liger_step(z, y, w):
    from liger_kernel.transformers.functional import liger_cross_entropy

    loss = (liger_cross_entropy(z, y, reduction="none") * w).mean()
    with torch.no_grad():
        score = eager_score(z, y)
    loss.backward()
    return score


PROVIDERS = {"fastis": fastis_step, "fastis_inplace": fastis_inplace_step, "torch": torch_step}
if DEVICE == "cuda" and importlib.util.find_spec("liger_kernel"):
    PROVIDERS["liger"] = liger_step


def inputs(N, C, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, C, generator=g) * 3).to(DEVICE, dtype).requires_grad_(True)
    target = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    weight = torch.rand(N, generator=g).to(DEVICE)
    return logits, target, weight


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", score_shapes(DEVICE), ids=lambda s: f"{s[0]}x{s[1]}")
def test_cross_entropy_forward_backward(benchmark, provider, dtype, shape):
    N, C = shape
    leaf, target, weight = inputs(N, C, dtype)
    step = PROVIDERS[provider]
    benchmark.group = f"cross_entropy fwd+bwd {N}x{C} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(bytes=2 * leaf.numel() * leaf.element_size(), device=DEVICE)

    def setup():
        leaf.grad = None
        # the in-place variant consumes its input: give it a fresh non-leaf copy, untimed
        z = leaf.clone() if provider == "fastis_inplace" else leaf
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return (z, target, weight), {}

    def run(z, y, w):
        step(z, y, w)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, setup=setup, rounds=7 if N * C >= 2**24 else 30, warmup_rounds=1)
