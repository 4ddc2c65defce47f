"""P8: peak memory of the input pipeline over one epoch, 10x larger dataset vs smaller (streaming means
memory does not grow with the data). Each epoch runs in a fresh subprocess; RSS is sampled every 20 ms.

    .venv/bin/python benchmarks/bench_memory.py --quick     # 600 vs 6000 samples
    .venv/bin/python benchmarks/bench_memory.py             # 10K vs 100K samples
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stream_data import replicate, table, write_json  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(url: str, gbs: int = 256) -> None:
    """One epoch at 56x56, global batch `gbs`; prints JSON {base, peak, samples}."""
    from ray_mmd.config import DataConfig
    from ray_mmd.data.stream import DataStream, StreamConfig

    s = DataStream(StreamConfig(DataConfig(url=url, image_size=56, global_batch_size=gbs)))
    s.steps_in_epoch()  # the epoch's order is part of the pipeline's memory, but build it after `base`
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    n = sum(len(b["sample_id"]) for b in s.epoch_batches())
    stop.set()
    t.join()
    print(json.dumps({"base": base, "peak": max(peak[0], _rss()), "samples": n}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--gbs", type=int, default=256)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.gbs)
        return
    small, large = (600, 6000) if args.quick else (10_000, 100_000)
    gbs = 64 if args.quick else 256  # quick: small batches so the small set also reaches steady state
    work = tempfile.mkdtemp(prefix="bench-memory-")
    try:
        from ray_mmd.data.pack import make_synthetic

        base = os.path.join(work, "base")
        make_synthetic(base, 500, 250, seed=0, test_fraction=0.1)
        out = {}
        for n in (small, large):
            url = os.path.join(work, f"ds{n}")
            replicate(base, url, n)
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, __file__, "--child", url, "--gbs", str(gbs)],
                capture_output=True,
                text=True,
                check=True,
            )
            out[n] = json.loads(r.stdout.strip().splitlines()[-1]) | {"epoch_s": time.perf_counter() - t0}
        mib = 1 << 20
        res = {
            "quick": args.quick,
            "samples": [small, large],
            "global_batch_size": gbs,
            "runs": {str(k): v for k, v in out.items()},
            "peak_rss_ratio": out[large]["peak"] / out[small]["peak"],
            "pipeline_delta_ratio": (out[large]["peak"] - out[large]["base"])
            / max(1, out[small]["peak"] - out[small]["base"]),
        }
        table(
            [
                ("figure", "what", "value"),
                *[
                    (
                        "P8",
                        f"{n} samples: peak RSS / growth during epoch (MiB)",
                        f"{o['peak'] / mib:.0f} / {(o['peak'] - o['base']) / mib:.0f}",
                    )
                    for n, o in out.items()
                ],
                ("P8", f"peak RSS ratio {large}/{small} (goal <=1.1)", f"{res['peak_rss_ratio']:.3f}"),
                ("P8", "growth-during-epoch ratio", f"{res['pipeline_delta_ratio']:.3f}"),
            ]
        )
        write_json("bench_memory", res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
