"""The native library (``kernels/``, built by CMake) bound with ctypes on torch tensors.

No torch C++ ABI: the library sees data pointers, int64 sizes and strides (in elements), a
dtype code and, for CUDA tensors, the current stream. Every argument is checked again by
the library, which answers with a status code (never a crash); this module turns a status
into an exception that names it.

Where the library comes from: ``FASTIS_NATIVE_LIB`` (a path to ``libfastis.so``), else the
copy that ``pip install`` builds into the package (``fastis/lib/``; an editable install
keeps it in its own tree, one of the package's ``__path__`` entries), else ``build/`` at the
top of the source tree (what ``cmake -S . -B build && cmake --build build`` writes).
``library()`` returns ``None``, and says why once, when there is none.

Functions (same contracts as the Triton launchers in ``fastis._triton``):

- ``softmax_xent(logits, target, *, ignore_index, label_smoothing, grad, grad_scale,
  check_target)`` -> ``(loss, score)``, and ``xent_loss(...)`` -> ``(total, loss, score, n)``
  (the whole weighted, reduced loss of class-index rows in one call, CPU);
- ``scale_rows_(grad, scale)``;
- ``alias_build(weights)`` -> ``(prob, alias, probs)`` and
  ``alias_draw(prob, alias, n, generator)`` -> int64 ``[n]``.
"""

import ctypes
import functools
import math
import os
import struct
import sys
import warnings
from pathlib import Path

import torch

# (major, minor) this module speaks: the library's major must match, its minor be at least
# this one (a minor version only adds functions); its patch may differ
ABI_VERSION = (0, 3)

_LIB_NAMES = {"linux": "libfastis.so", "darwin": "libfastis.dylib", "win32": "fastis.dll"}

# fastis_dtype codes (kernels/include/fastis.h)
_DTYPES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
}
_VALUE_ERRORS = {2: "a size", 3: "a stride", 4: "a dtype", 6: "a value", 7: "overlapping memory"}


