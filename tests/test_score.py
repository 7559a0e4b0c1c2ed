"""fastis.score against a float64 ground truth, on both backends (Triton runs interpreted)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastis
from fastis import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the inputs are the same numbers in every dtype (rounded once), and both backends compute
# in float32, so one relative tolerance covers all three
RTOL, ATOL = 2e-5, 1e-30


def truth(logits, target, *, ignore_index=-100, label_smoothing=0.0, features=None, bias=True):
    """Float64 score from the autograd gradient of torch's own cross-entropy."""
    z = logits.detach().double().requires_grad_(True)
    t = target.double() if target.is_floating_point() else target.long()
    flat_t = t.reshape(-1, z.shape[-1]) if t.is_floating_point() else t.reshape(-1)
    loss = F.cross_entropy(
        z.reshape(-1, z.shape[-1]),
        flat_t,
        reduction="sum",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    (grad,) = torch.autograd.grad(loss, z)
    g = torch.linalg.vector_norm(grad, dim=-1)
    if features is not None:
        h2 = features.double().square().sum(-1) + (1.0 if bias else 0.0)
        g = g * h2.sqrt()
    if logits.dim() == 3:
        g = torch.linalg.vector_norm(g, dim=1)
    return g


def check(logits, target, expected=None, rtol=RTOL, **kw):
    got = fastis.score(logits, target, **kw)
    assert got.dtype == torch.float32 and got.device == logits.device
    assert not got.requires_grad
    expected = truth(logits, target, **kw) if expected is None else expected
    torch.testing.assert_close(got.double(), expected.to(got.device), rtol=rtol, atol=ATOL)


def random_logits(shape, dtype, device, scale=3.0, generator=None):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "N,C", [(7, 1), (5, 2), (9, 3), (33, 10), (6, 1000), (2, 50257), (2, 131072)]
)
def test_matches_float64(backend, device, dtype, N, C):
    g = torch.Generator().manual_seed(N * C)
    logits = random_logits((N, C), dtype, device, generator=g)
    target = torch.randint(0, C, (N,), generator=g).to(device)
    check(logits, target)


