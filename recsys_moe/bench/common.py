"""Timing helpers for the ratio benchmarks: arms run interleaved in one process, medians kept.

Absolute times on shared machines are noise; ratios of arms measured side by side are not.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional

import torch


def measure(
    arms: Mapping[str, Callable[[], None]],
    repeats: int,
    warmup: int = 3,
    setup: Optional[Mapping[str, Callable[[], None]]] = None,
) -> dict[str, list[float]]:
    """Seconds per call of every arm. Arms alternate within each repeat (in rotating order) so
    that a noisy neighbour slows all of them alike. setup[name], where given, runs untimed
    right before each call of that arm (e.g. building a fresh trainer)."""
    names = list(arms)
    setup = setup or {}
    for _ in range(warmup):
        for name in names:
            if name in setup:
                setup[name]()
            arms[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in setup:
                setup[name]()
            t0 = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_report(path: Optional[Path], report: dict[str, object]) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A plain fixed-width table."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)
