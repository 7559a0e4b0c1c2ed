import os

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
