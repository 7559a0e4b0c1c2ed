"""How the benchmarks measure: medians, copy bandwidth, CUDA graphs, launches, the allocator.

Shared by the GPU check's sections (``bench/gpu_*.py``), the end-to-end benchmark and the
pytest benchmarks' conftest, so that every number in ``bench/results/`` is taken the same
way:

- ``bench_ms``: median milliseconds of a call (``triton.testing.do_bench``'s CUDA events on
  a GPU, host clock on the CPU); ``interleaved_ms``: per-step times of several variants
  of a training step, timed in alternating slices with one synchronisation at the end of
  each slice, so that the device's pipelining counts and drift hits every variant alike;
- ``copy_bandwidth``: the floor every bandwidth-bound kernel is judged against;
- ``capture``, ``kernels_launched``, ``synchronises``: the no-sync and CUDA-graph checks;
- ``pin_glibc_malloc``: stable host timings (below);
- ``describe``, ``attempt``: a baseline that fails (out of memory, out of range) is
  reported, and the run goes on.

Stable CPU timings on glibc: glibc adapts its mmap and trim thresholds to the allocation
history. In some processes PyTorch's few-megabyte CPU buffers are then returned to the
system after every step and page-faulted back on the next one: on this project's VM, 928
minor faults per no-grad forward of 384 rows through the demo CNN, 1.7 ms instead of
0.52 ms, and which regime a process lands in varies from run to run
(``bench/results/e2e_mnist1d_cpu_constant_malloc.md``). Pinning the thresholds, as
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456`` would at start-up,
keeps every buffer in the heap.
"""

import ctypes
import ctypes.util
import time
from collections.abc import Callable

import torch

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
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def malloc_label(pinned: bool) -> str:
    """How a results header names the allocator setting."""
    return "glibc thresholds pinned" if pinned else "default"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], device) -> float:
    """Median milliseconds of ``fn()``: CUDA events via ``do_bench`` on a GPU, else the host
    clock (one warm-up call, median of five)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def interleaved_ms(
    steps: dict[str, Callable[[], object]],
    calls: int,
    device,
    rounds: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds per call of each of ``steps``, timed in ``rounds`` alternating
    slices of ``calls // rounds`` calls (after a warm-up of each), so that a machine whose
    speed drifts during the measurement slows every variant alike. ``clock``: the host's
    by default; ``time.thread_time`` counts this thread's CPU time only (on the CPU, with
    one intra-op thread, what a shared machine's other processes do not inflate)."""
    per_round = max(1, calls // rounds)
    for step in steps.values():
        for _ in range(max(3, per_round // 5)):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            start = clock()
            for _ in range(per_round):
                step()
            sync(device)
            times[name].append((clock() - start) / per_round * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def copy_bandwidth(device, nbytes: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def capture(fn: Callable[[], object], warmup: int = 1):
    """Captures one call of ``fn`` in a CUDA graph, after ``warmup`` calls on a side stream
    (as ``torch.cuda.graphs`` asks). Returns ``(graph, what the captured call returned)``;
    ``graph.replay()`` reruns it on the same memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def kernels_launched(fn: Callable[[], object]) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` launches (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def synchronises(fn: Callable[[], object]) -> str:
    """``"no sync"``, or what ``torch.cuda.set_sync_debug_mode("error")`` caught in ``fn()``."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no sync"
    except RuntimeError as exc:
        return f"SYNC: {str(exc)[:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def describe(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: message"``, cut to ``limit`` characters of message, for a report."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}"


def attempt(fn: Callable[[], object], limit: int = 120):
    """``fn()``, or ``describe`` of what it raised: a baseline out of memory or out of range
    must not end a run."""
    try:
        return fn()
    except Exception as exc:
        return describe(exc, limit)
