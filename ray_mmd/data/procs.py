"""Worker-process start method shared by the packers and the synthetic generator."""

from __future__ import annotations

import multiprocessing as mp


def mp_context() -> mp.context.BaseContext:
    """fork where available: spawn would re-run the caller's __main__ (scripts without a main guard).
    The children only touch numpy, zipfile and fsspec, and fsspec resets its event loop after a fork."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
