"""The native library (``kernels/``) through ``fastis._native``, against the float64 oracle.

The session fixture ``native`` (tests/conftest.py) builds the CPU library with CMake
(incrementally, under ``build/``); the tests are skipped when CMake or a C++ compiler is
missing.
"""

import ctypes
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastis import _alias_torch, reference

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- softmax_xent


# (loss / score atol, rtol) of the float32 computation; the gradient is compared with the
# oracle rounded to the logits' dtype, up to one unit in its last place.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
}
EPS = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _inputs(draw, C_choices):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(list(TOL)))
    three_d = draw(st.booleans())
    lead = (
        (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
        if three_d
        else (draw(st.integers(1, 37)),)
    )
    C = draw(st.sampled_from(C_choices))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    scale = draw(st.sampled_from([1.0, 4.0, 30.0]))
    full = torch.randn(*lead, 2 * C, generator=gen, dtype=torch.float64) * scale
    if layout == "strided":
        z = full[..., ::2]
    elif layout == "transposed":  # rows have stride 1, columns the large stride
        z = full[..., :C].movedim(-1, 0).contiguous().movedim(0, -1)
    else:
        z = full[..., :C].contiguous()
    z = z.to(dtype)
    return gen, z, lead, C


def _special_rows(draw, gen, z):
    """Some rows get a NaN, +inf or -inf logit somewhere (in place)."""
    rows = z.shape[:-1].numel()
    for kind in draw(st.lists(st.sampled_from(["nan", "inf", "-inf"]), max_size=3)):
        r = int(torch.randint(0, rows, (1,), generator=gen))
        c = int(torch.randint(0, z.shape[-1], (1,), generator=gen))
        idx = (*torch.unravel_index(torch.tensor(r), z.shape[:-1]), c)
        z[tuple(int(i) for i in idx)] = float(kind)


@st.composite
def hard_case(draw):
    gen, z, lead, C = _inputs(draw, [1, 2, 3, 10, 31, 33, 100, 257, 1000, 3001])
    _special_rows(draw, gen, z)
    y = torch.randint(0, C, lead, generator=gen)
    ignore_index = draw(st.sampled_from([-100, 0, 5]))
    mask = torch.rand(lead, generator=gen) < 0.2
    y = torch.where(mask, torch.full_like(y, ignore_index), y)
    if draw(st.booleans()):  # an out-of-range class index gives a NaN row
        y.view(-1)[0] = C + 3
    y = y.to(draw(st.sampled_from([torch.int64, torch.int32])))
    eps = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))
    return z, y, ignore_index, eps, draw(st.sampled_from(["none", "out", "inplace"]))


@st.composite
def soft_case(draw):
    gen, z, lead, C = _inputs(draw, [1, 3, 10, 100, 300, 2000])
    _special_rows(draw, gen, z)
    t = torch.rand(*lead, C, generator=gen, dtype=torch.float64)
    t = (t / t.sum(-1, keepdim=True) * draw(st.sampled_from([1.0, 0.7]))).to(z.dtype)
    eps = draw(st.sampled_from([0.0, 0.25]))
    return z, t, -100, eps, draw(st.sampled_from(["none", "out", "inplace"]))


def _check_xent(native, z, target, ignore_index, eps, grad_mode):
    """Native against ``reference.softmax_xent`` in float64, on the same stored inputs."""
    rows = z.shape[:-1]
    grad_scale = torch.rand(rows, dtype=torch.float64) * 3
    oracle_target = target.double() if target.is_floating_point() else target
    want_loss, want_score, want_grad = reference.softmax_xent(
        z.double(),
        oracle_target,
        ignore_index=ignore_index,
        label_smoothing=eps,
        compute_grad=True,
        grad_scale=grad_scale,
    )
    logits = z.clone() if grad_mode == "inplace" else z
    grad = {"none": None, "out": torch.full_like(z, 7.0), "inplace": logits}[grad_mode]
    loss, score = native.softmax_xent(
        logits,
        target,
        ignore_index=ignore_index,
        label_smoothing=eps,
        grad=grad,
        grad_scale=grad_scale,
    )
    out = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert loss.shape == rows and score.shape == rows and loss.dtype == score.dtype == out
    atol, rtol = TOL[z.dtype]
    # loss and score are relative to the row's size
    torch.testing.assert_close(
        loss.double(),
        want_loss,
        atol=atol * (1 + want_loss.abs().nan_to_num(0, 0, 0).max().item()),
        rtol=rtol,
        equal_nan=True,
    )
    torch.testing.assert_close(score.double(), want_score, atol=atol, rtol=rtol, equal_nan=True)
    if grad is not None:
        rounded = want_grad.to(z.dtype).double()
        eps_ = EPS[z.dtype]
        torch.testing.assert_close(
            grad.double(), rounded, atol=atol + eps_ * 1e-3, rtol=2 * eps_, equal_nan=True
        )


