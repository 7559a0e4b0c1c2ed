"""Benchmark shapes shared by the kernel benchmarks.

The full grid (up to 8192 x 131,072) is for GPUs; on the CPU the default grid stops where
the eager baseline's temporaries (a float32 softmax and an int64 one-hot) still fit in
this project's 24 GiB machines. ``FASTIS_BENCH_FULL=1`` asks for the full grid anyway.
``QUICK`` is the GPU check's smoke-run grid (``--quick``).
"""

import os

import torch

FULL = [
    (1024, 10),
    (8192, 10),
    (1024, 1000),
    (8192, 1000),
    (4096, 32000),
    (8192, 32000),
    (4096, 50257),
    (4096, 131072),
    (8192, 131072),
]
CPU = [(1024, 10), (8192, 10), (1024, 1000), (8192, 1000), (1024, 32000), (512, 131072)]
QUICK = [(1024, 10), (256, 1000)]
DTYPES = [torch.float32, torch.bfloat16]


def score_shapes(device: str) -> list[tuple[int, int]]:
    return FULL if device == "cuda" or os.environ.get("FASTIS_BENCH_FULL") else CPU