def test_reference_agrees_with_autograd():
    # the torch path in float64 is the oracle the kernel is held to; hold it to autograd
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 37, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, 37, (64,), generator=g)
    target[::7] = -100
    for eps in (0.0, 0.1, 1.0):
        loss, score, grad = reference.softmax_xent(
            logits, target, label_smoothing=eps, compute_grad=True
        )
        z = logits.clone().requires_grad_(True)
        ref_loss = F.cross_entropy(z, target, reduction="none", label_smoothing=eps)
        (ref_grad,) = torch.autograd.grad(ref_loss.sum(), z)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(score, ref_grad.norm(dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits(backend, device, dtype):
    g = torch.Generator().manual_seed(1)
    logits = random_logits((17, 300), torch.float32, device, scale=1.0, generator=g) * 1e4
    logits = logits.to(dtype)
    target = torch.randint(0, 300, (17,), generator=g).to(device)
    target[:4] = logits[:4].float().argmax(1)  # confident and right: tiny scores
    check(logits, target)


@pytest.mark.parametrize("gap", [5.0, 20.0, 40.0, 60.0, 80.0])
def test_near_one_hot_keeps_relative_precision(backend, device, gap):
    # p_y = 1 - O(C e^-gap): 1 - p_y cannot be formed by subtraction in any precision
    g = torch.Generator().manual_seed(int(gap))
    C = 50
    logits = torch.randn(8, C, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (8,), generator=g)
    logits[torch.arange(8), target] += gap
    # the exact score, from the other classes' probabilities alone
    lse = torch.logsumexp(logits, 1, keepdim=True)
    p = torch.exp(logits - lse).scatter(1, target[:, None], 0.0)
    expected = torch.sqrt(p.sum(1) ** 2 + p.square().sum(1))
    check(logits.float().to(device), target.to(device), expected=expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_soft_targets(backend, device, dtype, eps):
    g = torch.Generator().manual_seed(2)
    logits = random_logits((13, 70), dtype, device, generator=g)
    target = torch.softmax(torch.randn(13, 70, generator=g) * 2, 1).to(device)
    check(logits, target, label_smoothing=eps)
    # a student that matches its teacher scores ~0, up to float32 rounding of p
    close = torch.softmax(logits.double(), 1).to(device)
    got = fastis.score(logits, close)
    assert (got < 1e-6).all()


@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0])
def test_label_smoothing(backend, device, eps):
    g = torch.Generator().manual_seed(3)
    logits = random_logits((21, 500), torch.float32, device, generator=g)
    target = torch.randint(0, 500, (21,), generator=g).to(device)
    target[3] = -100
    check(logits, target, label_smoothing=eps)


def test_ignore_index(backend, device):
    g = torch.Generator().manual_seed(4)
    logits = random_logits((10, 11), torch.float32, device, generator=g)
    target = torch.randint(0, 11, (10,), generator=g).to(device)
    target[[1, 5]] = -100
    got = fastis.score(logits, target)
    assert got[1] == 0 and got[5] == 0 and (got[[0, 2, 3]] > 0).all()
    target[[1, 5]] = 3
    target[7] = 4
    check(logits, target, ignore_index=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequences(backend, device, dtype):
    g = torch.Generator().manual_seed(5)
    B, T, C = 3, 7, 129
    logits = random_logits((B, T, C), dtype, device, generator=g)
    target = torch.randint(0, C, (B, T), generator=g).to(device)
    target[0, 2:] = -100
    target[2] = -100  # a sequence with no tokens scores 0
    check(logits, target)
    assert fastis.score(logits, target)[2] == 0
    soft = torch.softmax(torch.randn(B, T, C, generator=g), -1).to(device)
    check(logits, soft, label_smoothing=0.2)


def test_strided_inputs(backend, device):
    g = torch.Generator().manual_seed(6)
    base = random_logits((12, 2 * 301), torch.float32, device, generator=g)
    target = torch.randint(0, 301, (24,), generator=g).to(device)
    check(base[:, ::2], target[::2])  # strided columns and target
    check(base[:, 301:], target[:12])  # row stride larger than C
    check(base.t()[:301].t(), target[:12])
    seq = random_logits((5, 4, 33), torch.float32, device, generator=g).transpose(0, 1)
    check(seq, torch.randint(0, 33, (4, 5), generator=g).to(device))


def _per_sample_linear_grad_norms(h, target, bias):
    """Exact per-sample gradient norms of nn.Linear + cross-entropy, through torch.func."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(h.shape[-1], 9, bias=bias).double()
    params = dict(layer.named_parameters())

    def loss(p, x, y):
        z = torch.func.functional_call(layer, p, (x,))
        return F.cross_entropy(z.reshape(-1, 9), y.reshape(-1), reduction="sum")

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, h, target)
    sq = sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())
    with torch.no_grad():
        logits = layer(h)
    return logits, sq.sqrt()


@pytest.mark.parametrize("bias", [True, False])
def test_features_give_exact_last_layer_norm(backend, device, bias):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(16, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 9, (16,), generator=g)
    target[4] = -100
    logits, expected = _per_sample_linear_grad_norms(h, target, bias)
    got = fastis.score(logits.float().to(device), target.to(device), features=h.float(), bias=bias)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_sequence_features(backend, device):
    # per token, the exact norm; per sequence, the norm of the stacked per-token gradients
    g = torch.Generator().manual_seed(8)
    h = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 9, (6, 3), generator=g)
    target[1, 1] = -100
    tokens = h.reshape(18, 1, 4)
    logits, per_token = _per_sample_linear_grad_norms(tokens, target.reshape(18, 1), True)
    got = fastis.score(logits.reshape(6, 3, 9).float(), target, features=h.float())
    expected = per_token.reshape(6, 3).norm(dim=1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_nonfinite_logits(backend, device):
    logits = torch.randn(6, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    logits[0, 3] = float("nan")  # NaN anywhere: NaN
    logits[1, 1] = float("nan")  # NaN at the target
    logits[2, 0] = float("inf")  # +inf anywhere: NaN
    logits[3, 3] = float("inf")  # +inf at the target: NaN (softmax undefined)
    logits[4, :2] = float("-inf")  # -inf: a masked class, probability 0
    logits[5, 0] = float("-inf")  # -inf at the target: loss inf, finite score
    got = fastis.score(logits.float().to(device), target.to(device))
    assert got[:4].isnan().all()
    expected = truth(logits[4:], target[4:])
    assert expected.isfinite().all()
    torch.testing.assert_close(got[4:].double(), expected, rtol=RTOL, atol=ATOL)
    all_masked = torch.full((1, 4), float("-inf"), device=device)
    assert fastis.score(all_masked, torch.tensor([1], device=device)).isnan().all()


def test_empty_batches(backend, device):
    assert fastis.score(
        torch.randn(0, 5, device=device), torch.zeros(0, dtype=torch.long, device=device)
    ).shape == (0,)
    assert fastis.score(
        torch.randn(0, 3, 5, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    ).shape == (0,)
    got = fastis.score(
        torch.randn(2, 0, 5, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)
    )
    assert got.tolist() == [0.0, 0.0]


def test_int32_target_and_no_grad(backend, device):
    g = torch.Generator().manual_seed(9)
    logits = random_logits((8, 12), torch.float32, device, generator=g).requires_grad_(True)
    target = torch.randint(0, 12, (8,), generator=g).to(device)
    got = fastis.score(logits, target.int())
    assert not got.requires_grad
    torch.testing.assert_close(got, fastis.score(logits, target))


@pytest.mark.parametrize("C", [6, 40])
def test_out_of_range_target_is_an_error_on_cpu(backend, C):
    logits = torch.randn(4, C)
    for bad in (C, -1, -101):
        target = torch.tensor([0, bad, 2, 3])
        with pytest.raises(ValueError, match=rf"class index {bad}, outside \[0, {C}\)"):
            fastis.score(logits, target)
        # the ignored index is no error, and scores 0
        got = fastis.score(logits, target, ignore_index=bad)
        assert got[1] == 0 and (got[[0, 2, 3]] > 0).all()


def test_kernel_marks_out_of_range_rows_nan(device):
    # what CUDA callers get (no check there: it would synchronise); the kernel reads nothing
    # out of bounds and marks the row
    pytest.importorskip("triton")
    from fastis._triton.softmax_xent import softmax_xent as kernel

    logits = torch.randn(4, 6, device=device)
    target = torch.tensor([0, 6, -5, -100], device=device)
    grad = torch.empty_like(logits)
    loss, score = kernel(logits, target, grad=grad)
    _, ref_score, ref_grad = reference.softmax_xent(logits, target, compute_grad=True)
    assert score[1:3].isnan().all() and ref_score[1:3].isnan().all()
    assert grad[1:3].isnan().all() and ref_grad[1:3].isnan().all()
    assert score[3] == 0 and (grad[3] == 0).all() and loss[3] == 0
    assert score[0].isfinite()


@pytest.mark.parametrize(
    "logits,target,kwargs,error,match",
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), {}, ValueError, r"\[N, C\]"),
        (
            torch.randn(2, 3, 4, 5),
            torch.zeros(2, 3, 4, dtype=torch.long),
            {},
            ValueError,
            r"\[N, C\]",
        ),
        (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), {}, ValueError, r"outside \[0, 0\)"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), {}, ValueError, r"shape \(4,\)"),
        (
            torch.randn(2, 4, 3),
            torch.zeros(2, 5, dtype=torch.long),
            {},
            ValueError,
            r"shape \(2, 4\)",
        ),
        (torch.randn(4, 3), torch.zeros(4, 2), {}, ValueError, "soft"),
        (
            torch.randint(0, 3, (4, 3)),
            torch.zeros(4, dtype=torch.long),
            {},
            TypeError,
            "logits must be floating",
        ),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.bool), {}, TypeError, "int64/int32"),
        (torch.randn(4, 3), [0, 1, 2, 0], {}, TypeError, "target must be a tensor"),
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long, device="meta"),
            {},
            ValueError,
            "target is on meta",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"label_smoothing": 1.5},
            ValueError,
            "label_smoothing",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"features": torch.randn(3, 2)},
            ValueError,
            r"features must have shape \(4, 'D'\)",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"features": torch.randn(4)},
            ValueError,
            "features must have shape",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"features": torch.ones(4, 2, dtype=torch.long)},
            TypeError,
            "features must be float",
        ),
    ],
)
def test_bad_input(logits, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastis.score(logits, target, **kwargs)


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("FASTIS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTIS_BACKEND"):
        fastis.score(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_compiles_fullgraph(backend, device):
    def step(z, y):
        return fastis.score(z, y).mean() + fastis.score(z, y, label_smoothing=0.1).sum()

    compiled = torch.compile(step, fullgraph=True)
    z = torch.randn(9, 17, device=device)
    y = torch.randint(0, 17, (9,), device=device)
    torch.testing.assert_close(compiled(z, y), step(z, y))


def test_opcheck(backend, device):
    z = torch.randn(5, 13, device=device)
    for target in (
        torch.randint(0, 13, (5,), device=device),
        torch.softmax(torch.randn(5, 13, device=device), 1),
    ):
        torch.library.opcheck(torch.ops.fastis.softmax_xent.default, (z, target, -100, 0.1, True))


@settings(max_examples=30)
@given(
    rows=st.integers(0, 40),
    T=st.one_of(st.none(), st.integers(0, 4)),
    C=st.integers(1, 700),
    dtype=st.sampled_from(DTYPES),
    soft=st.booleans(),
    eps=st.sampled_from([0.0, 0.25]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(backend, device, rows, T, C, dtype, soft, eps, scale, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, C) if T is None else (rows, T, C)
    logits = random_logits(shape, dtype, device, scale=scale, generator=g)
    if soft:
        target = torch.softmax(torch.randn(shape, generator=g), -1).to(device)
    else:
        target = torch.randint(0, C, shape[:-1], generator=g)
        target[torch.rand(shape[:-1], generator=g) < 0.2] = -100
        target = target.to(device)
    check(logits, target, label_smoothing=eps, rtol=5e-5 if not math.isclose(scale, 30) else 1e-4)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float64),
    ],
)
def test_features_of_any_float_dtype(backend, device, dtypes):
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device, dtypes[0])
    target = torch.tensor([0, 1, 2, 0], device=device)
    features = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device, dtypes[1])
    got = fastis.score(logits, target, features=features)
    assert got.dtype == torch.float32
    expected = truth(logits.double(), target, features=features.double())
    rtol = 1e-2 if dtypes[0] == torch.bfloat16 else RTOL
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=ATOL)


def test_uint8_targets(backend, device):
    g = torch.Generator().manual_seed(18)
    logits = random_logits((6, 4), torch.float32, device, generator=g)
    target = torch.randint(0, 4, (6,), generator=g).to(device)
    torch.testing.assert_close(
        fastis.score(logits, target.to(torch.uint8)), fastis.score(logits, target)
    )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"bias": "no"}, TypeError, "bias must be a bool"),
        ({"ignore_index": None}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": 2**70}, ValueError, "ignore_index must fit in int64"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a float"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastis.score(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("ignore_index", [-100, 0, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_few_op_score_matches_one_pass_formula(ignore_index, dtype):
    # the CPU step's score (reference.score_rows) against the one-pass formula of
    # reference.softmax_xent, with ignored, out-of-range and non-finite rows
    g = torch.Generator().manual_seed(3 + ignore_index)
    logits = torch.randn(40, 10, generator=g, dtype=torch.float64) * 5
    target = torch.randint(0, 10, (40,), generator=g)
    logits[torch.arange(6, 12), target[6:12]] += torch.tensor([20.0, 40.0, 60.0, 80, 5, 1])
    logits[1, 3], logits[2], logits[3, 0] = float("inf"), float("-inf"), float("nan")
    target[::9] = ignore_index
    target[13], target[14] = 10, -3  # out of range: NaN
    logits = logits.to(dtype)
    _, expected, _ = reference.softmax_xent(logits, target, ignore_index=ignore_index)
    got = reference.score_rows(logits, target, ignore_index=ignore_index)
    assert got.dtype == expected.dtype
    assert got[13:15].isnan().all() and (got[::9] == 0).all()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0, equal_nan=True)
    # 'clean' (no ignored or out-of-range rows) skips the masks and changes nothing else
    # (up to the rounding of reductions vectorised over another number of rows)
    keep = (target >= 0) & (target < 10) & (target != ignore_index)
    clean = reference.score_rows(logits[keep], target[keep], ignore_index=ignore_index, clean=True)
    torch.testing.assert_close(
        clean, got[keep], rtol=4 * torch.finfo(dtype).eps, atol=0, equal_nan=True
    )


def _vmap_check(device, soft):
    g = torch.Generator().manual_seed(11)
    z = (3 * torch.randn(4, 5, 6, generator=g)).to(device)
    y = torch.rand(4, 5, 6, generator=g).softmax(-1) if soft else torch.randint(0, 6, (4, 5))
    y = y.to(device)

    def oracle(z, y):
        return reference.softmax_xent(z.double(), y.double() if soft else y)[1]

    got = torch.func.vmap(fastis.score)(z, y)
    torch.testing.assert_close(got.double(), oracle(z, y), rtol=1e-5, atol=1e-6)
    shared = torch.func.vmap(fastis.score, in_dims=(0, None))(z, y[0])
    torch.testing.assert_close(
        shared.double(), oracle(z, y[0].expand(y.shape)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("soft", [False, True])
def test_vmap(backend, device, soft):
    """``torch.func.vmap`` over a leading dimension: the scores of the stacked rows, as the
    float64 reference gives them (the op's batching rule)."""
    _vmap_check(device, soft)


@pytest.mark.parametrize("soft", [False, True])
def test_vmap_native(native, monkeypatch, soft):
    monkeypatch.setenv("FASTIS_BACKEND", "native")
    _vmap_check("cpu", soft)
