"""Equal wall-clock on a shared, noisy machine: several methods trained in one process,
in alternating short time slices.

Sequential runs of the same method on a shared machine differ by tens of percent, as the
other load comes and goes; a comparison of methods run one after the other then measures
the load as much as the methods. Here every method of a comparison lives in the same
process (same data tensors, each its own model, optimiser and sampler, the model built
from the same seed), and a round gives each unfinished method one slice of about
``slice_seconds`` of its own training (the slice ends with the step that passes it), in
the same order every round, until each has trained its budget. Each method's
``TrainingClock`` runs only during its own steps (evaluations and the other methods'
slices excluded), its learning rate follows the schedule of its own trained share, and
its curve is evaluated at its own points. A change of load thus lands on all methods
within about one round (``len(cfgs) * slice_seconds``).

The slice is a trade-off: short slices track the load closely but switch often (each
switch costs a cache refill, a fraction of a step on these models); 0.25 to 1 s suits
steps of a few milliseconds. One intra-op thread (``threads=1``, ``torch.set_num_threads``)
is recommended on a shared CPU: a step on several threads waits for the slowest one, the
one another process has preempted.

On CUDA the measured switch times steps with CUDA events, not the training clock: at a
slice boundary one of its intervals spans the other methods' slices (clipped by the
switch to 4x its estimate).
"""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from fastis.demo.config import RunConfig
from fastis.demo.train import Trainer, warm_up


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, restored after (None: as is)."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_interleaved(
    cfgs: list[RunConfig],
    data,
    *,
    slice_seconds: float = 0.5,
    model_fn: Callable[[], torch.nn.Module] | None = None,
    threads: int | None = None,
    clock: Callable[[], float] | None = None,
    progress: Callable[[int, float, dict], None] | None = None,
    warmup_steps: int = 2,
) -> list[dict]:
    """Trains every run of ``cfgs`` to its budget in alternating slices; their records.

    Args:
        cfgs: the runs (any methods, rates, seeds, schedules, budgets; usually one seed's
            methods, or one seed's grid of methods and rates).
        data: ``(x_train, y_train, x_test, y_test)`` on the runs' device, shared by all.
        slice_seconds: training seconds per method per round, finite and > 0.
        model_fn: builds each model (default: ``fastis.demo.models.build`` of each
            config's ``workload``).
        threads: intra-op threads while training (default: leave torch's setting).
        clock: the wall clock under every training clock (default ``time.perf_counter``).
        progress: called as ``progress(i, seconds_trained, state)`` for run ``i``.
        warmup_steps: before any clock runs, a discarded copy of the first run of each
            method trains this many steps (default 2; ``fastis.demo.train.warm_up``), so
            that no run pays the process's first calls in its budget; 0: none.

    Returns:
        One record per config, in order, in ``fastis.demo.train.run``'s format, with
        ``timing``: ``{'mode': 'interleaved', 'slice_seconds', 'slices', 'threads'}``.
    """
    slice_seconds = float(slice_seconds)
    if not (math.isfinite(slice_seconds) and slice_seconds > 0):
        raise ValueError(f"slice_seconds must be finite and > 0, got {slice_seconds}")
    if not cfgs:
        raise ValueError("cfgs must hold at least one RunConfig, got none")
    with intra_op_threads(threads):
        warm_up(cfgs, data, warmup_steps, model_fn)
        trainers = [Trainer(cfg, data, model_fn=model_fn, clock=clock) for cfg in cfgs]
        while not all(t.done for t in trainers):
            for i, t in enumerate(trainers):
                if not t.done:
                    report = None if progress is None else _bind(progress, i)
                    t.advance(slice_seconds, report)
        used = torch.get_num_threads()
    return [
        {
            **t.result(),
            "timing": {
                "mode": "interleaved",
                "slice_seconds": slice_seconds,
                "slices": t.slices,
                "threads": used,
            },
        }
        for t in trainers
    ]


def _bind(progress, i):
    return lambda clock, state: progress(i, clock, state)
