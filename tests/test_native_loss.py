"""``fastis._native.xent_loss`` (the whole weighted, reduced loss of class-index rows in one
library call) against the float64 oracle: every reduction, weights per row, per token and
per sequence, ignored rows, strided logits, both logits dtypes and index dtypes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastis import reference

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@st.composite
def cases(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    three_d = draw(st.booleans())
    lead = (
        (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
        if three_d
        else (draw(st.integers(1, 29)),)
    )
    C = draw(st.sampled_from([1, 3, 10, 17, 130]))
    full = 4 * torch.randn(*lead, 2 * C, generator=gen, dtype=torch.float64)
    z = (full[..., ::2] if draw(st.booleans()) else full[..., :C].contiguous()).to(dtype)
    y = torch.randint(0, C, lead, generator=gen)
    if draw(st.booleans()):
        y[torch.rand(lead, generator=gen) < 0.3] = -100
    y = y.to(draw(st.sampled_from([torch.int64, torch.int32])))
    kind = draw(st.sampled_from(["none", "row", "sequence"] if three_d else ["none", "row"]))
    weight = None
    if kind == "row":
        weight = (torch.rand(lead, generator=gen, dtype=torch.float64) * 2).to(dtype)
    elif kind == "sequence":
        weight = (torch.rand(lead[0], 1, generator=gen, dtype=torch.float64) * 2).to(dtype)
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    eps = draw(st.sampled_from([0.0, 0.2]))
    return z, y, weight, reduction, eps


@given(case=cases())
def test_matches_the_float64_oracle(native, case):
    z, y, weight, reduction, eps = case
    grad = torch.full_like(z, 7.0)
    total, loss, score, n = native.xent_loss(
        z, y, weight=weight, reduction=reduction, ignore_index=-100, label_smoothing=eps, grad=grad
    )
    counted = int((y != -100).sum())
    w = (
        torch.ones(y.shape, dtype=torch.float64)
        if weight is None
        else weight.double().expand(y.shape)
    )
    factor = w / counted if reduction == "mean" else w
    want_loss, want_score, want_grad = reference.softmax_xent(
        z.double(),
        y.long(),
        ignore_index=-100,
        label_smoothing=eps,
        compute_grad=True,
        grad_scale=factor,
    )
    tol = TOL[z.dtype]
    assert n == counted
    torch.testing.assert_close(
        loss.double(), want_loss, atol=tol * (1 + want_loss.abs().max().item()), rtol=tol
    )
    torch.testing.assert_close(score.double(), want_score, atol=tol, rtol=tol)
    torch.testing.assert_close(grad.double(), want_grad, atol=tol, rtol=4 * tol)
    if reduction == "none":
        assert total is None
        return
    want_total = (want_loss * factor).sum()
    assert total.shape == () and total.dtype == z.dtype
    if counted == 0 and reduction == "mean":
        assert total.isnan()
    else:
        torch.testing.assert_close(total.double(), want_total, atol=tol, rtol=tol)


def test_fails_without_the_factor_in_the_gradient(native):
    """The gradient rows carry the weights (and 1 / n): a plain row gradient differs."""
    z = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    w = torch.rand(6) + 0.5
    grad, plain = torch.empty_like(z), torch.empty_like(z)
    native.xent_loss(
        z, y, weight=w, reduction="mean", ignore_index=-100, label_smoothing=0.0, grad=grad
    )
    native.softmax_xent(z, y, grad=plain)
    torch.testing.assert_close(grad, plain * (w / 6)[:, None])
    assert not torch.allclose(grad, plain)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_weights_and_targets_raise(native, bad):
    z = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    w = torch.ones(5)
    w[3] = bad
    kw = {"reduction": "sum", "ignore_index": -100, "label_smoothing": 0.0, "grad": None}
    with pytest.raises(ValueError, match=f"got {bad}"):
        native.xent_loss(z, y, weight=w, **kw)
    with pytest.raises(ValueError, match="class index 3"):
        native.xent_loss(z, torch.tensor([0, 1, 3, 0, 1]), weight=None, **kw)
    with pytest.raises(TypeError, match="weight must have the logits' dtype"):
        native.xent_loss(z, y, weight=torch.ones(5, dtype=torch.float64), **kw)
    with pytest.raises(ValueError, match="target must hold"):
        native.xent_loss(z, y[:4], weight=None, **kw)


def test_results_do_not_depend_on_threads(native):
    z = torch.randn(300, 50)
    y = torch.randint(0, 50, (300,))
    w = torch.rand(300)
    out = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            grad = torch.empty_like(z)
            total, loss, score, _ = native.xent_loss(
                z, y, weight=w, reduction="mean", ignore_index=-100, label_smoothing=0.0, grad=grad
            )
            out.append((total, loss, score, grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)
