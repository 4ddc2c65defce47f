"""P1c / P1d: the Ray decoder (long-lived decode actors) against the thread backend, and decode spread
over CPU-only nodes.

P1c: img/s of the Ray decoder vs the thread backend on the same cores, one run, at 224 and 56: the
     first epoch of a fresh stream (start-up included; also the time from build to its first batch),
     the median of later epochs (warm workers; thread and ray epochs alternate), and the first epoch
     of a second Ray stream sharing the warm pool (as an eval stream does).
P1d: img/s reaching one trainer (this process, on a 0-CPU head node) with decode on 1 vs 2 CPU-only
     nodes of one CPU each (ray.cluster_utils.Cluster, "decode" resource), as a ratio.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_ray_data.py [--quick] [--samples N --epochs E]
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

from _stream_data import source_and_pack, table, write_json  # noqa: E402

from ray_mmd.config import DataConfig  # noqa: E402
from ray_mmd.data.order import Chunk  # noqa: E402
from ray_mmd.data.stream import DataStream, StreamConfig  # noqa: E402
from ray_mmd.data.transforms import forget_bg_tables  # noqa: E402


def epochs(cfg: StreamConfig, n: int) -> list[float]:
    """img/s of each of `n` epochs of one fresh stream (the first includes its start-up)."""
    forget_bg_tables()
    s = DataStream(cfg)
    out = []
    try:
        for _ in range(n):
            out.append(_epoch(s))
    finally:
        s.close()
    return out


def _epoch(s: DataStream) -> float:
    t0 = time.perf_counter()
    k = sum(len(b["sample_id"]) for b in s.epoch_batches())
    return k / (time.perf_counter() - t0)


def p1c(packed: str, n: int, cores: int, ep: int) -> dict:
    """Per size: each backend's first epoch on a fresh stream (the Ray one built only then, so its
    actor start-up is inside it), then `ep - 1` epochs of each, alternating thread / ray so that load
    from elsewhere on the box hits both alike; steady = the median of those. Then a second Ray stream
    (another order, as an eval stream would be) built while the first is open: its first epoch runs on
    the shared, warm pool."""
    import ray

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    res = {}
    try:
        for size in (224, 56):
            base = StreamConfig(
                DataConfig(url=packed, image_size=size, global_batch_size=64, decode_nodes="local"),
                chunks=[Chunk(0, n, ep)],
                workers=cores,
                ray_task_cpus=1.0,
            )
            forget_bg_tables()
            th = DataStream(base.with_data(backend="thread"))
            t_first = _epoch(th)
            t0 = time.perf_counter()
            rd = DataStream(base.with_data(backend="ray"))
            g = rd.epoch_batches()
            k = len(next(g)["sample_id"])
            startup = time.perf_counter() - t0
            k += sum(len(b["sample_id"]) for b in g)
            r_first = k / (time.perf_counter() - t0)
            ts, rs = [], []
            for _ in range(ep - 1):
                ts.append(_epoch(th))
                rs.append(_epoch(rd))
            other = DataStream(base.with_data(backend="ray", seed=1))
            shared_first = _epoch(other)
            other.close()
            rd.close()
            th.close()
            t_st, r_st = statistics.median(ts), statistics.median(rs)
            res[str(size)] = {
                "thread_first_epoch_img_s": t_first,
                "thread_steady_img_s": t_st,
                "thread_epochs_img_s": ts,
                "ray_first_epoch_img_s": r_first,
                "ray_build_to_first_batch_s": startup,
                "ray_steady_img_s": r_st,
                "ray_epochs_img_s": rs,
                "ray_second_stream_first_epoch_img_s": shared_first,
                "ray_vs_thread_steady": r_st / t_st,
                "ray_vs_thread_first_epoch": r_first / t_first,
                "ray_second_stream_first_vs_thread_steady": shared_first / t_st,
            }
    finally:
        ray.shutdown()
    return res


def p1d(packed: str, n: int, ep: int) -> dict:
    """One trainer (the driver, on a 0-CPU head) fed by 1, then 2, one-CPU decode nodes."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    cfg = StreamConfig(
        DataConfig(url=packed, image_size=56, global_batch_size=64, decode_nodes="decode"),
        chunks=[Chunk(0, n, ep)],
        workers=1,
    )
    res = {}
    try:
        for k in (1, 2):
            c.add_node(num_cpus=1, resources={"decode": 1})
            c.wait_for_nodes()
            res[f"{k}_nodes_img_s"] = statistics.median(epochs(cfg, ep)[1:])
    finally:
        ray.shutdown()
        c.shutdown()
    res["two_vs_one"] = res["2_nodes_img_s"] / res["1_nodes_img_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5, help="per stream; steady = median of all but the first")
    ap.add_argument("--only", choices=["p1c", "p1d"], default=None)
    args = ap.parse_args()
    n = args.samples or (640 if args.quick else 4000)  # 4000: ~1 s an epoch at 224 on 2 cores
    ep = args.epochs
    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="bench-ray-data-")
    try:
        _, packed = source_and_pack(work, n, shard_size=200)
        res: dict = {"quick": args.quick, "cores": cores, "samples": n, "global_batch": 64}
        if args.only in (None, "p1c"):
            res["p1c"] = p1c(packed, n, cores, ep)
        if args.only in (None, "p1d"):
            res["p1d"] = p1d(packed, n, ep)
        rows = [("figure", "what", "value")]
        for size, r in res.get("p1c", {}).items():
            rows += [
                ("P1c", f"{size}: thread first / steady img/s", f"{r['thread_first_epoch_img_s']:.0f} / {r['thread_steady_img_s']:.0f}"),
                ("P1c", f"{size}: ray first / steady img/s", f"{r['ray_first_epoch_img_s']:.0f} / {r['ray_steady_img_s']:.0f}"),
                ("P1c", f"{size}: ray vs thread steady (first)", f"{r['ray_vs_thread_steady']:.2f}x ({r['ray_vs_thread_first_epoch']:.2f}x)"),
                ("P1c", f"{size}: ray build -> first batch", f"{r['ray_build_to_first_batch_s']:.2f} s"),
                ("P1c", f"{size}: 2nd ray stream (shared pool) first epoch", f"{r['ray_second_stream_first_epoch_img_s']:.0f} img/s ({r['ray_second_stream_first_vs_thread_steady']:.2f}x thread steady)"),
            ]  # fmt: skip
        if "p1d" in res:
            d = res["p1d"]
            rows += [
                ("P1d", "1 / 2 decode nodes img/s @56", f"{d['1_nodes_img_s']:.0f} / {d['2_nodes_img_s']:.0f}"),
                ("P1d", "2 vs 1 decode nodes", f"{d['two_vs_one']:.2f}x"),
            ]  # fmt: skip
        table(rows)
        write_json("bench_ray_data" + ("_quick" if args.quick else ""), res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
