"""fastis.AliasTable / fastis.sample against torch.multinomial and numpy's choice (CPU).

Run: ``python -m pytest bench/test_bench_alias.py --benchmark-json=out.json`` and
``python -m bench.report out.json`` for the ratio table (``bench/results/alias_cpu.md``).
The default grid takes a couple of minutes on a 2-core machine; ``FASTIS_BENCH_FULL=1``
adds N up to 2^26 and n up to 2^22 (several minutes, ~10 GiB). GPU timings come from
``python -m bench.gpu_check --parts alias`` (``bench/gpu_alias.py``).

Groups (the first provider of each is the baseline of the report's ratios):

- ``build N``: ``AliasTable(w)`` against one float64 ``torch.sum`` of ``w`` (a single read of
  the weights: the floor of any build) and ``torch.cumsum`` (the inverse CDF's preparation).
- ``draw N n``: ``table.sample(n)`` from a built table against a call of
  ``torch.multinomial(w, n, replacement=True)`` (N <= 2^24 only) and
  ``numpy.random.Generator.choice(N, n, p=p)``: the baselines have no table, so every call
  pays their O(N) preparation, which is exactly what a table saves when it serves many draws.
- ``oneshot N n``: ``fastis.sample(w, n)`` against the same two baselines.
- ``batch R N n``: ``fastis.sample`` of ``[R, N]`` weights against 2-D ``torch.multinomial``.
- ``rule N n``: the two methods ``fastis.sample`` chooses between, inverse CDF and table
  (build + draw), for the dispatch rule in ``fastis.alias``.
"""

import os

import numpy as np
import pytest
import torch

import fastis.alias as fa
from fastis import _alias_torch

FULL = bool(os.environ.get("FASTIS_BENCH_FULL"))
MULTINOMIAL_MAX = 2**24

BUILD_N = [2**10, 2**16, 2**20, 10**7] + ([2**22, 2**24, 2**25, 2**26] if FULL else [])
DRAW_GRID = [(2**10, 2**10), (2**10, 2**20), (2**16, 2**16), (2**20, 2**10), (2**20, 2**20)]
if FULL:
    DRAW_GRID += [(2**24, 2**20), (2**24, 2**22), (2**26, 2**22), (2**16, 2**22)]
ONESHOT_GRID = [(384, 128), (4096, 1024), (2**16, 2**10), (2**20, 2**14)]
if FULL:
    ONESHOT_GRID += [(2**24, 2**16), (2**26, 2**16)]
RULE_GRID = [(N, N * r // 8) for N in (2**10, 2**14, 2**18) for r in (1, 2, 4, 8, 16, 32)]
RULE_GRID += [(2**20, 2**20 * r // 16) for r in (1, 2, 4, 8)]


def _weights(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, generator=g) ** 4  # skewed, no zeros


def _rounds(work: int) -> int:
    """Enough rounds for a median, few for the big sizes (~1e8 elements a round)."""
    return max(3, min(30, 10**8 // max(work, 1)))


def _run(benchmark, fn, work):
    fn()  # warm up
    benchmark.pedantic(fn, rounds=_rounds(work), iterations=1)


@pytest.mark.parametrize("provider", ["fastis", "sum", "cumsum"])
@pytest.mark.parametrize("N", BUILD_N)
def test_build(benchmark, provider, N):
    w = _weights(N)
    fn = {
        "fastis": lambda: fa.AliasTable(w),
        "sum": lambda: torch.sum(w, dtype=torch.float64),
        "cumsum": lambda: torch.cumsum(w, 0, dtype=torch.float64),
    }[provider]
    benchmark.group = f"build N={N}"
    benchmark.extra_info.update(N=N, bytes=4 * N)
    _run(benchmark, fn, 8 * N if provider == "fastis" else N)


def _baselines(w: torch.Tensor, n: int):
    N = w.shape[0]
    tg = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    p = (w.double() / w.double().sum()).numpy()
    return {
        "multinomial": (lambda: torch.multinomial(w, n, replacement=True, generator=tg))
        if N <= MULTINOMIAL_MAX
        else None,
        "numpy": lambda: rng.choice(N, size=n, p=p),
    }


@pytest.mark.parametrize("provider", ["fastis", "multinomial", "numpy"])
@pytest.mark.parametrize("N,n", DRAW_GRID, ids=lambda v: str(v))
def test_draw(benchmark, provider, N, n):
    w = _weights(N)
    if provider == "fastis":
        table = fa.AliasTable(w)
        g = torch.Generator().manual_seed(0)
        fn = lambda: table.sample(n, generator=g)  # noqa: E731
        work = 4 * n
    else:
        fn = _baselines(w, n)[provider]
        work = 4 * N + 8 * n
    if fn is None:
        pytest.skip(f"torch.multinomial refuses N = {N} > 2^24 categories")
    benchmark.group = f"draw N={N} n={n}"
    benchmark.extra_info.update(N=N, n=n)
    _run(benchmark, fn, work)


@pytest.mark.parametrize("provider", ["fastis", "multinomial", "numpy"])
@pytest.mark.parametrize("N,n", ONESHOT_GRID, ids=lambda v: str(v))
def test_oneshot(benchmark, provider, N, n):
    w = _weights(N)
    if provider == "fastis":
        g = torch.Generator().manual_seed(0)
        fn = lambda: fa.sample(w, n, generator=g, return_probs=True)  # noqa: E731
    else:
        fn = _baselines(w, n)[provider]
    if fn is None:
        pytest.skip(f"torch.multinomial refuses N = {N} > 2^24 categories")
    benchmark.group = f"oneshot N={N} n={n}"
    benchmark.extra_info.update(N=N, n=n)
    _run(benchmark, fn, 4 * N + 8 * n)


@pytest.mark.parametrize("provider", ["icdf", "table"])
@pytest.mark.parametrize("N,n", RULE_GRID, ids=lambda v: str(v))
def test_rule(benchmark, provider, N, n):
    w = _weights(N)
    g = torch.Generator().manual_seed(0)
    if provider == "icdf":

        def fn():
            return _alias_torch.sample_cdf(_alias_torch.cdf(w), n, g)

    else:

        def fn():
            prob, alias, _ = _alias_torch.build(w)
            return _alias_torch.sample_table(prob, alias, n, g)

    benchmark.group = f"rule N={N} n={n} (n/N={n / N:g})"
    benchmark.extra_info.update(N=N, n=n)
    _run(benchmark, fn, 8 * N + 8 * n)


@pytest.mark.parametrize("provider", ["fastis", "multinomial"])
@pytest.mark.parametrize("R,N,n", [(64, 4096, 1024), (256, 384, 128)], ids=lambda v: str(v))
def test_batch(benchmark, provider, R, N, n):
    w = torch.stack([_weights(N + r)[:N] for r in range(R)])
    g = torch.Generator().manual_seed(0)
    if provider == "fastis":
        fn = lambda: fa.sample(w, n, generator=g)  # noqa: E731
    else:
        fn = lambda: torch.multinomial(w, n, replacement=True, generator=g)  # noqa: E731
    benchmark.group = f"batch R={R} N={N} n={n}"
    benchmark.extra_info.update(R=R, N=N, n=n)
    _run(benchmark, fn, R * (4 * N + 8 * n))
