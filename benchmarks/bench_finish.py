"""The device half of the input pipeline: a uint8 wire batch copied to the device and finished there
(resize to the stage size, joint flip, normalise, bg gather) vs copying the float32 model tensors a
host-side pipeline would ship. Shows what moving that work off the host costs on the device.

    python benchmarks/bench_finish.py --quick               # CPU
    python benchmarks/bench_finish.py --device cuda         # a GPU: pinned copies, synchronised timings

Wire shapes are the real dataset's at decode size (fg_bg/mask 250x250, depth 240x320 at 224; 63x63 and
60x80 at 56); no dataset or JPEG codec needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import timeit, write_result  # noqa: E402
from ray_mmd.data.transforms import BatchFinisher  # noqa: E402

STATS = {k: {"mean": [0.45] * c, "std": [0.2] * c} for k, c in (("fg_bg", 3), ("bg", 3))}
WIRE = {
    224: {"fg_bg": (250, 250), "mask": (250, 250), "depth": (240, 320)},
    56: {"fg_bg": (63, 63), "mask": (63, 63), "depth": (60, 80)},
}


def wire_batch(n: int, size: int, pin: bool) -> dict[str, torch.Tensor]:
    s = WIRE[size]
    g = torch.Generator().manual_seed(0)

    def u8(*shape):
        t = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        return t.pin_memory() if pin else t

    return {
        "fg_bg": u8(n, *s["fg_bg"], 3),
        "mask": u8(n, *s["mask"]),
        "depth": u8(n, *s["depth"]),
        "bg_id": torch.randint(0, 100, (n,), generator=g),
        "flip": torch.rand(n, generator=g) < 0.5,
        "sample_id": torch.arange(n),
    }


def measure(size: int, n: int, dev: torch.device, reps: int) -> dict:
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fin = BatchFinisher(STATS, torch.randint(0, 256, (100, 3, size, size), dtype=torch.uint8), size).to(dev)
    wire = wire_batch(n, size, cuda)
    host_float = {
        "x": torch.randn(n, 6, size, size),
        "mask": torch.rand(n, 1, size, size),
        "depth": torch.rand(n, 1, size, size),
    }
    if cuda:
        host_float = {k: v.pin_memory() for k, v in host_float.items()}

    def to_dev(b: dict) -> dict:
        return {k: v.to(dev, non_blocking=True) for k, v in b.items()}

    on_dev = to_dev(wire)
    fns = {
        "copy_wire_u8": lambda: to_dev(wire),
        "finish": lambda: fin(on_dev),
        "copy_and_finish": lambda: fin(to_dev(wire)),
        "copy_float32": lambda: to_dev(host_float),
    }
    t = {name: min(timeit(lambda fn=fn: (fn(), sync()), repeat=reps)) for name, fn in fns.items()}
    wire_bytes = sum(v.numel() * v.element_size() for v in wire.values())
    float_bytes = sum(v.numel() * v.element_size() for v in host_float.values())
    return {
        "batch": n,
        "img_s": {k: n / v for k, v in t.items()},
        "bytes_per_sample_wire": wire_bytes / n,
        "bytes_per_sample_float32": float_bytes / n,
        "copy_and_finish_vs_copy_float32": t["copy_float32"] / t["copy_and_finish"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    res: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "quick": args.quick,
    }
    for size, n in ((224, 64 if args.quick else 256), (56, 256 if args.quick else 1024)):
        r = res[str(size)] = measure(size, n, dev, 3 if args.quick else 20)
        print(
            f"{size}: batch {n}; img/s: copy uint8 {r['img_s']['copy_wire_u8']:.0f}, finish "
            f"{r['img_s']['finish']:.0f}, copy+finish {r['img_s']['copy_and_finish']:.0f}, copy float32 "
            f"{r['img_s']['copy_float32']:.0f}; bytes/sample {r['bytes_per_sample_wire'] / 1e3:.0f} KB vs "
            f"{r['bytes_per_sample_float32'] / 1e3:.0f} KB; copy+finish is "
            f"{r['copy_and_finish_vs_copy_float32']:.2f}x the speed of copying float32"
        )
    write_result(f"bench_finish_{dev.type}", res)


if __name__ == "__main__":
    main()