@given(hard_case())
def test_hard_targets_match_reference(native, case):
    _check_xent(native, *case)


@given(soft_case())
def test_soft_targets_match_reference(native, case):
    _check_xent(native, *case)


def test_p_y_near_one_keeps_relative_accuracy(native):
    # 1 - p_y ~ e^-40 is summed from the other classes, not formed as a difference
    z = torch.zeros(3, 5)
    z[:, 2] = torch.tensor([40.0, 20.0, 80.0])
    y = torch.full((3,), 2)
    _, score = native.softmax_xent(z, y)
    _, want, _ = reference.softmax_xent(z.double(), y)
    torch.testing.assert_close(score.double(), want, rtol=1e-5, atol=0)
    assert (score > 0).all()


def test_one_row_and_empty(native):
    z = torch.randn(7)
    loss, score = native.softmax_xent(z, torch.tensor(3))
    want_loss, want_score, _ = reference.softmax_xent(z.double(), torch.tensor(3))
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-5, atol=1e-6)
    loss, score = native.softmax_xent(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    assert loss.shape == (0,) and score.shape == (0,)


def test_bad_arguments_name_the_problem(native):
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="target must be shaped"):
        native.softmax_xent(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="a value is invalid"):
        native.softmax_xent(z, torch.zeros(4, dtype=torch.long), label_smoothing=2.0)
    base = torch.randn(4, 6)
    with pytest.raises(ValueError, match="overlapping memory"):  # grad shifted by one column
        native.softmax_xent(base[:, :3], torch.zeros(4, dtype=torch.long), grad=base[:, 1:4])
    with pytest.raises(ValueError, match="a stride is invalid"):  # grad rows share memory
        native.softmax_xent(
            z, torch.zeros(4, dtype=torch.long), grad=torch.empty(1, 3).expand(4, 3)
        )
    with pytest.raises(TypeError, match="logits must have dtype"):
        native.softmax_xent(z.long(), torch.zeros(4, dtype=torch.long))


def test_packed_arguments_are_the_structure_field_for_field(native):
    # the argument block is packed by struct, not built in the ctypes Structure: same bytes
    values = [7, 3, 11, 0x1000, 2, 33, 11, 1, 0x2000, 5, 3, 1, 0, -100, 0.25]
    values += [0x3000, 0x4000, 0x5000, 34, 12, 2, 0x6000, 1]
    a = native._XentArgs()
    names = [name for name, _ in native._XentArgs._fields_]
    it = iter(values)
    for name in names:
        field = getattr(a, name)
        if isinstance(field, ctypes.Array):
            field[:] = [next(it) for _ in range(len(field))]
        else:
            setattr(a, name, next(it))
    assert next(it, None) is None
    assert bytes(a) == native._XENT.pack(*values)


@pytest.mark.parametrize("C", [6, 40])  # the narrow path and the row path
def test_check_target_counts_out_of_range_indices_in_the_kernel(native, C):
    z = torch.randn(5, C)
    y = torch.tensor([0, 1, C - 1, -100, 2])
    loss, score = native.softmax_xent(z, y, check_target=True)
    want_loss, want_score, _ = reference.softmax_xent(z.double(), y)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-5, atol=1e-6)
    for bad in (C, -1, 2**40):
        yb = y.clone()
        yb[4] = bad
        with pytest.raises(ValueError, match=rf"class index {bad}, outside \[0, {C}\)"):
            native.softmax_xent(z, yb, check_target=True)
        loss, _ = native.softmax_xent(z, yb)  # unchecked: a NaN row, no error
        assert loss[4].isnan() and not loss[:4].isnan().any()
    yb = y.clone()
    yb[3] = -7  # ignore_index itself is not out of range
    loss, _ = native.softmax_xent(z, yb, ignore_index=-7, check_target=True)
    assert loss[3] == 0


