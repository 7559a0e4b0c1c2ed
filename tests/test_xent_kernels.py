"""The softmax cross-entropy kernels, called directly, against ``fastis.reference`` in float64.

Under ``TRITON_INTERPRET=1`` (the conftest sets it without a GPU) the kernels run on CPU
tensors. The property test draws shapes (non-powers of two, and rows wider than one block of
columns), strides, dtypes, target kinds, ``ignore_index``, the gradient options (scaled, in
place) and NaN / +inf / -inf logits at random places, the target's column among them; every
output must match the reference, NaN where the reference has NaN.
"""

import math

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from fastis import reference

pytest.importorskip("triton")

from fastis._triton.softmax_xent import scale_rows_, softmax_xent  # noqa: E402

# the interpreter's reductions over rows holding NaN warn, as numpy does; harmless
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

KINDS = ("hard", "smooth", "soft", "soft_smooth")
GRADS = ("none", "grad", "scaled", "inplace", "inplace_scaled")
LAYOUTS = ("contiguous", "permuted", "sliced")
SPECIALS = (math.nan, math.inf, -math.inf)
# relative spacing of the gradient's storage dtype near 1: its rounding error, whether to
# nearest (on a GPU) or toward zero (the interpreter's bfloat16)
RESOLUTION = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def laid_out(x, layout):
    """``x``'s values in a tensor with other strides: dims reversed in memory, or every
    other element of a buffer twice as large in each dimension."""
    if layout == "permuted":
        dims = tuple(reversed(range(x.dim())))
        return x.permute(dims).contiguous().permute(dims)
    if layout == "sliced":
        big = torch.full([2 * n for n in x.shape], 7, dtype=x.dtype, device=x.device)
        view = big[tuple(slice(None, None, 2) for _ in x.shape)]
        return view.copy_(x)
    return x


@st.composite
def cases(draw):
    """One call's arguments (as a dict of plain values; tensors are made in the test)."""
    sequences = draw(st.booleans())
    C = draw(st.sampled_from([1, 2, 3, 7, 33, 100, 257, 1000, 4097, 5000]))
    wide = C > 4096  # several blocks of columns: keep the rows few
    if sequences:
        shape = (draw(st.integers(1, 2 if wide else 3)), draw(st.integers(1, 1 if wide else 4)))
    else:
        shape = (draw(st.integers(1, 2 if wide else 9)),)
    n_rows = math.prod(shape)
    specials = draw(
        st.lists(
            st.tuples(
                st.integers(0, n_rows - 1),
                st.one_of(st.just("target"), st.integers(0, C - 1)),
                st.sampled_from(SPECIALS),
            ),
            max_size=3,
        )
    )
    return dict(
        shape=shape + (C,),
        dtype=draw(st.sampled_from(list(RESOLUTION))),
        grad=draw(st.sampled_from(GRADS)),
        ignore_index=draw(st.sampled_from([-100, 1])),
        layouts=draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 3)),  # logits, target, grad
        scale=draw(st.sampled_from([1.0, 4.0, 30.0])),
        specials=specials,
        seed=draw(st.integers(0, 2**16)),
    )


