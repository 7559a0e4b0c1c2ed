"""The native CPU library against the torch path, eager and ``torch.compile`` (one thread).

    python -m bench.native_cpu [--calls 200] [--rounds 10] [--out FILE]

Per shape (float32 logits, int64 targets, float32 sample weights) it times, interleaved in
one process (``bench._timing.interleaved_ms``), one thread:

- ``fwd+bwd``: ``fastis.cross_entropy(z, y, sample_weight=w, return_score=True)`` and its
  backward, with ``FASTIS_BACKEND=native`` / ``auto`` / ``torch``; ``eager``: the same
  outputs written with torch ops (``bench.providers.torch_step``: weighted
  ``F.cross_entropy`` plus a no-grad score pass); ``compile``: ``torch.compile`` of that
  eager formula (loss and score in one compiled forward, its backward compiled too);
- ``score``: ``fastis.score(z, y)`` per backend, ``bench.providers.eager_score`` and its
  ``torch.compile``.

Ratios are ``variant / native`` (above 1: native is faster). No assertion: a measurement.
"""

import argparse
import os
import platform
import time

import torch

import fastis
from bench import providers
from bench._timing import interleaved_ms, pin_glibc_malloc

SHAPES = ((128, 10), (1024, 10), (8192, 1000))
BACKENDS = ("native", "auto", "torch")


def _eager_fwd(z, y, w):
    loss = (torch.nn.functional.cross_entropy(z, y, reduction="none") * w).mean()
    with torch.no_grad():
        score = providers.eager_score(z, y)
    return loss, score


def _with_backend(backend, fn):
    """``fn`` run with ``FASTIS_BACKEND=backend``; every variant sets it, so all pay alike."""

    def step():
        os.environ["FASTIS_BACKEND"] = backend
        return fn()

    return step


def _fwd_bwd_steps(N, C):
    z, y, w = providers.inputs(N, C, torch.float32, "cpu")
    z.requires_grad_(True)
    compiled = torch.compile(_eager_fwd, fullgraph=True)

    def fastis_step():
        loss, score = fastis.cross_entropy(z, y, sample_weight=w, return_score=True)
        loss.backward()
        z.grad = None
        return score

    def eager_step():
        loss, score = _eager_fwd(z, y, w)
        loss.backward()
        z.grad = None
        return score

    def compile_step():
        loss, score = compiled(z, y, w)
        loss.backward()
        z.grad = None
        return score

    steps = {b: _with_backend(b, fastis_step) for b in BACKENDS}
    steps["eager"] = _with_backend("torch", eager_step)
    steps["compile"] = _with_backend("torch", compile_step)
    return steps


def _score_steps(N, C):
    z, y, _ = providers.inputs(N, C, torch.float32, "cpu")
    compiled = torch.compile(providers.eager_score, fullgraph=True)
    steps = {b: _with_backend(b, lambda: fastis.score(z, y)) for b in BACKENDS}
    steps["eager"] = _with_backend("torch", lambda: providers.eager_score(z, y))
    steps["compile"] = _with_backend("torch", lambda: compiled(z, y))
    return steps


def _row(what, N, C, ms):
    names = [*BACKENDS, "eager", "compile"]
    cells = [f"{ms[n] * 1e3:.1f}" for n in names]
    ratios = [f"{ms[n] / ms['native']:.2f}" for n in ("torch", "eager", "compile")]
    return f"| {what} {N}x{C} | " + " | ".join(cells + ratios) + " |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per variant")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved slices")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pinned = pin_glibc_malloc()
    from fastis import _native

    if not _native.available():
        raise SystemExit("the native library is not available: pip install or build it")
    lines = [
        "| op shape | native (us) | auto (us) | torch path (us) | eager (us) | compile (us) "
        "| torch / native | eager / native | compile / native |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for what, make in (("fwd+bwd", _fwd_bwd_steps), ("score", _score_steps)):
        for N, C in SHAPES:
            calls = max(10, args.calls // max(1, N * C // 100_000))
            ms = interleaved_ms(make(N, C), calls, "cpu", rounds=args.rounds)
            lines.append(_row(what, N, C, ms))
            print(lines[-1], flush=True)
    os.environ.pop("FASTIS_BACKEND", None)
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()} "
        f"{platform.processor() or ''}, torch {torch.__version__}, 1 thread, "
        f"malloc {'pinned' if pinned else 'default'}, {args.calls} calls per variant "
        f"(fewer for the large shape), {args.rounds} interleaved rounds, medians"
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(header + "\n\n" + "\n".join(lines) + "\n\n")
    print(header)


if __name__ == "__main__":
    main()
