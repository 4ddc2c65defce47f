"""Stream throughput (wire batches, no training) by decode backend and worker count: where threads stop
scaling and worker processes take over (the basis of StreamConfig.backend="auto").

    python benchmarks/bench_decode_scaling.py --quick      # 1K samples; thread/process x 1, 2 workers
    python benchmarks/bench_decode_scaling.py              # 8K samples; thread x 4, 8, 16; process x 8, 16

img/s is the best of epochs 2-3 of one stream (epoch 1 also pays start-up); also one core's raw decode rate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import write_result  # noqa: E402
from ray_mmd.config import DataConfig  # noqa: E402
from ray_mmd.data.order import Chunk  # noqa: E402
from ray_mmd.data.pack import make_synthetic  # noqa: E402
from ray_mmd.data.stream import DataStream, StreamConfig  # noqa: E402
from ray_mmd.data.transforms import forget_bg_tables  # noqa: E402


def one_core_decode(root: str, size: int, n: int = 200) -> float:
    import pyarrow.parquet as pq
    import simplejpeg

    from ray_mmd.data import manifest as mf

    man = mf.load(root)
    t = pq.read_table(os.path.join(root, man.shards[0].path)).slice(0, n)
    rows = list(zip(t["fg_bg"].to_pylist(), t["mask"].to_pylist(), t["depth"].to_pylist(), strict=True))
    t0 = time.perf_counter()
    for f, m, d in rows:
        simplejpeg.decode_jpeg(f, min_height=size, min_width=size)
        simplejpeg.decode_jpeg(m, colorspace="GRAY", min_height=size, min_width=size)
        simplejpeg.decode_jpeg(d, colorspace="GRAY", min_height=size, min_width=size)
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 1024 if args.quick else 8192
    runs = (
        [("thread", 1), ("thread", 2), ("process", 1), ("process", 2)]
        if args.quick
        else [("thread", 4), ("thread", 8), ("thread", 16), ("process", 8), ("process", 16)]
    )
    work = tempfile.mkdtemp(prefix="bench-scaling-")
    res: dict = {"cores": os.cpu_count(), "samples": n}
    try:
        root = os.path.join(work, "ds")
        make_synthetic(root, n, shard_size=512, seed=0, test_fraction=0.0)
        for size, G in ((224, 64), (56, 512)):
            out = res[str(size)] = {"one_core_decode_samples_s": one_core_decode(root, size)}
            for backend, w in runs:
                forget_bg_tables()
                s = DataStream(
                    StreamConfig(
                        DataConfig(url=root, image_size=size, global_batch_size=G, backend=backend),
                        chunks=[Chunk(0, n, 3)], workers=w,
                    )
                )  # fmt: skip
                rates = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    k = sum(len(b["sample_id"]) for b in s.epoch_batches())
                    rates.append(k / (time.perf_counter() - t0))
                s.close()
                out[f"{backend}_{w}_img_s"] = max(rates[1:])
                print(
                    f"{size}: {backend:7s} x{w:<2d} {max(rates[1:]):7.0f} img/s (epoch 1: {rates[0]:.0f}); "
                    f"one core decodes {out['one_core_decode_samples_s']:.0f}/s",
                    flush=True,
                )
        write_result("bench_decode_scaling" + ("_quick" if args.quick else ""), res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
