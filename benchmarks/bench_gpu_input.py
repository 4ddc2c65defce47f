"""End to end on a GPU: stream (uint8 batches, decode workers = cores) -> copy ->
finish on the device -> train step, vs the same steps on a batch already on the device. One run.

    python benchmarks/bench_gpu_input.py --device cuda          # stage 1 (56, unet) and stage 3 (224, unet224)
    python benchmarks/bench_gpu_input.py --quick                 # CPU smoke run, tiny model

Also checks that the device finish matches the CPU finish to within uint8 rounding.
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
from ray_mmd.config import DataConfig  # noqa: E402
from ray_mmd.data.order import Chunk  # noqa: E402
from ray_mmd.data.pack import make_synthetic  # noqa: E402
from ray_mmd.data.stream import DataStream, StreamConfig  # noqa: E402
from ray_mmd.data.transforms import forget_bg_tables  # noqa: E402
from ray_mmd.losses import MultiTaskLoss  # noqa: E402
from ray_mmd.models import build_model  # noqa: E402
from ray_mmd.train.step import AmpPolicy, make_optimizer, train_step  # noqa: E402


def stage(
    root: str, n: int, size: int, model: str, width: int, G: int, dev: torch.device, preload: int = 0
) -> dict:
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = StreamConfig(
        DataConfig(url=root, image_size=size, global_batch_size=G, decoded_preload_bytes=preload),
        chunks=[Chunk(0, n, 4)],
        workers=0,
    )
    forget_bg_tables()
    s = DataStream(cfg)
    fin, fin_cpu = s.finisher().to(dev), s.finisher()
    policy = AmpPolicy.for_device(dev)
    net = policy.prepare_model(build_model(model, width=width))
    opt, loss = make_optimizer(net.parameters(), lr=1e-3), MultiTaskLoss().to(dev)

    # epochs 1 and 2: the stream alone (what the input pipeline delivers to the device, copies included);
    # epoch 1 of a fresh stream also pays worker start-up and the bg table, epoch 2 is the steady state
    stream_img_s = []
    for _ in range(2):
        t0, k = time.perf_counter(), 0
        for i, wire in enumerate(s.epoch_batches()):
            b = policy.prepare_batch(wire, fin)
            k += len(wire["sample_id"])
            if i == 0 and not stream_img_s:
                ref = fin_cpu(wire)
                err = {
                    key: float((b[key].float().cpu() - ref[key]).abs().max())
                    for key in ("x", "mask", "depth")
                }
                first = b
        sync()
        stream_img_s.append(k / (time.perf_counter() - t0))
    assert err["mask"] <= 1 / 255 + 1e-4 and err["depth"] <= 1 / 255 + 1e-4, err

    for _ in range(3):  # warm-up (cudnn autotune, allocator)
        train_step(net, first, loss, opt, policy)
    # epoch 3: stream -> finish -> step
    sync()
    t0, k, steps = time.perf_counter(), 0, 0
    for wire in s.epoch_batches():
        train_step(net, policy.prepare_batch(wire, fin), loss, opt, policy)
        k += len(wire["sample_id"])
        steps += 1
    sync()
    fed = k / (time.perf_counter() - t0)
    # the same number of steps on a batch that is already there
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(net, first, loss, opt, policy)
    sync()
    resident = steps * G / (time.perf_counter() - t0)
    out = {
        "samples": n,
        "global_batch": G,
        "model": f"{model} width {width}",
        "amp": policy.mode,
        "decoded_preload": bool(preload),
        "stream_first_epoch_img_s": stream_img_s[0],
        "stream_to_device_img_s": stream_img_s[1],
        "train_fed_by_stream_img_s": fed,
        "train_resident_batch_img_s": resident,
        "fed_vs_resident": fed / resident,
        "finish_max_abs_err_vs_cpu": err,
    }
    print(
        f"{size}{' decoded preload' if preload else ''}: stream->device {stream_img_s[1]:.0f} img/s (first epoch {stream_img_s[0]:.0f}); train fed by stream {fed:.0f} vs resident batch "
        f"{resident:.0f} img/s ({fed / resident:.2f}x); device finish vs CPU max |err| {err}"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=0)
    args = ap.parse_args()
    dev = torch.device(args.device)
    n = args.samples or (192 if args.quick else 4096)
    width = 4 if args.quick else 64
    work = tempfile.mkdtemp(prefix="bench-gpu-input-")
    try:
        root = os.path.join(work, "ds")
        make_synthetic(root, n, shard_size=512, seed=0, test_fraction=0.0)
        res: dict = {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "cores": os.cpu_count(),
        }
        res["stage1_56"] = stage(root, n, 56, "unet", width, 64 if args.quick else 512, dev)
        res["stage1_56_decoded_preload"] = stage(
            root, n, 56, "unet", width, 64 if args.quick else 512, dev, 4 << 30
        )
        res["stage3_224"] = stage(root, n, 224, "unet224", width, 32 if args.quick else 64, dev)
        write_result(f"bench_gpu_input_{dev.type}", res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
