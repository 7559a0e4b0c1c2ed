"""The Triton kernels compile for a Hopper GPU (sm_90), without one.

The interpreter runs the kernels' semantics on the CPU, but it is more permissive than the
compiler (types of loop-carried values, constexpr rules, scalar/tensor mixes). Compiling to
a cubin needs no GPU: Triton ships ptxas. Each kernel is compiled for every combination of
its constexpr flags that a launcher can produce, in a subprocess so that TRITON_INTERPRET
(set for the rest of the suite) does not apply.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import itertools, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastis._triton import softmax_xent as sx

    target = GPUTarget("cuda", 90, 32)
    DTYPES = sys.argv[1].split(",")
    done = []

    def compile_(fn, signature, constexprs, name):
        sig = dict(signature)
        for k in constexprs:
            sig[k] = "constexpr"
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        assert triton.compile(src, target=target).asm["cubin"], name
        done.append(name)

    ints = ["n_rows", "T", "C", "ignore_index",
            "stride_lb", "stride_lt", "stride_lc", "stride_tb", "stride_tt", "stride_tc",
            "stride_gb", "stride_gt", "stride_gc"]
    for dtype, soft, smooth, write, scale, (bn, bc) in itertools.product(
            DTYPES, [False, True], [False, True], [False, True],
            [False, True], [(16, 128), (1, 4096)]):
        if scale and not write:
            continue
        sig = {"Logits": "*" + dtype, "Target": "*fp32" if soft else "*i64",
               "Loss": "*fp32", "Score": "*fp32", "Grad": "*" + dtype, "GradScale": "*fp32",
               "label_smoothing": "fp32"}
        sig.update({k: "i64" for k in ints})
        compile_(sx._softmax_xent_kernel, sig,
                 {"SOFT": soft, "SMOOTH": smooth, "WRITE_GRAD": write,
                  "HAS_GRAD_SCALE": scale, "BLOCK_N": bn, "BLOCK_C": bc},
                 f"softmax_xent {dtype} soft={soft} smooth={smooth} grad={write} {bn}x{bc}")
    for dtype in DTYPES:
        sig = {"Grad": "*" + dtype, "Scale": "*fp32"}
        sig.update({k: "i64" for k in ["n_rows", "T", "C", "stride_gb", "stride_gt",
                                       "stride_gc", "stride_s"]})
        compile_(sx._scale_rows_kernel, sig, {"BLOCK_N": 16, "BLOCK_C": 128},
                 f"scale_rows {dtype}")
    print(json.dumps(done))
''')


def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "fp32,bf16"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(done) == 2 * (2 * 2 * 3 * 2 + 1)