@pytest.mark.parametrize("shape", [(1, 6), (4, 1, 6)])
def test_in_place_through_another_stride_of_a_size_one_dim(native, shape):
    # grad is the logits' memory, element for element, seen with another stride on a
    # dimension of size 1 (a stride never used): in place, not an overlap
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(shape, generator=gen, dtype=torch.float64).float()
    odd = list(z.stride())
    odd[-2] = 97
    grad = z.as_strided(z.shape, odd)
    assert grad.data_ptr() == z.data_ptr() and grad.stride() != z.stride()
    y = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    want_loss, want_score, want_grad = reference.softmax_xent(z.double(), y, compute_grad=True)
    loss, score = native.softmax_xent(z, y, grad=grad)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.double(), want_grad.double(), rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_threads(native):
    z = torch.randn(3000, 100, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 100, (3000,), generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grad = torch.empty_like(z)
            outs.append((*native.softmax_xent(z, y, grad=grad), grad))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_rows(native, dtype):
    g = torch.randn(6, 5, 9, dtype=torch.float64).to(dtype)[:, 1:4, ::2]
    scale = torch.tensor([1.0, 2.0, -0.5, 1.0, 0.0, 3.0] * 3).reshape(6, 3)
    want = (g.double() * scale.double()[..., None]).to(dtype)
    before = g.clone()
    native.scale_rows_(g, scale)
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    assert torch.equal(g[scale == 1], before[scale == 1])
    native.scale_rows_(g, torch.tensor(0.5))
    torch.testing.assert_close(g, (want.double() * 0.5).to(dtype), rtol=0, atol=0)


# ---------------------------------------------------------------- alias tables


@st.composite
def weights(draw):
    n = draw(st.integers(1, 5000))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["uniform", "heavy", "zeros", "one"]))
    w = torch.rand(n, generator=gen, dtype=torch.float64)
    if kind == "heavy":
        w = w.pow(8) * torch.where(torch.rand(n, generator=gen) < 0.01, 1e9, 1.0)
    elif kind == "zeros":
        w = torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, w)
        w[int(torch.randint(0, n, (1,), generator=gen))] = 1.0
    elif kind == "one":
        w = torch.zeros(n, dtype=torch.float64)
        w[int(torch.randint(0, n, (1,), generator=gen))] = 2.5
    return w.to(draw(st.sampled_from([torch.float64, torch.float32])))


def _implied(prob, alias):
    """The distribution a table draws from: bucket i keeps prob[i] / N, gives the rest to
    alias[i]."""
    n = prob.shape[0]
    return (prob / n).index_add(0, alias.long(), (1 - prob) / n)


@given(weights())
def test_alias_build_is_exact(native, w):
    prob, alias, probs = native.alias_build(w)
    assert prob.dtype == probs.dtype == torch.float64 and alias.dtype == torch.int32
    assert ((prob >= 0) & (prob <= 1)).all() and ((alias >= 0) & (alias < len(w))).all()
    want = w.double() / w.double().sum()
    torch.testing.assert_close(probs, want, rtol=1e-13, atol=0)  # (sums in another order)
    implied = _implied(prob, alias)
    torch.testing.assert_close(implied, want, rtol=1e-11, atol=1e-15)
    assert (implied[w == 0] == 0).all()


@pytest.mark.parametrize("n", [30, 3001])
@pytest.mark.parametrize("kind", ["mean_filled", "near_one"])
def test_alias_build_is_exact_at_the_mean(native, kind, n):
    # many q at 1 or a few ulp above; the whole rounding of the total lands on one item
    from test_alias import check_exact
    from test_alias_ties import mean_filled, near_one

    w = mean_filled(n, 1) if kind == "mean_filled" else near_one(n, 2, 1)
    for dtype in (torch.float64, torch.float32):
        prob, alias, _ = native.alias_build(w.to(dtype))
        check_exact(prob, alias, w.to(dtype))


