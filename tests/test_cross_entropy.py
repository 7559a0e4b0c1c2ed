"""fastis.cross_entropy: loss, gradients and score against float64 torch, on both backends."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastis

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]


def truth(logits, target, weight, reduction, ignore_index=-100, label_smoothing=0.0):
    """Float64 loss and gradients from torch's own cross-entropy, weighted by hand."""
    z = logits.detach().double().requires_grad_(True)
    w = None if weight is None else weight.detach().double().requires_grad_(weight.requires_grad)
    C = z.shape[-1]
    t = target.double() if target.is_floating_point() else target.long()
    flat_t = t.reshape(-1, C) if t.is_floating_point() else t.reshape(-1)
    rows = F.cross_entropy(
        z.reshape(-1, C),
        flat_t,
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    rows = rows.reshape(z.shape[:-1])
    if w is not None:
        rows = rows * (w[:, None] if z.dim() == 3 else w)
    if reduction == "sum":
        loss = rows.sum()
    elif reduction == "mean":
        n = rows.numel() if t.is_floating_point() else (t != ignore_index).sum()
        loss = rows.sum() / n
    else:
        loss = rows
    v = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inputs = [z] + ([w] if w is not None and w.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs, grad_outputs=v.to(loss.device))
    return loss.detach(), grads, v


def check(logits, target, weight=None, reduction="mean", inplace=False, **kw):
    z = logits.detach().clone().requires_grad_(True)
    # inplace=True overwrites its input: hand it a copy (a non-leaf, as model outputs are)
    loss, score = fastis.cross_entropy(
        z.clone() if inplace else z,
        target,
        sample_weight=weight,
        reduction=reduction,
        return_score=True,
        inplace=inplace,
        **kw,
    )
    ref_loss, ref_grads, v = truth(logits, target, weight, reduction, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-6)
    inputs = [z] + ([weight] if weight is not None and weight.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs, grad_outputs=v.to(loss))
    assert grads[0].dtype == logits.dtype
    if logits.dtype == torch.float32:
        torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=2e-5, atol=1e-7)
    else:
        # stored in a 16-bit dtype: within one unit in the last place of the exact gradient
        # (Triton's interpreter truncates float32 -> bfloat16 stores; GPUs round to nearest);
        # in place, a second rounding when the stored gradient is rescaled in backward
        exact = ref_grads[0]
        ulp = (2 if inplace else 1) * torch.finfo(logits.dtype).eps * exact.abs()
        err = (grads[0].double() - exact).abs()
        # among 16-bit subnormals the spacing is absolute (smallest_normal * eps): each
        # rounding errs by up to half of it, the in-place one scaled by the incoming gradient
        info = torch.finfo(logits.dtype)
        subnormal = info.smallest_normal * info.eps * (1 + v.abs().max().item())
        assert (err <= ulp + subnormal + 1e-6 * exact.abs().max()).all()
    if len(grads) > 1:
        # dloss/dw is the loss itself, known to float32 rounding of the logits' scale
        torch.testing.assert_close(grads[1].double(), ref_grads[1], rtol=2e-5, atol=1e-6)
    # the score from the same pass is fastis.score's, bit for bit
    assert not score.requires_grad
    same = fastis.score(
        logits,
        target,
        ignore_index=kw.get("ignore_index", -100),
        label_smoothing=kw.get("label_smoothing", 0.0),
    )
    torch.testing.assert_close(score, same, rtol=0, atol=0, equal_nan=True)


