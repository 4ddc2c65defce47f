"""The 3-stage recipe at full width on a synthetic set: held-out IoU, Dice, delta1, AbsRel after each stage
(and each epoch, for the curves), wall time per stage, and the stage-3 prediction grid (PNG).

    python benchmarks/bench_quality.py --device cuda --data /tmp/ds           # width 64, stage configs
    python benchmarks/bench_quality.py --quick                                 # CPU smoke run

The plain loop (as in bench_train.py's P4): the product's stream, DeviceFeed, model, stage freeze
rules, train_step, MultiTaskLoss and metrics in this process, without Ray (a Ray 2.60 wheel is 79 MB,
more than a GPU call may carry). LR, schedule and weight decay come from jobs/configs/stage{1,2,3}.yaml;
each global batch is one micro-batch (an 80 GB card needs no accumulation). The test split is decoded
and finished once and kept on the device, so the per-epoch evaluation is forward passes only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import RESULTS, write_result  # noqa: E402
from ray_mmd.data import manifest as mf  # noqa: E402
from ray_mmd.data.device_feed import DeviceFeed  # noqa: E402
from ray_mmd.data.order import Chunk  # noqa: E402
from ray_mmd.data.pack import make_synthetic  # noqa: E402
from ray_mmd.data.stream import DataStream, StreamConfig, eval_batches  # noqa: E402
from ray_mmd.data.transforms import make_finisher  # noqa: E402
from ray_mmd.losses import MultiTaskLoss  # noqa: E402
from ray_mmd.metrics import MetricAccumulator  # noqa: E402
from ray_mmd.models import build_model, freeze_spine, split_heads, unfreeze_all  # noqa: E402
from ray_mmd.train.step import AmpPolicy, make_optimizer, train_step  # noqa: E402
from ray_mmd.viz import prediction_grid  # noqa: E402

GOAL = {"iou": 0.98, "delta1": 0.98, "abs_rel": 0.03}


def lr_factor(schedule: str, warmup_fraction: float, steps: int):
    """The trainer's LR multiplier (ray_mmd.train.loop.lr_lambda; that module imports Ray)."""
    warm = max(1, int(warmup_fraction * steps))

    def f(step: int) -> float:
        if schedule == "constant":
            return min(1.0, (step + 1) / warm)
        if schedule == "onecycle":
            if step < warm:
                return 0.05 + 0.95 * step / warm
            t = min(1.0, (step - warm) / max(1, steps - warm))
            return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01
        t = min(1.0, step / steps)
        return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01

    return f


def stage_optim(n: int) -> dict:
    o = yaml.safe_load((ROOT / "jobs" / "configs" / f"stage{n}.yaml").read_text())["optim"]
    return {
        "lr": o["lr"],
        "schedule": o.get("schedule", "onecycle"),
        "weight_decay": o.get("weight_decay", 0),
    }


class EvalSet:
    """The test split at one size, finished once and kept on the device."""

    def __init__(self, root: str, size: int, policy: AmpPolicy, max_samples: int, batch: int) -> None:
        cfg = StreamConfig.for_url(root, split="test", image_size=size, workers=4, backend="thread")
        fin = make_finisher(mf.load(root), size).to(policy.device)
        self.batches = [policy.prepare_batch(w, fin) for w in eval_batches(cfg, 0, 1, batch, max_samples)]
        self.policy = policy

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[dict[str, float], tuple]:
        was = model.training
        model.eval()
        acc = MetricAccumulator(self.policy.device)
        grid = None
        for b in self.batches:
            with self.policy.autocast():
                y = model(b["x"])
            ml, dp = split_heads(y.float())
            acc.update(ml, b["mask"], dp, b["depth"])
            if grid is None:
                grid = (b["x"], b["mask"], ml, b["depth"], dp)
        model.train(was)
        return acc.compute(), grid


