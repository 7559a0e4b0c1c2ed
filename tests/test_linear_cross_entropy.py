"""fastis.linear_cross_entropy: loss, gradients and score against a float64 materialised
reference, the chunked path's memory, the ops' registration, compile and bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fastis
from fastis import linear_ops, reference_linear

REDUCTIONS = ["none", "mean", "sum"]


def truth(hidden, weight, bias, target, sample_weight, reduction, ignore_index, eps):
    """Float64 loss, gradients (hidden, weight, bias, sample_weight) and the score's
    ``G_i``, from the materialised logits and torch's own cross-entropy."""
    leaves = [
        None if t is None else t.detach().double().requires_grad_(True)
        for t in (hidden, weight, bias, sample_weight)
    ]
    h, w, b, sw = leaves
    z = h @ w.T + (b if b is not None else 0.0)
    V = w.shape[0]
    t = target.long()
    rows = F.cross_entropy(
        z.reshape(-1, V),
        t.reshape(-1),
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=eps,
    ).reshape(t.shape)
    if sw is not None:
        rows = rows * (sw[:, None] if sw.dim() < rows.dim() else sw)
    if reduction == "sum":
        loss = rows.sum()
    elif reduction == "mean":
        loss = rows.sum() / (t != ignore_index).sum()
    else:
        loss = rows
    v = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, inputs, grad_outputs=v)
    with torch.no_grad():
        # p - t with its target entry eps (1 - 1/V) - sum_{j != y} p_j: 1 - p_y summed from
        # the other classes, exact in float64 even where p_y rounds to 1
        y = torch.where(t == ignore_index, 0, t)[..., None]
        others = torch.softmax(z, -1).scatter(-1, y, 0.0)
        grad_y = eps * (1 - 1 / V) - others.sum(-1, keepdim=True)
        g = torch.linalg.vector_norm((others - eps / V).scatter(-1, y, grad_y), dim=-1)
        g = torch.where(t == ignore_index, 0.0, g)
    return loss.detach(), grads, v, g, h.detach()