def make(shape, dtype, device, seed, soft=False, ignore=0.0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    C = shape[-1]
    if soft:
        target = torch.softmax(torch.randn(shape, generator=g), -1).to(device)
    else:
        target = torch.randint(0, C, shape[:-1], generator=g)
        target[torch.rand(shape[:-1], generator=g) < ignore] = -100
        target = target.to(device)
    weight = None
    if weighted:
        weight = (torch.rand(shape[0], generator=g) * 2).to(device).requires_grad_(True)
    return logits, target, weight


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,C", [(9, 1), (17, 10), (6, 1000), (2, 131072)])
def test_matches_torch(backend, device, dtype, reduction, N, C, inplace):
    logits, target, weight = make((N, C), dtype, device, seed=N + C, ignore=0.2)
    check(logits, target, weight, reduction, inplace=inplace)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_soft_targets_and_smoothing(backend, device, reduction, eps):
    logits, target, weight = make((11, 37), torch.float32, device, seed=1, soft=True)
    check(logits, target, weight, reduction, label_smoothing=eps)
    check(logits, target, weight, reduction, inplace=True, label_smoothing=eps)
    logits, target, weight = make((11, 37), torch.bfloat16, device, seed=2, ignore=0.3)
    check(logits, target, weight, reduction, label_smoothing=0.2)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sequences(backend, device, reduction):
    logits, target, weight = make((3, 5, 29), torch.float32, device, seed=3, ignore=0.3)
    check(logits, target, weight, reduction)
    check(logits, target, weight, reduction, inplace=True)
    check(logits, target.masked_fill(target == -100, 7), None, reduction, ignore_index=7)
    logits, target, weight = make((3, 5, 29), torch.float32, device, seed=4, soft=True)
    check(logits, target, weight, reduction, label_smoothing=0.1)


def test_unweighted_equals_torch(backend, device):
    logits, target, _ = make((13, 50), torch.float32, device, seed=5, ignore=0.2)
    for reduction in REDUCTIONS:
        ours = fastis.cross_entropy(logits, target, reduction=reduction)
        torch.testing.assert_close(ours, F.cross_entropy(logits, target, reduction=reduction))


def test_weight_without_grad_and_int32_target(backend, device):
    logits, target, weight = make((8, 6), torch.float32, device, seed=6)
    check(logits, target.int(), weight.detach(), "sum")


def test_all_ignored_mean_is_nan_like_torch(backend, device):
    logits = torch.randn(4, 3, device=device)
    target = torch.full((4,), -100, device=device)
    assert fastis.cross_entropy(logits, target).isnan()
    assert F.cross_entropy(logits, target).isnan()
    assert fastis.cross_entropy(logits, target, reduction="sum") == 0


def test_backward_twice_with_retain_graph(backend, device):
    logits, target, weight = make((5, 7), torch.float32, device, seed=7)
    z = logits.clone().requires_grad_(True)
    loss = fastis.cross_entropy(z, target, sample_weight=weight)
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * first)


def test_inplace_overwrites_logits_with_the_gradient(backend, device):
    logits, target, weight = make((6, 9), torch.bfloat16, device, seed=9, ignore=0.3)
    z = logits.detach().clone().requires_grad_(True)
    expected = torch.autograd.grad(fastis.cross_entropy(z, target, sample_weight=weight), z)[0]
    y = z.detach().clone().requires_grad_(True)
    buffer = y.clone()
    loss = fastis.cross_entropy(buffer, target, sample_weight=weight, inplace=True)
    torch.testing.assert_close(buffer, expected.to(buffer.dtype), rtol=0, atol=0)
    loss.backward(retain_graph=True)  # an incoming gradient of 1: nothing left to scale
    torch.testing.assert_close(y.grad, expected, rtol=0, atol=0)
    assert buffer.data_ptr() != y.data_ptr()
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


def test_inplace_refuses_when_the_logits_are_needed_elsewhere(backend, device):
    z = torch.randn(4, 3, device=device, requires_grad=True)
    probs = torch.sigmoid(z * 1)  # sigmoid saves its output for backward
    loss = fastis.cross_entropy(
        probs, torch.zeros(4, dtype=torch.long, device=device), inplace=True
    )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + probs.sum()).backward()