def run_stage(
    n: int,
    model: torch.nn.Module,
    root: str,
    size: int,
    G: int,
    epochs: int,
    policy: AmpPolicy,
    evalset: EvalSet,
    budget_s: float,
    preload_bytes: int,
    workers: int,
) -> dict:
    t_stage = time.perf_counter()
    dev = policy.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if n == 2:
        freeze_spine(model)
    else:
        unfreeze_all(model)
    model.train()
    o = stage_optim(n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", lr=o["lr"], weight_decay=o["weight_decay"])
    man = mf.load(root)
    cfg = StreamConfig.for_url(
        root,
        image_size=size,
        global_batch_size=G,
        chunks=[Chunk(0, man.id_end, epochs)],
        decoded_preload_bytes=preload_bytes,
        preload_group="quality",  # stages 2 and 3 (both 224) share the decoded samples
        workers=workers,
        seed=n,
    )
    s = DataStream(cfg)
    total = epochs * s.steps_in_epoch()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(o["schedule"], 0.1, total))
    fin = s.finisher().to(dev)
    loss_fn = MultiTaskLoss("l1+dice", "rmse+ssim").to(dev)
    curve, step, imgs, t_train, stopped = [], 0, 0, 0.0, False
    for ep in range(epochs):
        t0 = time.perf_counter()
        feed = DeviceFeed(s.epoch_batches(), lambda w: policy.prepare_batch(w, fin), dev, state=s.state_dict)
        losses, finite = [], []
        for b in feed:
            out = train_step(model, b, loss_fn, opt, policy, grad_clip=1.0)
            sched.step()
            losses.append(out["loss"])
            finite.append(out["finite"])
            step += 1
            imgs += b["x"].shape[0]
        sync()
        t_train += time.perf_counter() - t0
        m, grid = evalset(model)
        row = {
            "epoch": ep + 1,
            "step": step,
            "train_loss": float(torch.stack(losses).float().mean()) if losses else None,
            "skipped_steps": int((~torch.stack(finite)).sum()) if finite else 0,
            "lr": sched.get_last_lr()[0],
            "epoch_s": time.perf_counter() - t0,
            **{k: m[k] for k in ("iou", "dice", "delta1", "abs_rel", "rmse")},
        }
        curve.append(row)
        print(
            f"  stage {n} epoch {ep + 1}/{epochs} step {step}: loss {row['train_loss']:.4f} iou {m['iou']:.4f} "
            f"dice {m['dice']:.4f} delta1 {m['delta1']:.4f} abs_rel {m['abs_rel']:.4f} ({row['epoch_s']:.1f}s)",
            flush=True,
        )
        if time.perf_counter() - t_stage > budget_s and ep + 1 < epochs:
            stopped = True
            break
    s.close()
    return {
        "stage": n,
        "size": size,
        "global_batch": G,
        "epochs_planned": epochs,
        "epochs_run": len(curve),
        "stopped_by_budget": stopped,
        "steps": step,
        "optim": o,
        "train_img_s": imgs / max(t_train, 1e-9),
        "wall_s": time.perf_counter() - t_stage,
        "final": {k: curve[-1][k] for k in ("iou", "dice", "delta1", "abs_rel", "rmse")},
        "curve": curve,
        "_grid": grid,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", default="")
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--epochs", default="", help="per stage, e.g. 24,3,6")
    ap.add_argument("--budget-s", default="", help="per stage wall budget, e.g. 60,30,90")
    ap.add_argument("--eval-samples", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    width = args.width or (4 if args.quick else 64)
    epochs = [int(x) for x in (args.epochs or ("1,1,1" if args.quick else "24,3,6")).split(",")]
    budget = [float(x) for x in (args.budget_s or "1e9,1e9,1e9").split(",")]
    G = (32, 8, 8) if args.quick else (512, 64, 64)
    name = f"bench_quality_{dev.type}" + (f"_{args.tag}" if args.tag else "")
    work = tempfile.mkdtemp(prefix="bench-quality-")
    try:
        root = args.data
        if not root:
            root = os.path.join(work, "ds")
            make_synthetic(
                root, args.samples or (200 if args.quick else 20480), 512, seed=0, test_fraction=0.05
            )
        man = mf.load(root)
        policy = AmpPolicy.for_device(dev)
        res: dict = {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "amp": policy.mode,
            "width": width,
            "samples": man.num_samples,
            "split_counts": man.split_counts,
            "loop": "plain (no Ray): DataStream + DeviceFeed + train_step, as bench_train.py's P4",
            "goal_after_stage3": GOAL,
            "stages": [],
        }
        torch.manual_seed(0)
        t0 = time.perf_counter()
        spine = policy.prepare_model(build_model("unet", width=width))
        ev56 = EvalSet(root, 56, policy, args.eval_samples, 256)
        r1 = run_stage(1, spine, root, 56, G[0], epochs[0], policy, ev56, budget[0], 4 << 30, args.workers)
        del ev56
        res["stages"].append({k: v for k, v in r1.items() if k != "_grid"})
        write_result(name, res)
        model = build_model("unet224", width=width)
        model.spine.load_state_dict(spine.state_dict())  # stage 2 starts from stage 1's spine
        model = policy.prepare_model(model)
        ev224 = EvalSet(root, 224, policy, args.eval_samples, 64)
        for n, G_n, e, b in ((2, G[1], epochs[1], budget[1]), (3, G[2], epochs[2], budget[2])):
            r = run_stage(n, model, root, 224, G_n, e, policy, ev224, b, 12 << 30, args.workers)
            grid = r.pop("_grid")
            res["stages"].append(r)
            res["total_wall_s"] = time.perf_counter() - t0
            write_result(name, res)
        png = RESULTS / f"{name}_stage3_grid.png"
        png.write_bytes(prediction_grid(*grid, rows=8))
        f = res["stages"][-1]["final"]
        res["goal_met"] = (
            f["iou"] >= GOAL["iou"] and f["delta1"] >= GOAL["delta1"] and f["abs_rel"] <= GOAL["abs_rel"]
        )
        res["grid_png"] = png.name
        print("wrote", write_result(name, res), "and", png, flush=True)
        for r in res["stages"]:
            print(
                f"stage {r['stage']}: {r['wall_s']:.0f}s wall, {r['steps']} steps, {r['train_img_s']:.0f} img/s; "
                + json.dumps({k: round(v, 4) for k, v in r["final"].items()}),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