def check(hidden, weight, bias, target, sample_weight=None, reduction="mean", *, kind="logits",
          ignore_index=-100, eps=0.0):  # fmt: skip
    inputs = [x for x in (hidden, weight, bias, sample_weight) if x is not None]
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    h, w = inputs[:2]
    b = inputs[2] if bias is not None else None
    sw = inputs[-1] if sample_weight is not None else None
    loss, score = fastis.linear_cross_entropy(
        h, w, target, bias=b, sample_weight=sw, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=eps, return_score=True, score=kind,
    )  # fmt: skip
    ref, ref_grads, v, g, h64 = truth(
        hidden, weight, bias, target, sample_weight, reduction, ignore_index, eps
    )
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    # float32 logits from the inputs' exact values: float32 rounding of a D-term product
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    grads = torch.autograd.grad(loss, inputs, grad_outputs=v.to(loss))
    for got, exact, x in zip(grads, ref_grads, inputs, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape
        # accumulated in float32, stored once in the input's dtype: one rounding
        tol = 0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
        scale = exact.abs().max().item() if exact.numel() else 0.0
        err = (got.double() - exact).abs()
        assert (err <= tol * exact.abs() + 1e-5 * (1 + scale)).all(), (err.max(), scale)
    if kind == "features":
        norm = torch.linalg.vector_norm(h64, dim=-1)
        g = g * (torch.sqrt(norm**2 + 1) if bias is not None else norm)
    if hidden.dim() == 3:
        g = torch.linalg.vector_norm(g, dim=1)
    assert score.dtype == torch.float32 and not score.requires_grad
    torch.testing.assert_close(score.double(), g, rtol=1e-4, atol=1e-5)


def make(N, T, D, V, dtype, seed, *, bias=True, weighted=None, ignore=0.2):
    """Random inputs with logits of order a few units; ``weighted``: None, 'row', 'token'."""
    g = torch.Generator().manual_seed(seed)
    rows = (N,) if T is None else (N, T)
    hidden = torch.randn(rows + (D,), generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 2 / (D + 1) ** 0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    target = torch.randint(0, V, rows, generator=g)
    target[torch.rand(rows, generator=g) < ignore] = -100
    if target.numel():
        target.view(-1)[0] = 0  # not every row ignored (an all-ignored mean is NaN)
    sw = None
    if weighted == "row":
        sw = torch.rand(N, generator=g, dtype=torch.float64) * 2
    elif weighted == "token":
        sw = torch.rand(rows, generator=g, dtype=torch.float64) * 2
    return hidden, weight, b, target, None if sw is None else sw.float()


@pytest.fixture
def chunk(monkeypatch):
    """Sets the block budget in elements (and the backward tiles' rows), so small shapes
    take several chunks and tiles."""

    def set_budget(elements, tile_rows=3):
        monkeypatch.setattr(reference_linear, "_CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(reference_linear, "_TILE_ROWS", tile_rows)

    return set_budget


# --------------------------------------------------------------------------------------
# against the float64 reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,D,V", [(7, 5, 1), (33, 19, 300), (5, 64, 3001)])
def test_matches_float64(chunk, dtype, reduction, N, D, V):
    chunk(6 * V)  # several chunks, the last one partial
    check(*make(N, None, D, V, dtype, seed=N + V, weighted="row"), reduction=reduction)


@pytest.mark.parametrize("kind", ["logits", "features"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weighted", [None, "row", "token"])
def test_sequences(chunk, kind, bias, weighted):
    chunk(4 * 77)
    inputs = make(3, 5, 11, 77, torch.float32, seed=3, bias=bias, weighted=weighted)
    check(*inputs, reduction="sum", kind=kind, eps=0.1)


@settings(max_examples=25)
@given(
    N=st.integers(1, 24),
    T=st.one_of(st.none(), st.integers(1, 4)),
    D=st.integers(1, 40),
    V=st.integers(1, 2500),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    reduction=st.sampled_from(REDUCTIONS),
    eps=st.sampled_from([0.0, 0.3]),
    bias=st.booleans(),
    weighted=st.sampled_from([None, "row", "token"]),
    kind=st.sampled_from(["logits", "features"]),
    rows_per_chunk=st.integers(1, 9),
    tile_rows=st.integers(1, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(chunk, N, T, D, V, dtype, reduction, eps, bias, weighted, kind,
                  rows_per_chunk, tile_rows, seed):  # fmt: skip
    chunk(rows_per_chunk * V, tile_rows)
    if weighted == "token" and T is None:
        weighted = "row"
    inputs = make(N, T, D, V, dtype, seed, bias=bias, weighted=weighted)
    check(*inputs, reduction=reduction, kind=kind, eps=eps)


def test_ignore_index_other_than_default(chunk):
    chunk(3 * 50)
    h, w, b, y, sw = make(12, None, 6, 50, torch.float32, seed=5, weighted="row", ignore=0)
    y[::3] = 7  # class 7 is ignored, not a class any more
    check(h, w, b, y, sw, reduction="mean", ignore_index=7, eps=0.2)


def test_equals_cross_entropy_of_the_logits():
    h, w, b, y, sw = make(20, None, 9, 130, torch.float32, seed=7, weighted="row")
    loss, g = fastis.linear_cross_entropy(h, w, y, bias=b, sample_weight=sw, return_score=True)
    loss2, g2 = fastis.cross_entropy(h @ w.T + b, y, sample_weight=sw, return_score=True)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(g, g2)
    gf = fastis.linear_cross_entropy(h, w, y, return_score=True, score="features")[1]
    torch.testing.assert_close(gf, fastis.score(h @ w.T, y, features=h, bias=False))


def test_float64_stays_float64_and_gradcheck(chunk):
    chunk(2 * 7)
    h, w, b, y, _ = make(5, None, 3, 7, torch.float64, seed=11, ignore=0.3)
    sw = torch.rand(5, dtype=torch.float64)
    loss = fastis.linear_cross_entropy(h, w, y, bias=b, sample_weight=sw)
    assert loss.dtype == torch.float64
    inputs = tuple(x.clone().requires_grad_(True) for x in (h, w, b, sw))
    for reduction in REDUCTIONS:

        def f(h, w, b, sw, reduction=reduction):
            return fastis.linear_cross_entropy(
                h, w, y, bias=b, sample_weight=sw, reduction=reduction, label_smoothing=0.2
            )

        assert torch.autograd.gradcheck(f, inputs)


def test_gradients_only_where_needed():
    h, w, b, y, _ = make(6, None, 4, 9, torch.float32, seed=2)
    h.requires_grad_(True)
    fastis.linear_cross_entropy(h, w, y, bias=b).backward()  # frozen weight and bias
    assert h.grad is not None and w.grad is None and b.grad is None
    out = linear_ops.linear_xent_grad(h, w, b, y, torch.zeros(6), torch.ones(6), -100, 0.0,
                                      False, True, False)  # fmt: skip
    assert out[0].numel() == 0 and out[1].shape == w.shape and out[2].numel() == 0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_score_keeps_its_precision_as_p_y_goes_to_1(chunk, eps):
    # logits of order 40: 1 - p_y ~ 1e-17, far below float32 rounding of p_y itself
    chunk(4 * 50, 2)
    h, w, b, y, _ = make(9, None, 6, 50, torch.float32, seed=9, ignore=0)
    w = w * 40
    y = (h.double() @ w.double().T + b.double()).argmax(-1)
    loss, g = fastis.linear_cross_entropy(h, w, y, bias=b, reduction="none",
                                          label_smoothing=eps, return_score=True)  # fmt: skip
    ref, _, _, g64, _ = truth(h, w, b, y, None, "none", -100, eps)
    if not eps:
        assert (g64 < 1e-8).sum() >= 3  # where 1 - p_y cannot be formed by subtraction
    # the score to relative precision (float32 rounding of logits of order 100), the loss
    # (log S - (z_y - m), as fastis.cross_entropy) to absolute precision
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=2e-5)


def test_non_finite_rows_like_cross_entropy(chunk):
    chunk(2 * 30, 2)
    h, w, b, y, _ = make(6, None, 4, 30, torch.float32, seed=8, ignore=0)
    h[1, 0] = float("nan")  # a NaN row
    h[2] = 3e38  # logits that overflow to +inf
    h[4, 2], y[4] = float("nan"), -100  # ignored: loss, score and gradient 0
    inputs = [x.clone().requires_grad_(True) for x in (h, w, b)]
    loss, g = fastis.linear_cross_entropy(*inputs[:2], y, bias=inputs[2], reduction="none",
                                          return_score=True)  # fmt: skip
    z = (h @ w.T + b).requires_grad_(True)
    loss2, g2 = fastis.cross_entropy(z, y, reduction="none", return_score=True)
    torch.testing.assert_close(loss, loss2, equal_nan=True)
    torch.testing.assert_close(g, g2, equal_nan=True)
    assert (z[2] == float("inf")).any()
    assert loss[[1, 2]].isnan().all() and loss[4] == 0 and g[4] == 0
    loss.nansum().backward()
    dh = inputs[0].grad
    assert dh[[1, 2]].isnan().all() and (dh[4] == 0).all() and dh[[0, 3, 5]].isfinite().all()


def test_double_backward_raises():
    h, w, b, y, _ = make(5, None, 3, 7, torch.float32, seed=1)
    h.requires_grad_(True)
    (g,) = torch.autograd.grad(fastis.linear_cross_entropy(h, w, y), h, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_narrow_index_targets(dtype):
    h, w, b, y, _ = make(6, None, 3, 9, torch.float32, seed=3, ignore=0)
    loss = fastis.linear_cross_entropy(h, w, y.to(dtype), bias=b, reduction="none")
    torch.testing.assert_close(loss, fastis.linear_cross_entropy(h, w, y, bias=b, reduction="none"))


def test_all_ignored_mean_is_nan_like_torch():
    h, w, b, y, _ = make(4, None, 3, 5, torch.float32, seed=0)
    y[:] = -100
    assert fastis.linear_cross_entropy(h, w, y, bias=b).isnan()
    assert fastis.linear_cross_entropy(h, w, y, bias=b, reduction="sum") == 0


def test_empty_batch():
    h, w, y = torch.zeros(0, 4), torch.randn(6, 4), torch.zeros(0, dtype=torch.long)
    loss, g = fastis.linear_cross_entropy(h, w, y, reduction="none", return_score=True)
    assert loss.shape == (0,) and g.shape == (0,)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_bfloat16_at_a_262k_vocabulary_as_accurate_as_torch_float32(eps):
    # the chunked path (the Triton kernel takes minutes at this V under the interpreter;
    # tests/test_linear_xent_kernels.py covers it at small V)
    N, D, V = 8, 16, 262_144
    h, w, b, y, _ = make(N, None, D, V, torch.bfloat16, seed=262, ignore=0)
    w = w * 4  # logits of order 10
    loss, g = fastis.linear_cross_entropy(h, w, y, bias=b, reduction="none",
                                          label_smoothing=eps, return_score=True)  # fmt: skip
    ref, _, _, g64, _ = truth(h, w, b, y, None, "none", -100, eps)
    z32 = F.linear(h.float(), w.float(), b.float())
    torch32 = F.cross_entropy(z32, y, reduction="none", label_smoothing=eps)
    assert loss.dtype == torch.float32 and ref.abs().min() > 1
    err, torch_err = (loss.double() - ref).abs(), (torch32.double() - ref).abs()
    assert (err <= torch_err.max() + 1e-6 * (1 + ref.abs())).all(), (err, torch_err)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# memory: one chunk of logits, never [N, V]


class _Largest(TorchDispatchMode):
    """Records the largest tensor created, by elements, other than those shaped like the
    gradients ``[N, D]`` / ``[V, D]`` or the float32 copy of the weight."""

    def __init__(self, *skip):
        super().__init__()
        self.skip, self.numel = skip, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.skip:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("N", [40, 400])
def test_chunked_path_holds_one_tile_of_logits(chunk, N):
    V, D = 97, 8
    chunk(16 * V, 40)
    h, w, b, y, _ = make(N, None, D, V, torch.bfloat16, seed=N)
    with _Largest((N, D), (V, D), (40, D)) as forward:
        loss, lse, g = reference_linear.linear_xent(h, w, b, y, compute_score=True)
    with _Largest((N, D), (V, D), (40, D)) as backward:
        reference_linear.linear_xent_grad(h, w, b, y, lse, torch.rand(N))
    # whatever N: a tile of 40 rows x 38 classes (the budget's share of 40 rows)
    assert reference_linear.tiles(N, V) == (40, 38)
    assert forward.numel == backward.numel == 40 * 38


# registration: opcheck, compile


def test_opcheck():
    h, w, b, y, _ = make(11, None, 6, 23, torch.float32, seed=4)
    for bias in (b, None):
        for score in (True, False):
            args = (h.requires_grad_(True), w.requires_grad_(True), bias, y, -100, 0.1, score)
            torch.library.opcheck(torch.ops.fastis.linear_xent.default, args)
        lse = torch.logsumexp(h.detach() @ w.detach().T, -1)
        args = (h.detach(), w.detach(), bias, y, lse, torch.rand(11), -100, 0.1, True, True, True)
        torch.library.opcheck(torch.ops.fastis.linear_xent_grad.default, args)


def test_compiled_training_step():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
    head = torch.nn.Linear(16, 37)
    x = torch.randn(2, 6, 8)
    y = torch.randint(0, 37, (2, 6))
    sw = torch.rand(2, requires_grad=True)

    def step(x, y, sw):
        return fastis.linear_cross_entropy(
            body(x), head.weight, y, bias=head.bias, sample_weight=sw, return_score=True,
            score="features", label_smoothing=0.1,
        )  # fmt: skip

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        params = [*body.parameters(), *head.parameters(), sw]
        for p in params:
            p.grad = None
        loss, score = fn(x, y, sw)
        loss.backward()
        results.append([p.grad.clone() for p in params] + [loss, score])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------
# bad input


def _inputs():
    return torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 4, -100])


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(hidden=torch.randn(4)), ValueError, "hidden must be"),
        (dict(hidden=torch.ones(4, 3, dtype=torch.long)), TypeError, "hidden must be floating"),
        (dict(weight=torch.randn(5, 2)), ValueError, r"weight must have shape \[V, D\]"),
        (dict(weight=torch.randn(0, 3)), ValueError, "at least one class"),
        (dict(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, "weight must have"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \[V\] = \[5\]"),
        (dict(bias=torch.randn(5).half()), TypeError, "bias must have hidden's dtype"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target must have shape \(4,\)"),
        (dict(target=torch.rand(4, 5)), TypeError, "soft .* not supported"),
        (dict(target=torch.tensor([0, 1, 5, 2])), ValueError, "class index 5"),
        (dict(sample_weight=torch.rand(3)), ValueError, r"sample_weight must have shape \[4\]"),
        (dict(sample_weight=torch.tensor([1.0, -1, 0, 0])), ValueError, "non-negative"),
        (dict(sample_weight=torch.ones(4, dtype=torch.long)), TypeError, "sample_weight must"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(score="loss"), ValueError, "score must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (dict(return_score=1), TypeError, "return_score must be a bool"),
    ],
)
def test_bad_input(change, error, match):
    hidden, weight, target = _inputs()
    kwargs = dict(hidden=hidden, weight=weight, target=target) | change
    with pytest.raises(error, match=match):
        fastis.linear_cross_entropy(**kwargs)


def test_bad_input_sequences():
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[2\] or \[2, 3\]"):
        fastis.linear_cross_entropy(h, w, y, sample_weight=torch.rand(3))
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3\)"):
        fastis.linear_cross_entropy(h, w, y.view(-1))


# --------------------------------------------------------------------------------------
# the Triton forward kernel (under TRITON_INTERPRET=1 without a GPU), against the torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "N,D,V,bias,eps", [(1, 3, 1, True, 0.0), (20, 17, 5, False, 0.2), (70, 70, 130, True, 0.1)]
)
def test_triton_forward_matches_the_torch_path(dtype, N, D, V, bias, eps):
    from fastis._triton import linear_xent as kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, b, y, _ = make(N, None, D, V, dtype, seed=N + D, bias=bias)
    if N > 2:
        h[2, 0] = float("nan")  # a NaN row, and an ignored row with NaN inputs
        h[N - 1, 1], y[N - 1] = float("nan"), -100
    h, w, y = h.to(device), w.to(device), y.to(device)
    b = None if b is None else b.to(device)
    got = kernel.linear_xent(h, w, b, y, ignore_index=-100, label_smoothing=eps)
    want = reference_linear.linear_xent(
        h, w, b, y, ignore_index=-100, label_smoothing=eps, compute_score=True
    )
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_torch_func_transforms():
    """``torch.func.grad`` (with sample weights and sequences) and per-sample gradients
    (``vmap`` of ``grad``): the materialised logits through ``cross_entropy``, against
    autograd and the exact per-sample formula ``(p - e_y) h^T`` in float64."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3), generator=g)
    w = torch.rand(2, generator=g, dtype=torch.float64) + 0.5

    def loss(W, b):
        return fastis.linear_cross_entropy(h, W, y, bias=b, sample_weight=w, reduction="sum")

    gW, gb = torch.func.grad(loss, argnums=(0, 1))(W, b)
    W2, b2 = W.clone().requires_grad_(), b.clone().requires_grad_()
    loss(W2, b2).backward()
    torch.testing.assert_close(gW, W2.grad)
    torch.testing.assert_close(gb, b2.grad)
    flat_h, flat_y = h.reshape(-1, 8), y.reshape(-1)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda W, hi, yi: fastis.linear_cross_entropy(hi[None], W, yi[None])),
        in_dims=(None, 0, 0),
    )(W, flat_h, flat_y)
    d = (flat_h @ W.T).softmax(-1) - torch.nn.functional.one_hot(flat_y, 5).double()
    torch.testing.assert_close(per_sample, d[:, :, None] * flat_h[:, None, :])