def test_gradcheck_torch_path(monkeypatch):
    monkeypatch.setenv("FASTIS_BACKEND", "torch")
    g = torch.Generator().manual_seed(8)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 1, 2])
    w = torch.rand(5, generator=g, dtype=torch.float64, requires_grad=True)
    soft = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), 1)
    for reduction in REDUCTIONS:
        for target, eps in ((y, 0.0), (y, 0.3), (soft, 0.1)):

            def f(z, w, target=target, eps=eps, reduction=reduction):
                return fastis.cross_entropy(
                    z, target, sample_weight=w, reduction=reduction, label_smoothing=eps
                )

            assert torch.autograd.gradcheck(f, (z, w))


def test_opcheck_with_autograd(backend, device):
    z = torch.randn(6, 11, device=device, requires_grad=True)
    y = torch.randint(0, 11, (6,), device=device)
    ops = torch.ops.fastis
    for compute_score in (False, True):
        torch.library.opcheck(ops.softmax_xent.default, (z, y, -100, 0.0, compute_score))
    grad_loss = torch.rand(6, device=device, requires_grad=True)
    torch.library.opcheck(ops.softmax_xent_grad.default, (z, y, -100, 0.1, grad_loss))
    torch.library.opcheck(
        ops.softmax_xent_.default, (z.detach().clone(), y, -100, 0.1, torch.rand(6, device=device))
    )
    for scale in (torch.rand(6, device=device), torch.tensor(2.0, device=device)):
        torch.library.opcheck(ops.scale_rows_.default, (z.detach().clone(), scale))


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_compiled_training_step(backend, device, inplace):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).to(
        device
    )
    x = torch.randn(12, 8, device=device)
    y = torch.randint(0, 5, (12,), device=device)
    w = torch.rand(12, device=device)

    def step(x, y, w):
        loss, score = fastis.cross_entropy(
            model(x), y, sample_weight=w, return_score=True, inplace=inplace
        )
        return loss, score

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (step, compiled):
        model.zero_grad()
        loss, score = fn(x, y, w)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()] + [loss, score])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_autocast_bfloat16(backend, device):
    torch.manual_seed(1)
    layer = torch.nn.Linear(8, 10).to(device)
    x = torch.randn(16, 8, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    results = []
    for loss_fn in (fastis.cross_entropy, F.cross_entropy):
        layer.zero_grad()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = layer(x)
            assert logits.dtype == torch.bfloat16
            loss = loss_fn(logits, y)
        loss.backward()
        results.append((loss.float(), layer.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_weights_raise_on_cpu(bad):
    w = torch.ones(4)
    w[2] = bad
    with pytest.raises(ValueError, match="sample_weight must be finite and non-negative"):
        fastis.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), sample_weight=w)


def test_bad_weights_poison_their_row_where_unchecked(backend, device):
    # what CUDA and compiled code get: no check (it would synchronise), a NaN instead
    from fastis.loss import _checked_weight

    w = torch.tensor([1.0, -1.0, float("inf"), 2.0], device=device)
    with torch.compiler.set_stance("default"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        got = _checked_weight(w, torch.randn(4, 3, device=device))
    assert got[1:3].isnan().all() and got[[0, 3]].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sample_weight": torch.ones(3)}, ValueError, r"sample_weight must have shape \(4,\)"),
        ({"sample_weight": torch.ones(4, 1)}, ValueError, "sample_weight must have shape"),
        (
            {"sample_weight": torch.ones(4, dtype=torch.long)},
            TypeError,
            "sample_weight must be floating",
        ),
        ({"sample_weight": torch.ones(4, device="meta")}, ValueError, "sample_weight is on meta"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastis.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), **kwargs)


def test_bad_input_sequences():
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(2,\)"):
        fastis.cross_entropy(
            torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), sample_weight=torch.ones(6)
        )
    with pytest.raises(ValueError, match="class index 5"):
        fastis.cross_entropy(torch.randn(2, 3, 5), torch.full((2, 3), 5))