def make_inputs(case, device):
    """Random logits (with the specials), targets and gradient scale for ``case``."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, C = case["shape"], case["shape"][-1]
    rows = shape[:-1]
    z = (torch.randn(shape, generator=g, dtype=torch.float64) * case["scale"]).to(case["dtype"])
    if case["kind"].startswith("soft"):
        raw = torch.rand(shape, generator=g, dtype=torch.float64) ** 4  # some near 0
        target = (raw / raw.sum(-1, keepdim=True)).to(case["dtype"])
        y = torch.full(rows, -1)
    else:
        y = torch.randint(0, C, rows, generator=g)
        # some rows ignored, some with an index outside [0, C)
        u = torch.rand(rows, generator=g)
        y = torch.where(u < 0.15, case["ignore_index"], y)
        y = torch.where((u > 0.15) & (u < 0.25), torch.tensor([C, -1, C + 5])[y % 3], y)
        target = y
    flat_z = z.view(-1, C)
    # the target's column: the class index, or the largest probability
    columns = target.view(-1, C).argmax(-1) if target.is_floating_point() else y.view(-1) % C
    for row, col, value in case["specials"]:
        flat_z[row, columns[row] if col == "target" else col] = value
    scale = None
    if case["grad"].endswith("scaled"):
        scale = torch.randn(math.prod(rows), generator=g)
        scale[::3] = 1.0
        scale[1::4] = 0.0
    if scale is not None and case["layouts"][2] == "sliced":
        scale = laid_out(scale, "sliced")
    return z.to(device), target.to(device), None if scale is None else scale.to(device)


def tolerances(logits, dtype):
    """``(rtol, atol, rounding)``: a few float32 roundings of the row's log-sum-exp, whose
    absolute error grows with the logits' magnitude, and the gradient's extra relative
    rounding to ``dtype``."""
    finite = logits[logits.isfinite()].double()
    zmax = finite.abs().max().item() if finite.numel() else 0.0
    tol = 5e-7 * (1.0 + zmax)
    return tol, tol, RESOLUTION[dtype]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20)
@given(case=cases())
@example(
    case=dict(shape=(2, 5000), dtype=torch.float32, grad="inplace_scaled",
              ignore_index=-100, layouts=("sliced", "sliced", "sliced"), scale=4.0,
              specials=[(0, 4500, math.nan), (1, 10, -math.inf)], seed=1)
)  # fmt: skip
@example(
    case=dict(shape=(1, 2, 4097), dtype=torch.bfloat16, grad="scaled",
              ignore_index=-100, layouts=("permuted", "contiguous", "sliced"), scale=30.0,
              specials=[(1, "target", -math.inf), (0, 4096, math.inf)], seed=2)
)  # fmt: skip
@example(
    case=dict(shape=(2, 4097), dtype=torch.float16, grad="grad",
              ignore_index=-100, layouts=("contiguous", "permuted", "permuted"), scale=1.0,
              specials=[(1, 4096, math.nan)], seed=3)
)  # fmt: skip
def test_matches_reference(kind, case, device):
    case = dict(case, kind=kind)
    for label in ("grad", "dtype"):
        event(f"{label}={case[label]}")
    event(f"blocks of columns: {-(-case['shape'][-1] // 4096)}")
    event(f"specials: {len(case['specials'])}")
    logits, target, grad_scale = make_inputs(case, device)
    logits = laid_out(logits, case["layouts"][0])
    target = laid_out(target, case["layouts"][1])
    eps = 0.1 if case["kind"].endswith("smooth") else 0.0
    mode = case["grad"]
    rtol, atol, rounding = tolerances(logits, case["dtype"])

    ref_target = target.double() if target.is_floating_point() else target
    want_loss, want_score, want_grad = reference.softmax_xent(
        logits.double(), ref_target, ignore_index=case["ignore_index"], label_smoothing=eps,
        compute_grad=mode != "none", grad_scale=None if grad_scale is None else grad_scale.double(),
    )  # fmt: skip
    if mode.startswith("inplace"):
        grad = logits
    elif mode != "none":
        grad = laid_out(torch.full_like(logits, 7.0), case["layouts"][2])
    else:
        grad = None
    loss, score = softmax_xent(
        logits, target, ignore_index=case["ignore_index"], label_smoothing=eps, grad=grad,
        grad_scale=grad_scale,
    )  # fmt: skip

    assert loss.dtype == score.dtype == torch.float32
    assert loss.shape == score.shape == logits.shape[:-1]
    close = dict(rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(loss.double(), want_loss, **close)
    torch.testing.assert_close(score.double(), want_score, **close)
    if grad is not None:
        assert grad.dtype == logits.dtype
        torch.testing.assert_close(
            grad.double(), want_grad, rtol=rtol + rounding, atol=atol, equal_nan=True
        )


@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_rows(kind, device):
    # a NaN (or +inf) logit anywhere, the target's column or not, makes the whole row NaN;
    # -inf is a masked class; ignored rows stay 0 whatever their logits
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).to(device)
    z[0, 0] = math.nan  # not the target
    z[1, 1] = math.nan  # the target
    z[2, 0] = math.inf
    z[3, 1] = math.inf
    z[4, 0] = -math.inf
    z[5, 0] = math.nan
    y = torch.tensor([1, 1, 1, 1, 1, -100], device=device)
    eps = 0.1 if kind.endswith("smooth") else 0.0
    target = torch.eye(3, device=device)[y.clamp(min=0)] if kind.startswith("soft") else y
    grad = torch.empty_like(z)
    loss, score = softmax_xent(z, target, label_smoothing=eps, grad=grad)
    want = reference.softmax_xent(
        z.double(), target.double() if kind.startswith("soft") else target,
        label_smoothing=eps, compute_grad=True,
    )  # fmt: skip
    for got, expected in zip((loss, score, grad), want, strict=True):
        torch.testing.assert_close(got.double(), expected, equal_nan=True)
    assert loss[:4].isnan().all() and score[:4].isnan().all() and grad[:4].isnan().all()
    # the masked class: probability 0; smoothing gives it target mass, hence an infinite loss
    assert score[4].isfinite() and grad[4].isfinite().all()
    assert grad[4, 0] == -eps / 3
    if kind == "hard":
        assert loss[4].isfinite()
    if kind.endswith("smooth"):
        assert loss[4] == math.inf
    if not kind.startswith("soft"):
        assert loss[5] == 0 and score[5] == 0 and (grad[5] == 0).all()


def test_masked_target_class_gives_infinite_loss(device):
    z = torch.tensor([[0.0, -math.inf, 0.0]], device=device)
    grad = torch.empty_like(z)
    loss, score = softmax_xent(z, torch.tensor([1], device=device), grad=grad)
    assert loss[0] == math.inf
    torch.testing.assert_close(score, torch.tensor([1.5**0.5], device=device))
    torch.testing.assert_close(grad, torch.tensor([[0.5, -1.0, 0.5]], device=device))


def test_score_keeps_relative_precision_as_p_y_goes_to_1(device):
    # 1 - p_y is summed from the other classes, never formed as a difference
    z = torch.zeros(3, 10, device=device)
    z[:, 0] = torch.tensor([15.0, 25.0, 40.0])
    target = torch.zeros(3, dtype=torch.long, device=device)
    _, score = softmax_xent(z, target)
    _, want, _ = reference.softmax_xent(z.double(), target)
    assert (want > 0).all()
    torch.testing.assert_close(score.double(), want, rtol=1e-5, atol=0)


def test_one_grad_scale_for_all_rows(device):
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.tensor([0, 4, -100, 2], device=device)
    grad, want = torch.empty_like(z), torch.empty_like(z)
    softmax_xent(z, y, grad=grad, grad_scale=torch.tensor([-0.5], device=device))
    softmax_xent(z, y, grad=want, grad_scale=torch.full((4,), -0.5, device=device))
    assert torch.equal(grad, want)


def test_bad_grad_shapes_are_refused(device):
    z = torch.randn(4, 5, device=device)
    y = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="grad must have the logits' shape"):
        softmax_xent(z, y, grad=torch.empty(4, 6, device=device))
    with pytest.raises(ValueError, match="grad_scale must hold 1 or 4 factors"):
        softmax_xent(z, y, grad=torch.empty_like(z), grad_scale=torch.ones(3, device=device))


def test_no_rows(device):
    z = torch.randn(0, 5, device=device)
    loss, score = softmax_xent(z, torch.zeros(0, dtype=torch.long, device=device))
    assert loss.shape == score.shape == (0,)


@pytest.mark.parametrize("dtype", list(RESOLUTION))
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 130), (2, 4100)])
@pytest.mark.parametrize("per_row", [True, False])
def test_scale_rows(dtype, shape, per_row, device):
    g = torch.Generator().manual_seed(sum(shape))
    grad = laid_out(torch.randn(shape, generator=g).to(dtype), "permuted").to(device)
    before = grad.clone()
    if per_row:
        scale = torch.randn(shape[:-1], generator=g)
        scale.view(-1)[::2] = 1.0
    else:
        scale = torch.tensor(0.25)
    scale_rows_(grad, scale.to(device))
    factor = (scale[..., None] if per_row else scale).to(device)
    want = (before.float() * factor).to(dtype)
    torch.testing.assert_close(grad, want, rtol=RESOLUTION[dtype], atol=0)
    if per_row:  # rows whose factor is 1 are left as they were, bit for bit
        untouched = (scale == 1.0).to(device)
        assert torch.equal(grad[untouched], before[untouched])
