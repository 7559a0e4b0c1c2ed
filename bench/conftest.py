"""The benchmarks time host code too: pin glibc's malloc thresholds first (bench/_timing.py)."""

from bench._timing import malloc_label, pin_glibc_malloc

PINNED = pin_glibc_malloc()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["malloc"] = malloc_label(PINNED)
