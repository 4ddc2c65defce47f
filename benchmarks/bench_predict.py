"""Batch prediction on Ray Data (actor pool, batches) vs a plain single-process loop, same images, one run.

Both read the same folder of fg_bg/bg JPEG pairs (250x250, from the packed demo set), predict with the
same checkpoint and write the same four PNGs per pair. The loop is what a notebook would do: load the
model once, then read, predict and write one pair at a time. Ray is started before the timed part (its
start-up is reported apart); the Ray time includes building the actor pool and loading the model in
each actor.

    python benchmarks/bench_predict.py --quick          # 96 pairs
    python benchmarks/bench_predict.py --pairs 600

Needs a checkpoint: `make demo` (or jobs/stage1.py --config jobs/configs/demo.yaml) writes
runs/demo-stage1 and data/demo.
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
from ray_mmd import infer, storage  # noqa: E402
from ray_mmd.infer_batch import batch_predict, folder_items  # noqa: E402


def make_pairs(data: str, root: Path, n: int) -> None:
    """n fg_bg/bg pairs as JPEG files, taken from a packed dataset as they are stored."""
    import pyarrow.parquet as pq

    from ray_mmd.data import manifest as mf

    man = mf.load(data)
    bg = pq.read_table(man.url(man.bg.path))
    bgs = dict(zip(bg["bg_id"].to_pylist(), bg["image"].to_pylist(), strict=True))
    (root / "fg_bg").mkdir(parents=True)
    (root / "bg").mkdir()
    k = 0
    for s in man.shards:
        for r in pq.read_table(man.url(s.path), columns=["sample_id", "fg_bg", "bg_id"]).to_pylist():
            (root / "fg_bg" / f"{r['sample_id']:06d}.jpg").write_bytes(r["fg_bg"])
            (root / "bg" / f"{r['sample_id']:06d}.jpg").write_bytes(bgs[r["bg_id"]])
            k += 1
            if k == n:
                return
    raise SystemExit(f"{data} has only {k} samples, fewer than --pairs {n}")


def plain_loop(checkpoint: str, pairs: Path, out: Path) -> int:
    """The baseline: one process, one pair at a time."""
    loaded = infer.load_model(checkpoint)
    n = 0
    for it in folder_items(str(pairs)):
        fg, size = infer.decode_rgb(storage.read_bytes(it["fg"]), loaded.size, it["fg"])
        bg, _ = infer.decode_rgb(storage.read_bytes(it["bg"]), loaded.size, it["bg"])
        ((prob, depth),) = infer.predict_arrays(loaded, [fg], [bg], [size])
        infer.write_outputs(str(out), it["key"], infer.prediction_pngs(prob, depth))
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo-stage1")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="96 pairs")
    a = ap.parse_args()
    n = 96 if a.quick else a.pairs
    if not os.path.isdir(a.checkpoint):
        raise SystemExit(f"no checkpoint at {a.checkpoint}: run `make demo` first")
    import ray
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        make_pairs(a.data, work / "in", n)
        t0 = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        t_ray_start = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 1))

        t0 = time.perf_counter()
        done = plain_loop(a.checkpoint, work / "in", work / "loop")
        t_loop = time.perf_counter() - t0

        t0 = time.perf_counter()
        r = batch_predict(
            a.checkpoint, str(work / "in"), str(work / "ray"), batch_size=a.batch_size, progress=False
        )
        t_ray = time.perf_counter() - t0
        assert r["written"] == done == n and len(os.listdir(work / "ray")) == len(os.listdir(work / "loop"))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {
        "pairs": n,
        "checkpoint": a.checkpoint,
        "batch_size": a.batch_size,
        "cluster_cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "loop_s": t_loop,
        "ray_s": t_ray,
        "ray_start_s": t_ray_start,
        "loop_img_per_s": n / t_loop,
        "ray_img_per_s": n / t_ray,
        "speedup_ray_vs_loop": t_loop / t_ray,
        "speedup_incl_ray_start": t_loop / (t_ray + t_ray_start),
    }
    print(f"{'':<34}{'img/s':>9}{'seconds':>9}")
    print(f"{'plain loop (1 process, 1 pair)':<34}{res['loop_img_per_s']:>9.1f}{t_loop:>9.2f}")
    print(f"{'Ray Data actor pool':<34}{res['ray_img_per_s']:>9.1f}{t_ray:>9.2f}")
    print(
        f"speedup {res['speedup_ray_vs_loop']:.2f}x ({res['speedup_incl_ray_start']:.2f}x counting Ray's start-up)"
    )
    print(f"-> {write_result('bench_predict', res)}")


if __name__ == "__main__":
    main()
