"""The ``--profile`` switch: a cProfile table like the original's and a torch.profiler trace.

Usage (what the jobs do)::

    with profile(run_dir / "profile", enabled=args.profile, torch_steps=5) as prof:
        for batch in loader:
            train_step(...)
            prof.step()

Writes, into ``out_dir``:

* ``cprofile.txt``  -- pstats table sorted by cumulative time: ``ncalls tottime percall cumtime
  percall filename:lineno(function)``, the columns of the original work's profile;
* ``cprofile.prof`` -- the raw stats (``python -m pstats``, snakeviz);
* ``trace.json``    -- a Chrome/Perfetto trace from torch.profiler (CPU, plus CUDA when available);
* ``torch_ops.txt`` -- torch.profiler's per-op table (self CPU/CUDA time).

``torch_steps=None`` traces the whole block; ``torch_steps=k`` traces k steps after one warm-up step
(counted by ``prof.step()``), which keeps traces of long runs small. With ``enabled=False`` the
context manager does nothing and ``step()`` is free.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import logging
import pstats
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Profiler:
    """Handle yielded by :func:`profile`; call ``step()`` once per training step."""

    def __init__(self, torch_prof: torch.profiler.profile | None = None) -> None:
        self._torch = torch_prof
        self.paths: dict[str, Path] = {}

    def step(self) -> None:
        if self._torch is not None:
            self._torch.step()


def _activities() -> list[torch.profiler.ProfilerActivity]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def cprofile_table(stats: pstats.Stats, sort: str = "cumulative", limit: int = 60) -> str:
    buf = io.StringIO()
    stats.stream = buf
    stats.sort_stats(sort).print_stats(limit)
    return buf.getvalue()


@contextlib.contextmanager
def profile(
    out_dir: str | Path,
    enabled: bool = True,
    torch_trace: bool = True,
    torch_steps: int | None = None,
    sort: str = "cumulative",
    limit: int = 60,
    record_shapes: bool = False,
) -> Iterator[Profiler]:
    """Profile the block with cProfile (always, when enabled) and torch.profiler (``torch_trace``)."""
    if not enabled:
        yield Profiler()
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tprof = None
    if torch_trace:
        schedule = None
        if torch_steps is not None:
            schedule = torch.profiler.schedule(wait=0, warmup=1, active=max(1, torch_steps), repeat=1)
        tprof = torch.profiler.profile(
            activities=_activities(), schedule=schedule, record_shapes=record_shapes
        )
    handle = Profiler(tprof)
    cprof = cProfile.Profile()
    if tprof is not None:
        tprof.__enter__()
    cprof.enable()
    try:
        yield handle
    finally:
        cprof.disable()
        if tprof is not None:
            tprof.__exit__(None, None, None)
        cprof.dump_stats(str(out / "cprofile.prof"))
        (out / "cprofile.txt").write_text(cprofile_table(pstats.Stats(cprof), sort, limit))
        handle.paths = {"cprofile_txt": out / "cprofile.txt", "cprofile_prof": out / "cprofile.prof"}
        if tprof is not None:
            try:
                tprof.export_chrome_trace(str(out / "trace.json"))
                handle.paths["trace"] = out / "trace.json"
                sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                (out / "torch_ops.txt").write_text(tprof.key_averages().table(sort_by=sort_key, row_limit=40))
                handle.paths["torch_ops"] = out / "torch_ops.txt"
            except (RuntimeError, AssertionError) as e:  # nothing recorded (e.g. fewer steps than warm-up)
                log.warning("torch.profiler trace not written: %s", e)
        log.info("profile written to %s", out)
