"""P7 on a GPU: train steps fed by the stream vs the same steps on a batch already on the device, at
stage 1 (56, G=512) and stage 3 (224, G=64), bf16 + channels_last, over a whole epoch of >= 16K samples;
fed twice: the copy + finish serial on the step's stream, and overlapped on a side stream
(ray_mmd.data.device_feed.DeviceFeed). GPU busy % from the profiler beside each. One run.

    python benchmarks/bench_gpu_input.py --device cuda --data /tmp/ds      # a packed set (>= 16K train)
    python benchmarks/bench_gpu_input.py --quick                            # CPU smoke run, tiny model

Per stage, on one stream (epochs of its whole train split): 1-2 the stream alone on the host (fresh,
steady state), 3 the stream to the device and finished there, 4 fed serial, 5 fed through DeviceFeed;
then resident for as many steps. The img/s of a fed epoch
counts its first steps (the epoch's refill) and excludes the last --profile-steps, which run under
the profiler: busy % = union of GPU activity (kernels, copies) / span from first to last of it there.
Also checks the device finish against the CPU finish, and DeviceFeed's batches against serial ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import write_result  # noqa: E402
from ray_mmd.data import manifest as mf  # noqa: E402
from ray_mmd.data.device_feed import DeviceFeed  # noqa: E402
from ray_mmd.data.order import Chunk  # noqa: E402
from ray_mmd.data.pack import make_synthetic  # noqa: E402
from ray_mmd.data.stream import DataStream, StreamConfig  # noqa: E402
from ray_mmd.data.transforms import forget_bg_tables  # noqa: E402
from ray_mmd.losses import MultiTaskLoss  # noqa: E402
from ray_mmd.models import build_model  # noqa: E402
from ray_mmd.train.step import AmpPolicy, make_optimizer, train_step  # noqa: E402


def gpu_busy(prof) -> dict:
    """Union of GPU activity intervals / their span, from a torch.profiler run (CUDA activity)."""
    iv = []
    for e in prof.profiler.kineto_results.events():
        if not str(e.device_type()).endswith("CUDA"):
            continue
        s = e.start_ns() if hasattr(e, "start_ns") else e.start_us() * 1000
        d = e.duration_ns() if hasattr(e, "duration_ns") else e.duration_us() * 1000
        if d > 0:
            iv.append((s, s + d))
    if not iv:
        return {"busy_frac": None, "gpu_events": 0}
    iv.sort()
    busy, cur_s, cur_e = 0, *iv[0]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = iv[-1][1] - iv[0][0]
    return {"busy_frac": busy / span, "span_s": span / 1e9, "gpu_events": len(iv)}


def _fed(batches, step, n_prof: int, n_total: int, sync, cuda: bool) -> tuple[float, int, dict]:
    """Run `step` on each batch: time the first n_total - n_prof steps, profile the rest."""
    t0, k, steps, res, prof = time.perf_counter(), 0, 0, None, None
    for b in batches:
        if steps == n_total - n_prof:
            sync()
            res = (k / (time.perf_counter() - t0), steps)
            if cuda and n_prof:
                try:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    prof.start()
                except Exception as e:  # a profiler that will not start must not cost the figures
                    print("profiler did not start:", repr(e), flush=True)
                    prof = None
        step(b)
        k += len(b["sample_id"])
        steps += 1
    sync()
    if res is None:
        res = (k / (time.perf_counter() - t0), steps)
    busy = {"busy_frac": None}
    if prof is not None:
        prof.stop()
        try:
            busy = gpu_busy(prof)
        except Exception as e:  # the profiler's event API differs between torch versions
            busy = {"busy_frac": None, "error": repr(e)}
    return res[0], res[1], busy


def stage(
    root: str,
    size: int,
    model: str,
    width: int,
    G: int,
    dev: torch.device,
    workers: int,
    n_prof: int,
    alt_workers: int = 0,
    preload: int = 0,
    feed_thread: bool = False,
) -> dict:
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    man = mf.load(root)
    cfg = StreamConfig.for_url(
        root,
        image_size=size,
        global_batch_size=G,
        chunks=[Chunk(0, man.id_end, 6 if feed_thread else 5)],
        workers=workers,
        decoded_preload_bytes=preload,
    )
    forget_bg_tables()
    s = DataStream(cfg)
    n_train, nb = len(man.sample_ids("train")), s.steps_in_epoch()
    fin, fin_cpu = s.finisher().to(dev), s.finisher()
    policy = AmpPolicy.for_device(dev)
    torch.manual_seed(0)
    net = policy.prepare_model(build_model(model, width=width))
    opt, loss = make_optimizer(net.parameters(), lr=1e-4), MultiTaskLoss().to(dev)

    def prep(w):
        return policy.prepare_batch(w, fin)

    def step(b):
        train_step(net, b, loss, opt, policy)

    # epochs 1-3: the stream alone: on the host (epoch 1 pays worker start-up), then to the device and
    # finished there, serially (what the step would wait for without overlap)
    host_img_s, stream_img_s, keep = [], [], []
    for e in range(3):
        t0, k = time.perf_counter(), 0
        for i, wire in enumerate(s.epoch_batches()):
            if e == 2:
                b = prep(wire)
                if i < 3:
                    keep.append((wire, b))
            k += len(wire["sample_id"])
        sync()
        (host_img_s if e < 2 else stream_img_s).append(k / (time.perf_counter() - t0))
    ref = fin_cpu(keep[0][0])
    err = {
        key: float((keep[0][1][key].float().cpu() - ref[key]).abs().max()) for key in ("x", "mask", "depth")
    }
    assert err["mask"] <= 1 / 255 + 1e-4 and err["depth"] <= 1 / 255 + 1e-4, err
    # DeviceFeed's batches (side stream on CUDA) are the serial ones
    feed_equal = all(
        torch.equal(a[k], b[k])
        for (_, b), a in zip(keep, DeviceFeed([w for w, _ in keep], prep, dev, depth=2), strict=True)
        for k in ("x", "mask", "depth", "sample_id")
    )
    first = keep[0][1]
    for _ in range(3):  # warm-up (cudnn autotune, allocator, the compiled SSIM)
        step(first)
    sync()
    n_prof = min(n_prof, nb // 3)
    # epoch 4: stream -> copy + finish on the step's stream -> step
    fed, steps, busy_fed = _fed((prep(w) for w in s.epoch_batches()), step, n_prof, nb, sync, cuda)
    # epoch 5: the same through DeviceFeed (copy + finish of the next batches on a side stream)
    feed = DeviceFeed(s.epoch_batches(), prep, dev, state=s.state_dict)
    fed2, steps2, busy_feed = _fed(feed, step, n_prof, nb, sync, cuda)
    thr = {}
    if feed_thread:  # epoch 6: DeviceFeed's producer thread (next + copy + finish off the step's thread)
        feed_t = DeviceFeed(s.epoch_batches(), prep, dev, state=s.state_dict, thread=True)
        fed_t, _, busy_t = _fed(feed_t, step, n_prof, nb, sync, cuda)
        thr = {"train_fed_device_feed_thread_img_s": fed_t, "gpu_busy_fed_device_feed_thread": busy_t}
    # resident: the same number of steps on a batch already on the device
    res, _, busy_res = _fed(iter([first] * nb), step, n_prof, nb, sync, cuda)
    position_ok = (feed_t if feed_thread else feed).state_dict() == s.state_dict()
    if thr:
        thr["fed_device_feed_thread_vs_resident"] = thr["train_fed_device_feed_thread_img_s"] / res
    s.close()
    alt = {}
    if alt_workers:
        # the same DeviceFeed epoch with fewer decode processes: cores left to the thread driving the GPU
        s2 = DataStream(dataclasses.replace(cfg, workers=alt_workers, chunks=[Chunk(0, man.id_end, 2)]))
        for _ in s2.epoch_batches():  # warm: worker start-up
            pass
        fed3, _, busy_alt = _fed(DeviceFeed(s2.epoch_batches(), prep, dev), step, n_prof, nb, sync, cuda)
        s2.close()
        alt = {
            "alt_decode_workers": alt_workers,
            "train_fed_device_feed_alt_workers_img_s": fed3,
            "fed_device_feed_alt_workers_vs_resident": fed3 / res,
            "gpu_busy_fed_device_feed_alt_workers": busy_alt,
        }
    out = {
        "train_samples": n_train,
        "global_batch": G,
        "steps_per_epoch": nb,
        "timed_steps": steps,
        "profiled_steps": n_prof,
        "model": f"{model} width {width}",
        "amp": policy.mode,
        "channels_last": policy.channels_last,
        "decode_workers": s._workers,
        "decode_backend": s._backend,
        "decoded_preload": bool(preload),
        "stream_host_first_epoch_img_s": host_img_s[0],
        "stream_host_img_s": host_img_s[1],
        "stream_to_device_serial_img_s": stream_img_s[0],
        "train_fed_serial_img_s": fed,
        "train_fed_device_feed_img_s": fed2,
        "train_resident_batch_img_s": res,
        "fed_serial_vs_resident": fed / res,
        "fed_device_feed_vs_resident": fed2 / res,
        "gpu_busy_fed_serial": busy_fed,
        "gpu_busy_fed_device_feed": busy_feed,
        "gpu_busy_resident": busy_res,
        "device_feed_batches_equal_serial": feed_equal,
        "device_feed_position_matches_stream": position_ok,
        "finish_max_abs_err_vs_cpu": err,
        **alt,
        **thr,
    }
    bf = lambda d: "n/a" if d.get("busy_frac") is None else f"{100 * d['busy_frac']:.0f}%"  # noqa: E731
    print(
        f"{size}px G={G} ({n_train} train samples): stream on host {host_img_s[1]:.0f} img/s (first epoch "
        f"{host_img_s[0]:.0f}), to device serially {stream_img_s[0]:.0f}; resident {res:.0f} img/s (busy {bf(busy_res)}); fed serial {fed:.0f} "
        f"({fed / res:.2f}x, busy {bf(busy_fed)}); fed DeviceFeed {fed2:.0f} ({fed2 / res:.2f}x, busy "
        f"{bf(busy_feed)}); feed==serial {feed_equal}"
        + (
            f"; DeviceFeed thread {thr['fed_device_feed_thread_vs_resident']:.2f}x "
            f"(busy {bf(thr['gpu_busy_fed_device_feed_thread'])})"
            if thr
            else ""
        )
        + (
            f"; DeviceFeed with {alt_workers} decode workers {alt['fed_device_feed_alt_workers_vs_resident']:.2f}x "
            f"(busy {bf(alt['gpu_busy_fed_device_feed_alt_workers'])})"
            if alt
            else ""
        ),
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, small batches")
    ap.add_argument("--data", default="", help="a packed dataset (else one is generated)")
    ap.add_argument("--samples", type=int, default=0, help="samples to generate without --data")
    ap.add_argument("--workers", type=int, default=0, help="decode workers (0: the stream's default)")
    ap.add_argument("--stages", default="1,3")
    ap.add_argument(
        "--profile-steps",
        default="5,10",
        help="stage 1, stage 3: last steps of each epoch under the profiler",
    )
    ap.add_argument(
        "--alt-workers",
        default="12,8",
        help="stage 1, stage 3: decode workers of an extra DeviceFeed epoch (0: none)",
    )
    ap.add_argument("--tag", default="")
    ap.add_argument("--preload-bytes", type=int, default=0, help="decoded preload (epoch 1 fills it)")
    ap.add_argument(
        "--feed-thread", action="store_true", help="also an epoch through DeviceFeed(thread=True)"
    )
    args = ap.parse_args()
    dev = torch.device(args.device)
    width = 4 if args.quick else 64
    work = tempfile.mkdtemp(prefix="bench-gpu-input-")
    try:
        root = args.data
        if not root:
            root = os.path.join(work, "ds")
            make_synthetic(
                root, args.samples or (256 if args.quick else 17000), 512, seed=0, test_fraction=0.02
            )
        res: dict = {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "cores": os.cpu_count(),
            "command": " ".join(sys.argv),
        }
        alt = [int(x) for x in args.alt_workers.split(",")] + [0, 0]
        nprof = [int(x) for x in args.profile_steps.split(",")] * 2
        if args.quick:
            alt = [2, 2]
        for st in args.stages.split(","):
            if st == "1":
                res["stage1_56"] = stage(
                    root,
                    56,
                    "unet",
                    width,
                    64 if args.quick else 512,
                    dev,
                    args.workers,
                    nprof[0],
                    alt[0],
                    args.preload_bytes,
                    args.feed_thread,
                )
            elif st == "3":
                res["stage3_224"] = stage(
                    root,
                    224,
                    "unet224",
                    width,
                    16 if args.quick else 64,
                    dev,
                    args.workers,
                    nprof[1],
                    alt[1],
                    args.preload_bytes,
                    args.feed_thread,
                )
            name = f"bench_gpu_input_{dev.type}" + (f"_{args.tag}" if args.tag else "")
            print("wrote", write_result(name, res), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