@settings(max_examples=20)
@given(
    N=st.integers(1, 16),
    T=st.one_of(st.none(), st.integers(1, 3)),
    C=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    soft=st.booleans(),
    weighted=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    eps=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(backend, device, N, T, C, dtype, soft, weighted, reduction, eps, seed):
    inplace = seed % 2 == 1
    shape = (N, C) if T is None else (N, T, C)
    logits, target, weight = make(
        shape, dtype, device, seed, soft=soft, ignore=0.2, weighted=weighted
    )
    if reduction == "mean" and not soft and (target == -100).all():
        target.view(-1)[0] = 0  # an all-ignored mean is NaN, tested on its own
    check(logits, target, weight, reduction, inplace=inplace, label_smoothing=eps)


# --------------------------------------------------------------------------------------
# what torch users rely on: in-place rules, higher-order and forward-mode AD, float64


def test_inplace_refuses_a_leaf_that_requires_grad(backend, device):
    y = torch.zeros(4, dtype=torch.long, device=device)
    p = torch.nn.Parameter(torch.randn(4, 3, device=device))
    for logits in (p, p[:], p.view(4, 3)):
        with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
            fastis.cross_entropy(logits, y, inplace=True)
    before = p.detach().clone()
    assert torch.equal(p.detach(), before)  # untouched


def test_inplace_refuses_overlapping_memory(backend, device):
    y = torch.zeros(4, dtype=torch.long, device=device)
    b = torch.randn(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="share memory"):
        fastis.cross_entropy(b.detach().expand(4, 3), y, inplace=True)
    base = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match="share memory"):
        fastis.cross_entropy(base.as_strided((4, 3), (1, 1)), y, inplace=True)
    # distinct elements in any order are fine
    z = torch.randn(3, 4, device=device).t()
    fastis.cross_entropy(z, y, inplace=True)


def test_inplace_refuses_inference_tensors_outside_inference_mode(backend, device):
    y = torch.zeros(4, dtype=torch.long, device=device)
    with torch.inference_mode():
        z = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match="inference"):
        fastis.cross_entropy(z, y, inplace=True)
    with torch.inference_mode():
        fastis.cross_entropy(z, y, inplace=True)


def test_expanded_logits_get_the_summed_gradient(backend, device):
    # not in place: a broadcast row receives the sum of its rows' gradients, as in torch
    b = torch.randn(3, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1], device=device)
    (grad,) = torch.autograd.grad(fastis.cross_entropy(b.expand(4, 3), y), b)
    (ref,) = torch.autograd.grad(F.cross_entropy(b.expand(4, 3), y), b)
    torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_double_backward_matches_torch(backend, device, soft, eps):
    # a gradient penalty: d/dz and d/dw of ||dloss/dz||^2, float32 on the kernel path
    logits, target, weight = make((6, 7), torch.float32, device, seed=11, soft=soft, ignore=0.2)
    results = []
    for fn in (fastis.cross_entropy, None):
        z = (
            logits.detach().double().clone().requires_grad_(True)
            if fn is None
            else logits.detach().clone().requires_grad_(True)
        )
        w = weight.detach().to(z.dtype).clone().requires_grad_(True)
        t = target.to(z.dtype) if soft else target
        if fn is None:
            rows = F.cross_entropy(z, t, reduction="none", label_smoothing=eps)
            loss = (rows * w).sum() / (rows.numel() if soft else (t != -100).sum())
        else:
            loss = fn(z, t, sample_weight=w, label_smoothing=eps)
        (g,) = torch.autograd.grad(loss, z, create_graph=True)
        assert g.requires_grad
        results.append(torch.autograd.grad((g * g).sum() + g[:, 0].sum(), [z, w]))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)


