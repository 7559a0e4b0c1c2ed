"""GPU check sections: ``fastis.linear_cross_entropy`` against ``F.linear`` +
``F.cross_entropy``, and the native library's cross-entropy against the Triton kernel.

``linear``: per shape and provider, forward + backward time (fastis with the score), the
peak memory allocated beyond the inputs (``torch.cuda.max_memory_allocated``; not on the
CPU) and the agreement with the float32 materialised loss and gradients, for the fused op
(the Triton kernels on a GPU), the naive composition, and Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` and cut-cross-entropy's ``linear_cross_entropy``
where they are installed. ``native``: ``fastis._native.softmax_xent`` (loss,
score and gradient) against the Triton launcher on the same inputs, when the library is
there (``FASTIS_NATIVE_LIB``, or ``build/``); the row says so when it is not.
"""

import importlib
import importlib.util

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


def linear_providers(h, w, y) -> dict:
    """Forward + backward of a mean cross-entropy of ``h @ w.T`` per provider, each a
    call that leaves ``h.grad`` and ``w.grad``: fastis (with the score), the naive
    composition (16-bit logits, then float32), and Liger-Kernel's and cut-cross-entropy's
    fused last layers where they are installed (neither gives a score)."""

    def fused():
        loss, _ = fastis.linear_cross_entropy(h, w, y, return_score=True)
        loss.backward()
        return loss

    def naive():
        loss = F.cross_entropy(F.linear(h, w).float(), y)
        loss.backward()
        return loss

    out = {"fused": fused, "naive": naive}
    liger = _optional("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    if liger is not None:
        liger_loss = liger()

        def liger_step():
            loss = liger_loss(w, h, y)
            loss.backward()
            return loss

        out["liger"] = liger_step
    cce = _optional("cut_cross_entropy", "linear_cross_entropy")
    if cce is not None:

        def cce_step():
            loss = cce(h, w, y)
            loss.backward()
            return loss

        out["cce"] = cce_step
    return out


def _optional(module: str, name: str):
    """``module.name``, or None where the package is not installed (or does not import)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # a broken install counts as absent
        return None


def _agreement(loss, h, w, ref) -> dict:
    """How far a provider's loss and gradients are from the float32 materialised ones:
    the loss's absolute difference, the gradients' relative (Frobenius) errors."""
    ref_loss, ref_dh, ref_dw = ref

    def rel(g, r):
        return ((g.float() - r).norm() / r.norm()).item()

    return {
        "loss_err": abs(loss.item() - ref_loss),
        "dh_err": rel(h.grad, ref_dh),
        "dw_err": rel(w.grad, ref_dw),
    }


def _reference(h, w, y):
    """Loss and gradients of the float32 composition, from float32 copies of the inputs."""
    h32 = h.detach().float().requires_grad_(True)
    w32 = w.detach().float().requires_grad_(True)
    loss = F.cross_entropy(F.linear(h32, w32), y)
    loss.backward()
    out = loss.item(), h32.grad, w32.grad
    del h32, w32
    return out


def linear(settings: Settings) -> list[dict]:
    device = settings.device
    rows = []
    for N, D, V, dtype in LINEAR_QUICK if settings.quick else LINEAR_FULL:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(N, D, device=device, generator=g).to(dtype).requires_grad_(True)
        w = (torch.randn(V, D, device=device, generator=g) / D**0.5).to(dtype)
        w.requires_grad_(True)
        y = torch.randint(0, V, (N,), device=device, generator=g)
        ref = _reference(h, w, y)
        shape = {"shape": f"{N} x {D} x {V}", "dtype": str(dtype).removeprefix("torch.")}
        here = []
        for name, fn in linear_providers(h, w, y).items():
            row = {**shape, "provider": name}
            try:
                h.grad = w.grad = None
                row |= _agreement(fn(), h, w, ref)
                row["ms"] = bench_ms(fn, device)
                h.grad = w.grad = None
                row["MiB"] = _peak_mb(fn, device)
            except Exception as exc:  # out of memory must not end the run
                row["ms"] = describe(exc, 80)
            h.grad = w.grad = None
            here.append(row)
        naive_ms = here[1]["ms"]
        for r in here:
            if isinstance(r["ms"], float) and isinstance(naive_ms, float):
                r["x_naive"] = naive_ms / r["ms"]
        rows += here
        del ref
    return rows


LINEAR_COLUMNS = [
    ("N x D x V", "shape", "s"),
    ("dtype", "dtype", "s"),
    ("provider", "provider", "s"),
    ("ms", "ms", ".3f"),
    ("peak MiB", "MiB", ".0f"),
    ("x naive", "x_naive", ".2f"),
    ("loss err", "loss_err", ".1e"),
    ("dh rel err", "dh_err", ".1e"),
    ("dW rel err", "dw_err", ".1e"),
]


def linear_markdown(rows: list[dict]) -> list[str]:
    return [
        "## fastis.linear_cross_entropy (forward + backward; fastis with the score)",
        "",
        "Peak memory beyond the inputs; errors against the float32 materialised",
        "composition (loss: absolute; gradients: relative Frobenius norm). Liger-Kernel",
        "and cut-cross-entropy appear where installed.",
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
