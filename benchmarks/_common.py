"""Helpers shared by the benchmarks: timing and writing results to benchmarks/results/<name>.json."""

from __future__ import annotations

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
