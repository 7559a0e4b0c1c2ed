"""Every kernel backend (Triton, the native library) gives the torch path's loss, score and
gradients on every input class: NaN and infinite logits, expanded and strided views,
float64, soft and smoothed targets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastis
from fastis._backend import triton_available


@pytest.fixture(params=["triton", "native"])
def kernels(request):
    if request.param == "triton" and not triton_available():
        pytest.skip("needs triton")
    if request.param == "native":
        request.getfixturevalue("native")  # builds the library, or skips
    return request.param


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(backend, logits, target, weight, **kw):
    """Loss, score and the gradients w.r.t. logits and weight under one backend."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTIS_BACKEND", backend)
        z = logits.detach().clone().requires_grad_(True)
        w = None if weight is None else weight.detach().clone().requires_grad_(True)
        view = kw.pop("view")
        loss, score = fastis.cross_entropy(
            view(z), target, sample_weight=w, return_score=True, **kw
        )
        v = torch.linspace(-1, 1, loss.numel(), dtype=loss.dtype, device=loss.device)
        grads = torch.autograd.grad(
            loss, [z] + ([w] if w is not None else []), grad_outputs=v.view(loss.shape)
        )
        alone = fastis.score(view(z), target, **{k: kw[k] for k in ("label_smoothing",)})
    return [loss, score, alone, *grads]


VIEWS = {
    "plain": lambda z: z,
    "transposed": lambda z: z.t().contiguous().t(),
    "sliced": lambda z: torch.cat([z, z], -1)[:, ::2],
    "expanded": lambda z: z[:1].expand(z.shape[0], -1),
}


@settings(max_examples=40)
@given(
    N=st.integers(1, 9),
    C=st.sampled_from([1, 2, 7, 33, 130]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    target_kind=st.sampled_from(["hard", "soft"]),
    eps=st.sampled_from([0.0, 0.3]),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    view=st.sampled_from(sorted(VIEWS)),
    specials=st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30, -1e30]),
        ),
        max_size=4,
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_backends_agree(kernels, N, C, dtype, target_kind, eps, reduction, view, specials, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    for pos, value in specials:  # NaN / inf / huge logits at random places, target or not
        logits.view(-1)[pos % logits.numel()] = value
    if target_kind == "soft":
        target = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
        target = target.to(torch.float32 if dtype != torch.float64 else dtype)
    else:
        target = torch.randint(0, C, (N,), generator=g)
        target[torch.rand(N, generator=g) < 0.2] = -100
    weight = torch.rand(N, generator=g, dtype=torch.float64).to(torch.float32)
    kw = dict(reduction=reduction, label_smoothing=eps, view=VIEWS[view])
    logits, target, weight = logits.to(DEVICE), target.to(DEVICE), weight.to(DEVICE)
    ours = run(kernels, logits, target, weight, **dict(kw))
    oracle = run("torch", logits, target, weight, **dict(kw))
    # losses of huge logits cancel terms of their size: absolute errors scale with max |z|
    finite = logits[logits.isfinite()].abs()
    scale = 1.0 + (float(finite.max()) if finite.numel() else 0.0)
    tol = (
        dict(rtol=2e-2, atol=1e-2 * scale)
        if dtype == torch.bfloat16
        else dict(rtol=2e-5, atol=1e-6 * scale)
    )
    for a, b in zip(ours, oracle, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
