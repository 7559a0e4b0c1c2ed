"""GPU check sections: ``fastis.linear_cross_entropy`` against ``F.linear`` +
``F.cross_entropy``, and the native library's cross-entropy against the Triton kernel.

``linear``: per shape, forward + backward time (with the score) and the peak memory
allocated beyond the inputs (``torch.cuda.max_memory_allocated``; not on the CPU), for the
fused op and the naive composition. ``native``: ``fastis._native.softmax_xent`` (loss,
score and gradient) against the Triton launcher on the same inputs, when the library is
there (``FASTIS_NATIVE_LIB``, or ``build/``); the row says so when it is not.
"""

import torch
import torch.nn.functional as F

import fastis
from bench._section import Part, Settings, table
from bench._timing import bench_ms, describe
from bench.providers import inputs

# (N, D, V, dtype): a small model and an LLM last layer (the 8k x 4k x 128k)
LINEAR_FULL = [(4096, 2048, 32000, torch.bfloat16), (8192, 4096, 128256, torch.bfloat16)]
LINEAR_QUICK = [(256, 64, 1000, torch.float32)]
NATIVE_FULL = [(8192, 10), (4096, 1000), (1024, 32000)]
NATIVE_QUICK = [(256, 10)]


def _peak_mb(fn, device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def linear(settings: Settings) -> list[dict]:
    device = settings.device
    rows = []
    for N, D, V, dtype in LINEAR_QUICK if settings.quick else LINEAR_FULL:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(N, D, device=device, generator=g).to(dtype).requires_grad_(True)
        w = (torch.randn(V, D, device=device, generator=g) / D**0.5).to(dtype)
        w.requires_grad_(True)
        y = torch.randint(0, V, (N,), device=device, generator=g)

        def fused(h=h, w=w, y=y):
            loss, _ = fastis.linear_cross_entropy(h, w, y, return_score=True)
            loss.backward()

        def naive(h=h, w=w, y=y):
            F.cross_entropy(F.linear(h, w).float(), y).backward()

        row = {"shape": f"{N} x {D} x {V}", "dtype": str(dtype).removeprefix("torch.")}
        for name, fn in (("fused", fused), ("naive", naive)):
            try:
                row[f"{name}_ms"] = bench_ms(fn, device)
                row[f"{name}_MiB"] = _peak_mb(fn, device)
            except Exception as exc:  # out of memory must not end the run
                row[f"{name}_ms"] = describe(exc, 80)
            h.grad = w.grad = None
        if isinstance(row.get("fused_ms"), float) and isinstance(row.get("naive_ms"), float):
            row["speedup"] = row["naive_ms"] / row["fused_ms"]
        rows.append(row)
    return rows


LINEAR_COLUMNS = [
    ("N x D x V", "shape", "s"),
    ("dtype", "dtype", "s"),
    ("fused ms", "fused_ms", ".3f"),
    ("fused MiB", "fused_MiB", ".0f"),
    ("naive ms", "naive_ms", ".3f"),
    ("naive MiB", "naive_MiB", ".0f"),
    ("x naive", "speedup", ".2f"),
]


def linear_markdown(rows: list[dict]) -> list[str]:
    return [
        "## fastis.linear_cross_entropy (forward + backward, with the score)",
        "",
        *table(rows, LINEAR_COLUMNS),
    ]


def native(settings: Settings) -> list[dict]:
    from fastis import _native

    device = settings.device
    if not _native.available():
        return [{"shape": "-", "error": "no native library (set FASTIS_NATIVE_LIB)"}]
    kernels = {"native": _native.softmax_xent}
    if torch.device(device).type == "cuda":
        from fastis._triton import softmax_xent as triton_kernel

        kernels["triton"] = triton_kernel.softmax_xent
    rows = []
    for N, C in NATIVE_QUICK if settings.quick else NATIVE_FULL:
        logits, target, _ = inputs(N, C, torch.float32, device)
        grad = torch.empty_like(logits)
        nbytes = 2 * logits.numel() * 4 + N * (8 + 4 + 4)  # read logits, write grad
        row = {"shape": f"{N} x {C}"}
        for name, fn in kernels.items():
            try:
                ms = bench_ms(lambda fn=fn, z=logits, t=target, g=grad: fn(z, t, grad=g), device)
                row[f"{name}_ms"] = ms
                row[f"{name}_GBps"] = nbytes / ms / 1e6
            except Exception as exc:
                row[f"{name}_ms"] = describe(exc, 80)
        if isinstance(row.get("triton_ms"), float) and isinstance(row.get("native_ms"), float):
            row["native_over_triton"] = row["native_ms"] / row["triton_ms"]
        rows.append(row)
    return rows


NATIVE_COLUMNS = [
    ("N x C", "shape", "s"),
    ("native ms", "native_ms", ".4f"),
    ("native GB/s", "native_GBps", ".0f"),
    ("triton ms", "triton_ms", ".4f"),
    ("triton GB/s", "triton_GBps", ".0f"),
    ("native / triton", "native_over_triton", ".2f"),
]


def native_markdown(rows: list[dict]) -> list[str]:
    return [
        "## Native library: loss, score and gradient (float32)",
        "",
        *table(rows, NATIVE_COLUMNS),
    ]


PARTS = [
    Part("linear", linear, linear_markdown),
    Part("native", native, native_markdown),
]
