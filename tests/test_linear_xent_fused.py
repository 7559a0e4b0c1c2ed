"""fastis.linear_cross_entropy with its gradients formed in forward (``linear_xent_fused``):
which calls take that path, its chunks and its fallback against the float64 reference,
its memory, backward (scaling, twice, double), opcheck and compile."""

import pytest
import torch
from test_linear_cross_entropy import _Largest, check, make
from torch.utils._python_dispatch import TorchDispatchMode

import fastis
from fastis import linear_ops, reference_linear


@pytest.fixture
def fused_chunk(monkeypatch):
    """Sets the fused path's chunk budget in elements and the fewest rows per chunk it
    accepts before recomputing; and the recomputing path's tiles (by default a third of
    the chunk's budget, with ``tile_rows`` rows at least)."""

    def set_budget(elements, min_rows=1, tile_elements=None, tile_rows=3):
        monkeypatch.setattr(reference_linear, "_FUSED_CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(reference_linear, "_FUSED_MIN_ROWS", min_rows)
        monkeypatch.setattr(reference_linear, "_CHUNK_ELEMENTS", tile_elements or elements // 3)
        monkeypatch.setattr(reference_linear, "_TILE_ROWS", tile_rows)

    return set_budget


class _Ops(TorchDispatchMode):
    """Records the names of the ``fastis`` ops that run."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastis":
            self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _ops_run(fn):
    with _Ops() as ops:
        fn()
    return ops.names


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_fused_where_a_scalar_loss_needs_a_gradient(reduction, which):
    h, w, b, y, sw = make(7, None, 5, 13, torch.float32, seed=1, weighted="row")
    leaves = dict(hidden=h, weight=w, bias=b)
    leaves[which] = leaves[which].clone().requires_grad_(True)

    def step():
        loss = fastis.linear_cross_entropy(
            leaves["hidden"], leaves["weight"], y, bias=leaves["bias"], sample_weight=sw,
            reduction=reduction,
        )  # fmt: skip
        loss.backward()

    assert _ops_run(step) == {"linear_xent_fused", "linear_xent_scale"}


def test_recomputing_elsewhere(monkeypatch):
    h, w, b, y, sw = make(7, None, 5, 13, torch.float32, seed=1, weighted="row")
    hg, swg = h.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    none = fastis.linear_cross_entropy(hg, w, y, bias=b, reduction="none")
    assert _ops_run(lambda: none.sum().backward()) == {"linear_xent_grad"}
    # a gradient for sample_weight only: the row losses suffice
    assert _ops_run(lambda: fastis.linear_cross_entropy(h, w, y, sample_weight=swg)) == {
        "linear_xent"
    }
    with torch.no_grad():
        assert _ops_run(lambda: fastis.linear_cross_entropy(hg, w, y)) == {"linear_xent"}
    monkeypatch.setenv("FASTIS_BACKEND", "triton")
    assert not linear_ops.grads_in_forward(hg, w, None, "mean")
    assert linear_ops.grads_in_forward(hg.double(), w.double(), None, "mean")
    monkeypatch.setenv("FASTIS_BACKEND", "torch")
    assert linear_ops.grads_in_forward(hg, w, None, "sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("min_rows", [1, 10**9], ids=["fused", "too-few-rows"])
@pytest.mark.parametrize("N,T,D,V", [(19, None, 7, 211), (3, 5, 9, 1), (4, 6, 33, 1500)])
def test_matches_float64(fused_chunk, dtype, reduction, min_rows, N, T, D, V):
    fused_chunk(4 * V, min_rows)  # several chunks, the last one partial
    inputs = make(N, T, D, V, dtype, seed=N + V, weighted="row" if T is None else "token")
    check(*inputs, reduction=reduction, eps=0.1, kind="features")
    check(*inputs[:4], reduction=reduction)


@pytest.mark.parametrize("min_rows", [1, 10**9], ids=["fused", "too-few-rows"])
def test_gradcheck(fused_chunk, min_rows):
    fused_chunk(2 * 7, min_rows)
    h, w, b, y, _ = make(5, None, 3, 7, torch.float64, seed=12, ignore=0.3)
    inputs = tuple(x.requires_grad_(True) for x in (h, w, b, torch.rand(5, dtype=torch.float64)))
    for reduction in ("mean", "sum"):

        def f(h, w, b, sw, reduction=reduction):
            assert linear_ops.grads_in_forward(h, w, b, reduction)
            return fastis.linear_cross_entropy(
                h, w, y, bias=b, sample_weight=sw, reduction=reduction, label_smoothing=0.2
            )

        assert torch.autograd.gradcheck(f, inputs)


def test_sequence_weights_and_ignore_index(fused_chunk):
    fused_chunk(2 * 40)
    h, w, b, y, _ = make(3, 7, 6, 40, torch.float32, seed=4, weighted=None, ignore=0)
    y[:, ::2] = 5
    sw = torch.rand(3) * 2
    check(h, w, b, y, sw, reduction="mean", ignore_index=5, eps=0.2)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gradient_keeps_its_precision_as_p_y_goes_to_1(fused_chunk, eps):
    # logits of order 40: p_y - 1 ~ -1e-17, formed as -s / S, not by subtraction
    fused_chunk(4 * 50)
    h, w, b, y, _ = make(9, None, 6, 50, torch.float32, seed=9, ignore=0)
    w = w * 40
    y = (h.double() @ w.double().T + b.double()).argmax(-1)
    check(h, w, b, y, reduction="sum", eps=eps)


def test_non_finite_rows(fused_chunk):
    fused_chunk(2 * 30)
    h, w, b, y, _ = make(6, None, 4, 30, torch.float32, seed=8, ignore=0)
    h[1, 0] = float("nan")  # a NaN row
    h[2] = 3e38  # logits that overflow to +inf
    h[4, 2], y[4] = float("nan"), -100  # ignored: gradient 0
    hg = h.clone().requires_grad_(True)
    loss = fastis.linear_cross_entropy(hg, w, y, bias=b, reduction="sum")
    loss.backward()
    assert loss.isnan()
    dh = hg.grad
    assert dh[[1, 2]].isnan().all() and (dh[4] == 0).all() and dh[[0, 3, 5]].isfinite().all()


def test_all_ignored_mean_is_nan_with_zero_gradient():
    h, w, b, y, _ = make(4, None, 3, 5, torch.float32, seed=0)
    y[:] = -100
    hg = h.clone().requires_grad_(True)
    loss = fastis.linear_cross_entropy(hg, w, y, bias=b)
    loss.backward()
    assert loss.isnan() and (hg.grad == 0).all()


def test_backward_twice_and_double_backward():
    h, w, b, y, sw = make(8, None, 5, 11, torch.float32, seed=6, weighted="row")
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b, sw)]
    loss = fastis.linear_cross_entropy(*leaves[:2], y, bias=leaves[2], sample_weight=leaves[3])
    first = torch.autograd.grad(loss, leaves, torch.tensor(3.0), retain_graph=True)
    second = torch.autograd.grad(loss, leaves, torch.tensor(3.0))
    for a, c in zip(first, second, strict=True):  # the stored gradients are not scaled in place
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    loss = fastis.linear_cross_entropy(*leaves[:2], y, bias=leaves[2], sample_weight=leaves[3])
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grads[0].sum().backward()
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grads[3].sum().backward()


@pytest.mark.parametrize("N", [40, 400])
def test_holds_one_chunk_of_logits(fused_chunk, N):
    V, D = 97, 8
    fused_chunk(16 * V)
    h, w, b, y, _ = make(N, None, D, V, torch.bfloat16, seed=N)
    R = reference_linear.fused_rows(N, V)
    with _Largest((N, D), (V, D), (R, D)) as largest:
        reference_linear.linear_xent_fused(h, w, b, y, torch.rand(N), compute_score=True)
    assert R == 16 and largest.numel == R * V  # the chunk's logits, whatever N


def test_opcheck():
    h, w, b, y, _ = make(11, None, 6, 23, torch.float32, seed=4)
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    sw, count = torch.rand(11, requires_grad=True), torch.tensor(9.0)
    for bias, row_weight, n in ((b, sw, count), (None, None, None)):
        for score in (True, False):
            args = (h, w, bias, y, row_weight, n, -100, 0.1, score, True, True, bias is not None)
            torch.library.opcheck(torch.ops.fastis.linear_xent_fused.default, args)
    out = torch.ops.fastis.linear_xent_fused(h, w, b, y, sw, count, -100, 0.0, False, True,
                                             False, True)  # fmt: skip
    args = (torch.tensor(2.0), *out[4:], out[1], count, h.detach(), w.detach(), b, True)
    torch.library.opcheck(torch.ops.fastis.linear_xent_scale.default, args)


def test_compiled_training_step_fuses():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37).to(torch.bfloat16)
    h = torch.randn(2, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 37, (2, 6))

    def step(h):
        return fastis.linear_cross_entropy(h, head.weight, y, bias=head.bias, reduction="sum")

    assert "linear_xent_fused" in _ops_run(lambda: step(h))
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        loss = fn(h)
        results.append([loss, *torch.autograd.grad(loss, [h, *head.parameters()])])
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c)


def test_empty_batch_has_zero_gradients():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    loss = fastis.linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), reduction="sum")
    loss.backward()
    assert loss == 0 and h.grad.shape == (0, 4) and (w.grad == 0).all()