def test_gradgradcheck_float64(backend, device):
    g = torch.Generator().manual_seed(12)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.rand(5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    y = torch.tensor([0, 3, -100, 1, 2], device=device)
    soft = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), 1).to(device)
    soft.requires_grad_(True)
    for target, eps in ((y, 0.0), (y, 0.3), (soft, 0.1)):

        def f(z, w, target=target, eps=eps):
            return fastis.cross_entropy(z, target, sample_weight=w, label_smoothing=eps)

        assert torch.autograd.gradcheck(f, (z, w))
        assert torch.autograd.gradgradcheck(f, (z, w))
    assert torch.autograd.gradcheck(
        lambda t: fastis.cross_entropy(z, t, label_smoothing=0.1), (soft,)
    )


def test_inplace_refuses_double_backward(backend, device):
    z = torch.randn(4, 3, device=device, requires_grad=True)
    loss = fastis.cross_entropy(
        z * 1, torch.zeros(4, dtype=torch.long, device=device), inplace=True
    )
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z, create_graph=True)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_soft_target_and_logit_gradients_match_torch(backend, device, soft):
    logits, target, _ = make((5, 6), torch.float32, device, seed=13, soft=True)
    z = logits.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    grads = torch.autograd.grad(fastis.cross_entropy(z, t, label_smoothing=0.1), [z, t])
    ref = torch.autograd.grad(F.cross_entropy(z, t, label_smoothing=0.1), [z, t])
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_forward_mode_ad_matches_torch(backend, device):
    logits, target, weight = make((5, 6), torch.float32, device, seed=14, ignore=0.2)
    v = torch.randn_like(logits)
    for tgt in (target, torch.softmax(torch.randn_like(logits), -1)):
        ours = torch.func.jvp(
            lambda z, t=tgt: fastis.cross_entropy(z, t, label_smoothing=0.1), (logits,), (v,)
        )
        ref = torch.func.jvp(
            lambda z, t=tgt: F.cross_entropy(z, t, label_smoothing=0.1), (logits,), (v,)
        )
        torch.testing.assert_close(ours, ref)


def test_float64_stays_float64(backend, device):
    z = torch.tensor(
        [[1e39, 0.0, -3.0], [0.5, 1e-300, 2.0]],
        dtype=torch.float64,
        device=device,
        requires_grad=True,
    )
    y = torch.tensor([1, 2], device=device)
    loss, score = fastis.cross_entropy(z, y, reduction="none", return_score=True)
    ref = F.cross_entropy(z, y, reduction="none")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-15, atol=0)
    assert loss[0].item() == 1e39
    g = torch.Generator().manual_seed(15)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    t = torch.tensor([0, 4, 2, -100], device=device)
    assert torch.autograd.gradcheck(lambda x: fastis.cross_entropy(x, t, reduction="sum"), (x,))


def test_uint8_targets_like_torch(backend, device):
    logits, target, _ = make((7, 5), torch.float32, device, seed=16)
    ours = fastis.cross_entropy(logits, target.to(torch.uint8), reduction="none")
    torch.testing.assert_close(
        ours, F.cross_entropy(logits, target.to(torch.uint8), reduction="none")
    )


