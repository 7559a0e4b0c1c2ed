"""The GPU check: the test suite on the device, then every benchmark section, in minutes.

    python -m bench.gpu_check                      # on a GPU, from the repository root
    python -m bench.gpu_check --device cpu --quick --skip-tests   # smoke run of the script
    python -m bench.gpu_check --parts alias sampler               # some sections only

The training-loop section (``bench/gpu_sampler.py``) also runs the demo end to end when
MNIST-1D is cached. A GPU machine without the ``mnist1d`` package or a network cannot make
the data set, so make the cache where it can be made and copy ``.cache/`` (git-ignored) to
the GPU machine's checkout::

    FASTIS_CACHE_DIR=.cache python -c "from fastis.demo.data import mnist1d; mnist1d()"
    # then, on the GPU machine:
    FASTIS_CACHE_DIR=.cache PYTHONUNBUFFERED=1 python -m bench.gpu_check --out DIR

Writes ``<out>/gpu_<card>.md`` (and ``.json``; ``gpu_<card>_<parts>.*`` for a subset): the
test summary, the measured copy bandwidth, then each section's own tables
(``bench/gpu_score.py``, ``gpu_cross_entropy.py``, ``gpu_alias.py``, ``gpu_sampler.py``).
The report is rewritten after each part, and parts that would start after ``--deadline``
seconds are skipped and listed, so a run stopped by a time limit still leaves what it
measured.
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

from bench import gpu_alias, gpu_cross_entropy, gpu_linear, gpu_sampler, gpu_score
from bench._section import Settings
from bench._timing import copy_bandwidth, describe, malloc_label, pin_glibc_malloc

# the report's order; the cheap parts (no-sync and graph checks) run first
PARTS = (
    gpu_score.PARTS
    + gpu_cross_entropy.PARTS
    + gpu_linear.PARTS
    + gpu_alias.PARTS
    + gpu_sampler.PARTS
)


def run_tests(report, timeout=300):
    """The test suite with the kernels compiled for the device (not interpreted)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    start = time.perf_counter()
    # no -x: one run on the device should see every failure, not only the first
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests",
        "-q",
        "-rf",
        "--maxfail=25",
        "-p",
        "no:cacheprovider",
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:  # the benchmarks must still run
        returncode = f"timed out after {timeout} s"
        output = exc.stdout or ""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
    lines = output.strip().splitlines()
    report["tests"] = {
        "returncode": returncode,
        "summary": lines[-1] if lines else "",
        "seconds": round(time.perf_counter() - start, 1),
        "tail": lines[-60:] if returncode else [],
    }


def markdown(report) -> str:
    lines = [
        f"# GPU check: {report['device_name']}",
        "",
        f"{report['date']}; torch {report['torch']}, triton {report['triton']}; "
        f"copy bandwidth {report['copy_GBps']:.0f} GB/s (read + write); malloc "
        f"{report['malloc']}.",
    ]
    if "tests" in report:
        tests = report["tests"]
        lines += ["", f"Tests: `{tests['summary']}` ({tests['seconds']} s)"]
        lines += ["", *(f"    {line}" for line in tests["tail"])] if tests["tail"] else []
    for part in PARTS:
        if part.name in report:
            try:
                lines += ["", *part.markdown(report[part.name])]
            except Exception as exc:  # the measurements are still in the .json
                lines += ["", f"## {part.name}", "", f"Not rendered: {describe(exc, 300)}"]
    if report.get("errors") or report.get("skipped"):
        lines += ["", "## Not measured", ""]
        lines += [f"- {name}: error {err}" for name, err in report.get("errors", {}).items()]
        lines += [f"- skipped past the deadline: {name}" for name in report.get("skipped", [])]
    return "\n".join(lines) + "\n"


def write(report, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    path = out_dir / f"{stem}.md"
    path.write_text(markdown(report))
    return path


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


def main(argv=None):
    names = [part.name for part in PARTS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few small shapes only")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=names,
        default=names,
        metavar="PART",
        help=f"the parts to run (default all: {' '.join(names)})",
    )
    parser.add_argument(
        "--e2e-budget",
        type=float,
        default=10.0,
        help="seconds of training per demo run in the sampler section",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--deadline",
        type=float,
        default=480.0,
        help="seconds after which the remaining parts are skipped (leave a "
        "margin below any time limit the run is under)",
    )
    args = parser.parse_args(argv)
    device = args.device
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    pinned = pin_glibc_malloc()  # stable host timings (bench/_timing.py)
    report = {
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu {platform.processor() or platform.machine()} (smoke run)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "malloc": malloc_label(pinned),
    }
    card = re.sub(r"[^A-Za-z0-9]+", "_", report["device_name"]).strip("_").lower()
    stem = f"gpu_{card}" if args.parts == names else f"gpu_{card}_{'_'.join(args.parts)}"
    start = time.perf_counter()
    report["copy_GBps"] = copy_bandwidth(device, 1 << (24 if args.quick else 30))
    settings = Settings(
        device=device, quick=args.quick, bandwidth=report["copy_GBps"], e2e_budget=args.e2e_budget
    )
    if not args.skip_tests:
        run_tests(report, timeout=min(300, args.deadline / 2))
    # the report is rewritten after every part, so that a run stopped by a time limit
    # still leaves what it measured
    chosen = [part for part in PARTS if part.name in args.parts]
    for part in sorted(chosen, key=lambda part: not part.cheap):
        elapsed = time.perf_counter() - start
        if elapsed > args.deadline:
            report.setdefault("skipped", []).append(f"{part.name} (at {elapsed:.0f} s)")
            continue
        try:
            report[part.name] = part.measure(settings)
        except Exception as exc:  # one broken part must not cost the others
            report.setdefault("errors", {})[part.name] = describe(exc, 300)
        print(f"{part.name}: {time.perf_counter() - start - elapsed:.1f} s", flush=True)
        write(report, args.out, stem)
    path = write(report, args.out, stem)
    print(path.read_text())
    return report


if __name__ == "__main__":
    main()
