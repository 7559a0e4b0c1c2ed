"""One script for a lent GPU: the GPU test suite, then the kernel benchmarks, in a few minutes.

    python bench/gpu_check.py                 # on the GPU machine, from the repo root
    python bench/gpu_check.py --device cpu --quick --skip-tests   # smoke run of this script

The training-loop section (``bench/gpu_sampler.py``) also runs the demo end to end when
MNIST-1D is cached; the GPU machine has no ``mnist1d`` package and no network, so make the
cache here and carry it (``.cache/`` is git-ignored)::

    FASTIS_CACHE_DIR=.cache python -c "from fastis.demo.data import mnist1d; mnist1d()"
    # then, on the device (carry=[".cache"]), writing the results where they come back:
    FASTIS_CACHE_DIR=.cache PYTHONUNBUFFERED=1 python bench/gpu_check.py --out $OUT

Writes ``<out>/gpu_<card>.md`` (and ``.json``): the test summary, the measured copy
bandwidth, and per kernel and shape the median time, GB/s, fraction of copy bandwidth and
the speed-up over the baselines; plus the launch count and CUDA-graph capture of a small
step (no host synchronisation). Later kernel issues add their section to ``SECTIONS``.
The report is rewritten after each part, and parts that would start after ``--deadline``
seconds (default 480) are skipped and listed, so a run cut off at the device's per-call
limit still returns what it measured.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastis  # noqa: E402
from bench.malloc import pin_glibc_malloc  # noqa: E402
from bench.shapes import DTYPES, FULL  # noqa: E402

QUICK = [(1024, 10), (256, 1000)]


def bench_ms(fn, device):
    """Median milliseconds of ``fn()``: CUDA events via ``do_bench`` on a GPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, nbytes):
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def run_tests(report, timeout=300):
    env = dict(os.environ, TRITON_INTERPRET="0")
    start = time.perf_counter()
    # no -x: one device session should see every failure, not only the first
    command = [sys.executable, "-m", "pytest", "tests", "-q", "-rf", "--maxfail=25",
               "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:  # the benchmarks must still run
        returncode = f"timed out after {timeout} s"
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
    lines = output.strip().splitlines()
    report["tests"] = {"returncode": returncode, "summary": lines[-1] if lines else "",
                       "seconds": round(time.perf_counter() - start, 1),
                       "tail": lines[-60:] if returncode else []}


def eager_score(logits, target):
    return (torch.softmax(logits.float(), 1) - F.one_hot(target, logits.shape[1])).norm(dim=1)


def score_section(report, device, shapes, bandwidth):
    compiled = torch.compile(eager_score)
    rows = []
    for dtype in DTYPES:
        for N, C in shapes:
            logits = (torch.randn(N, C, device=device) * 3).to(dtype)
            target = torch.randint(0, C, (N,), device=device)
            nbytes = logits.numel() * logits.element_size() + target.numel() * 8 + N * 4
            row = {"N": N, "C": C, "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes}
            for name, fn in (("fastis", fastis.score), ("eager", eager_score),
                             ("compile", compiled)):
                try:
                    row[f"{name}_ms"] = bench_ms(
                        lambda fn=fn, z=logits, y=target: fn(z, y), device)
                except Exception as exc:  # a baseline out of memory must not end the run
                    row[f"{name}_ms"] = None
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            ms = row["fastis_ms"]
            row["fastis_GBps"] = nbytes / ms / 1e6
            row["fraction_of_copy"] = row["fastis_GBps"] / bandwidth
            for name in ("eager", "compile"):
                if row[f"{name}_ms"]:
                    row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / ms
            rows.append(row)
            del logits, target
    report["score"] = rows


def small_step_section(report, device):
    """Launch count and CUDA-graph capture of fastis.score at 1024 x 10."""
    logits = torch.randn(1024, 10, device=device)
    target = torch.randint(0, 10, (1024,), device=device)
    out = {}
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        fastis.score(logits, target)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fastis.score(logits, target)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        out["kernels"] = kernels
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fastis.score(logits, target)  # warm up on the side stream
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                captured = fastis.score(logits, target)
            logits.copy_(torch.randn_like(logits))
            graph.replay()
            torch.cuda.synchronize()
            ok = torch.allclose(captured, fastis.score(logits, target))
            out["cuda_graph"] = "captured and replayed" + ("" if ok else ", WRONG RESULT")
        except Exception as exc:
            out["cuda_graph"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    out["ms"] = bench_ms(lambda: fastis.score(logits, target), device)
    report["score_small_step"] = out


def cross_entropy_section(report, device, shapes, bandwidth):
    """Forward + backward with the score, against torch (+ eager score) and Liger."""
    from bench.test_bench_cross_entropy import PROVIDERS, inputs

    rows = []
    for dtype in DTYPES:
        for N, C in shapes:
            leaf, target, weight = (t.to(device) for t in inputs(N, C, dtype))
            leaf = leaf.detach().requires_grad_(True)
            logits_bytes = leaf.numel() * leaf.element_size()
            row = {"N": N, "C": C, "dtype": str(dtype).removeprefix("torch."),
                   "bytes": 2 * logits_bytes}  # one read of the logits, one write of the grad
            clone_ms = bench_ms(lambda leaf=leaf: leaf.clone(), device)
            for name, step in PROVIDERS.items():
                inplace = name == "fastis_inplace"

                def once(step=step, inplace=inplace, leaf=leaf, target=target, weight=weight):
                    leaf.grad = None
                    step(leaf.clone() if inplace else leaf, target, weight)

                try:
                    # the in-place variant needs a fresh copy each time: its cost is removed
                    row[f"{name}_ms"] = bench_ms(once, device) - (clone_ms if inplace else 0)
                    if device == "cuda":
                        leaf.grad = None
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        once()
                        torch.cuda.synchronize()
                        # the copy handed to the in-place variant is its input, not extra
                        extra = torch.cuda.max_memory_allocated() - base - inplace * logits_bytes
                        row[f"{name}_peak_extra_logits"] = extra / logits_bytes
                except Exception as exc:  # a baseline out of memory must not end the run
                    row[f"{name}_ms"] = None
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            for name in PROVIDERS:
                if row.get(f"{name}_ms"):
                    row[f"{name}_GBps"] = row["bytes"] / row[f"{name}_ms"] / 1e6
                    row[f"{name}_of_copy"] = row[f"{name}_GBps"] / bandwidth
            rows.append(row)
            leaf.grad = None
            del leaf, target, weight
    report["cross_entropy"] = rows


def cuda_graph_training_step(report, device):
    """Capture forward, fastis.cross_entropy, backward and an SGD step in one CUDA graph."""
    if device != "cuda":
        return
    out = {}
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 1000)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(512, 64, device=device)
        y = torch.randint(0, 1000, (512,), device=device)
        w = torch.rand(512, device=device)

        def step():
            opt.zero_grad(set_to_none=False)
            loss, score = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
            loss.backward()
            opt.step()
            return loss, score

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, score = step()
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        torch.cuda.synchronize()
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(),
                                                           strict=True))
        out["cuda_graph"] = f"captured; replay updated the parameters: {moved}; " \
            f"loss {loss.item():.4f}, finite scores: {bool(score.isfinite().all())}"
    except Exception as exc:
        out["cuda_graph"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    report["cross_entropy_training_step"] = out


def alias_section(report, device, shapes, bandwidth):
    from bench.gpu_alias import alias_section as section

    section(report, device, shapes, bandwidth)


def sampler_section(report, device, shapes, bandwidth):
    from bench.gpu_sampler import sampler_section as section

    section(report, device, shapes, bandwidth)


SECTIONS = [score_section, cross_entropy_section, alias_section, sampler_section]


def write(report, out_dir):
    card = re.sub(r"[^A-Za-z0-9]+", "_", report["device_name"]).strip("_").lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"gpu_{card}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# GPU check: {report['device_name']}", "",
             f"{report['date']}; torch {report['torch']}, triton {report['triton']}; "
             f"copy bandwidth {report['copy_GBps']:.0f} GB/s (read + write).", ""]
    if "tests" in report:
        lines += [f"Tests: `{report['tests']['summary']}` ({report['tests']['seconds']} s)", ""]
        lines += [f"    {line}" for line in report["tests"]["tail"]]
    if "score" in report:
        lines += ["## fastis.score", "",
                  "| N x C | dtype | fastis ms | GB/s | of copy | eager ms | x eager "
                  "| compile ms | x compile |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["score"]:
            def cell(key, fmt, r=r):
                return format(r[key], fmt) if r.get(key) is not None else "-"

            lines.append(
                f"| {r['N']} x {r['C']} | {r['dtype']} | {cell('fastis_ms', '.4f')} | "
                f"{cell('fastis_GBps', '.0f')} | {cell('fraction_of_copy', '.0%')} | "
                f"{cell('eager_ms', '.4f')} | {cell('speedup_vs_eager', '.2f')} | "
                f"{cell('compile_ms', '.4f')} | {cell('speedup_vs_compile', '.2f')} |")
    if "cross_entropy" in report:
        names = [k[:-3] for k in report["cross_entropy"][0] if k.endswith("_ms")]
        lines += ["", "## fastis.cross_entropy (forward + backward, with the score)", "",
                  "GB/s count one read of the logits and one write of the gradient; peak is "
                  "the extra memory in logits-sized buffers.", "",
                  "| N x C | dtype | " + " | ".join(f"{n} ms | GB/s | of copy | peak"
                                                   for n in names) + " |",
                  "|---|---|" + "---|---|---|---|" * len(names)]
        for r in report["cross_entropy"]:
            cells = []
            for n in names:
                for key, fmt in (("_ms", ".4f"), ("_GBps", ".0f"), ("_of_copy", ".0%"),
                                 ("_peak_extra_logits", ".2f")):
                    v = r.get(n + key)
                    cells.append(format(v, fmt) if v is not None else "-")
            lines.append(f"| {r['N']} x {r['C']} | {r['dtype']} | " + " | ".join(cells) + " |")
    if "cross_entropy_training_step" in report:
        lines += ["", "Training step in a CUDA graph: "
                  + report["cross_entropy_training_step"]["cuda_graph"]]
    if "score_small_step" in report:
        s = report["score_small_step"]
        lines += ["", f"Small step (1024 x 10): {s['ms']:.4f} ms; kernels launched: "
                  f"{s.get('kernels', 'n/a')}; CUDA graph: {s.get('cuda_graph', 'n/a')}"]
    if report.get("errors") or report.get("skipped"):
        lines += ["", "## Not measured", ""]
        lines += [f"- {name}: error {err}" for name, err in report.get("errors", {}).items()]
        lines += [f"- skipped past the deadline: {name}" for name in report.get("skipped", [])]
    if "extra_sampler" in report:
        from bench.gpu_sampler import to_markdown

        lines += ["", to_markdown(report["extra_sampler"], "Training loop (ImportanceSampler)")]
    for key in report:
        if key.startswith("extra_") and key != "extra_sampler":
            lines += ["", f"## {key[6:]}", "", "```", json.dumps(report[key], indent=1), "```"]
    path = out_dir / f"gpu_{card}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few small shapes only")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--deadline", type=float, default=480.0,
                        help="seconds after which the remaining sections are skipped (the "
                             "device's per-call limit is 600 s)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    pinned = pin_glibc_malloc()  # stable host timings (bench/malloc.py)
    report = {
        "device_name": torch.cuda.get_device_name() if device == "cuda"
        else f"cpu {platform.processor() or platform.machine()} (smoke run)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "triton": triton_version,
        "malloc": "pinned" if pinned else "default",
    }
    start = time.perf_counter()
    report["copy_GBps"] = copy_bandwidth(device, 1 << (24 if args.quick else 30))
    shapes = QUICK if args.quick else FULL
    if not args.skip_tests:
        run_tests(report, timeout=min(300, args.deadline / 2))
    # the cheap no-sync and graph checks first; the report is rewritten after every part so
    # that a run stopped at the device's limit still leaves what it measured
    parts = [("small_step", lambda: small_step_section(report, device)),
             ("cuda_graph_training_step", lambda: cuda_graph_training_step(report, device))]
    parts += [(f.__name__, lambda f=f: f(report, device, shapes, report["copy_GBps"]))
              for f in SECTIONS]
    for name, part in parts:
        elapsed = time.perf_counter() - start
        if elapsed > args.deadline:
            report.setdefault("skipped", []).append(f"{name} (at {elapsed:.0f} s)")
            continue
        try:
            part()
        except Exception as exc:  # one broken part must not cost the others
            report.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"{name}: {time.perf_counter() - start - elapsed:.1f} s", flush=True)
        write(report, args.out)
    path = write(report, args.out)
    print(path.read_text())
    return report


if __name__ == "__main__":
    main()
