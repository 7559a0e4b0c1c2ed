"""The fused last layer's Triton kernels (under TRITON_INTERPRET=1 without a GPU): the
backward's gradients of hidden, weight and bias against a float64 materialised reference,
and forward + backward through the op on the Triton backend."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import fastis  # noqa: E402
from fastis import reference_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the unit roundoff of dz in the products (bfloat16 rounds dz; float16 multiplies in TF32)
DZ_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make(N, D, V, dtype, seed, *, bias=True, ignore=0.2, strided=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D + 3 if strided else D, generator=g, dtype=torch.float64)
    h = h[:, 1 : D + 1] if strided else h  # rows with a gap between them
    w = torch.randn(D, V, generator=g, dtype=torch.float64) * 2 / (D + 1) ** 0.5
    w = w.T if strided else w.T.contiguous()  # column-major weight
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore] = -100
    s = torch.rand(N, generator=g, dtype=torch.float32) * 2
    move = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return move(h), move(w), move(b), y.to(DEVICE), s.to(DEVICE)


def exact_grads(h, w, b, y, s, eps, ignore_index=-100):
    """Float64 ``(dh, dW, dc)`` of ``sum_i s_i loss_i`` from the materialised logits, and
    ``|dz|`` (for the rounding bound of 16-bit products)."""
    h, w = h.double().cpu(), w.double().cpu()
    z = h @ w.T + (0.0 if b is None else b.double().cpu())
    V = w.shape[0]
    y, s = y.cpu(), s.double().cpu()
    ignored = y == ignore_index
    t = torch.full_like(z, eps / V)
    t[~ignored, y[~ignored]] += 1 - eps
    dz = (torch.softmax(z, -1) - t) * torch.where(ignored, 0.0, s)[:, None]
    return dz @ w, dz.T @ h, dz.sum(0), dz.abs(), h.abs(), w.abs()


def assert_grads(got, h, w, b, y, s, eps, dtype):
    dh, dw, db, adz, ah, aw = exact_grads(h, w, b, y, s, eps)
    u = DZ_ROUNDING[dtype]
    out = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2  # the final store
    bounds = (u * adz @ aw, u * adz.T @ ah, torch.zeros_like(db))
    for name, g, e, bound in zip("h W c".split(), got, (dh, dw, db), bounds, strict=True):
        if b is None and name == "c":
            assert g.numel() == 0
            continue
        assert g.shape == e.shape and g.dtype == dtype, name
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (g.double().cpu() - e).abs()
        tol = 2 * out * e.abs() + 1.01 * bound + 2e-6 * (1 + scale)
        assert (err <= tol).all(), (name, (err - tol).max().item(), scale)


def run_kernels(h, w, b, y, s, eps, **which):
    from fastis._triton import linear_xent as forward
    from fastis._triton import linear_xent_grad as backward

    _, lse, _ = forward.linear_xent(h, w, b, y, ignore_index=-100, label_smoothing=eps)
    return backward.linear_xent_grad(
        h, w, b, y, lse, s, ignore_index=-100, label_smoothing=eps, **which
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "N,D,V,bias,eps", [(1, 3, 1, True, 0.0), (37, 23, 131, True, 0.1), (70, 19, 67, False, 0.0)]
)
def test_backward_matches_float64(dtype, N, D, V, bias, eps):
    inputs = make(N, D, V, dtype, seed=N * V, bias=bias)
    assert_grads(run_kernels(*inputs, eps), *inputs, eps, dtype)


@settings(max_examples=15)
@given(
    N=st.integers(1, 40),
    D=st.integers(1, 40),
    V=st.integers(1, 150),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    eps=st.sampled_from([0.0, 0.25]),
    bias=st.booleans(),
    strided=st.booleans(),
    expanded=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_backward_property(N, D, V, dtype, eps, bias, strided, expanded, seed):
    h, w, b, y, s = make(N, D, V, dtype, seed, bias=bias, strided=strided)
    if expanded:  # one factor for every row (a mean's), stride 0
        s = s[:1].expand(N)
    assert_grads(run_kernels(h, w, b, y, s, eps), h, w, b, y, s, eps, dtype)


def test_backward_only_what_is_asked_and_bad_rows():
    h, w, b, y, s = make(20, 9, 45, torch.float32, seed=3, ignore=0)
    y[2], y[5] = 45, -100  # a class index out of range: a NaN row; an ignored row
    h[7, 0] = float("nan")  # a NaN row
    dh, dw, db = run_kernels(h, w, b, y, s, 0.1, weight_grad=False)
    assert dw.numel() == 0 and db.shape == (45,)
    assert dh[[2, 7]].isnan().all() and (dh[5] == 0).all()
    fine = [i for i in range(20) if i not in (2, 5, 7)]
    assert dh[fine].isfinite().all()
    y[2], h[7, 0] = 0, 0.0
    want = exact_grads(h, w, b, y, s, 0.1)
    torch.testing.assert_close(dh[fine].double().cpu(), want[0][fine], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# through the op, on the Triton backend (FASTIS_BACKEND=triton)


@pytest.fixture
def triton_backend(monkeypatch):
    if DEVICE == "cpu":
        from fastis._backend import interpreting

        if not interpreting():
            pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTIS_BACKEND", "triton")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_op_on_the_triton_backend(triton_backend, reduction, monkeypatch):
    h, w, b, y, _ = make(29, 13, 70, torch.float32, seed=5)
    sw = torch.rand(29, device=DEVICE)

    def run(backend):
        monkeypatch.setenv("FASTIS_BACKEND", backend)
        leaves = [x.clone().requires_grad_(True) for x in (h, w, b, sw)]
        loss, g = fastis.linear_cross_entropy(
            *leaves[:2], y, bias=leaves[2], sample_weight=leaves[3], reduction=reduction,
            label_smoothing=0.1, return_score=True, score="features",
        )  # fmt: skip
        v = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0)).to(loss)
        return (loss, g, *torch.autograd.grad(loss, leaves, v))

    for got, want in zip(run("triton"), run("torch"), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_triton_backend_opcheck_and_compile(triton_backend):
    h, w, b, y, _ = make(11, 6, 23, torch.float32, seed=4)
    args = (h.requires_grad_(True), w.requires_grad_(True), b, y, -100, 0.1, True)
    torch.library.opcheck(torch.ops.fastis.linear_xent.default, args)
    lse = torch.logsumexp(h.detach() @ w.detach().T + b, -1)
    args = (h.detach(), w.detach(), b, y, lse, torch.rand(11), -100, 0.1, True, True, True)
    torch.library.opcheck(torch.ops.fastis.linear_xent_grad.default, args)

    def step(h, w, b):
        return fastis.linear_cross_entropy(h, w, y, bias=b, return_score=True)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [x.detach().requires_grad_(True) for x in (h, w, b)]
        loss, g = fn(*leaves)
        results.append([loss, g, *torch.autograd.grad(loss, leaves)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


def test_float64_takes_the_torch_path_on_the_triton_backend(triton_backend):
    h, w, b, y, s = make(9, 4, 11, torch.float64, seed=2)
    got = fastis.linear_cross_entropy(h, w, y, bias=b, reduction="none")
    want = reference_linear.linear_xent(h, w, b, y)[0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
