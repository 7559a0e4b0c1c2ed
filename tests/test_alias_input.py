"""fastis.AliasTable / fastis.sample at the edges: bad input, shapes torch answers, meta
tensors, dtypes, and a table's state (save, load, validate, rebuild).

Every test that takes ``backend`` runs the torch path and the Triton kernels.
"""

import io

import pytest
import torch
from test_alias import check_draws, check_exact, make_weights

from fastis.alias import AliasTable, sample

# -- bad weights and arguments ---------------------------------------------------------------

BAD_WEIGHTS = [
    ([1.0, 2.0], TypeError, "torch.Tensor"),
    (torch.tensor([1, 2]), TypeError, "floating"),
    (torch.tensor([True, False]), TypeError, "floating"),
    (torch.tensor([1, 2], dtype=torch.uint8), TypeError, "floating"),
    (torch.tensor(1.0), ValueError, "1-D"),
    (torch.ones(2, 3, 4), ValueError, "1-D"),
    (torch.ones(0), ValueError, "at least one category"),
    (torch.ones(3, 0), ValueError, "at least one category"),
    (torch.tensor([[1.0, 2.0], [0.0, 0.0]]), ValueError, r"all be zero \(row 1\)"),
    (torch.tensor([[1.0, 2.0], [0.0, -1.0]]), ValueError, "non-negative, got -1.0 at index 3"),
    (torch.tensor([1.0, float("nan")]), ValueError, "NaN"),
    (torch.tensor([1.0, float("inf")]), ValueError, "finite"),
    (torch.tensor([1.0, -0.5]), ValueError, "non-negative"),
    (torch.zeros(4), ValueError, "all be zero"),
    (torch.tensor([1e308, 1e308], dtype=torch.float64), ValueError, "overflows"),
    (torch.tensor([1.0, float("nan")], dtype=torch.float16), ValueError, "NaN"),
    (torch.tensor([1.0, -1.0], dtype=torch.bfloat16), ValueError, "non-negative"),
]


@pytest.mark.parametrize("weights,exc,match", BAD_WEIGHTS)
def test_bad_weights(backend, weights, exc, match):
    """Integer and bool weights are refused as torch.multinomial refuses them."""
    with pytest.raises(exc, match=match):
        AliasTable(weights)
    # the inverse CDF, a table, and (on the triton path) the fused kernel
    for n in (3, 1000, 100_000):
        with pytest.raises(exc, match=match):
            sample(weights, n)


@pytest.mark.parametrize(
    "n,exc,match",
    [
        (-1, ValueError, "n must be non-negative, got -1"),
        (2.0, TypeError, "n must be an int"),
        (True, TypeError, "n must be an int"),
        (torch.tensor(3), TypeError, "n must be a Python int, got a tensor"),
        (torch.tensor([3]), TypeError, "n must be a Python int, got a tensor"),
        (2**62, ValueError, r"n = 4611686018427387904 draws.* is too many"),
        (2**61, ValueError, r"n = 2305843009213693952 draws.* is too many"),
    ],
)
def test_bad_n(backend, n, exc, match):
    for w in (torch.ones(3), torch.ones(2, 3)):
        with pytest.raises(exc, match=match):
            sample(w, n)
        with pytest.raises(exc, match=match):
            AliasTable(w).sample(n)


def test_too_many_draws_per_row():
    """The output's size counts every row: 2^59 draws from 8 rows overflow too."""
    sample(torch.ones(3), 10)  # fine
    with pytest.raises(ValueError, match="per row for 8 rows"):
        sample(torch.ones(8, 3), 2**59)


