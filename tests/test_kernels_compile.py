"""Every Triton kernel compiles for a Hopper GPU (sm_90), without one.

The interpreter runs the kernels' semantics on the CPU, but it is more permissive than the
compiler (types of loop-carried values, constexpr rules, scalar/tensor mixes). Compiling to
a cubin needs no GPU: Triton ships ptxas. Each kernel is compiled for every combination of
constexprs its launcher produces (the ``WRITE_GRAD`` flag, and the block shapes of
``launch_config`` for narrow, medium and multi-block rows), in a subprocess so that
TRITON_INTERPRET (set for the rest of the suite) does not apply. Run with ``-s`` to see
each kernel's registers and spills.
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from fastis._triton.rows import launch_config  # noqa: E402

# one width per block shape the launch rule picks: many rows of one column, a few rows of a
# block each, and rows wider than a block (several blocks, one row per program)
WIDTHS = (1, 100, 5000)
# (logits dtype, integer arguments): the common 32-bit launch and the 64-bit one
DTYPES = (("fp32", "i32"), ("bf16", "i64"))
# kernel -> its pointers' element types for (logits dtype, integer type)
_ROWS = {"Loss": "fp32", "Score": "fp32", "GradScale": "fp32"}
KERNELS = {
    "xent_hard": lambda d, i: {"Logits": d, "Target": i, "Grad": d, **_ROWS},
    "xent_smooth": lambda d, i: {"Logits": d, "Target": i, "Grad": d, **_ROWS},
    "xent_soft": lambda d, i: {"Logits": d, "Target": d, "Grad": d, **_ROWS},
    "scale_rows": lambda d, i: {"Grad": d, "Scale": "fp32"},
}
FLOATS = {"xent_smooth": ["label_smoothing"], "xent_soft": ["label_smoothing"]}
WRITE_GRAD = {"xent_hard": (False, True), "xent_smooth": (False, True),
              "xent_soft": (False, True), "scale_rows": (None,)}  # fmt: skip

SCRIPT = textwrap.dedent("""
    import importlib, json, os, subprocess, sys, tempfile
    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    CUOBJDUMP = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")

    def resources(cubin):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True).stdout
        line = next(x for x in out.splitlines() if "REG:" in x)
        return dict(kv.split(":", 1) for kv in line.split() if ":" in kv)

    done, kernels = {}, set()
    for job in json.loads(sys.argv[1]):
        module = importlib.import_module(job["module"])
        kernels |= {f"{job['module']}.{name}" for name, obj in vars(module).items()
                    if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
        fn = getattr(module, job["kernel"])
        sig = {name: job["int"] for name in fn.arg_names}  # sizes and strides
        sig.update({name: "*" + t for name, t in job["pointers"].items()})
        sig.update({name: "fp32" for name in job["floats"]})
        sig.update({name: "constexpr" for name in job["constexprs"]})
        # arguments a launch specialises as multiples of 16 (pointers, row strides)
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
                 for k in job.get("aligned", [])}
        src = ASTSource(fn=fn, signature=sig, constexprs={
            (fn.arg_names.index(k),): v for k, v in job["constexprs"].items()}, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": job["num_warps"]})
        res = resources(k.asm["cubin"])
        done[job["name"]] = {"kernel": f"{job['module']}.{job['kernel']}",
                             "regs": int(res["REG"]), "stack": int(res["STACK"]),
                             "local": int(res["LOCAL"])}
    print(json.dumps({"done": done, "kernels": sorted(kernels)}))
""")


def compile_all(todo):
    """Compiles ``todo`` in a subprocess (no interpreter); every ``_*_kernel`` of the
    modules involved must be among the jobs. Returns the registers and spills per job."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(todo)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    done = out["done"]
    assert set(done) == {job["name"] for job in todo}
    assert {res["kernel"] for res in done.values()} == set(out["kernels"])
    for name, res in sorted(done.items()):
        print(f"{name:48s} {res['regs']:4d} registers, stack {res['stack']}, local {res['local']}")
    return done


def jobs():
    """Every (kernel, dtype, constexprs) a launcher can produce, named."""
    out = []
    for (kernel, pointers), (dtype, int_type), C in itertools.product(
        KERNELS.items(), DTYPES, WIDTHS
    ):
        _, block_n, block_c, num_warps = launch_config(4096, C)
        for write in WRITE_GRAD[kernel]:
            constexprs = {"BLOCK_N": block_n, "BLOCK_C": block_c}
            if write is not None:
                constexprs["WRITE_GRAD"] = write
            out.append({
                "module": f"fastis._triton.{kernel}", "kernel": f"_{kernel}_kernel",
                "pointers": pointers(dtype, int_type),
                "floats": FLOATS.get(kernel, []), "int": int_type,
                "constexprs": constexprs, "num_warps": num_warps,
                "name": f"{kernel} {dtype}/{int_type} grad={write} {block_n}x{block_c}",
            })  # fmt: skip
    return out


def test_xent_kernels_compile_for_sm90():
    compile_all(jobs())


def alias_jobs():
    """The alias kernels at the launchers' configurations (32-bit and 64-bit builds)."""
    from fastis._triton import alias as A

    p64, i32 = "fp64", "i32"
    fill = dict(Total=p64, A=p64, H=p64, OffA=p64, OffH=p64, PrevA=p64, PrevH=p64, EndA=p64,
                EndH=p64, ScaleH=p64, Prob=p64, Probs=p64)  # fmt: skip
    fill_consts = {"BLOCK": A.SCAN_BLOCK, "IN_STEPS": A.SCAN_BLOCK.bit_length()}
    specs = {
        "scan": ("_alias_scan_kernel", dict(W="fp32", Total=p64, A=p64, H=p64, BlockA=p64,
                 BlockH=p64), i32, {"BLOCK": A.SCAN_BLOCK}, A.SCAN_WARPS),
        "fill": ("_alias_fill_kernel", dict(fill, W="fp32", Alias="i32"), i32, fill_consts,
                 A.FILL_WARPS),
        "fill_int64": ("_alias_fill_kernel", dict(fill, W="bf16", Alias="i64"), "i64",
                       fill_consts, A.FILL_WARPS),
        "sample": ("_alias_sample_kernel", dict(Prob=p64, Alias="i32", Seed="i64", Out="i64"),
                   i32, {"BLOCK": A.SAMPLE_BLOCK}, A.SAMPLE_WARPS),
        "icdf_bf16": ("_icdf_kernel", dict(W="bf16", Seed="i64", Out="i64", ProbsOut="fp32"),
                      i32, {"BLOCK_N": A.ICDF_BLOCK_N, "BLOCK_B": A.ICDF_BLOCK_B},
                      A.ICDF_WARPS),
    }  # fmt: skip
    return [
        {"module": "fastis._triton.alias", "kernel": kernel, "pointers": pointers,
         "floats": [], "int": int_type, "constexprs": consts, "num_warps": warps,
         "name": f"alias {name}"}
        for name, (kernel, pointers, int_type, consts, warps) in specs.items()
    ]  # fmt: skip


def test_alias_kernels_compile_for_sm90_without_spills():
    for name, res in compile_all(alias_jobs()).items():
        # the int64 build (N >= 2^31) keeps an 8-byte stack slot; nothing spills beyond it
        assert res["stack"] <= 8 and res["regs"] < 128, (name, res)


def linear_jobs():
    """The fused last layer's forward and backward kernels at the launchers' GPU
    configurations, for each input dtype (and a backward with frozen weight, no bias)."""
    import torch

    from fastis._triton.linear_xent_grad import grad_config

    DTYPE_OF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    # contiguous rows: Triton specialises an integer argument equal to 1 at launch
    unit = {"stride_hd": 1, "stride_wd": 1}
    # and marks multiples of 16 (the pointers of fresh tensors, rows of 4096 elements)
    aligned = ["Hidden", "Weight", "stride_hn", "stride_wv", "D"]
    out = []
    for dtype, int_type in (("bf16", "i64"), ("fp16", "i32"), ("fp32", "i32")):
        cfg = grad_config(True, DTYPE_OF[dtype], 8192, 128256, 4096)
        warps = cfg.pop("num_warps")
        forward = {"HAS_BIAS": True, "SMOOTH": True, "DOT_F32": dtype == "fp32",
                   "BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64, **unit}  # fmt: skip
        out.append({
            "module": "fastis._triton.linear_xent", "kernel": "_linear_xent_kernel",
            "pointers": {"Hidden": dtype, "Weight": dtype, "Bias": dtype, "Target": int_type,
                         "Loss": "fp32", "Lse": "fp32", "Score": "fp32"},
            "floats": ["eps"], "int": int_type, "constexprs": forward, "num_warps": 4,
            "aligned": aligned, "name": f"linear_xent {dtype}/{int_type}",
        })  # fmt: skip
        for frozen in (False, True) if dtype == "bf16" else (False,):
            backward = {"HAS_BIAS": not frozen, "WRITE_DH": True, "WRITE_DW": not frozen,
                        "WRITE_DB": not frozen, "DOT_F32": dtype == "fp32",
                        "ROUND_DZ": dtype == "bf16",
                        "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                        **cfg, **unit}  # fmt: skip
            out.append({
                "module": "fastis._triton.linear_xent_grad",
                "kernel": "_linear_xent_grad_kernel",
                "pointers": {"Hidden": dtype, "Weight": dtype, "Bias": dtype,
                             "Target": int_type, "Lse": "fp32", "GradLoss": "fp32",
                             "GradHidden": "fp32", "GradWeight": "fp32", "GradBias": "fp32"},
                "floats": ["eps"], "int": int_type, "constexprs": backward,
                "num_warps": warps, "aligned": aligned + ["GradHidden", "GradWeight"],
                "name": f"linear_xent_grad {dtype}/{int_type} frozen={frozen}",
            })  # fmt: skip
    return out


def test_linear_kernels_compile_for_sm90():
    for name, res in compile_all(linear_jobs()).items():
        # the 16-bit kernels (the tensor-core path) keep their tiles in registers; float32's
        # IEEE products spill
        if "fp32" not in name:
            assert res["stack"] <= 8, (name, res)
