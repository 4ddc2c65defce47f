"""P2 / P5: time to first batch from a cold cache on emulated gs:// (small vs 10x larger dataset), and
time to first batch when resuming at 90% vs at 10% of an epoch.

    .venv/bin/python benchmarks/bench_resume.py --quick     # 1K vs 10K samples
    .venv/bin/python benchmarks/bench_resume.py             # 10K vs 100K samples (uploads ~1.6 GB)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _stream_data import replicate, table, write_json  # noqa: E402
from conftest import GcsEmulator  # noqa: E402

from ray_mmd.config import DataConfig  # noqa: E402
from ray_mmd.data.stream import DataStream, StreamConfig  # noqa: E402
from ray_mmd.data.transforms import forget_bg_tables  # noqa: E402


def first_batch_s(url: str, work: str, consumed_frac: float = 0.0, G: int = 256) -> float:
    """Seconds from a fresh stream (cold process and node cache) to its first batch."""
    forget_bg_tables()
    cache = tempfile.mkdtemp(dir=work, prefix="cache-")
    cfg = StreamConfig(
        DataConfig(url=url, image_size=56, global_batch_size=G, cache_bytes=4 << 30), cache_dir=cache
    )
    state = None
    if consumed_frac:
        probe = DataStream(cfg)
        state = probe.state_dict()
        state["consumed"] = int(consumed_frac * probe.steps_in_epoch()) * G
    t0 = time.perf_counter()
    s = DataStream(cfg)
    if state is not None:
        s.load_state_dict(state)
    g = s.epoch_batches()
    next(g)
    dt = time.perf_counter() - t0
    g.close()
    s.close()
    shutil.rmtree(cache, ignore_errors=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    small, large = (1000, 10_000) if args.quick else (10_000, 100_000)
    reps = 3
    work = tempfile.mkdtemp(prefix="bench-resume-")
    emu = GcsEmulator()
    os.environ.update(emu.env())
    try:
        from ray_mmd.data.pack import make_synthetic

        base = os.path.join(work, "base")
        make_synthetic(base, 500, 250, seed=0, test_fraction=0.1)  # 1K = 4 shards = one shuffle window
        bucket = emu.new_bucket()
        t0 = time.perf_counter()
        urls = {n: f"{bucket}/ds{n}" for n in (small, large)}
        for n, u in urls.items():
            replicate(base, u, n)
        upload_s = time.perf_counter() - t0

        # P2: cold-cache time to first batch, interleaved
        p2: dict[int, list[float]] = {small: [], large: []}
        for _ in range(reps):
            for n in (small, large):
                p2[n].append(first_batch_s(urls[n], work))
        # P5: resume at 10% vs 90% of an epoch (the larger set, cold caches), interleaved
        p5: dict[float, list[float]] = {0.1: [], 0.9: []}
        for _ in range(reps):
            for f in (0.1, 0.9):
                p5[f].append(first_batch_s(urls[large], work, consumed_frac=f))
        m2 = {n: statistics.median(v) for n, v in p2.items()}
        m5 = {f: statistics.median(v) for f, v in p5.items()}
        res = {
            "quick": args.quick,
            "samples": [small, large],
            "upload_s": upload_s,
            "p2_first_batch_s": {str(k): v for k, v in p2.items()},
            "p2_median_s": {str(k): v for k, v in m2.items()},
            "p2_ratio": m2[large] / m2[small],
            "p5_first_batch_s": {str(k): v for k, v in p5.items()},
            "p5_median_s": {str(k): v for k, v in m5.items()},
            "p5_ratio_90_vs_10": m5[0.9] / m5[0.1],
        }
        table(
            [
                ("figure", "what", "value"),
                ("P2", f"first batch, cold cache, gs:// {small} samples (median s)", f"{m2[small]:.2f}"),
                ("P2", f"first batch, cold cache, gs:// {large} samples (median s)", f"{m2[large]:.2f}"),
                ("P2", f"ratio {large}/{small} (goal <=1.2; goal <=10 s)", f"{res['p2_ratio']:.2f}"),
                ("P5", f"resume at 10% of {large}: first batch (median s)", f"{m5[0.1]:.2f}"),
                ("P5", f"resume at 90% of {large}: first batch (median s)", f"{m5[0.9]:.2f}"),
                ("P5", "ratio 90%/10% (goal <=1.2)", f"{res['p5_ratio_90_vs_10']:.2f}"),
            ]
        )
        write_json("bench_resume", res)
    finally:
        emu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
