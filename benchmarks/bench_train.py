"""Ray Train overhead and checkpoint stalls, measured side by side in one run on this machine.

P4  training throughput through Ray Train (1 worker, our loop) vs a plain PyTorch loop running the same
    model, global batch, stream and `train_step` in this process (goal >= 0.90);
P6  step time of the steps during which an async checkpoint is written/uploaded vs ordinary steps
    (goal <= 1.2x);
R   restore latency: worker SIGKILL -> next completed step, median of 3 (`--restore`, not in --quick);
Q   demo model quality (IoU, delta<1.25, AbsRel) from runs/demo-stage1 (`make demo`), if it exists.

    python benchmarks/bench_train.py --quick          # P4 + P6 (+ Q if the demo ran), <= ~60 s on 2 cores
    python benchmarks/bench_train.py --restore        # adds R (3 killed runs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp: str, samples: int) -> str:
    from ray_mmd.data.pack import make_synthetic

    url = os.path.join(tmp, "data")
    if not os.path.exists(url):
        make_synthetic(url, samples, 64, seed=1)
    return url


def _cfg(data: str, storage: str, name: str, *extra: str):
    from ray_mmd.config import load

    return load(
        None,
        [
            f"data.url={data}",
            f"run.storage={storage}",
            f"run.name={name}",
            "run.workers=1",
            "run.cpus_per_worker=2",
            "run.progress=false",
            "run.log_every=1",  # one host sync per step: per-step timings for the benchmark
            "model.width=12",
            "data.image_size=56",
            "data.global_batch_size=32",
            "data.decoded_preload_bytes=200000000",
            "optim.amp=off",
            "eval.max_samples=32",
            *extra,
        ],
    )


def plain_loop(cfg, skip: int) -> tuple[float, int]:
    """img/s of the same stream + model + train_step in this process, without Ray."""
    import torch

    from ray_mmd.data import manifest as mf
    from ray_mmd.data.stream import DataStream
    from ray_mmd.losses import MultiTaskLoss
    from ray_mmd.models import build_model
    from ray_mmd.train.inputs import chunk_schedule, stream_config
    from ray_mmd.train.optim import build_optimizer
    from ray_mmd.train.step import AmpPolicy, train_step

    torch.set_num_threads(int(cfg.run.cpus_per_worker))
    torch.manual_seed(0)
    man = mf.load(cfg.data.url)
    stream = DataStream(stream_config(cfg, chunk_schedule(cfg, man)))
    finish = stream.finisher()
    model = build_model(cfg.model.name, width=cfg.model.width)
    opt = build_optimizer(cfg, list(model.parameters()))
    policy = AmpPolicy.for_device("cpu", "off")
    loss = MultiTaskLoss()
    n, t0, k = 0, None, 0
    while not stream.done:
        for wire in stream.epoch_batches():
            batch = policy.prepare_batch(wire, finish)
            out = train_step(model, batch, loss, opt, policy, grad_clip=cfg.optim.grad_clip)
            out["loss"].item()  # same per-step sync as the Ray run's log_every=1
            k += 1
            if k == skip:
                t0 = time.perf_counter()
            elif k > skip:
                n += batch["x"].shape[0]
    return n / (time.perf_counter() - t0), k


def ray_run(cfg) -> list[dict]:
    from ray_mmd.train import trainer

    trainer.fit(cfg)
    path = Path(cfg.run.storage) / cfg.run.name / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def p4_p6(tmp: str, samples: int, epochs: int, ckpt_every: int) -> dict:
    import ray

    from ray_mmd.data import manifest as mf

    data = _dataset(tmp, samples)
    # steady state only: epoch 0 decodes the parquet shards (later epochs come from the decoded preload)
    # and the first step of epoch 1 carries the Ray run's evaluation
    skip = len(mf.load(data).sample_ids("train")) // 32 + 1
    plain_cfg = _cfg(data, tmp, "plain", f"data.epochs={epochs}")
    # the machine is shared and noisy: the plain loop runs before and after the Ray run
    plain_before, steps = plain_loop(plain_cfg, skip)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _cfg(data, tmp, "bench", f"data.epochs={epochs}", f"checkpoint.every_steps={ckpt_every}")
        lines = [x for x in ray_run(cfg) if x["kind"] == "train"]
    finally:
        ray.shutdown()
    plain_after, _ = plain_loop(plain_cfg, skip)
    plain_ips = (plain_before + plain_after) / 2
    # a step's window starts right after the previous flush, so a checkpoint written after step s
    # (write + async upload start) lands in step s+1's time; upload continues during s+1, s+2
    ck = {s + d for s in range(ckpt_every, 10_000, ckpt_every) for d in (1, 2)}
    gbs = cfg.data.global_batch_size
    step_t = {x["step"]: gbs / x["train/img_per_s"] for x in lines if x["step"] > skip}
    normal = [t for s, t in step_t.items() if s not in ck]
    during = [t for s, t in step_t.items() if s in ck]
    ray_ips = gbs * len(normal) / sum(normal)
    # P4 compares steady-state throughput (checkpoint steps excluded from both: the plain loop has none)
    return {
        "steps": steps,
        "p4_ray_img_s": ray_ips,
        "p4_plain_img_s": plain_ips,
        "p4_plain_before_after_img_s": [plain_before, plain_after],
        "p4_ratio": ray_ips / plain_ips,
        "p6_normal_step_s": statistics.median(normal),
        "p6_ckpt_step_s": statistics.median(during) if during else float("nan"),
        "p6_ratio": (statistics.median(during) / statistics.median(normal)) if during else float("nan"),
        "p6_ckpt_steps": len(during),
    }


def restore_latency(tmp: str, repeats: int = 3) -> dict:
    """Seconds from a worker SIGKILL to the next completed step (metrics.jsonl, log_every=1)."""
    import ray

    data = _dataset(tmp, 480)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = []
    try:
        for i in range(repeats):
            marker = Path(tmp) / f"kill{i}"
            cfg = _cfg(
                data,
                tmp,
                f"restore{i}",
                "data.epochs=1",
                "checkpoint.every_steps=2",
                "debug.kill_at_step=5",
                "debug.kill_rank=0",
                f"debug.kill_marker={marker}",
                "run.cpus_per_worker=1",
            )
            lines = ray_run(cfg)
            killed = marker.stat().st_mtime
            after = [x["time"] for x in lines if x["kind"] == "train" and x["time"] > killed]
            out.append(min(after) - killed)
    finally:
        ray.shutdown()
    return {"restore_s": out, "restore_median_s": statistics.median(out)}


def demo_quality() -> dict:
    path = ROOT / "runs" / "demo-stage1" / "metrics.jsonl"
    if not path.exists():
        return {}
    evals = [json.loads(x) for x in path.read_text().splitlines() if '"eval"' in x]
    last = evals[-1]
    return {k: last[k] for k in ("eval/iou", "eval/delta1", "eval/abs_rel", "eval/rmse") if k in last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short runs (<= ~60 s)")
    ap.add_argument("--restore", action="store_true", help="also measure restore latency (3 killed runs)")
    a = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        res = p4_p6(tmp, samples=320 if a.quick else 960, epochs=3 if a.quick else 4, ckpt_every=4)
        if a.restore:
            res.update(restore_latency(tmp))
    res.update({f"demo_{k.split('/')[-1]}": v for k, v in demo_quality().items()})
    res["wall_s"] = time.time() - t0
    print(f"{'figure':<46}{'value':>12}  goal")
    print(f"{'P4 Ray Train img/s':<46}{res['p4_ray_img_s']:>12.1f}")
    b, f = res["p4_plain_before_after_img_s"]
    print(
        f"{'P4 plain PyTorch loop img/s (before/after)':<46}{res['p4_plain_img_s']:>12.1f}  ({b:.1f} / {f:.1f})"
    )
    print(f"{'P4 ratio (Ray / plain)':<46}{res['p4_ratio']:>12.3f}  >= 0.90")
    print(f"{'P6 normal step s (median)':<46}{res['p6_normal_step_s']:>12.4f}")
    print(f"{'P6 step during checkpoint write/upload s':<46}{res['p6_ckpt_step_s']:>12.4f}")
    print(f"{'P6 ratio':<46}{res['p6_ratio']:>12.3f}  <= 1.2")
    if "restore_median_s" in res:
        print(f"{'restore latency kill -> next step s (median 3)':<46}{res['restore_median_s']:>12.1f}")
    for k in ("demo_iou", "demo_delta1", "demo_abs_rel"):
        if k in res:
            print(f"{k:<46}{res[k]:>12.4f}")
    print(f"wrote {write_result('bench_train', res)}")


if __name__ == "__main__":
    main()
