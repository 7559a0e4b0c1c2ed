"""The benchmarks time host code too: pin glibc's malloc thresholds first (bench/malloc.py)."""

from bench.malloc import pin_glibc_malloc

PINNED = pin_glibc_malloc()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["malloc"] = "glibc thresholds pinned" if PINNED else "default"
