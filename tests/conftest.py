import os
import shutil
import subprocess
from pathlib import Path

import torch

# Triton decides at kernel-definition time whether to interpret, so this must be set before
# any fastis kernel module is imported. Without a GPU the Triton kernels run on CPU tensors
# under the interpreter; on a GPU machine they run for real.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests draw the same examples on every run (CI must not go red by chance);
# HYPOTHESIS_PROFILE=explore draws fresh ones, to look for new failures. Kernels under the
# interpreter are slow and examples share the backend fixture: no deadline, no such checks.
_COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.register_profile("fixed", derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

from fastis import _native  # noqa: E402
from fastis._backend import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once per backend, forcing it through FASTIS_BACKEND."""
    monkeypatch.setenv("FASTIS_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def one_thread():
    """For tests of many tiny ops: one intra-op thread avoids oversubscribing the
    machine's cores (5x faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# the native library (kernels/), built once per session by CMake

ROOT = Path(__file__).resolve().parents[1]


def _build_dir(tmp_path_factory) -> Path:
    out = ROOT / "build" / "test-native"
    try:
        out.mkdir(parents=True, exist_ok=True)
        return out
    except OSError:  # a read-only checkout
        return tmp_path_factory.mktemp("native")


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """The library ``FASTIS_NATIVE_LIB`` names (a sanitizer build, say), else a freshly
    built CPU one (Release, incremental), loaded by ``fastis._native``."""
    if os.environ.get("FASTIS_NATIVE_LIB"):
        _native.library.cache_clear()
        assert _native.library() is not None, os.environ["FASTIS_NATIVE_LIB"]
        yield _native
        return
    cmake = shutil.which("cmake")
    if cmake is None or not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("the native library needs cmake and a C++ compiler")
    out = _build_dir(tmp_path_factory)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(out),
        *gen,
        "-DCMAKE_BUILD_TYPE=Release",
        "-DFASTIS_CUDA=OFF",
        "-DFASTIS_TESTS=OFF",
    ]
    done = subprocess.run(configure, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cmake could not configure the native library:\n{done.stderr[-2000:]}")
    build = subprocess.run(
        [cmake, "--build", str(out), "--parallel", str(os.cpu_count() or 1)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    lib = next(out.glob("*fastis.*"))
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTIS_NATIVE_LIB", str(lib))
    _native.library.cache_clear()
    assert _native.library() is not None
    yield _native
    mp.undo()
    _native.library.cache_clear()
