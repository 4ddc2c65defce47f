"""Helpers shared by the benchmarks: timing and writing results to benchmarks/results/<name>.json."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls.

    ``fn`` must finish its own device work (e.g. call ``torch.cuda.synchronize()``) before returning.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` (plus machine info) to benchmarks/results/<name>.json; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {
        "name": name,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        **payload,
    }
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


def load_info() -> dict:
    """The machine's load when a figure was taken (shared, noisy machine: state it beside each figure)."""
    import os

    one, five, fifteen = os.getloadavg()
    return {
        "load1": round(one, 2),
        "load5": round(five, 2),
        "load15": round(fifteen, 2),
        "cpus": os.cpu_count(),
    }


def spread(values: list[float]) -> dict:
    """Median, min, max and the half-range relative to the median (the "+-x%" of a repeated figure)."""
    import statistics

    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {
        "median": med,
        "min": lo,
        "max": hi,
        "half_range_pct": 100 * (hi - lo) / 2 / med,
        "stdev_pct": 100 * statistics.stdev(values) / med if len(values) > 1 else 0.0,
        "values": values,
    }


@contextlib.contextmanager
def heavy_lock(path: str | None):
    """Hold the shared machine's heavy-work lock (flock) for the block; no-op without a path.

    Long benchmarks take it per measurement round, not for the whole run, so others can interleave."""
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
