"""Stable CPU timings on glibc: pin malloc's thresholds before measuring.

glibc adapts its mmap and trim thresholds to the allocation history. In some processes
PyTorch's few-megabyte CPU buffers are then returned to the system after every step and
page-faulted back on the next one: on this project's VM, 928 minor faults per no-grad
forward of 384 rows through the demo CNN, 1.7 ms instead of 0.52 ms, and which regime a
process lands in varies from run to run (``bench/results/e2e_mnist1d_cpu_constant_malloc.md``).
Pinning the thresholds, as ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456`` would at start-up, keeps every buffer in the heap.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD = 256 << 20


def pin_glibc_malloc() -> bool:
    """Pins the thresholds (and turns off their adaptation); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
