"""SSIM loss forward+backward: ours (ray_mmd.losses.ssim) vs kornia's ssim_loss (the original's) and
pytorch-msssim, at the original's two shapes, in one run, as ratios.

    python benchmarks/bench_ssim.py --quick            # CPU, 3 interleaved reps per shape
    python benchmarks/bench_ssim.py --device cuda

Times are the minimum over interleaved repetitions (the machines here are shared and noisy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import timeit, write_result  # noqa: E402
from ray_mmd import losses  # noqa: E402
from ray_mmd.losses import ssim  # noqa: E402

SHAPES = [(64, 1, 224, 224), (256, 1, 56, 56)]


def _candidates(x, y):
    c = {"ours": lambda: (1 - ssim(x, y, data_range=1.0, compile=True)).backward()}
    if x.is_cuda:  # the same maths, not compiled (one chunk = the whole batch, eager)
        c["ours_eager"] = lambda: (1 - ssim(x, y, data_range=1.0, chunk=x.shape[0])).backward()
    try:
        from pytorch_msssim import ssim as ms_ssim

        c["pytorch_msssim"] = lambda: (1 - ms_ssim(x, y, data_range=1.0)).backward()
    except ImportError:
        pass
    try:
        from kornia.losses import ssim_loss

        c["kornia"] = lambda: ssim_loss(x, y, 11).backward()
    except ImportError:
        pass
    return c


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 reps per shape (finishes in < 60 s on CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared machine multi-threaded timings mostly measure contention)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    reps = args.reps or (3 if args.quick else (30 if dev.type == "cuda" else 10))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        y = torch.rand(shape, generator=g).to(dev)
        x = (0.6 * y + 0.4 * torch.rand(shape, generator=g).to(dev)).requires_grad_()
        fns = _candidates(x, y)
        t0 = time.perf_counter()
        ours_val = ssim(x, y, compile=True).item()  # on CUDA the first call per shape compiles
        first_call_s = time.perf_counter() - t0
        match = None
        if "pytorch_msssim" in fns:
            from pytorch_msssim import ssim as ms_ssim

            match = abs(ours_val - ms_ssim(x, y, data_range=1.0).item())
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():  # warm-up
            timeit(lambda f=f: (f(), sync()), repeat=0, warmup=1)
        for _ in range(reps):  # interleaved: each rep runs every candidate once
            for k, f in fns.items():
                times[k] += timeit(lambda f=f: (f(), sync()), repeat=1, warmup=0)
                x.grad = None
        best = {k: min(v) for k, v in times.items()}
        row = {
            "shape": list(shape),
            "seconds": best,
            "abs_diff_vs_pytorch_msssim": match,
            "first_call_s": first_call_s,
            "compiled": losses._COMPILED.get("full") is not None and dev.type == "cuda",
        }
        for k in best:
            if k != "ours":
                row[f"speedup_vs_{k}"] = best[k] / best["ours"]
        rows.append(row)

    names = list(rows[0]["seconds"])
    print(
        f"SSIM loss fwd+bwd on {dev}, {torch.get_num_threads()} thread(s) (min of {reps} interleaved reps, seconds)"
    )
    print(
        f"{'shape':<20}"
        + "".join(f"{n:>16}" for n in names)
        + "".join(f"{'x vs ' + n:>20}" for n in names[1:])
    )
    for r in rows:
        print(
            f"{str(tuple(r['shape'])):<20}"
            + "".join(f"{r['seconds'][n]:>16.4f}" for n in names)
            + "".join(f"{r['speedup_vs_' + n]:>20.2f}" for n in names[1:])
        )
    payload = {
        "device": str(dev),
        "torch": torch.__version__,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    if dev.type == "cuda":
        payload["gpu"] = torch.cuda.get_device_name(dev)
    suffix = ("" if dev.type == "cpu" else f"_{dev.type}") + (f"_{args.tag}" if args.tag else "")
    print("wrote", write_result(f"bench_ssim{suffix}", payload))
    return payload


if __name__ == "__main__":
    main()
