"""Draws of fastis.AliasTable / fastis.sample: exact oracles, item-by-item frequencies.

Every draw is checked twice. Index for index against an oracle that takes the same random
numbers (the generator's, or the Triton kernels' Philox stream, reproduced here from its
published definition) through a float64 computation written independently of the package;
and statistically, each item's count against ``n p`` with a z limit, on fixed seeds. Every
``sample`` method is reached through its public regime of ``(N, n)`` (see the docstring of
``fastis.sample``), on both backends.
"""

import numpy as np
import pytest
import torch
from conftest import BACKENDS
from test_alias import check_exact, check_frequencies, make_weights

from fastis.alias import AliasTable, sample

# -- oracles ---------------------------------------------------------------------------------

_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox4x32-10 (Salmon et al., SC 2011): four uint32 counter words (uint64 arrays)
    and two key words to four uint32 words."""
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # 32 x 32 -> 64-bit products
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _MASK,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _MASK,
        )
        k0, k1 = (k0 + w0) & _MASK, (k1 + w1) & _MASK
    return [c0, c1, c2, c3]


@pytest.mark.parametrize(
    "counter,key,expect",
    [  # Random123's known-answer vectors
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expect):
    words = philox4x32_10([np.array([c]) for c in counter], key)
    assert tuple(int(w[0]) for w in words) == expect


def uniform53(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from the top 27 bits of ``a`` and 26 of ``b``."""
    hi = (a >> np.uint64(5)).astype(np.float64)
    lo = (b >> np.uint64(6)).astype(np.float64)
    return (hi * 2.0**26 + lo) / 2.0**53


def kernel_seed(generator: torch.Generator) -> int:
    """The Philox key a Triton draw takes from ``generator``: one int64 in [0, 2^62)."""
    dev = generator.device
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev, dtype=torch.int64))


def philox_words(generator: torch.Generator, n: int) -> list[np.ndarray]:
    """The kernel's four words for draws ``i < n`` (``tl.randint4x(seed, i)``: counter
    ``(i_lo, i_hi, 0, 0)``, key ``(seed_lo, seed_hi)``), advancing ``generator``."""
    i = np.arange(n, dtype=np.uint64)
    zero = np.zeros_like(i)
    seed = kernel_seed(generator)
    return philox4x32_10(
        [i & _MASK, i >> np.uint64(32), zero, zero], (seed & 0xFFFFFFFF, seed >> 32)
    )


def icdf_oracle(w: torch.Tensor, u: np.ndarray) -> np.ndarray:
    """float64 inverse CDF: the first item whose prefix sum passes ``u * total``."""
    c = np.cumsum(w.double().cpu().numpy(), -1)
    idx = np.searchsorted(c, u * c[-1], side="right")
    return np.minimum(idx, np.flatnonzero(w.double().cpu().numpy() > 0)[-1])


def table_oracle(table: AliasTable, bucket: np.ndarray, coin: np.ndarray) -> np.ndarray:
    """Walker's draw: keep ``bucket`` if ``coin < prob[bucket]``, else its alias."""
    prob, alias = table.prob.cpu().numpy(), table.alias.cpu().numpy().astype(np.int64)
    return np.where(coin < prob[bucket], bucket, alias[bucket])


def table_draw_oracle(backend, table: AliasTable, g: torch.Generator, n: int) -> np.ndarray:
    """The indices ``table.sample(n)`` must return from generator state ``g``."""
    num = len(table)
    if backend == "triton":
        r0, r1, r2, r3 = philox_words(g, n)
        bucket = (((r0 << np.uint64(32)) | r1) % np.uint64(num)).astype(np.int64)
        return table_oracle(table, bucket, uniform53(r2, r3))
    # torch path: 63 random bits for the bucket, then a float64 coin
    bits = torch.empty(n, dtype=torch.int64, device=g.device).random_(generator=g)
    coin = torch.rand(n, dtype=torch.float64, device=g.device, generator=g)
    return table_oracle(table, (bits % num).cpu().numpy(), coin.cpu().numpy())


