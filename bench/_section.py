"""What a section of the GPU check is: parts that measure, each rendering its own markdown.

A section module (``bench/gpu_score.py``, ``gpu_cross_entropy.py``, ``gpu_alias.py``,
``gpu_sampler.py``) lists its ``PARTS``; ``bench/gpu_check.py`` runs them (the cheap ones
first), stores each result under ``report[part.name]`` and joins their markdown. A part
that fails or would start after the deadline costs only itself.
"""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """What every part is told."""

    device: str
    quick: bool  # the smoke-run sizes
    bandwidth: float  # GB/s of a device-to-device copy (read + write)
    e2e_budget: float = 10.0  # seconds of training per demo run (the sampler section)


@dataclass(frozen=True)
class Part:
    name: str  # the key of its result in the report
    measure: Callable[[Settings], object]  # returns a JSON-able result
    markdown: Callable[[object], list[str]]  # the result's lines of the report
    cheap: bool = False  # no-sync and graph checks: run before the long tables


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown lines of a table, one row a dict; ``columns`` are ``(title, key, format)``.

    A missing or ``None`` value shows ``-``; a value that is not a number (an error text, a
    list of kernel names) shows as ``str``; a row with an ``error`` key shows its first cell
    and then the error.
    """

    def cell(value, fmt):
        if value is None:
            return "-"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, fmt)
        return str(value)

    out = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        first = cell(r.get(columns[0][1]), columns[0][2])
        cells = (
            [first, r["error"]]
            if "error" in r
            else [cell(r.get(key), fmt) for _, key, fmt in columns]
        )
        out.append("| " + " | ".join(cells) + " |")
    return out
