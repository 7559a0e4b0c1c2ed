"""Alias tables where many items sit at the mean: excesses that vanish in the prefix sums.

A heavy item with ``q = N p = 1 + a few ulp`` after a large excess adds nothing to the
rounded prefix sum ``H`` of the excesses, so it ties with the previous heavy item. The
closed-form builders (``fastis._alias_torch``, ``fastis._triton.alias``) make such an item
a bucket of its own; these tests hold every builder to the exact implied distribution on
such weights (items filled at exactly the mean, at exactly ``1 / N``, at ``1 +- k ulp``,
float32 and float64, one and several scan blocks), and check the draws of the worst case.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_alias import check_draws, check_exact

from fastis import _alias_torch
from fastis.alias import AliasTable

ULP = 2.0**-52


def mean_filled(n: int, seed: int) -> torch.Tensor:
    """Log-uniform scores over two decades, about half replaced by the mean of the others,
    then mixed 9:1 with the uniform distribution (the history sampler's shape)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 4.6)
    seen = torch.rand(n, generator=g) < 0.5
    seen[0] = True
    s = torch.where(seen, s, s[seen].mean())
    return 0.9 * s / s.sum() + 0.1 / n


def near_one(n: int, k: int, sign: int) -> torch.Tensor:
    """One item of ``1.5 + z`` and ``z`` of weight 0 first (an excess of ``z ~ N / 8`` in
    ``H``), then items of ``1 + sign k ulp`` (their ``q`` round to ``1`` or a few ulp
    above, below half an ulp of ``H``), then ``0.25`` and ``1.25``: the light that the
    tied heavy items search lies past ``H`` by 0.25, so a tie that is not handled loses a
    quarter of a bucket."""
    w = torch.full((n,), 1.0 + sign * k * (ULP if sign > 0 else ULP / 2), dtype=torch.float64)
    z = max(1, n // 8)
    if n >= z + 3:
        w[0] = 1.5 + z
        w[1 : 1 + z] = 0.0
        w[-2:] = torch.tensor([0.25, 1.25], dtype=torch.float64)
    elif n > 1:
        w[0], w[1] = 2.0, 0.0
    return w


def exact_mean(n: int, seed: int) -> torch.Tensor:
    """Every other item exactly 1 (``q = 1`` when the rest average 1), the rest random."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) * 2
    w[::2] = 1.0
    if n > 1:
        w[1::2] *= w[1::2].shape[0] / w[1::2].sum()
    return w


def one_heavy(n: int) -> torch.Tensor:
    w = torch.ones(n, dtype=torch.float64)
    w[n // 2] = 50.0
    return w


def cases(sizes):
    for n in sizes:
        yield f"mean_filled-{n}", mean_filled(n, n)
        yield f"exact_mean-{n}", exact_mean(n, n)
        yield f"equal-{n}", torch.ones(n, dtype=torch.float64)
        yield f"one_heavy-{n}", one_heavy(n)
        for k in range(5):
            for sign in (1, -1):
                yield f"near_one-{n}-{sign * k}", near_one(n, k, sign)


SIZES = (1, 2, 3, 7, 30, 31, 257, 1000, 3001)
CASES = list(cases(SIZES))
TRITON_CASES = list(cases((1, 30, 257, 1500)))  # 1500: two scan blocks (interpreted: small)


def check_table(build, w):
    prob, alias, probs = build(w)
    check_exact(prob, alias, w)
    torch.testing.assert_close(probs, w.double() / w.double().sum(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,w", CASES, ids=[c[0] for c in CASES])
def test_torch_builds_are_exact(name, w, dtype):
    w = w.to(dtype)
    check_table(_alias_torch.build, w)
    check_table(_alias_torch.build_dense, w)
    # a batch: every row is its own table
    rows = torch.stack([w, w.flip(0)])
    prob, alias, _ = _alias_torch.build_dense(rows)
    for r in range(2):
        check_exact(prob[r], alias[r], rows[r])


def test_half_the_items_at_the_mean_keep_their_mass():
    # Half of 30 items at the mean: several q round to 1 + 1 ulp after a large excess.
    w = mean_filled(30, 0)
    prob, alias, probs = _alias_torch.build(w)
    m = (prob / 30).index_add(0, alias.long(), (1 - prob) / 30)
    assert (m - probs).abs().max() < 1e-15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,w", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_build_is_exact(device, name, w, dtype):
    pytest.importorskip("triton")
    from fastis._triton import alias as triton_alias

    w = w.to(dtype).to(device)
    prob, alias, probs = triton_alias.build(w)
    check_exact(prob.cpu(), alias.cpu(), w.cpu())


def test_public_table_draws(backend, device):
    # The worst case (tied heavies with the largest share of lost mass before the fix): the
    # draws, not only the table, follow w.
    w = mean_filled(30, 0)
    table = AliasTable(w.to(device))
    check_exact(table.prob.cpu(), table.alias.cpu(), w)
    idx = table.sample(200_000, generator=torch.Generator(device).manual_seed(3))
    check_draws(idx.cpu(), w)


@given(
    n=st.integers(1, 600),
    share=st.floats(0.0, 0.95),
    spread=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_mean_filled_is_exact(n, share, spread, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * spread)
    fill = torch.rand(n, generator=g) < share
    fill[0] = False
    w = torch.where(fill, s[~fill].mean(), s).to(dtype)
    check_table(_alias_torch.build, w)
    check_table(_alias_torch.build_dense, w)