def test_alias_build_rejects_bad_weights(native):
    for bad in ([1.0, -1.0], [1.0, float("nan")], [float("inf"), 1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="a value is invalid"):
            native.alias_build(torch.tensor(bad, dtype=torch.float64))


def test_alias_draws_chi_square(native):
    scipy_stats = pytest.importorskip("scipy.stats")
    w = torch.tensor([0.0, 1.0, 5.0, 0.5, 0.0, 12.0, 3.0, 0.01, 7.0, 2.0] * 3, dtype=torch.float64)
    prob, alias, probs = native.alias_build(w)
    draws = native.alias_draw(prob, alias, 300_000, torch.Generator().manual_seed(11))
    counts = torch.bincount(draws, minlength=len(w)).double()
    assert counts[w == 0].sum() == 0
    expected = probs[w > 0] * draws.numel()
    p = scipy_stats.chisquare(counts[w > 0].numpy(), expected.numpy()).pvalue
    assert p > 1e-4, p


def test_alias_draws_are_reproducible_and_thread_independent(native):
    w = torch.rand(777, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    prob, alias, _ = native.alias_build(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.alias_draw(prob, alias, 100_000, seed=123, offset=40)
        torch.set_num_threads(2)
        two = native.alias_draw(prob, alias, 100_000, seed=123, offset=40)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    # draw k depends on (seed, offset + k) only
    assert torch.equal(native.alias_draw(prob, alias, 10, seed=123, offset=50), one[10:20])
    assert not torch.equal(native.alias_draw(prob, alias, 10, seed=124, offset=50), one[10:20])
    assert native.alias_draw(prob, alias, 0, seed=1).shape == (0,)
    with pytest.raises(ValueError, match="n must be"):
        native.alias_draw(prob, alias, -1, seed=1)


def test_alias_draws_match_the_triton_kernel(native):
    pytest.importorskip("triton")
    from fastis._triton import alias as triton_alias

    w = torch.rand(300, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    prob, alias, _ = _alias_torch.build(w)
    ours = native.alias_draw(prob, alias, 512, torch.Generator().manual_seed(9))
    theirs = triton_alias.sample_table(prob, alias, 512, torch.Generator().manual_seed(9))
    assert torch.equal(ours, theirs)


def test_missing_library_warns_once_and_returns_none(native, monkeypatch):
    monkeypatch.setenv("FASTIS_NATIVE_LIB", "/nonexistent/libfastis.so")
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
            assert native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None and not native.available()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.library() is not None


# ---------------------------------------------------------------- where auto sends a call


def test_auto_runs_native_on_the_cpu_and_float64_on_torch(native, monkeypatch):
    from fastis import _backend

    monkeypatch.setenv("FASTIS_BACKEND", "auto")
    for dtype in _backend.NATIVE_AUTO_DTYPES:
        assert _backend.kernel_backend(torch.zeros(2, 3, dtype=dtype)) == "native"
    assert _backend.kernel_backend(torch.zeros(2, 3, dtype=torch.float64)) == "torch"
    assert _backend.kernel_backend(torch.zeros(2, 3, device="meta")) == "torch"
    # the alias sampling keeps the torch path on the CPU
    assert not _backend.use_triton(torch.ones(4))


def test_auto_without_the_library_takes_the_torch_path(native, monkeypatch):
    """No library (a machine without a compiler): one warning, then the torch path, whose
    results match the native library's."""
    import fastis
    from fastis import _backend

    g = torch.Generator().manual_seed(3)
    z = torch.randn(37, 11, generator=g) * 4
    y = torch.randint(0, 11, (37,), generator=g)
    monkeypatch.setenv("FASTIS_BACKEND", "auto")
    with_native = fastis.score(z, y)
    monkeypatch.setenv("FASTIS_NATIVE_LIB", "/nonexistent/libfastis.so")
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
            assert _backend.kernel_backend(z) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not per call
            without = fastis.score(z, y)
            fastis.cross_entropy(z, y)
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    torch.testing.assert_close(without, with_native, rtol=2e-6, atol=2e-6)


def test_the_installed_copy_is_found_in_every_package_directory(monkeypatch):
    """An editable install keeps the built library in its own tree, one of the package's
    ``__path__`` entries; ``FASTIS_NATIVE_LIB`` overrides every candidate."""
    import fastis
    from fastis import _native

    monkeypatch.delenv("FASTIS_NATIVE_LIB", raising=False)
    candidates = _native._candidates()
    for d in fastis.__path__:
        assert any(c.parent == Path(d) / "lib" for c in candidates)
    monkeypatch.setenv("FASTIS_NATIVE_LIB", "/some/where/libfastis.so")
    assert _native._candidates() == [Path("/some/where/libfastis.so")]