# -- statistics ------------------------------------------------------------------------------


def head_weights(n_cat: int, seed: int = 0) -> torch.Tensor:
    """Item 0 holds 30% of the mass, then a few heavy items, a long tail and zeros: a 10%
    error on item 0's rate is z ~ 9 at 20,000 draws (z ~ 4 at 4,000)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n_cat, generator=g, dtype=torch.float64)
    w[torch.rand(n_cat, generator=g) < 0.2] = 0.0
    w[1 : 1 + min(4, n_cat - 1)] *= 0.05 * n_cat
    w[0] = 0.0
    w[0] = 0.3 / 0.7 * w.sum()
    return w


# Regimes of ``sample`` (its docstring): (N, n) -> the method each backend then runs.
# torch: inverse CDF for n < N / 4 + 2048, else a table. triton: the fused one-shot kernel
# for N <= 2^14 and n N <= 2^26; otherwise the inverse CDF for n <= N, else a table.
REGIMES = {
    ("torch", "icdf"): (2**16, 18_000),
    ("torch", "table"): (1000, 20_000),
    ("triton", "fused"): (30, 4000),  # the interpreter runs this kernel slowly: fewer draws
    ("triton", "icdf"): (2**16, 18_000),
    ("triton", "table"): (1000, 70_000),
}


REGIME_CASES = [r for r in REGIMES if r[0] in BACKENDS]


@pytest.fixture(params=REGIME_CASES, ids=lambda r: "-".join(r))
def regime(request, monkeypatch):
    """``(backend, method)``, the backend forced as the ``backend`` fixture forces it."""
    monkeypatch.setenv("FASTIS_BACKEND", request.param[0])
    return request.param


# -- table draws -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,n_cat", [("head", 1000), ("zeros", 2000), ("wide", 700)])
def test_table_draws_match_oracle(backend, device, kind, n_cat):
    w = head_weights(n_cat) if kind == "head" else make_weights(kind, n_cat)
    w = w.to(device)
    table = AliasTable(w)
    check_exact(table.prob, table.alias, w)
    g = torch.Generator(device).manual_seed(1234)
    expect = table_draw_oracle(backend, table, g.clone_state(), 20_000)
    idx, p = table.sample(20_000, generator=g, return_probs=True)
    np.testing.assert_array_equal(idx.cpu().numpy(), expect)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, (w.double() / w.double().sum())[idx], rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind,n_cat", [("head", 1000), ("head", 5), ("zeros", 2000)])
def test_table_draw_frequencies(backend, device, kind, n_cat):
    w = (head_weights(n_cat) if kind == "head" else make_weights(kind, n_cat)).to(device)
    idx = AliasTable(w).sample(100_000, generator=torch.Generator(device).manual_seed(5))
    check_frequencies(idx, w)


# -- sample(): each regime, exact and statistically ------------------------------------------


def sample_oracle(backend, method, w, g, n):
    """What ``sample(w, n)`` must return from generator state ``g`` in ``method``'s regime."""
    if method == "fused":
        r0, r1, _, _ = philox_words(g, n)
        return icdf_oracle(w, uniform53(r0, r1))
    if method == "icdf":
        u = torch.rand(n, dtype=torch.float64, device=g.device, generator=g)
        return icdf_oracle(w, u.cpu().numpy())
    return table_draw_oracle(backend, AliasTable(w), g, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sample_matches_oracle(regime, device, dtype):
    backend, method = regime
    n_cat, n = REGIMES[regime]
    w = head_weights(n_cat).to(dtype).to(device)
    g = torch.Generator(device).manual_seed(42)
    expect = sample_oracle(backend, method, w, g.clone_state(), n)
    idx, p = sample(w, n, generator=g, return_probs=True)
    np.testing.assert_array_equal(idx.cpu().numpy(), expect)
    assert p.dtype == torch.promote_types(dtype, torch.float32)
    exact = (w.double() / w.double().sum())[idx]
    torch.testing.assert_close(
        p.double(), exact, rtol=1e-7 if p.dtype == torch.float32 else 1e-12, atol=0
    )


def test_sample_frequencies(regime, device):
    n_cat, n = REGIMES[regime]
    w = head_weights(n_cat, seed=1).float().to(device)
    idx = sample(w, n, generator=torch.Generator(device).manual_seed(9))
    check_frequencies(idx, w)


def test_fused_oracle_frequencies():
    """The fused kernel's oracle (its Philox uniforms through a float64 inverse CDF) draws
    each item at its rate, at 400,000 draws. With the kernel equal to it index for index
    (``test_sample_matches_oracle``), the kernel's rates are checked at this precision too,
    where running it on 400,000 draws under the interpreter would take minutes."""
    w = head_weights(30, seed=1).float()
    r0, r1, _, _ = philox_words(torch.Generator().manual_seed(9), 400_000)
    check_frequencies(torch.from_numpy(icdf_oracle(w, uniform53(r0, r1))), w)


@pytest.mark.parametrize("kind,n_cat", [("zeros", 300), ("wide", 200), ("one", 1), ("two", 2)])
def test_fused_draw_matches_oracle(device, monkeypatch, kind, n_cat):
    """The fused one-shot kernel on awkward weights (zeros, 60 decades, N of 1 and 2), and
    on several blocks of its scan (N = 300 > 128)."""
    if "triton" not in BACKENDS:
        pytest.skip("needs triton")
    monkeypatch.setenv("FASTIS_BACKEND", "triton")
    w = make_weights(kind, n_cat).float().to(device)
    g = torch.Generator(device).manual_seed(7)
    expect = sample_oracle("triton", "fused", w, g.clone_state(), 1000)
    np.testing.assert_array_equal(sample(w, 1000, generator=g).cpu().numpy(), expect)


def test_batch_icdf_matches_oracle(backend, device):
    """A batch [R, N] draws each row from its own inverse CDF, rows in order."""
    w = torch.stack([head_weights(300, seed=s) for s in range(4)]).float().to(device)
    g = torch.Generator(device).manual_seed(3)
    u = torch.rand((4, 500), dtype=torch.float64, device=device, generator=g.clone_state())
    idx = sample(w, 500, generator=g)
    for r in range(4):
        np.testing.assert_array_equal(idx[r].cpu().numpy(), icdf_oracle(w[r], u[r].cpu().numpy()))


@pytest.mark.parametrize("method", ["icdf", "table"])
def test_batch_frequencies(backend, device, method):
    n = 2000 if method == "icdf" else 40_000  # regimes for N = 100: n < 2073, else a table
    w = torch.stack([head_weights(100, seed=s) for s in range(3)]).to(device)
    table = AliasTable(w)
    idx = sample(w, n, generator=torch.Generator(device).manual_seed(8))
    assert idx.shape == (3, n)
    tab = table.sample(40_000, generator=torch.Generator(device).manual_seed(8))
    for r in range(3):
        check_exact(table.prob[r], table.alias[r], w[r])
        check_frequencies(idx[r], w[r])
        check_frequencies(tab[r], w[r])


# -- randomness ------------------------------------------------------------------------------


def test_determinism_and_generator_advances(backend, device):
    w = make_weights("zipf", 500).float().to(device)
    table = AliasTable(w)
    for draw in (
        lambda g: table.sample(3000, generator=g),
        lambda g: sample(w, 100, generator=g),
        lambda g: sample(w, 140_000, generator=g),  # a table on both paths
    ):
        g1 = torch.Generator(device).manual_seed(5)
        g2 = torch.Generator(device).manual_seed(5)
        a1 = draw(g1)
        assert torch.equal(a1, draw(g2))
        state = g1.get_state()
        b1 = draw(g1)
        assert not torch.equal(g1.get_state(), state)
        assert not torch.equal(a1, b1)


def test_default_generator(backend, device):
    w = make_weights("zipf", 200).float().to(device)
    table = AliasTable(w)
    torch.manual_seed(11)
    a = table.sample(1000), sample(w, 50)
    torch.manual_seed(11)
    b = table.sample(1000), sample(w, 50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
