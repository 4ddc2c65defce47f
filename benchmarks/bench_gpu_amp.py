"""fp16 + GradScaler (optim.amp=fp16, the path of GPUs without bf16, e.g. P100) on real batches: a
stage-1 and a stage-3 run of a few hundred steps; which steps were skipped as non-finite, the scale,
the loss going down, and img/s beside the same run in bf16 (and fp32 with --amps) on the same GPU.

    python benchmarks/bench_gpu_amp.py --device cuda --data /tmp/ds --steps 300
    python benchmarks/bench_gpu_amp.py --quick                     # CPU smoke run (fp32 only)

The plain loop of bench_quality.py (stream with decoded preload, DeviceFeed, train_step, the stage
configs' LR and schedule). img/s counts the steps after the first 20.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import write_result  # noqa: E402
from benchmarks.bench_quality import lr_factor, stage_optim  # noqa: E402
from ray_mmd.data import manifest as mf  # noqa: E402
from ray_mmd.data.device_feed import DeviceFeed  # noqa: E402
from ray_mmd.data.order import Chunk  # noqa: E402
from ray_mmd.data.pack import make_synthetic  # noqa: E402
from ray_mmd.data.stream import DataStream, StreamConfig  # noqa: E402
from ray_mmd.losses import MultiTaskLoss  # noqa: E402
from ray_mmd.models import build_model  # noqa: E402
from ray_mmd.train.step import AmpPolicy, make_optimizer, train_step  # noqa: E402

WARM = 20


def run(
    root: str, stage: int, amp: str, steps: int, width: int, G: int, dev: torch.device, workers: int
) -> dict:
    size, model_name = (56, "unet") if stage == 1 else (224, "unet224")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    policy = AmpPolicy.for_device(dev, amp)
    torch.manual_seed(0)
    model = policy.prepare_model(build_model(model_name, width=width)).train()
    o = stage_optim(stage)
    opt = make_optimizer(model.parameters(), "adamw", lr=o["lr"], weight_decay=o["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(o["schedule"], 0.1, steps))
    man = mf.load(root)
    cfg = StreamConfig.for_url(
        root,
        image_size=size,
        global_batch_size=G,
        chunks=[Chunk(0, man.id_end, 1000)],
        decoded_preload_bytes=0,  # every run decodes alike (a shared preload would favour the later run)
        workers=workers,
    )
    s = DataStream(cfg)
    per_epoch = s.steps_in_epoch()
    fin = s.finisher().to(dev)
    loss_fn = MultiTaskLoss().to(dev)
    logs, k, t_steady, n_steady = [], 0, None, 0
    while k < steps:
        feed = DeviceFeed(s.epoch_batches(), lambda w: policy.prepare_batch(w, fin), dev)
        for b in feed:
            if k == WARM:  # past cudnn autotuning, the scaler's first steps and the SSIM compile
                sync()
                t_steady = time.perf_counter()
            out = train_step(model, b, loss_fn, opt, policy, grad_clip=1.0)
            sched.step()
            scale = (
                policy.scaler._scale
                if policy.scaler is not None and policy.scaler._scale is not None
                else None
            )
            logs.append(
                (out["loss"], out["finite"], scale.clone() if scale is not None else out["loss"] * 0 + 1)
            )
            if k >= WARM:
                n_steady += b["x"].shape[0]
            k += 1
            if k >= steps:
                break
    sync()
    img_s = n_steady / (time.perf_counter() - t_steady) if t_steady is not None and n_steady else None
    loss = torch.stack([x[0] for x in logs]).float().cpu()
    finite = torch.stack([x[1] for x in logs]).cpu()
    scales = torch.stack([x[2].float() for x in logs]).cpu()
    skipped = (~finite).nonzero().view(-1).tolist()
    w = max(1, min(20, steps // 5))
    ok = loss[finite]
    s.close()
    row = {
        "stage": stage,
        "amp": policy.mode,
        "scaler": policy.scaler is not None,
        "size": size,
        "global_batch": G,
        "steps": steps,
        "steps_per_epoch": per_epoch,
        "skipped_steps": skipped,
        "skipped_after_first_20": [i for i in skipped if i >= WARM],
        "scale_first_last": [float(scales[0]), float(scales[-1])] if policy.scaler is not None else None,
        "loss_first_mean": float(ok[:w].mean()) if len(ok) else None,
        "loss_last_mean": float(ok[-w:].mean()) if len(ok) else None,
        "loss_all_finite_after_skips": bool(torch.isfinite(ok).all()),
        "steady_img_s": img_s,
    }
    print(
        f"stage {stage} {policy.mode:<4}: {steps} steps, skipped {skipped[:12]}{'...' if len(skipped) > 12 else ''}, "
        f"loss {row['loss_first_mean']:.4f} -> {row['loss_last_mean']:.4f}, "
        f"{'n/a' if img_s is None else f'{img_s:.0f}'} img/s"
        + (f", scale {row['scale_first_last']}" if row["scale_first_last"] else ""),
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", default="")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--amps", default="")
    ap.add_argument("--stages", default="1,3")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    amps = (args.amps or ("fp16,bf16" if dev.type == "cuda" else "fp32")).split(",")
    width = 4 if args.quick else 64
    steps = 24 if args.quick else args.steps
    work = tempfile.mkdtemp(prefix="bench-gpu-amp-")
    try:
        root = args.data
        if not root:
            root = os.path.join(work, "ds")
            make_synthetic(root, 160 if args.quick else 8192, 512, seed=0, test_fraction=0.02)
        res: dict = {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "runs": [],
        }
        name = f"bench_gpu_amp_{dev.type}" + (f"_{args.tag}" if args.tag else "")
        for st in (int(x) for x in args.stages.split(",")):
            G = (32 if args.quick else 256) if st == 1 else (8 if args.quick else 64)
            for amp in amps:
                res["runs"].append(run(root, st, amp, steps, width, G, dev, args.workers))
                write_result(name, res)
            by = {r["amp"]: r["steady_img_s"] for r in res["runs"] if r["stage"] == st}
            if by.get("fp16") and by.get("bf16"):
                res[f"stage{st}_fp16_vs_bf16_img_s"] = by["fp16"] / by["bf16"]
        print("wrote", write_result(name, res), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