def test_meta_tensors_give_meta_results():
    z = torch.randn(4, 3, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    loss, score = fastis.cross_entropy(
        z, y, sample_weight=torch.ones(4, device="meta"), return_score=True
    )
    assert loss.device.type == "meta" and loss.shape == () and score.shape == (4,)
    assert fastis.score(z, y).shape == (4,)
    assert fastis.cross_entropy(z, y, reduction="none").shape == (4,)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"ignore_index": None}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": 2**70}, ValueError, "ignore_index must fit in int64"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"label_smoothing": None}, TypeError, "label_smoothing must be a float"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a float"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing must not be NaN"),
        ({"return_score": "yes"}, TypeError, "return_score must be a bool"),
        ({"inplace": 1}, TypeError, "inplace must be a bool"),
        ({"reduction": None}, ValueError, "reduction must be one of"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastis.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("kind", ["hard", "smoothed", "soft", "sequences"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_weight_matches_torch(backend, device, kind, reduction, inplace):
    # torch's per-class weight=: the loss, torch's weighted mean, the gradients, and the
    # score as the norm of the weighted loss's gradient
    shape = (3, 4, 6) if kind == "sequences" else (9, 6)
    logits, target, _ = make(shape, torch.float32, device, seed=19, soft=kind == "soft", ignore=0.3)
    eps = 0.2 if kind == "smoothed" else 0.0
    cw = (torch.rand(6, generator=torch.Generator().manual_seed(20)) + 0.1).to(device)
    z = logits.clone().requires_grad_(True)
    loss, score = fastis.cross_entropy(
        z.clone() if inplace else z,
        target,
        weight=cw,
        reduction=reduction,
        label_smoothing=eps,
        return_score=True,
        inplace=inplace,
    )
    ref_z = logits.double().requires_grad_(True)
    C = shape[-1]
    flat_t = target.double().reshape(-1, C) if kind == "soft" else target.reshape(-1)
    ref = F.cross_entropy(
        ref_z.reshape(-1, C), flat_t, weight=cw.double(), reduction=reduction, label_smoothing=eps
    )
    ref = ref.reshape(shape[:-1]) if reduction == "none" else ref
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
    v = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64, device=device).view(ref.shape)
    (grad,) = torch.autograd.grad(loss, z, v.to(loss.dtype))
    (ref_grad,) = torch.autograd.grad(ref, ref_z, v)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=1e-6)
    # score: norm of the per-row gradient of the weighted (summed) loss
    zz = ref_z.detach().reshape(-1, C).requires_grad_(True)
    rows = F.cross_entropy(zz, flat_t, weight=cw.double(), reduction="none", label_smoothing=eps)
    (g_rows,) = torch.autograd.grad(rows.sum(), zz)
    expected = g_rows.norm(dim=-1).reshape(shape[:-1])
    if kind == "sequences":
        expected = expected.norm(dim=1)
    torch.testing.assert_close(score.double(), expected, rtol=2e-5, atol=1e-6)
    alone = fastis.score(logits, target, weight=cw, label_smoothing=eps)
    torch.testing.assert_close(alone, score, rtol=1e-6, atol=1e-7)


def test_unbatched_and_no_classes_like_torch(backend, device):
    z = torch.randn(5, device=device, requires_grad=True)
    for y in (torch.tensor(3, device=device), torch.softmax(torch.randn(5, device=device), 0)):
        loss = fastis.cross_entropy(z, y, reduction="none")
        ref = F.cross_entropy(z, y, reduction="none")
        assert loss.shape == ref.shape == ()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(ref, z)[0])
        assert fastis.score(z, y).shape == ()
    empty = torch.randn(3, 0, device=device)
    ignored = torch.full((3,), -100, device=device)
    torch.testing.assert_close(
        fastis.cross_entropy(empty, ignored, reduction="none"),
        F.cross_entropy(empty, ignored, reduction="none"),
    )
    assert fastis.cross_entropy(empty, ignored).isnan()  # mean over no rows, as torch
    assert fastis.score(empty, ignored).tolist() == [0.0, 0.0, 0.0]
    if device == "cpu":
        with pytest.raises(ValueError, match=r"outside \[0, 0\)"):
            fastis.cross_entropy(empty, torch.zeros(3, dtype=torch.long))


def test_ignored_rows_get_zero_gradient_even_with_nan_logits(backend, device):
    z = torch.randn(3, 4, device=device)
    z[1, 2] = float("nan")
    z[2, 0] = float("inf")
    z.requires_grad_(True)
    y = torch.tensor([0, -100, -100], device=device)
    loss, score = fastis.cross_entropy(z, y, reduction="sum", return_score=True)
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.isfinite() and (score[1:] == 0).all()
    assert grad[0].isfinite().all() and (grad[1:] == 0).all()
