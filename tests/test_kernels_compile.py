"""The softmax cross-entropy kernels compile for a Hopper GPU (sm_90), without one.

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
    import json, os, subprocess, sys, tempfile
    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastis._triton import scale_rows, xent_hard, xent_smooth, xent_soft

    KERNELS = {"xent_hard": xent_hard._xent_hard_kernel,
               "xent_smooth": xent_smooth._xent_smooth_kernel,
               "xent_soft": xent_soft._xent_soft_kernel,
               "scale_rows": scale_rows._scale_rows_kernel}
    CUOBJDUMP = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")

    def resources(cubin):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True).stdout
        line = next(x for x in out.splitlines() if "REG:" in x)
        return dict(kv.split(":", 1) for kv in line.split() if ":" in kv)

    done = {}
    for job in json.loads(sys.argv[1]):
        fn = KERNELS[job["kernel"]]
        sig = {name: job["int"] for name in fn.arg_names}  # sizes and strides
        sig.update({name: "*" + t for name, t in job["pointers"].items()})
        sig.update({name: "fp32" for name in job["floats"]})
        sig.update({name: "constexpr" for name in job["constexprs"]})
        src = ASTSource(fn=fn, signature=sig, constexprs={
            (fn.arg_names.index(k),): v for k, v in job["constexprs"].items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": job["num_warps"]})
        res = resources(k.asm["cubin"])
        done[job["name"]] = {"regs": int(res["REG"]), "stack": int(res["STACK"]),
                             "local": int(res["LOCAL"])}
    print(json.dumps(done))
""")


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
                "kernel": kernel, "pointers": pointers(dtype, int_type),
                "floats": FLOATS.get(kernel, []), "int": int_type,
                "constexprs": constexprs, "num_warps": num_warps,
                "name": f"{kernel} {dtype}/{int_type} grad={write} {block_n}x{block_c}",
            })  # fmt: skip
    return out


def test_kernels_compile_for_sm90():
    todo = jobs()
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(todo)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(done) == {job["name"] for job in todo}
    for name, res in sorted(done.items()):
        print(f"{name:48s} {res['regs']:4d} registers, stack {res['stack']}, local {res['local']}")
