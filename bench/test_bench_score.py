"""fastis.score against the eager composition and torch.compile of it (pytest-benchmark).

Run: ``python -m pytest bench/test_bench_score.py --benchmark-json=out.json`` and
``python -m bench.report out.json`` for the ratio table. On the CPU this times the torch
path; the GPU numbers (GB/s, fraction of copy bandwidth) come from ``python -m
bench.gpu_check`` (``bench/gpu_score.py``).
"""

import functools

import pytest
import torch

import fastis
from bench._timing import sync
from bench.providers import eager_score, inputs
from bench.shapes import DTYPES, score_shapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def compiled_score():
    return torch.compile(eager_score)


PROVIDERS = {
    "fastis": fastis.score,
    "eager": eager_score,
    "compile": lambda z, y: compiled_score()(z, y),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", score_shapes(DEVICE), ids=lambda s: f"{s[0]}x{s[1]}")
def test_score(benchmark, provider, dtype, shape):
    N, C = shape
    logits, target, _ = inputs(N, C, dtype, DEVICE)
    fn = PROVIDERS[provider]
    fn(logits, target)  # warm up (and compile)
    benchmark.group = f"score {N}x{C} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(bytes=logits.numel() * logits.element_size(), device=DEVICE)

    def run():
        fn(logits, target)
        sync(DEVICE)

    benchmark(run)
