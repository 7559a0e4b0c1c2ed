"""``cross_entropy`` with the gradient formed in forward (float32 CPU logits on the native
library, eager mode): against the torch path in float64, every option, every way a user
backpropagates (twice, with a graph of the backward, with other incoming gradients)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastis


@pytest.fixture
def native_backend(native, monkeypatch):
    monkeypatch.setenv("FASTIS_BACKEND", "native")
    return native


def _uses_grad_in_forward(loss: torch.Tensor) -> bool:
    return loss.grad_fn is not None and "GradInForward" in type(loss.grad_fn).__name__


def _oracle(monkeypatch, z, y, **kw):
    """The torch path in float64 on the same values (``z`` float32)."""
    monkeypatch.setenv("FASTIS_BACKEND", "torch")
    try:
        zd = z.detach().double().requires_grad_()
        sw = kw.get("sample_weight")
        if sw is not None:
            kw["sample_weight"] = sw.detach().double().requires_grad_(sw.requires_grad)
        if isinstance(kw.get("weight"), torch.Tensor):
            kw["weight"] = kw["weight"].double()
        if y.is_floating_point():
            y = y.double()
        out = fastis.cross_entropy(zd, y, return_score=True, **kw)
    finally:
        monkeypatch.setenv("FASTIS_BACKEND", "native")
    return zd, kw.get("sample_weight"), out


@st.composite
def cases(draw):
    seq = draw(st.booleans())
    B, T, C = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 13))
    shape = (B, T, C) if seq else (B * T, C)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = 3 * torch.randn(shape, generator=g)
    if draw(st.booleans()):  # a strided view
        z = (3 * torch.randn((*shape[:-1], 2 * C), generator=g))[..., ::2]
    soft = draw(st.booleans()) and not seq
    if soft:
        y = torch.rand(shape, generator=g).softmax(-1)
    else:
        y = torch.randint(0, C, shape[:-1], generator=g)
        if draw(st.booleans()):
            y[torch.rand(shape[:-1], generator=g) < 0.3] = -100
    kw = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1])),
    }
    if draw(st.booleans()):  # per row, or per sequence
        sw = torch.rand(shape[:1], generator=g) * 2
        kw["sample_weight"] = sw.requires_grad_(draw(st.booleans()))
    if draw(st.booleans()) and not soft:
        kw["weight"] = torch.rand(C, generator=g) + 0.5
    return z, y, kw


@given(case=cases())
def test_matches_the_float64_torch_path(native_backend, monkeypatch, case):
    z, y, kw = case
    z = z.requires_grad_()
    loss, score = fastis.cross_entropy(z, y, return_score=True, **kw)
    # class weights with smoothing form a dense target with its own ignore rule: recomputed
    dense = "weight" in kw and kw["label_smoothing"] and not y.is_floating_point()
    assert _uses_grad_in_forward(loss) != dense
    zd, swd, (loss_d, score_d) = _oracle(monkeypatch, z, y, **kw)
    torch.testing.assert_close(loss.double(), loss_d, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(score.double(), score_d.double(), rtol=1e-5, atol=1e-5)
    v = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    (loss * v).sum().backward()  # a non-unit incoming gradient
    (loss_d * v.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), zd.grad, rtol=1e-5, atol=1e-6, equal_nan=True)
    sw = kw.get("sample_weight")
    if sw is not None and sw.requires_grad:
        torch.testing.assert_close(sw.grad.double(), swd.grad, rtol=1e-5, atol=1e-6)


def test_backpropagated_twice(native_backend):
    z = torch.randn(9, 5, requires_grad=True)
    y = torch.randint(0, 5, (9,))
    loss = fastis.cross_entropy(z, y, sample_weight=torch.rand(9))
    assert _uses_grad_in_forward(loss)
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * first)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_matches_the_torch_path(native_backend, monkeypatch, reduction):
    """``create_graph=True``: a Hessian-vector product w.r.t. the logits and the mixed
    derivative w.r.t. the sample weights, against the float64 torch path."""
    g = torch.Generator().manual_seed(3)
    z = (2 * torch.randn(7, 6, generator=g)).requires_grad_()
    y = torch.randint(0, 6, (7,), generator=g)
    sw = (torch.rand(7, generator=g) + 0.5).requires_grad_()
    v = torch.randn(7, 6, generator=g)

    def hvp(z, sw, y):
        loss = fastis.cross_entropy(z, y, sample_weight=sw, reduction=reduction)
        (gz,) = torch.autograd.grad(loss.sum(), z, create_graph=True)
        return loss, torch.autograd.grad((gz * v.to(gz.dtype)).sum(), (z, sw))

    loss, (hz, hw) = hvp(z, sw, y)
    assert _uses_grad_in_forward(loss)
    monkeypatch.setenv("FASTIS_BACKEND", "torch")
    _, (hz_d, hw_d) = hvp(
        z.detach().double().requires_grad_(), sw.detach().double().requires_grad_(), y
    )
    torch.testing.assert_close(hz.double(), hz_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hw.double(), hw_d, rtol=1e-5, atol=1e-6)


def test_not_taken_where_it_does_not_apply(native_backend):
    y = torch.randint(0, 4, (5,))
    z = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        assert fastis.cross_entropy(z, y).grad_fn is None
    assert not _uses_grad_in_forward(fastis.cross_entropy(z.detach(), y))
    assert not _uses_grad_in_forward(fastis.cross_entropy(z.double(), y))
    assert not _uses_grad_in_forward(fastis.cross_entropy(z.bfloat16(), y))
    soft = torch.rand(5, 4).softmax(-1).requires_grad_()
    assert not _uses_grad_in_forward(fastis.cross_entropy(z, soft))


def test_forward_mode_ad_takes_the_recomputing_path(native_backend):
    import torch.autograd.forward_ad as fwad

    z, dz = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    with fwad.dual_level():
        loss = fastis.cross_entropy(fwad.make_dual(z, dz), y, reduction="none")
        tangent = fwad.unpack_dual(loss).tangent
    p = z.double().softmax(-1)
    expected = ((p - torch.nn.functional.one_hot(y, 5)) * dz.double()).sum(-1)
    torch.testing.assert_close(tangent.double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_input_still_raises(native_backend):
    z = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="class index 3"):
        fastis.cross_entropy(z, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="sample_weight"):
        fastis.cross_entropy(z, torch.tensor([0, 1, 2, 0]), sample_weight=-torch.ones(4))


def test_all_rows_ignored(native_backend, monkeypatch):
    """A mean over no rows is NaN, as in torch; the gradient is what the torch path gives."""
    z = torch.randn(3, 4, requires_grad=True)
    y = torch.full((3,), -100)
    loss = fastis.cross_entropy(z, y)
    assert _uses_grad_in_forward(loss) and loss.isnan()
    loss.backward()
    zd, _, (loss_d, _) = _oracle(monkeypatch, z, y)
    loss_d.backward()
    torch.testing.assert_close(z.grad.double(), zd.grad, equal_nan=True)


def test_the_library_reduces_class_index_rows(native_backend, monkeypatch):
    """Class indices without class weights: the whole loss is one library call
    (``_native.xent_loss``); soft targets and class weights take the row kernel."""
    from fastis import _native

    calls = []
    real = _native.xent_loss
    monkeypatch.setattr(_native, "xent_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    for reduction in ("mean", "sum", "none"):
        fastis.cross_entropy(z, y, sample_weight=torch.rand(6), reduction=reduction)
    assert len(calls) == 3
    fastis.cross_entropy(z, y, weight=torch.rand(4) + 0.5)
    fastis.cross_entropy(z, torch.rand(6, 4).softmax(-1))
    assert len(calls) == 3


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("sequences", [False, True])
def test_bad_weights_raise_with_their_value(native_backend, bad, sequences):
    shape = (3, 2, 5) if sequences else (6, 5)
    z = torch.randn(shape, requires_grad=True)
    y = torch.randint(0, 5, shape[:-1])
    w = torch.rand(shape[0]) + 0.5
    w[1] = bad
    with pytest.raises(
        ValueError, match=f"sample_weight must be finite and non-negative, got {bad}"
    ):
        fastis.cross_entropy(z, y, sample_weight=w)
    assert z.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(native_backend, reduction):
    z = torch.randn(0, 4, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    loss, score = fastis.cross_entropy(z, y, reduction=reduction, return_score=True)
    expected = torch.nn.functional.cross_entropy(z, y, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert score.shape == (0,)
    loss.sum().backward()
    assert z.grad.shape == (0, 4)


def test_the_unit_gradient_keeps_the_buffer_intact(native_backend):
    """``loss.backward()`` hands back the saved gradient itself: accumulating into the
    leaf's ``.grad`` across backward passes (and an in-place edit of ``.grad``) must not
    change what a later backward of the same graph gives."""
    z = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    loss = fastis.cross_entropy(z, y, sample_weight=torch.rand(8) + 0.5)
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    z.grad.mul_(3.0)  # an in-place edit of the accumulated gradient
    loss.backward(retain_graph=True)
    torch.testing.assert_close(z.grad, 4 * first)
    z.grad = None
    loss.backward()
    torch.testing.assert_close(z.grad, first)
    h = torch.randn(8, 5, requires_grad=True)  # through a non-leaf, twice
    out = fastis.cross_entropy(h * 2, y)
    out.backward(retain_graph=True)
    g1 = h.grad.clone()
    out.backward()
    torch.testing.assert_close(h.grad, 2 * g1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_outputs_may_be_updated_in_place(native_backend, reduction):
    """As ``F.cross_entropy``'s: the loss and the score are tensors of their own."""
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    loss, score = fastis.cross_entropy(z, y, reduction=reduction, return_score=True)
    assert _uses_grad_in_forward(loss)
    expected = fastis.score(z, y)
    loss.mul_(2)
    score.mul_(3)
    loss.sum().backward()
    torch.testing.assert_close(score, 3 * expected)
    z2 = z.detach().requires_grad_()
    torch.nn.functional.cross_entropy(z2, y, reduction=reduction).mul(2).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_torch_func_transforms(native_backend, monkeypatch):
    """``torch.func.grad`` and per-sample gradients (``vmap`` of ``grad``) take the op's
    path, and agree with autograd and with the float64 torch path."""
    g = torch.Generator().manual_seed(5)
    z = 2 * torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    w = torch.rand(6, generator=g) + 0.5

    def loss(z):
        return fastis.cross_entropy(z, y, sample_weight=w)

    grad = torch.func.grad(loss)(z)
    z2 = z.clone().requires_grad_()
    loss(z2).backward()
    torch.testing.assert_close(grad, z2.grad)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda zi, yi: fastis.cross_entropy(zi[None], yi[None]))
    )(z, y)
    p = z.double().softmax(-1)
    expected = p - torch.nn.functional.one_hot(y, 4).double()
    torch.testing.assert_close(per_sample.double(), expected, rtol=1e-5, atol=1e-6)
