"""Which implementation runs a kernel call: the fused Triton kernels or the plain-torch path.

``FASTIS_BACKEND`` (read once per call, by ``kernel_backend``, so tests can switch it):

- ``auto`` (default), per device, what ``bench/results/native_cpu.md`` and the GPU check
  measured fastest: on CUDA tensors Triton when it is importable; on CPU tensors the native
  library when it is loaded (``pip install`` builds it) and the dtype is float32, float16
  or bfloat16; the torch path otherwise (float64 always stays there, in float64).
- ``torch``: always the plain-torch path (``fastis.reference``).
- ``triton``: always the Triton kernels. CPU tensors need ``TRITON_INTERPRET=1`` set before
  the first kernel is used (Triton's interpreter); that is how the tests run the real
  kernel code on machines without a GPU.
- ``native``: the CMake-built C++ / CUDA library (``fastis._native``) for the softmax
  cross-entropy ops, every dtype; raises when the library is not built. The alias sampling
  keeps its ``auto`` choice (the torch path on the CPU, whatever ``auto`` says here).
"""

import functools
import importlib.util
import os

import torch

from fastis import _native

BACKENDS = ("auto", "torch", "triton", "native")

# the logits dtypes ``auto`` sends to the native library on the CPU (float32 accumulation,
# as the Triton kernels); float64 keeps the torch path's float64 arithmetic
NATIVE_AUTO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_backend(tensor: torch.Tensor) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``: the implementation for a call on ``tensor``
    (its device decides, with ``FASTIS_BACKEND``)."""
    # Every loss and score call reads this: a lookup in the environment's own mapping where
    # there is one (``os.environ.get`` of an unset variable raises and catches a KeyError),
    # and the common case, a CPU tensor with the variable unset, decided first.
    data = getattr(os.environ, "_data", None)
    if type(data) is dict and os.name == "posix":
        mode = data.get(b"FASTIS_BACKEND")
        mode = None if mode is None else os.fsdecode(mode)
    else:
        mode = os.environ.get("FASTIS_BACKEND")
    if mode is None and tensor.is_cpu:
        return "native" if _native_auto(tensor) else "torch"
    mode = "auto" if mode is None else mode.lower()
    if mode not in BACKENDS:
        raise ValueError(f"FASTIS_BACKEND must be one of {BACKENDS}, got {mode!r}")
    if mode == "torch":
        return "torch"
    if mode == "native":
        if not _native.available():
            raise RuntimeError(
                "FASTIS_BACKEND=native but the native library is not built "
                "(cmake -S . -B build && cmake --build build)"
            )
        return "native"
    if mode == "auto":
        if tensor.is_cuda:
            return "triton" if triton_available() else "torch"
        return "native" if _native_auto(tensor) else "torch"
    if not triton_available():
        raise RuntimeError("FASTIS_BACKEND=triton but triton is not installed")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"FASTIS_BACKEND=triton on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
            "(set before the first kernel launch)"
        )
    return "triton"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the call on ``tensor`` should run the Triton kernel."""
    return kernel_backend(tensor) == "triton"


def _native_auto(tensor: torch.Tensor) -> bool:
    """``auto``'s CPU choice: the native library for the dtypes it was measured on, when it
    loads (the first call that asks loads it, and warns once if it cannot)."""
    return tensor.is_cpu and tensor.dtype in NATIVE_AUTO_DTYPES and _native.library() is not None