def test_bad_generator(backend):
    w = torch.ones(3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        sample(w, 2, generator=3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        AliasTable(w).sample(2, generator=3)


# -- shapes and dtypes -----------------------------------------------------------------------


def test_zero_draws(backend, device):
    w = torch.tensor([1.0, 3.0], device=device)
    assert AliasTable(w).sample(0).shape == (0,)
    idx, p = sample(w, 0, return_probs=True)
    assert idx.shape == (0,) and idx.dtype == torch.int64 and p.shape == (0,)
    assert torch.equal(sample(w[:1], 5).cpu(), torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("n", [2, 5000])  # the inverse CDF and a table
def test_zero_rows(backend, device, n):
    """A batch of no rows draws nothing, as torch.multinomial answers it: [0, n]."""
    w = torch.ones(0, 3, device=device)
    expect = torch.multinomial(w, n, replacement=True)
    idx, p = sample(w, n, return_probs=True)
    assert idx.shape == p.shape == expect.shape == (0, n)
    assert idx.dtype == torch.int64 and p.dtype == torch.float32
    table = AliasTable(w)
    assert len(table) == 3 and "rows=0" in repr(table)
    idx, p = table.sample(n, return_probs=True)
    assert idx.shape == p.shape == (0, n) and idx.dtype == torch.int64


@pytest.mark.parametrize("shape", [(7,), (3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_meta_tensors(backend, shape, dtype):
    """Meta weights give meta results of the right shapes and dtypes, as torch.multinomial
    does (every method, every backend)."""
    w = torch.rand(shape, device="meta", dtype=dtype)
    rows = shape[:-1]
    for n in (5, 3000, 100_000):
        idx, p = sample(w, n, return_probs=True)
        assert idx.device.type == p.device.type == "meta"
        assert idx.shape == p.shape == (*rows, n)
        assert idx.dtype == torch.int64 and p.dtype == torch.promote_types(dtype, torch.float32)
    table = AliasTable(w)
    assert table.prob.device.type == "meta" and table.prob.shape == shape
    assert table.alias.dtype == torch.int32 and table.probs.dtype == torch.float64
    idx, p = table.sample(4, return_probs=True)
    assert idx.shape == p.shape == (*rows, 4) and idx.device.type == "meta"
    assert "num_categories=7" in repr(table)
    AliasTable(torch.ones(3)).load_state_dict(table.state_dict())  # shapes check only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_weight_dtypes(backend, device, dtype):
    """Half-precision weights are exact in their own values (the sums are float64), on
    both backends; the probabilities come back in promote_types(dtype, float32)."""
    w = make_weights("zipf", 700).to(dtype).to(device)
    table = AliasTable(w)
    check_exact(table.prob, table.alias, w)
    torch.testing.assert_close(table.probs, w.double() / w.double().sum(), rtol=1e-15, atol=0)
    g = torch.Generator(device).manual_seed(6)
    check_draws(table.sample(20_000, generator=g), w)
    for n in (50, 100_000):  # every method of the backend (fused, then a table on triton)
        idx, p = sample(w, n, generator=g, return_probs=True)
        assert p.dtype == torch.promote_types(dtype, torch.float32)
        rtol = 1e-7 if p.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(
            p.double(), (w.double() / w.double().sum())[idx], rtol=rtol, atol=0
        )


# -- state: round trip, validation, rebuild --------------------------------------------------


def test_state_dict_round_trip(backend, device):
    table = AliasTable(make_weights("zeros", 400).to(device))
    buf = io.BytesIO()
    torch.save(table.state_dict(), buf)
    buf.seek(0)
    other = AliasTable(torch.ones(3, device=device))
    other.load_state_dict(torch.load(buf))
    g1, g2 = torch.Generator(device).manual_seed(2), torch.Generator(device).manual_seed(2)
    assert torch.equal(table.sample(500, generator=g1), other.sample(500, generator=g2))
    assert table.to(device) is table
    assert "num_categories=400" in repr(table)
    moved = table.to("meta")
    assert moved.prob.device.type == "meta" and len(moved) == 400


def corrupt_states():
    """(name, edit of a valid state, the error it must raise)."""

    def put(key, index, value):
        def edit(sd):
            sd[key] = sd[key].clone()
            sd[key][index] = value

        return edit

    def scale(sd):
        sd["probs"] = sd["probs"] * 2.0

    def swap(sd):  # a permutation of the right values: each entry wrong
        sd["probs"] = sd["probs"].roll(1, -1)

    def drop_zero(sd):  # a weight-0 item's probability made positive: mass from nowhere
        p = sd["probs"].clone()
        k = int((p == 0).nonzero()[0, 0])
        p[k], p[k + 1 if p[k + 1] > 0 else k - 1] = 1e-3, 0.0
        sd["probs"] = p

    nan = float("nan")
    return [
        ("nan prob", put("prob", 5, nan), "out of range"),
        ("prob > 1", put("prob", 5, 1.5), "out of range"),
        ("prob < 0", put("prob", 5, -0.1), "out of range"),
        ("nan probs", put("probs", 7, nan), "does not match"),
        ("negative probs", put("probs", 7, -1e-3), "does not match"),
        ("inf probs", put("probs", 7, float("inf")), "does not match"),
        ("unnormalised probs", scale, "does not match"),
        ("permuted probs", swap, "does not match"),
        ("zero made positive", drop_zero, "does not match"),
        ("alias out of range", put("alias", 3, 400), "out of range"),
        ("alias negative", put("alias", 3, -1), "out of range"),
    ]


@pytest.mark.parametrize(
    "name,edit,match", corrupt_states(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_load_state_dict_rejects_corrupt_state(backend, device, name, edit, match):
    """A loaded state is validated as weights are: NaN or out-of-range ``prob``, and
    ``probs`` that are not the distribution the table draws from (negative, NaN,
    unnormalised, or merely inconsistent) raise, and the table keeps its old state."""
    w = make_weights("zeros", 400).to(device)
    sd = {k: v.clone() for k, v in AliasTable(w).state_dict().items()}
    edit(sd)
    target = AliasTable(torch.tensor([1.0, 3.0], device=device))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_state_dict_rejects_bad_structure():
    sd = AliasTable(make_weights("zeros", 400)).state_dict()
    other = AliasTable(torch.ones(3))
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"prob": sd["prob"]})
    with pytest.raises(ValueError, match="length"):
        other.load_state_dict({**sd, "alias": sd["alias"][:-1]})
    with pytest.raises(TypeError, match="float64"):
        other.load_state_dict({**sd, "prob": sd["prob"].float()})
    with pytest.raises(TypeError, match="int32 or int64"):
        other.load_state_dict({**sd, "alias": sd["alias"].double()})
    with pytest.raises(ValueError, match="1-D or 2-D"):
        other.load_state_dict({**sd, "probs": sd["probs"].tolist()})


@pytest.mark.parametrize("kind,n_cat", [("wide", 3001), ("wide_flat", 700), ("dominant", 517)])
def test_load_state_dict_accepts_every_build(backend, device, kind, n_cat):
    """The validation never refuses a table a builder made (weights over 60 decades,
    several scan blocks on the triton path, a batch)."""
    w = make_weights(kind, n_cat).to(device)
    other = AliasTable(torch.ones(2, device=device))
    other.load_state_dict(AliasTable(w).state_dict())
    assert len(other) == n_cat
    other.load_state_dict(AliasTable(torch.stack([w, w.flip(0)])).state_dict())
    assert other.prob.shape == (2, n_cat)


def test_state_and_probs_are_live(backend, device):
    """``probs`` and ``state_dict()`` are the table's own tensors, as torch's state_dict
    returns live references: a rebuild of the same shape overwrites them in place (and a
    clone keeps a snapshot); a rebuild of another shape leaves them as they were."""
    w1 = make_weights("zipf", 300).to(device)
    w2 = make_weights("dominant", 300).to(device)
    table = AliasTable(w1)
    probs, sd = table.probs, table.state_dict()
    snapshot = {k: v.clone() for k, v in sd.items()}
    assert table.rebuild(w2) is table
    assert probs is table.probs and all(sd[k] is v for k, v in table.state_dict().items())
    torch.testing.assert_close(probs, w2.double() / w2.double().sum(), rtol=1e-15, atol=0)
    check_exact(table.prob, table.alias, w2)
    other = AliasTable(torch.ones(3, device=device))
    other.load_state_dict(snapshot)
    check_exact(other.prob, other.alias, w1)
    w3 = make_weights("zipf", 301).to(device)
    table.rebuild(w3)
    check_exact(table.prob, table.alias, w3)
    assert probs.shape == (300,)
    torch.testing.assert_close(probs, w2.double() / w2.double().sum(), rtol=1e-15, atol=0)


def test_failed_rebuild_keeps_table(backend, device):
    w = make_weights("zipf", 300).to(device)
    table = AliasTable(w)
    with pytest.raises(ValueError, match="NaN"):
        table.rebuild(torch.full((300,), float("nan"), device=device))
    check_exact(table.prob, table.alias, w)
