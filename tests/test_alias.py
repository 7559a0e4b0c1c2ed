"""fastis.AliasTable: the tables are exact, on every builder, past 2^24 categories.

Every test that takes ``backend`` runs the torch path and the Triton kernels (under
TRITON_INTERPRET=1 without a GPU, so those cases use small N and n). The draws have their
own file (``test_alias_draws.py``: exact oracles, item-by-item rates), and so do bad input
and state (``test_alias_input.py``). This file also holds the helpers the other two import.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fastis import _alias_torch
from fastis.alias import AliasTable, sample

P_MIN = 1e-4  # chi-square p-value floor; seeds are fixed, so a pass is a pass


def make_weights(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.ones(n)
    if kind == "zipf":
        return 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.1
    if kind == "dominant":
        w = torch.rand(n, generator=g)
        w[n // 3] = 1e3 * n
        return w
    if kind == "zeros":  # 90% zeros
        w = torch.rand(n, generator=g, dtype=torch.float64)
        w[torch.rand(n, generator=g) < 0.9] = 0.0
        w[n // 2] = 0.5
        return w
    if kind == "two":
        return torch.tensor([0.3, 0.7])
    if kind == "one":
        return torch.tensor([2.5])
    if kind == "wide":  # 1e-30 .. 1e30, log-uniform
        return 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 60 - 30)
    if kind == "wide_flat":  # 1e-30 .. 1e30 in a few decades each, so the chi-square sees many
        e = torch.randint(-30, 31, (n,), generator=g).double()
        return 10.0 ** (e / 30.0) * torch.where(torch.arange(n) % 7 == 0, 1e30, 1e-30)
    if kind == "steps":  # whole scan blocks of heavy, light and weight-0 items
        i = torch.arange(n)
        return torch.where(i < 1100, 10.0, torch.where((i >= 2100) & (i < 3200), 0.0, 1.0))
    raise ValueError(kind)


def implied(prob: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
    """The distribution a table draws from: (prob[k] + sum_{alias[i] = k} (1 - prob[i])) / N."""
    m = prob.double().clone()
    m.index_add_(0, alias.long(), 1.0 - prob.double())
    return m / prob.shape[0]


def check_exact(table_prob, table_alias, weights):
    """The table's implied distribution is w / sum(w) to float64 precision: prefix sums of
    magnitude <= N round to ~N * 2^-53 absolute in bucket units (the mass of a heavy item,
    the only kind built from prefix sums, is >= 1 bucket)."""
    rtol = 1e-14 + 32 * weights.shape[0] * 2.0**-53
    p = weights.double() / weights.double().sum()
    m = implied(table_prob.cpu(), table_alias.cpu())
    assert ((table_prob >= 0) & (table_prob <= 1)).all()
    assert table_alias.min() >= 0 and table_alias.max() < weights.shape[0]
    torch.testing.assert_close(m, p.cpu(), rtol=rtol, atol=0.0)
    assert (m[p == 0] == 0).all()  # weight-0 items have no mass at all


def check_draws(idx: torch.Tensor, weights: torch.Tensor, groups: int | None = None):
    """Chi-square goodness of fit of int64 draws ``idx`` against ``weights``."""
    assert idx.dtype == torch.int64
    n_cat = weights.shape[0]
    p = (weights.double() / weights.double().sum()).numpy()
    idx = idx.cpu().numpy()
    assert idx.min() >= 0 and idx.max() < n_cat
    assert (p[idx] > 0).all(), "drew a weight-0 item"
    counts = np.bincount(idx, minlength=n_cat).astype(np.float64)
    if groups is not None:  # contiguous groups of categories (for N too large to bin)
        counts = counts.reshape(groups, -1).sum(1)
        p = p.reshape(groups, -1).sum(1)
    expected = p * idx.shape[0]
    # pool the categories expected fewer than 5 times into one bin
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if obs.shape[0] < 2:
        assert obs.sum() == idx.shape[0]
        return
    exp *= obs.sum() / exp.sum()  # remove float rounding of the total
    assert stats.chisquare(obs, exp).pvalue > P_MIN


def check_frequencies(idx: torch.Tensor, weights: torch.Tensor, alpha: float = 1e-3):
    """Each item's count against ``n p`` (items expected fewer than 20 times pooled into one
    bin): max |z| below the Bonferroni limit for family-wise level ``alpha`` (3.9 to 5.3 for
    1 to 1000 bins; the seeds are fixed, so a pass is a pass). Weight-0 items never drawn."""
    assert idx.dtype == torch.int64
    p = (weights.double() / weights.double().sum()).cpu().numpy()
    idx = idx.cpu().numpy()
    n = idx.shape[0]
    assert idx.min() >= 0 and idx.max() < p.shape[0]
    assert (p[idx] > 0).all(), "drew a weight-0 item"
    counts = np.bincount(idx, minlength=p.shape[0]).astype(np.float64)
    big = p * n >= 20
    obs = np.append(counts[big], counts[~big].sum())
    q = np.append(p[big], p[~big].sum())
    keep = (q > 0) & (q < 1)
    obs, q = obs[keep], q[keep]
    if q.shape[0] == 0:
        return
    z = (obs - n * q) / np.sqrt(n * q * (1 - q))
    limit = stats.norm.isf(alpha / (2 * q.shape[0]))
    worst = int(np.abs(z).argmax())
    assert np.abs(z).max() < limit, f"bin {worst}: z = {z[worst]:.2f} (limit {limit:.2f})"


CASES = [
    ("uniform", 1000),
    ("zipf", 1000),
    ("dominant", 517),
    ("zeros", 2000),
    ("two", 2),
    ("one", 1),
    ("wide", 1000),
    ("wide_flat", 700),
]


@pytest.mark.parametrize("kind,n_cat", CASES)
def test_table_goodness_of_fit(backend, device, kind, n_cat):
    w = make_weights(kind, n_cat).to(device)
    table = AliasTable(w)
    check_exact(table.prob, table.alias, w)
    g = torch.Generator(device).manual_seed(1234)
    check_frequencies(table.sample(40_000, generator=g), w)


@pytest.mark.parametrize("build", ["build", "build_dense"])
@pytest.mark.parametrize("kind,n_cat", CASES + [("zipf", 10**5), ("zeros", 10**5)])
def test_torch_builds_match_input(build, kind, n_cat):
    w = make_weights(kind, n_cat)
    prob, alias, probs = getattr(_alias_torch, build)(w)
    check_exact(prob, alias, w)
    torch.testing.assert_close(probs, w.double() / w.double().sum(), rtol=1e-15, atol=0)


TRITON_KINDS = ["uniform", "zipf", "dominant", "zeros", "wide", "steps"]
TRITON_CASES = [  # up to 3 scan blocks for every kind, 9 for two (the two-level search)
    (k, n) for k in TRITON_KINDS for n in (1, 2, 3, 5, 17, 1000, 1023, 1024, 1025, 3001)
] + [("zeros", 9000), ("steps", 9000)]


@pytest.mark.parametrize("kind,n_cat", TRITON_CASES)
def test_triton_table_matches_input(device, kind, n_cat):
    """The two-pass kernel build: exact, and the same distribution as the torch build. Sizes
    past one scan block reach the block offsets and the two-level searches; "steps" has
    blocks with no light item, no heavy item, and only weight-0 items."""
    pytest.importorskip("triton")
    from fastis._triton import alias as tri

    if kind == "zeros" and n_cat < 3:
        kind = "zipf"
    w = make_weights(kind, n_cat).to(device)
    prob, alias, probs = tri.build(w)
    check_exact(prob, alias, w)
    torch.testing.assert_close(probs, w.double() / w.double().sum(), rtol=1e-15, atol=0)
    ref_prob, ref_alias, _ = _alias_torch.build(w.cpu())
    torch.testing.assert_close(
        implied(prob.cpu(), alias.cpu()), implied(ref_prob, ref_alias), rtol=1e-12, atol=0
    )


def test_large_beyond_multinomial_limit():
    """N = 2^25 (> torch.multinomial's 2^24) with weights over 30 orders of magnitude."""
    n_cat = 2**25
    g = torch.Generator().manual_seed(7)
    w = 10.0 ** (torch.rand(n_cat, generator=g) * 30 - 15)  # float32, 1e-15 .. 1e15
    w[::97] = 0.0
    table = AliasTable(w)
    assert table.alias.dtype == torch.int32
    p = w.double() / w.double().sum()
    m = implied(table.prob, table.alias)
    pos = p > 0
    rel = ((m[pos] - p[pos]).abs() / p[pos]).max().item()
    assert rel < 1e-6, rel
    assert (m[~pos] == 0).all()
    del m, p
    AliasTable(torch.ones(1)).load_state_dict(table.state_dict())  # its validation agrees
    idx = table.sample(2**22, generator=torch.Generator().manual_seed(8))
    assert idx[idx >= 2**24].numel() > 0
    check_draws(idx, w, groups=2**10)


def test_uniform_large_groups():
    """Past 2^24 categories, every index range is drawn at its rate (uniform, sample())."""
    n_cat = 2**25
    idx = sample(torch.ones(n_cat), 2**21, generator=torch.Generator().manual_seed(3))
    check_draws(idx, torch.ones(n_cat), groups=2**9)


def test_strided_and_grad_weights(backend, device):
    base = make_weights("zipf", 600).float().to(device).requires_grad_()
    w = base[::3]  # a non-contiguous view that requires grad
    table = AliasTable(w)
    check_exact(table.prob, table.alias, w.detach())
    g = torch.Generator(device).manual_seed(4)
    check_draws(table.sample(20_000, generator=g), w.detach())
    for n in (64, 3000):  # the torch path's two methods (the fused kernel on triton)
        idx, p = sample(w, n, generator=g, return_probs=True)
        assert not p.requires_grad and not idx.requires_grad
        torch.testing.assert_close(p.double(), (w.double() / w.double().sum())[idx].detach())


@settings(max_examples=40)
@given(
    weights=st.lists(
        st.one_of(
            st.just(0.0),
            st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=300,
    ).filter(lambda ws: any(x > 0 for x in ws) and sum(ws) < 1e307)
)
def test_property_table_is_exact(weights):
    w = torch.tensor(weights, dtype=torch.float64)
    for build in (_alias_torch.build, _alias_torch.build_dense):
        prob, alias, probs = build(w)
        check_exact(prob, alias, w)
        assert alias.dtype == torch.int32


@settings(max_examples=15)
@given(
    n_cat=st.integers(1, 5000),
    zeros=st.floats(0.0, 0.95),
    spread=st.floats(0.0, 40.0),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
)
def test_property_triton_table_is_exact(device, n_cat, zeros, spread, seed, dtype):
    """The kernel build over sizes of one to five scan blocks and every weight dtype."""
    pytest.importorskip("triton")
    from fastis._triton import alias as tri

    g = torch.Generator().manual_seed(seed)
    w = 10.0 ** (torch.rand(n_cat, generator=g, dtype=torch.float64) * spread)
    w[torch.rand(n_cat, generator=g) < zeros] = 0.0
    w[seed % n_cat] = 1.0
    w = (w / w.max()).to(dtype)  # the largest is 1: in range for float16, the sum too
    prob, alias, probs = tri.build(w.to(device))
    check_exact(prob, alias, w)
    torch.testing.assert_close(probs, w.double() / w.double().sum(), rtol=1e-15, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no-sync and graph checks)")
def test_cuda_draws_do_not_synchronise():
    w = make_weights("zipf", 4096).float().cuda()
    table = AliasTable(w)  # the one documented synchronisation (value check)
    draws = [
        lambda: table.sample(1 << 16, return_probs=True),
        lambda: sample(w, 1365, return_probs=True),  # fused b-of-B kernel
        lambda: sample(w.repeat(64), 1 << 10),  # inverse CDF on the device
        lambda: sample(w, 1 << 14),  # table
    ]
    for draw in draws:
        draw()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for draw in draws:
            draw()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert table.to("cpu").to("cuda").device.type == "cuda"
    # a one-shot draw captures in a CUDA graph
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(w, 1365)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        idx = sample(w, 1365)
    graph.replay()
    torch.cuda.synchronize()
    assert 0 <= int(idx.min()) and int(idx.max()) < 4096


def batch_weights(n_cat: int) -> torch.Tensor:
    kinds = ["uniform", "zipf", "dominant", "zeros", "wide_flat"]
    return torch.stack([make_weights(k, n_cat, seed=i).double() for i, k in enumerate(kinds)])


@pytest.mark.parametrize("n_cat", [1, 2, 300])
def test_batch_table(backend, device, n_cat):
    w = batch_weights(n_cat).to(device)
    table = AliasTable(w)
    assert table.prob.shape == table.alias.shape == table.probs.shape == w.shape
    assert len(table) == n_cat and "rows=5" in repr(table)
    for r in range(w.shape[0]):
        check_exact(table.prob[r], table.alias[r], w[r])
    g = torch.Generator(device).manual_seed(21)
    idx, p = table.sample(20_000, generator=g, return_probs=True)
    assert idx.shape == p.shape == (5, 20_000)
    for r in range(w.shape[0]):
        check_draws(idx[r], w[r])
    torch.testing.assert_close(p, (w / w.sum(-1, keepdim=True)).gather(-1, idx))
    # state_dict and rebuild keep the batch
    other = AliasTable(torch.ones(3, device=device))
    other.load_state_dict(table.state_dict())
    g1, g2 = torch.Generator(device).manual_seed(1), torch.Generator(device).manual_seed(1)
    assert torch.equal(table.sample(50, generator=g1), other.sample(50, generator=g2))
    ptr = table.prob.data_ptr()
    table.rebuild(w.flip(-1))
    assert table.prob.data_ptr() == ptr
    check_exact(table.prob[1], table.alias[1], w[1].flip(-1))


def tree_cumsum(x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
    """Hillis-Steele inclusive scan: rounds each position in its own association, as a
    GPU's parallel scan does (unlike the CPU's sequential torch.cumsum)."""
    y = x.to(dtype) if dtype is not None else x.clone()
    step = 1
    while step < y.shape[-1]:
        y = torch.cat([y[..., :step], y[..., step:] + y[..., :-step]], -1)
        step *= 2
    return y, False


SCAN_KINDS = ["zeros", "wide", "dominant", "uniform"]


def check_flat_at_zeros(w: torch.Tensor, device) -> None:
    """What the parallel scan's rounding would break: weight-0 items as alias targets or
    owners of an inverse-CDF interval, light items as alias targets."""
    prob, alias, probs = _alias_torch.build_dense(w.to(device))
    check_exact(prob, alias, w)
    split = prob < 1
    assert (probs[alias.long()][split] * w.shape[0] > 1).all(), "a bucket points at a light item"
    c = _alias_torch.cdf(w.to(device)).cpu()
    zero = w[1:] == 0
    assert torch.equal(c[1:][zero], c[:-1][zero])
    idx = _alias_torch.sample_cdf(c, 200_000, torch.Generator().manual_seed(0))
    check_draws(idx, w)


@pytest.mark.parametrize("kind", SCAN_KINDS)
def test_parallel_scan_rounding(monkeypatch, kind):
    """With a parallel scan, zero increments can move a prefix sum by an ulp: without
    ``_flat``, weight-0 items become alias targets and inverse-CDF intervals (this test
    fails on thousands of items then). No CPU scan rounds that way, so the scan is emulated
    here (``_cumsum`` is that seam); the torch path on CUDA runs exactly this code."""
    monkeypatch.setattr(_alias_torch, "_cumsum", tree_cumsum)
    check_flat_at_zeros(make_weights(kind, 2**14, seed=3), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA's parallel scan")
@pytest.mark.parametrize("kind", SCAN_KINDS)
def test_parallel_scan_rounding_cuda(kind):
    """The same with CUDA's own torch.cumsum (no emulation)."""
    check_flat_at_zeros(make_weights(kind, 2**20, seed=3), "cuda")


@pytest.mark.parametrize("kind", ["zeros", "dominant", "wide"])
def test_triton_parallel_scan_rounding(monkeypatch, kind):
    """The kernels under an interpreter whose tl.cumsum rounds like a GPU's parallel scan
    (Hillis-Steele, instead of numpy's sequential cumsum). The interpreter's scan is the
    only seam: no CPU scan rounds as a parallel one does. On a GPU the real tl.cumsum runs
    in the other kernel tests."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the real GPU scan runs in the other tests on this machine")
    from triton.runtime import interpreter

    from fastis._triton import alias as tri

    def tree_scan(self, input):
        y = np.moveaxis(np.array(input.handle.data, copy=True), self.axis, -1)
        step = 1
        while step < y.shape[-1]:
            y = np.concatenate([y[..., :step], y[..., step:] + y[..., :-step]], -1)
            step *= 2
        return [self.to_tensor(np.moveaxis(y, -1, self.axis).copy(), dtype=input.dtype)]

    monkeypatch.setattr(interpreter.ScanOps, "cumsum", tree_scan)
    w = make_weights(kind, 2100, seed=5)  # three scan blocks
    prob, alias, probs = tri.build(w)
    check_exact(prob, alias, w)
    split = prob < 1
    assert (probs[alias.long()][split] * w.shape[0] > 1).all(), "a bucket points at a light item"
    idx, _ = tri.sample_icdf(w.float(), 256, torch.Generator().manual_seed(2), torch.float32)
    check_draws(idx, w.float())
