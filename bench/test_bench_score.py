"""fastis.score against the eager composition and torch.compile of it (pytest-benchmark).

Run: ``python -m pytest bench/test_bench_score.py --benchmark-json=out.json`` and
``python bench/report.py out.json`` for the ratio table. On the CPU this times the torch
path; the GPU numbers (GB/s, fraction of copy bandwidth) come from ``bench/gpu_check.py``.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import fastis
from bench.shapes import DTYPES, score_shapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def eager_score(logits, target):
    return (torch.softmax(logits.float(), 1) - F.one_hot(target, logits.shape[1])).norm(dim=1)


@functools.cache
def compiled_score():
    return torch.compile(eager_score)


PROVIDERS = {
    "fastis": fastis.score,
    "eager": eager_score,
    "compile": lambda z, y: compiled_score()(z, y),
}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", score_shapes(DEVICE), ids=lambda s: f"{s[0]}x{s[1]}")
def test_score(benchmark, provider, dtype, shape):
    N, C = shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, C, generator=g) * 3).to(DEVICE, dtype)
    target = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    fn = PROVIDERS[provider]
    fn(logits, target)  # warm up (and compile)
    benchmark.group = f"score {N}x{C} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(bytes=logits.numel() * logits.element_size(), device=DEVICE)

    def run():
        fn(logits, target)
        _sync()

    benchmark(run)
