"""Training step at full width: images/s and the share of the step spent in the losses, for the
stage-1 (unet, 56x56) and stage-3 (unet224, 224x224) shapes; our losses vs the original's recipe
(kornia SSIM) side by side; on a GPU, fp32 vs bf16 + channels_last vs fp16 + GradScaler + channels_last.

    python benchmarks/bench_step.py --quick                 # CPU, small batches, 1 timed step
    python benchmarks/bench_step.py --device cuda --amp fp32,bf16,fp16

Loss share = (loss forward+backward on a tensor shaped like the model output) / (whole train_step);
for the kornia recipe the step is estimated as (our step - our losses + its losses).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import timeit, write_result  # noqa: E402
from ray_mmd import losses as ray_mmd_losses  # noqa: E402
from ray_mmd.losses import MultiTaskLoss, build_loss  # noqa: E402
from ray_mmd.models import build_model  # noqa: E402
from ray_mmd.train.step import AmpPolicy, make_optimizer, train_step  # noqa: E402

STAGES = {"stage1": ("unet", 56, 256), "stage3": ("unet224", 224, 64)}
QUICK_BS = {"stage1": 8, "stage3": 2}


class KorniaRecipe(torch.nn.Module):
    """The original work's recipe with kornia's SSIM, for the side-by-side loss share."""

    def __init__(self) -> None:
        super().__init__()
        from kornia.losses import ssim_loss

        self.ssim_loss = ssim_loss
        self.mask = build_loss("l1+dice")
        self.rmse = build_loss("rmse")

    def forward(self, out, mask, depth):
        lm = self.mask(out[:, :1], mask)
        p = out[:, 1:2].float().sigmoid()
        ld = self.rmse(out[:, 1:2], depth) + self.ssim_loss(p, depth, 11)
        return lm + ld, {"mask": lm, "depth": ld}


def _batch(bs: int, size: int, dev: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.rand(bs, 6, size, size, generator=g),
        "mask": (torch.rand(bs, 1, size, size, generator=g) > 0.5).float(),
        "depth": torch.rand(bs, 1, size, size, generator=g),
    }


def bench(
    stage: str,
    bs: int,
    dev: torch.device,
    amp: str,
    steps: int,
    warmup: int,
    width: int,
    losses: dict[str, torch.nn.Module],
    check_sync: bool,
) -> dict:
    name, size, _ = STAGES[stage]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    # the fp32 baseline is plain NCHW; AMP runs use the policy's default (channels_last on CUDA)
    policy = AmpPolicy.for_device(dev, amp, channels_last=False if amp == "fp32" else None)
    model = policy.prepare_model(build_model(name, width=width)).train()
    opt = make_optimizer(model.parameters(), lr=1e-4)
    batch = policy.prepare_batch(_batch(bs, size, dev))
    row: dict = {
        "stage": stage,
        "model": name,
        "size": size,
        "batch": bs,
        "amp": policy.mode,
        "channels_last": policy.channels_last,
        "width": width,
    }
    step_t = min(
        timeit(lambda: (train_step(model, batch, losses["ours"], opt, policy), sync()), steps, warmup)
    )
    row["step_s"], row["img_per_s"] = step_t, bs / step_t
    out = torch.randn(bs, 2, size, size, device=dev, requires_grad=True)
    loss_t = {}
    for lname, loss in losses.items():

        def loss_only(loss=loss, out=out):
            loss(out, batch["mask"], batch["depth"])[0].backward()
            out.grad = None
            sync()

        loss_t[lname] = min(timeit(loss_only, max(steps, 3), 1))
    rest = max(step_t - loss_t["ours"], 1e-9)  # model forward/backward + optimizer
    for lname, t in loss_t.items():
        # a step with this recipe = the same model/optimizer work + this recipe's losses
        row[lname] = {"loss_s": t, "loss_share": t / (rest + t), "est_step_s": rest + t}
    if check_sync and dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                train_step(model, batch, losses["ours"], opt, policy)
            row["host_syncs_in_step"] = "none (torch.cuda.set_sync_debug_mode('error') passed)"
        except RuntimeError as e:
            row["host_syncs_in_step"] = f"sync detected: {str(e).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"batch sizes {QUICK_BS}, 1 timed step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--amp", default=None, help="comma list of fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)"
    )
    ap.add_argument("--stages", default="stage1,stage3")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    ap.add_argument("--no-kornia", action="store_true", help="skip the original-recipe (kornia SSIM) column")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    amps = (args.amp or ("fp32,bf16,fp16" if dev.type == "cuda" else "fp32")).split(",")
    steps = args.steps or (1 if args.quick else (10 if dev.type == "cuda" else 3))
    warmup = 1 if dev.type == "cpu" else 3
    losses: dict[str, torch.nn.Module] = {"ours": MultiTaskLoss("l1+dice", "rmse+ssim", compile_ssim=True)}
    if not args.no_kornia:
        with contextlib.suppress(ImportError):
            losses["kornia_recipe"] = KorniaRecipe()
    rows = []
    for stage in args.stages.split(","):
        bs = QUICK_BS[stage] if args.quick else STAGES[stage][2]
        for amp in amps:
            rows.append(
                bench(stage, bs, dev, amp, steps, warmup, args.width, losses, check_sync=amp != "fp32")
            )
            r = rows[-1]
            print(
                f"{stage:<7} {r['model']:<8} bs {bs:<4} {r['size']}^2 {r['amp']:<5} cl={int(r['channels_last'])}  "
                f"{r['img_per_s']:9.1f} img/s  step {r['step_s']:.4f}s  loss share: "
                + "  ".join(f"{k} {100 * r[k]['loss_share']:5.1f}%" for k in losses),
                flush=True,
            )
    payload = {
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "quick": args.quick,
        "command": " ".join(sys.argv),
        "ssim_compiled": dev.type == "cuda" and ray_mmd_losses._COMPILED.get("full") is not None,
        "rows": rows,
    }
    if dev.type == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(dev)
    suffix = ("" if dev.type == "cpu" else f"_{dev.type}") + (f"_{args.tag}" if args.tag else "")
    print("wrote", write_result(f"bench_step{suffix}", payload))
    return payload


if __name__ == "__main__":
    main()