class _XentArgs(ctypes.Structure):
    """``fastis_xent_args``: field for field."""

    _fields_ = [
        ("B", ctypes.c_int64),
        ("T", ctypes.c_int64),
        ("C", ctypes.c_int64),
        ("logits", ctypes.c_void_p),
        ("logits_dtype", ctypes.c_int32),
        ("logits_stride", ctypes.c_int64 * 3),
        ("target", ctypes.c_void_p),
        ("target_dtype", ctypes.c_int32),
        ("target_stride", ctypes.c_int64 * 3),
        ("ignore_index", ctypes.c_int64),
        ("label_smoothing", ctypes.c_double),
        ("loss", ctypes.c_void_p),
        ("score", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("grad_stride", ctypes.c_int64 * 3),
        ("grad_scale", ctypes.c_void_p),
        ("grad_scale_stride", ctypes.c_int64),
    ]


# the same block as bytes, packed in one call: native sizes and alignment, field for field
_XENT = struct.Struct("@3qPi3qPi3qqd3P3qPq")
assert _XENT.size == ctypes.sizeof(_XentArgs)
_STRIDES = struct.Struct("@3q")  # an int64_t[3] argument, as bytes
# fastis_xent_loss_args: a fastis_xent_args block, then the weight, reduction and total
_XENT_LOSS = struct.Struct(_XENT.format + "P2qiP")
_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def _candidates() -> list[Path]:
    name = _LIB_NAMES.get(sys.platform, "libfastis.so")
    env = os.environ.get("FASTIS_NATIVE_LIB")
    if env:
        return [Path(env)]
    import fastis  # its __path__: the source tree, and an editable install's build tree

    here = Path(__file__).resolve().parent
    dirs = [Path(d) for d in fastis.__path__]
    return [*(d / "lib" / name for d in dirs), here / name, here.parent / "build" / name]


def _declare(lib: ctypes.CDLL) -> None:
    i32, i64, u64, p = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    sigs = {
        "fastis_version": (i32, []),
        "fastis_has_cuda": (i32, []),
        "fastis_status_string": (ctypes.c_char_p, [i32]),
        # the argument block is passed as packed bytes (_XENT) or a _XentArgs
        "fastis_softmax_xent_cpu": (i32, [p, i32]),
        "fastis_softmax_xent_cpu_count": (i32, [p, i32, ctypes.POINTER(i64)]),
        "fastis_softmax_xent_cuda": (i32, [p, p]),
        "fastis_xent_loss_cpu": (i32, [p, i32, ctypes.POINTER(i64 * 3)]),
        # (the strides int64_t[3] as packed bytes, _STRIDES)
        "fastis_scale_rows_cpu": (i32, [i64, i64, i64, p, i32, p, p, i32, i64, i32]),
        "fastis_scale_rows_cuda": (i32, [i64, i64, i64, p, i32, p, p, i32, i64, p]),
        "fastis_alias_build_cpu": (i32, [i64, p, i32, i64, p, p, i32, p]),
        "fastis_alias_draw_cpu": (i32, [i64, p, p, i32, i64, u64, u64, p, i32]),
        "fastis_alias_draw_cuda": (i32, [i64, p, p, i32, i64, u64, u64, p, p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` (with one warning saying why) when there is none."""
    tried = _candidates()
    path = next((c for c in tried if c.is_file()), None)
    if path is None:
        where = ", ".join(str(c) for c in tried)
        _unavailable(f"no native library at {where}")
        return None
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as err:
        _unavailable(f"{path} could not be loaded ({err})")
        return None
    version = lib.fastis_version()
    if version // 10000 != ABI_VERSION[0] or version // 100 % 100 < ABI_VERSION[1]:
        _unavailable(f"{path} is version {version}, this fastis needs {ABI_VERSION}")
        return None
    return lib


def _unavailable(why: str) -> None:
    warnings.warn(
        f"fastis: native kernels unavailable: {why}. `pip install` builds them when a C++ "
        "compiler is found (or build them with `cmake -S . -B build && cmake --build build`, "
        "or point FASTIS_NATIVE_LIB at libfastis.so); fastis runs its Triton and torch "
        "paths meanwhile.",
        RuntimeWarning,
        stacklevel=3,
    )


def available() -> bool:
    return library() is not None


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the fastis native library is not available (see the warning above)")
    return lib


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status == 0:
        return
    name = lib.fastis_status_string(status).decode()
    kind = _VALUE_ERRORS.get(status)
    if kind is not None:
        raise ValueError(f"fastis native {what}: {kind} is invalid ({name})")
    raise RuntimeError(f"fastis native {what} failed: {name}")


def _dtype_code(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> int:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {allowed}, got {t.dtype}")
    return _DTYPES[t.dtype]


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _strides3(t: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """(stride_b, stride_t, stride_c) of ``t`` seen as [B, T(, C)]; 1-D per-row data is
    [N] = [N, 1], 2-D logits [N, C] = [N, 1, C]."""
    s = t.stride()
    if t.dim() == rank + 1:
        return (*s, 0) if rank == 1 else s
    if t.dim() == rank:
        return (s[0], 0, s[1] if rank == 2 else 0)
    return (0, 0, s[0] if rank == 2 else 0)  # a single row


def _view3(t: torch.Tensor) -> tuple[int, int, int, tuple[int, int, int]]:
    """``(B, T, C, strides)`` of ``[C]``, ``[N, C]`` or ``[B, T, C]`` data seen as ``[B, T, C]``."""
    shape = t.shape
    nd = len(shape)
    if nd == 2:
        s = t.stride()
        return shape[0], 1, shape[1], (s[0], 0, s[1])
    if nd == 3:
        return shape[0], shape[1], shape[2], t.stride()
    if nd == 1:
        return 1, 1, shape[0], (0, 0, t.stride(0))
    raise ValueError(f"logits must be [C], [N, C] or [B, T, C], got shape {tuple(shape)}")


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOAT_CODES = {d: _DTYPES[d] for d in _FLOATS}
_INDEX_CODES = {d: _DTYPES[d] for d in (torch.int32, torch.int64)}


def softmax_xent(
    logits,
    target,
    *,
    ignore_index=-100,
    label_smoothing=0.0,
    grad=None,
    grad_scale=None,
    check_target=False,
):
    """Per-row cross-entropy and gradient-norm score; ``fastis.reference.softmax_xent``'s math.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]`` (or one row ``[C]``), any non-negative strides,
            float32 / float64 / float16 / bfloat16, on the CPU or a CUDA device.
        target: class indices shaped ``logits.shape[:-1]`` (int32 / int64; other integer
            dtypes are converted), or probabilities shaped like ``logits`` (soft targets,
            converted to the logits' dtype).
        ignore_index: rows with this target get loss 0, score 0 and a zero gradient.
        label_smoothing: in ``[0, 1]``.
        grad: optional output shaped like ``logits`` in its dtype; may be ``logits`` itself.
            Receives ``grad_scale[r] * dloss_r / dlogits_r``.
        grad_scale: optional per-row factors (``logits.shape[:-1]``, or one scalar).
        check_target: on the CPU, raise ``ValueError`` for a class index outside ``[0, C)``
            that is not ``ignore_index`` (counted by the kernel itself, in the same read of
            the targets; ignored on CUDA, where it would synchronise).

    Returns:
        ``(loss, score)`` shaped ``logits.shape[:-1]``: float32, float64 for float64 logits.
        Class indices outside ``[0, C)`` give NaN rows (unless ``check_target`` raises; no
        synchronisation).
    """
    # The hot path of every CPU step at small shapes: the argument block is packed in one
    # struct call (a ctypes Structure costs ~10 us a call field by field), and every value
    # check beyond the shapes is left to the library, which answers with a status code.
    lib = _lib()
    block = _xent_block(logits, target, ignore_index, label_smoothing, grad, grad_scale)
    if block is None:
        return _empty_rows(logits)
    packed, loss, score, target, _ = block  # (the last: converted inputs, kept alive)
    if logits.is_cuda:
        status = lib.fastis_softmax_xent_cuda(packed, _stream(logits))
    elif check_target:
        bad = ctypes.c_int64(0)
        status = lib.fastis_softmax_xent_cpu_count(packed, torch.get_num_threads(), bad)
        if status == 0 and bad.value:
            _raise_out_of_range(target, logits.shape[-1], ignore_index)
    else:
        status = lib.fastis_softmax_xent_cpu(packed, torch.get_num_threads())
    if status:
        _check(lib, status, "softmax_xent")
    return loss, score


def _empty_rows(logits):
    rows = logits.shape[:-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=dtype, device=logits.device)
    return loss, torch.empty_like(loss)


def _xent_block(logits, target, ignore_index, label_smoothing, grad, grad_scale):
    """``fastis_xent_args`` packed as bytes, with the fresh ``(loss, score)`` rows it writes
    and the inputs as passed (converted where needed, to be kept alive until the call):
    ``(packed, loss, score, target, grad_scale)``; None when there is no row."""
    B, T, C, lstride = _view3(logits)
    shape = logits.shape
    rows = shape[:-1]
    dtype = logits.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if B * T == 0:
        return None
    loss = torch.empty(rows, dtype=out_dtype, device=logits.device)
    score = torch.empty_like(loss)
    code = _FLOAT_CODES.get(dtype)
    if code is None:
        raise TypeError(f"logits must have dtype in {_FLOATS}, got {dtype}")
    if target.is_floating_point():
        if target.shape != shape:
            raise ValueError(
                f"soft target must be shaped like logits {tuple(shape)}, got {tuple(target.shape)}"
            )
        target = target.to(dtype)
        tstride = _strides3(target, 2)
    else:
        if target.shape != rows:
            raise ValueError(f"target must be shaped {tuple(rows)}, got {tuple(target.shape)}")
        if target.dtype not in _INDEX_CODES:
            target = target.long()
        tstride = _strides3(target, 1)
    gptr, gstride, gsptr, gss = 0, (0, 0, 0), 0, 0
    if grad is not None:
        if grad.shape != shape or grad.dtype != dtype:
            raise ValueError(
                f"grad must be shaped {tuple(shape)} with dtype "
                f"{dtype}, got {tuple(grad.shape)} {grad.dtype}"
            )
        gptr, gstride = grad.data_ptr(), _strides3(grad, 2)
        if grad_scale is not None:
            if grad_scale.dtype != out_dtype:
                grad_scale = grad_scale.to(out_dtype)
            n = grad_scale.numel()
            if n != 1 and n != B * T:
                raise ValueError(
                    f"grad_scale must hold one factor per row ({B * T}) or one in all, got {n}"
                )
            if grad_scale.dim() != 1:
                grad_scale = grad_scale.reshape(-1)
            gsptr, gss = grad_scale.data_ptr(), grad_scale.stride(0) if n > 1 else 0
    packed = _XENT.pack(
        B, T, C, logits.data_ptr(), code, *lstride,
        target.data_ptr(), _DTYPES[target.dtype], *tstride,
        ignore_index, label_smoothing, loss.data_ptr(), score.data_ptr(),
        gptr, *gstride, gsptr, gss,
    )  # fmt: skip
    return packed, loss, score, target, grad_scale


def xent_loss(logits, target, *, weight, reduction, ignore_index, label_smoothing, grad):
    """The whole weighted loss of CPU rows with class indices in one library call.

    ``softmax_xent``'s rows, with each gradient row scaled by its factor in the reduction
    (``w_r``, or ``w_r / n`` for a mean over the ``n`` rows not ignored) and the reduced
    loss ``sum_r f_r L_r`` (summed in float64).

    Args:
        logits: ``[N, C]`` or ``[B, T, C]`` CPU float32 / float64 (any strides).
        target: int32 / int64 class indices shaped ``logits.shape[:-1]``.
        weight: None, or non-negative finite weights in the logits' dtype shaped like the rows
            (``[N]``, ``[B, T]``) or one per sequence (``[B, 1]``).
        reduction: ``'none'`` | ``'sum'`` | ``'mean'``.
        ignore_index, label_smoothing: as ``softmax_xent``'s.
        grad: None, or the gradient's output (shaped like ``logits``, its dtype).

    Returns:
        ``(total, loss, score, n)``: the reduced loss (0-d; None for ``'none'``), the
        unweighted row losses and scores, and the number of rows not ignored.

    Raises ``ValueError`` for a negative, NaN or infinite weight and for a class index
    outside ``[0, C)`` (read by the library in the same call).
    """
    # Every step of a small CPU model runs this: the argument block is packed in one call.
    lib = _lib()
    if not logits.is_cpu:
        raise ValueError(f"xent_loss runs on CPU tensors, got logits on {logits.device}")
    shape = logits.shape
    B, T, C, lstride = _view3(logits)
    rows = B * T
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"logits must be float32 or float64, got {logits.dtype}")
    if target.shape != shape[:-1] or target.dtype not in _INDEX_CODES:
        raise ValueError(
            f"target must hold int32/int64 class indices shaped {tuple(shape[:-1])}, got "
            f"{target.dtype} {tuple(target.shape)}"
        )
    gptr, gstride = 0, (0, 0, 0)
    if grad is not None:
        if grad.shape != shape or grad.dtype != logits.dtype:
            raise ValueError(f"grad must be shaped like logits {tuple(shape)}, in their dtype")
        gptr, gstride = grad.data_ptr(), _strides3(grad, 2)
    # separate tensors, not views of one buffer: autograd refuses in-place updates of a
    # custom Function's outputs that are views
    loss = torch.empty(shape[:-1], dtype=logits.dtype)
    score = torch.empty_like(loss)
    total = None if reduction == "none" else loss.new_empty(())
    if rows == 0:
        if total is not None:
            total.fill_(math.nan if reduction == "mean" else 0.0)
        return total, loss, score, 0
    wptr, ws = 0, (0, 0)
    if weight is not None:
        if weight.dtype != logits.dtype:
            raise TypeError(
                f"weight must have the logits' dtype {logits.dtype}, got {weight.dtype}"
            )
        wptr = weight.data_ptr()
        if weight.dim() == 1:
            ws = (weight.stride(0), 0)
        else:  # [B, T], or [B, 1] per sequence (its size-1 stride read as 0)
            ws = (weight.stride(0), weight.stride(1) if weight.shape[1] > 1 else 0)
    packed = _XENT_LOSS.pack(
        B, T, C, logits.data_ptr(), _DTYPES[logits.dtype], *lstride,
        target.data_ptr(), _DTYPES[target.dtype], *_strides3(target, 1),
        ignore_index, label_smoothing, loss.data_ptr(), score.data_ptr(),
        gptr, *gstride, 0, 0,
        wptr, *ws, _REDUCTIONS[reduction], 0 if total is None else total.data_ptr(),
    )  # fmt: skip
    info = (ctypes.c_int64 * 3)()
    status = lib.fastis_xent_loss_cpu(packed, torch.get_num_threads(), info)
    if status or info[1]:
        _xent_loss_failed(lib, status, info, logits, target, weight, ignore_index)
    return total, loss, score, info[0]


def _xent_loss_failed(lib, status, info, logits, target, weight, ignore_index):
    """The error for a refused weight, a failed call or class indices out of range."""
    if status == 6 and info[2] >= 0:
        value = weight.expand(logits.shape[:-1]).reshape(-1)[info[2]].item()
        raise ValueError(f"sample_weight must be finite and non-negative, got {value}")
    if status:
        _check(lib, status, "xent_loss")
    _raise_out_of_range(target, logits.shape[-1], ignore_index)


def _raise_out_of_range(target, C, ignore_index):
    """The error for class indices the kernel counted outside ``[0, C)`` (a slow path):
    ``fastis.ops.check_target_range``'s."""
    from fastis.ops import check_target_range  # imported here: fastis.ops imports this module

    check_target_range(target, C, ignore_index)
    raise AssertionError("the kernel counted class indices out of range; the check found none")


def scale_rows_(grad, scale):
    """``grad[r] *= scale[r]`` in place (rows whose factor is exactly 1 untouched).

    Args:
        grad: ``[N, C]`` or ``[B, T, C]``, any strides, float32/float64/float16/bfloat16.
        scale: one factor per row (``grad.shape[:-1]``), or a scalar tensor; converted to
            float32 (float64 for a float64 ``grad``).
    """
    lib = _lib()
    B, T, C, strides = _view3(grad)
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if scale.dtype != dtype:
        scale = scale.to(dtype)
    if scale.dim() != 1:
        scale = scale.reshape(-1)
    n = scale.numel()
    if n != 1 and n != B * T:
        raise ValueError(f"scale must hold one factor per row ({B * T}) or one in all, got {n}")
    if B * T * C == 0:
        return grad
    code = _FLOAT_CODES.get(grad.dtype)
    if code is None:
        raise TypeError(f"grad must have dtype in {_FLOATS}, got {grad.dtype}")
    args = (
        B, T, C, grad.data_ptr(), code, _STRIDES.pack(*strides),
        scale.data_ptr(), _DTYPES[dtype], scale.stride(0) if n > 1 else 0,
    )  # fmt: skip
    if grad.is_cuda:
        status = lib.fastis_scale_rows_cuda(*args, _stream(grad))
    else:
        status = lib.fastis_scale_rows_cpu(*args, torch.get_num_threads())
    if status:
        _check(lib, status, "scale_rows_")
    return grad


def alias_build(weights):
    """Walker alias table of 1-D non-negative finite CPU ``weights`` (not all zero).

    Returns:
        ``(prob, alias, probs)``: float64 ``[N]``, int32 ``[N]`` (int64 past 2^31 - 1 items)
        and float64 ``w / sum(w)``; ``fastis._alias_torch.build``'s layout.
    """
    lib = _lib()
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"weights must be 1-D and non-empty, got shape {tuple(weights.shape)}")
    if weights.is_cuda:
        raise NotImplementedError("the native alias build runs on the CPU only")
    if weights.dtype not in (torch.float32, torch.float64):
        weights = weights.double()
    n = weights.shape[0]
    prob = torch.empty(n, dtype=torch.float64)
    alias = torch.empty(n, dtype=torch.int32 if n <= 2**31 - 1 else torch.int64)
    probs = torch.empty(n, dtype=torch.float64)
    status = lib.fastis_alias_build_cpu(
        n,
        weights.data_ptr(),
        _DTYPES[weights.dtype],
        weights.stride(0),
        prob.data_ptr(),
        alias.data_ptr(),
        _DTYPES[alias.dtype],
        probs.data_ptr(),
    )
    _check(lib, status, "alias_build")
    return prob, alias, probs


def philox_seed(generator, device) -> int:
    """A Philox key drawn from ``generator`` (advancing it), as the Triton draws take theirs.

    On a CUDA device this reads one number back to the host (one synchronisation).
    """
    return int(
        torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64).item()
    )


def alias_draw(prob, alias, n, generator=None, *, seed=None, offset=0):
    """``n`` int64 draws from a table (bucket uniform, then a coin against ``prob``).

    Draw ``k`` depends on ``(seed, offset + k)`` only (Philox 4x32-10): the same on any
    number of threads, and the same as ``fastis._triton.alias.sample_table`` for one seed.
    ``seed`` defaults to ``philox_seed(generator, prob.device)``.
    """
    lib = _lib()
    N = prob.shape[0]
    if prob.dtype != torch.float64 or not prob.is_contiguous() or not alias.is_contiguous():
        raise ValueError("prob must be contiguous float64 and alias contiguous")
    if int(n) < 0:
        raise ValueError(f"n must be a non-negative number of draws, got {n}")
    out = torch.empty(int(n), dtype=torch.int64, device=prob.device)
    if out.numel() == 0:
        return out
    if seed is None:
        seed = philox_seed(generator, prob.device)
    args = (
        N,
        prob.data_ptr(),
        alias.data_ptr(),
        _dtype_code(alias, "alias", (torch.int32, torch.int64)),
        int(n),
        int(seed),
        int(offset),
        out.data_ptr(),
    )
    if prob.is_cuda:
        status = lib.fastis_alias_draw_cuda(*args, _stream(prob))
    else:
        status = lib.fastis_alias_draw_cpu(*args, torch.get_num_threads())
    _check(lib, status, "alias_draw")
    return out
