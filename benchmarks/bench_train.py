"""Ray Train overhead and checkpoint stalls, measured side by side on this machine.

P4  training throughput through Ray Train (1 worker on a local cluster, our loop) vs a plain PyTorch loop
    running the same model, global batch, stream, optimizer, LR schedule and `train_step` (goal >= 0.97).
    Measured in >= 5 alternating rounds (plain, ray / ray, plain, ...), each measurement a fresh process
    with the same torch thread count, after an untimed warm-up process (page cache, .pyc); the figure is
    the median of the per-round ratios and their spread. `--local` adds a third process per round: our
    loop through Ray Train's local mode (no cluster), which splits the gap into "our loop" and "Ray".
    The Ray process also samples the CPU time of every process of its cluster (psutil) over the
    steady-state window: the CPU-share table (raylet, GCS, agents, controller, worker, ...).
P6  step time of the steps during which an async checkpoint is written/uploaded vs ordinary steps
    (goal <= 1.05): a separate Ray process checkpointing every 3 steps.
R   restore latency (`--restore`): see benchmarks/bench_recovery.py (worker SIGKILL -> next step).
Q   demo model quality (IoU, delta<1.25, AbsRel) from runs/demo-stage1 (`make demo`), if it exists.

    python benchmarks/bench_train.py --quick          # P4 (5 rounds) + P6, ~3 min on 2 cores
    python benchmarks/bench_train.py --rounds 7 --local
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import heavy_lock, load_info, spread, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GBS = 32
THREADS = 2  # torch intra-op threads of every measured process (= run.cpus_per_worker)


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
            f"run.cpus_per_worker={THREADS}",
            "run.progress=false",
            "run.log_every=1",  # one host sync per step: per-step timings (the plain loop syncs too)
            "model.width=12",
            "data.image_size=56",
            f"data.global_batch_size={GBS}",
            f"data.decode_workers={THREADS}",
            "data.decoded_preload_bytes=200000000",
            "optim.amp=off",
            "eval.max_samples=32",
            "checkpoint.every_steps=100000",  # P4: epoch-end checkpoints only (P6 measures the others)
            *extra,
        ],
    )


def _steps_per_epoch(data: str) -> int:
    from ray_mmd.data import manifest as mf

    return len(mf.load(data).sample_ids("train")) // GBS


def _steady(step: int, spe: int, ck_every: int = 0) -> bool:
    """Steady-state steps: not epoch 0 (it decodes the shards; later epochs come from the decoded
    preload), not an epoch's first step (it carries the previous epoch's evaluation + checkpoint), and
    not the two steps after an interval checkpoint (P6 measures those)."""
    if step <= spe or (step - 1) % spe == 0:
        return False
    return not (ck_every and (step - 1) % ck_every in (0, 1) and step > ck_every)


def _threads() -> dict:
    import torch

    return {
        "pid": os.getpid(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


# ---- child processes: one measurement each -------------------------------------------------------


def child_plain(data: str, work: str, epochs: int) -> dict:
    """A plain PyTorch loop over the same stream + model + optimizer + schedule + train_step."""
    import torch

    from ray_mmd.data import manifest as mf
    from ray_mmd.data.stream import DataStream
    from ray_mmd.losses import MultiTaskLoss
    from ray_mmd.models import build_model
    from ray_mmd.train.inputs import chunk_schedule, stream_config, total_steps
    from ray_mmd.train.optim import build_optimizer, lr_lambda
    from ray_mmd.train.step import AmpPolicy, train_step

    cfg = _cfg(data, work, "plain", f"data.epochs={epochs}")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    man = mf.load(cfg.data.url)
    stream = DataStream(stream_config(cfg, chunk_schedule(cfg, man)))
    finish = stream.finisher()
    model = build_model(cfg.model.name, width=cfg.model.width)
    opt = build_optimizer(cfg, list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps(cfg, man)))
    policy = AmpPolicy.for_device("cpu", "off")
    loss = MultiTaskLoss()
    sampler = _CpuSampler()
    sampler.start()
    times, wall, step, t = {}, {}, 0, time.perf_counter()
    while not stream.done:
        model.train()
        for wire in stream.epoch_batches():
            batch = policy.prepare_batch(wire, finish)
            out = train_step(model, batch, loss, opt, policy, grad_clip=cfg.optim.grad_clip)
            sched.step()
            out["loss"].item()  # the same per-step sync as the Ray run's log_every=1
            step += 1
            now = time.perf_counter()
            times[step] = now - t
            wall[step] = time.time()
            t = now
        model.eval()  # an epoch-end pass like the loop's evaluation would go here (not timed)
    sampler.stop.set()
    spe = _steps_per_epoch(data)
    steady_steps = [s for s in wall if _steady(s, spe)]
    steady = [wall[s] for s in steady_steps]
    cpu = sampler.shares(min(steady) - times[min(steady_steps)], max(steady)) if steady else {}
    return {"step_s": times, "threads": _threads(), "cpu_cores": cpu}


class _CpuSampler(threading.Thread):
    """Cumulative CPU seconds of every process under this one (the local Ray cluster), once a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        procs: dict[int, psutil.Process] = {}
        while not self.stop.is_set():
            snap = {}
            for p in [me, *me.children(recursive=True)]:
                p = procs.setdefault(p.pid, p)
                try:
                    c = p.cpu_times()
                    snap[p.pid] = (_role(p), c.user + c.system + c.children_user + c.children_system)
                except Exception:
                    continue
            c = psutil.cpu_times()
            snap[-1] = ("machine_busy", c.user + c.system + c.nice + c.irq + c.softirq + c.steal)
            self.samples.append((time.time(), snap))
            self.stop.wait(0.5)

    def shares(self, t0: float, t1: float) -> dict[str, float]:
        """Cores used by each role between t0 and t1 (1.0 = one core busy all the time)."""
        if len(self.samples) < 2:
            return {}
        a = min(self.samples, key=lambda s: abs(s[0] - t0))
        b = min(self.samples, key=lambda s: abs(s[0] - t1))
        dt = b[0] - a[0]
        out: dict[str, float] = {}
        for pid, (role, cpu) in b[1].items():
            prev = a[1].get(pid, (role, 0.0))[1] if pid in a[1] else None
            if prev is None:  # started inside the window
                prev = 0.0
            out[role] = out.get(role, 0.0) + max(0.0, cpu - prev) / dt
        # what the rest of the machine (other users' jobs) used meanwhile: the measurement's noise
        out["outside_this_run"] = out.pop("machine_busy", 0.0) - sum(out.values())
        return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _role(p) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:
        return "?"
    for key, role in (
        ("gcs_server", "gcs_server"),
        ("raylet/raylet", "raylet"),
        ("dashboard/agent.py", "dashboard_agent"),
        ("dashboard/dashboard.py", "dashboard"),
        ("runtime_env/agent/main.py", "runtime_env_agent"),
        ("log_monitor.py", "log_monitor"),
        ("autoscaler/_private/monitor.py", "autoscaler_monitor"),
        ("TrainController", "train_controller"),
        ("RayTrainWorker", "train_worker"),
        ("bench_train.py", "driver"),
        ("ray::IDLE", "idle_workers"),
        ("default_worker.py", "idle_workers"),
    ):
        if key in cmd:
            return role
    return "other: " + cmd.split(" ")[0][-40:]


_LOOP = None  # the real train_loop_per_worker (set before _probe_loop replaces it)


def _probe_loop(config: dict) -> None:
    """The Train worker's entry point for the benchmark: record its thread settings, then train."""
    path = config.get("_probe")
    if path:
        Path(path).write_text(json.dumps({**_threads(), "time": time.time()}))
    _LOOP(config)


def _pyspy_when_steady(work: str, name: str, probe: str, spe: int, seconds: float) -> threading.Thread:
    """Once the run is past epoch 1, py-spy the Train worker and the Train controller for `seconds`
    (raw collapsed stacks per thread, idle samples included, into work/pyspy_<role>.txt)."""
    import psutil

    def go() -> None:
        metrics = Path(work) / name / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline:
            if metrics.exists() and metrics.read_text().count('"train"') > spe + 2:
                break
            time.sleep(0.2)
        targets = {
            _role(p): p.pid
            for p in psutil.Process().children(recursive=True)
            if _role(p) in ("train_worker", "train_controller")
        }
        procs = [
            subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(int(seconds)),
                ]
                + ["-r", "100", "--nonblocking", "--threads", "--idle", "--format", "raw"]
                + ["-o", os.path.join(work, f"pyspy_{role}.txt")],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(work, f"pyspy_{role}.err"), "w"),
            )
            for role, pid in targets.items()
        ]
        for p in procs:
            p.wait()
        Path(work, "pyspy_targets.json").write_text(json.dumps(targets))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def child_ray(data: str, work: str, epochs: int, ck_every: int, local: bool, pyspy_s: float = 0.0) -> dict:
    """Our loop through Ray Train: a fresh local cluster the way `ray-mmd train` starts one (or, with
    `local`, Ray Train's local mode in this process: the same loop without a cluster)."""
    import ray
    import torch

    from ray_mmd.train import loop, trainer

    name = "local" if local else "ray"
    extra = [f"data.epochs={epochs}"]
    if ck_every:
        extra.append(f"checkpoint.every_steps={ck_every}")
    if local:
        extra.append("run.workers=0")
        torch.set_num_threads(THREADS)
    cfg = _cfg(data, work, name, *extra)
    probe = os.path.join(work, f"{name}.threads.json")
    global _LOOP
    orig = _LOOP = loop.train_loop_per_worker
    loop.train_loop_per_worker = _probe_loop  # build_trainer imports it by name
    sampler = _CpuSampler()
    t_init = time.time()
    try:
        started = trainer.connect_ray(cfg)
        sampler.start()
        spy = _pyspy_when_steady(work, name, probe, _steps_per_epoch(data), pyspy_s) if pyspy_s else None
        trainer.resolve_paths(cfg)
        tr = trainer.build_trainer(cfg)
        tr.train_loop_config = {**tr.train_loop_config, "_probe": probe}
        t_fit = time.time()
        tr.fit()
        t_end = time.time()
        if spy is not None:
            spy.join(timeout=30)
    finally:
        loop.train_loop_per_worker = orig
        sampler.stop.set()
        if ray.is_initialized():
            ray.shutdown()
    t_down = time.time()
    lines = [json.loads(x) for x in (Path(work) / name / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    step_s = {x["step"]: GBS / x["train/img_per_s"] for x in train}
    spe = _steps_per_epoch(data)
    steady_t = [x["time"] for x in train if _steady(x["step"], spe, ck_every)]
    threads = json.loads(Path(probe).read_text()) if os.path.exists(probe) else {}
    res = {
        "step_s": step_s,
        "threads": threads,
        "started_cluster": started,
        # where a run's wall time goes besides training (start-up and tear-down)
        "phases_s": {
            "ray_init": t_fit - t_init,
            "fit_to_train_fn": threads.get("time", t_fit) - t_fit,
            "train_fn_to_first_step": train[0]["time"] - threads.get("time", t_fit),
            "training": train[-1]["time"] - train[0]["time"],
            "last_step_to_fit_return": t_end - train[-1]["time"],
            "shutdown": t_down - t_end,
        },
    }
    for f in Path(work).glob("pyspy_*.err"):
        res.setdefault("pyspy_err", {})[f.stem] = f.read_text()[-2000:]
    if os.path.exists(os.path.join(work, "pyspy_targets.json")):
        res["pyspy_targets"] = json.loads(Path(work, "pyspy_targets.json").read_text())
    for f in Path(work).glob("pyspy_*.txt"):
        res.setdefault("pyspy", {})[f.stem[6:]] = summarize_pyspy(f.read_text())
    if steady_t and sampler.samples:
        res["cpu_cores"] = sampler.shares(min(steady_t) - GBS / train[0]["train/img_per_s"], max(steady_t))
        res["cpu_window_s"] = max(steady_t) - min(steady_t)
    return res


def summarize_pyspy(raw: str, top: int = 25) -> dict:
    """py-spy raw output (`thread;frame;...;leaf count`, --threads --idle) -> per-thread sample share
    and the heaviest frames (inclusive) of the busiest thread, as shares of all samples."""
    threads: dict[str, int] = {}
    frames: dict[str, dict[str, int]] = {}
    leaves: dict[str, dict[str, int]] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        parts = stack.split(";")
        th = parts[0]
        total += k
        threads[th] = threads.get(th, 0) + k
        seen = set()
        for f in parts[1:]:
            f = f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
            if f not in seen:
                seen.add(f)
                frames.setdefault(th, {})[f] = frames.setdefault(th, {}).get(f, 0) + k
        leaf = parts[-1].split(" (")[0] + " (" + parts[-1].split(" (")[-1].rstrip(")") + ")"
        leaves.setdefault(th, {})[leaf] = leaves.setdefault(th, {}).get(leaf, 0) + k
    out: dict = {"samples": total, "threads": {}}
    for th, n in sorted(threads.items(), key=lambda kv: -kv[1]):
        fr = sorted(frames.get(th, {}).items(), key=lambda kv: -kv[1])[:top]
        lv = sorted(leaves.get(th, {}).items(), key=lambda kv: -kv[1])[:top]
        out["threads"][th] = {
            "share": n / max(1, total),
            "inclusive": {f: c / n for f, c in fr},
            "leaf": {f: c / n for f, c in lv},
        }
    return out


def _run_child(
    mode: str, data: str, epochs: int, ck_every: int = 0, timeout: float = 240, pyspy_s: float = 0
) -> dict:
    work = tempfile.mkdtemp(prefix=f"bench_train_{mode}_")
    out = os.path.join(work, "result.json")
    cmd = [sys.executable, __file__, "--child", mode, "--data", data, "--work", work, "--out", out]
    cmd += ["--epochs", str(epochs), "--ck-every", str(ck_every), "--pyspy", str(pyspy_s)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    res = json.loads(Path(out).read_text())
    res["step_s"] = {int(k): v for k, v in res["step_s"].items()}
    res["wall_s"] = time.time() - t0
    return res


def _ips(res: dict, spe: int) -> tuple[float, float, int]:
    """Steady-state img/s: (total images / total time, batch / median step time, steps)."""
    t = [v for s, v in res["step_s"].items() if _steady(s, spe)]
    return GBS * len(t) / sum(t), GBS / statistics.median(t), len(t)


def _round(i: int, data: str, epochs: int, spe: int, with_local: bool) -> dict:
    """One alternating round: plain then Ray on even rounds, Ray then plain on odd ones."""
    order = ["plain", "ray"] if i % 2 == 0 else ["ray", "plain"]
    if with_local:
        order.insert(1, "local")
    rec: dict = {"order": order, "load1_before": os.getloadavg()[0]}
    for mode in order:
        res = _run_child(mode, data, epochs)
        ips, ips_med, n = _ips(res, spe)
        rec[mode] = {"img_s": ips, "img_s_median_step": ips_med, "steps": n, "wall_s": res["wall_s"]}
        rec[mode]["threads"] = res["threads"]
        rec[mode]["outside_cores"] = res.get("cpu_cores", {}).get("outside_this_run")
        if mode == "ray":
            rec["cpu_cores"] = res.get("cpu_cores", {})
            rec["cpu_window_s"] = res.get("cpu_window_s")
            rec["phases_s"] = res["phases_s"]
    rec["ratio"] = rec["ray"]["img_s"] / rec["plain"]["img_s"]
    rec["ratio_median_step"] = rec["ray"]["img_s_median_step"] / rec["plain"]["img_s_median_step"]
    if with_local:
        rec["local_over_plain"] = rec["local"]["img_s"] / rec["plain"]["img_s"]
        rec["ray_over_local"] = rec["ray"]["img_s"] / rec["local"]["img_s"]
    print(
        f"round {i}: ratio {rec['ratio']:.3f} (median-step {rec['ratio_median_step']:.3f})  "
        f"plain {rec['plain']['img_s']:.1f}  ray {rec['ray']['img_s']:.1f} img/s  "
        f"load {rec['load1_before']:.2f}  outside cores plain {rec['plain']['outside_cores'] or 0:.2f} "
        f"ray {rec['ray']['outside_cores'] or 0:.2f}",
        flush=True,
    )
    return rec


def p4(data: str, rounds: int, epochs: int, with_local: bool, lock: str | None = None) -> dict:
    spe = _steps_per_epoch(data)
    with heavy_lock(lock):
        _run_child("plain", data, 2)  # warm-up, untimed: page cache, .pyc, synthetic data on disk
    per_round = []
    for i in range(rounds):
        with heavy_lock(lock):  # one round at a time holds the shared machine's lock
            per_round.append(_round(i, data, epochs, spe, with_local))
    ratios = [r["ratio"] for r in per_round]
    roles = sorted({k for r in per_round for k in r.get("cpu_cores", {})})
    cpu = {k: statistics.median([r.get("cpu_cores", {}).get(k, 0.0) for r in per_round]) for k in roles}
    out = {
        "p4_rounds": per_round,
        "p4_ratio": statistics.median(ratios),
        "p4_ratio_spread": spread(ratios),
        "p4_ratio_median_step": statistics.median([r["ratio_median_step"] for r in per_round]),
        "p4_plain_img_s": statistics.median([r["plain"]["img_s"] for r in per_round]),
        "p4_ray_img_s": statistics.median([r["ray"]["img_s"] for r in per_round]),
        "cpu_cores_median": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
        "threads": {m: per_round[0][m]["threads"] for m in per_round[0]["order"]},
    }
    if with_local:
        out["local_over_plain"] = statistics.median([r["local_over_plain"] for r in per_round])
        out["ray_over_local"] = statistics.median([r["ray_over_local"] for r in per_round])
    return out


def p6(data: str, epochs: int, ck_every: int = 3, lock: str | None = None) -> dict:
    """Steps right after an interval checkpoint (write + async upload) vs the other steady steps."""
    spe = _steps_per_epoch(data)
    with heavy_lock(lock):
        res = _run_child("ray", data, epochs, ck_every=ck_every)
    steps = {s: t for s, t in res["step_s"].items() if _steady(s, spe)}  # epoch-first steps out
    # a checkpoint saved after step k (interval or epoch end) is written in step k+1's window and
    # uploaded in the background during k+1 and k+2
    saved = {k for k in range(1, max(res["step_s"]) + 1) if k % ck_every == 0 or k % spe == 0}
    hit = {s for s in steps if s - 1 in saved or s - 2 in saved}
    during = [t for s, t in steps.items() if s in hit]
    normal = [t for s, t in steps.items() if s not in hit]
    return {
        "p6_normal_step_s": statistics.median(normal),
        "p6_ckpt_step_s": statistics.median(during),
        "p6_ratio": statistics.median(during) / statistics.median(normal),
        "p6_ckpt_steps": len(during),
        "p6_normal_steps": len(normal),
    }


def profile(samples: int, epochs: int, seconds: float, lock: str | None, name: str) -> None:
    """Where the Ray run's time goes: py-spy of the Train worker and controller + the CPU-share table."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data = _dataset(tmp, samples)
        with heavy_lock(lock):
            before = load_info()
            res = _run_child("ray", data, epochs, pyspy_s=seconds)
    keys = ("pyspy", "pyspy_targets", "pyspy_err", "cpu_cores", "cpu_window_s", "threads", "phases_s")
    out = {k: res.get(k) for k in keys}
    print(json.dumps({k: res.get(k) for k in ("pyspy_targets", "pyspy_err", "threads", "phases_s")}))
    out["load_before"] = before
    for role, prof in (res.get("pyspy") or {}).items():
        print(f"== {role}: {prof['samples']} samples")
        for th, d in list(prof["threads"].items())[:6]:
            print(f"  {d['share']:6.1%}  {th}")
            for f, v in list(d["inclusive"].items())[:12]:
                print(f"      {v:6.1%}  {f}")
    print("CPU cores during the steady state:")
    for k, v in (res.get("cpu_cores") or {}).items():
        print(f"   {k:<47}{v:>10.3f}")
    print(f"wrote {write_result(name + '_pyspy', out)}")


def demo_quality() -> dict:
    path = ROOT / "runs" / "demo-stage1" / "metrics.jsonl"
    if not path.exists():
        return {}
    evals = [json.loads(x) for x in path.read_text().splitlines() if '"eval"' in x]
    last = evals[-1]
    return {k: last[k] for k in ("eval/iou", "eval/delta1", "eval/abs_rel", "eval/rmse") if k in last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 short rounds + P6 (~3 min)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating plain/Ray rounds (>= 5)")
    ap.add_argument("--local", action="store_true", help="also our loop in Ray Train local mode each round")
    ap.add_argument("--no-p6", action="store_true")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lock", help="flock this file around each round (shared machines: /work/heavy.lock)")
    ap.add_argument("--name", default="bench_train", help="result file name (benchmarks/results/NAME.json)")
    ap.add_argument("--child", choices=("plain", "ray", "local"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ck-every", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument(
        "--pyspy",
        type=float,
        default=0.0,
        help="instead of P4/P6: one Ray run with py-spy on the Train worker + controller for this many s",
    )
    a = ap.parse_args()
    if a.child:
        if a.child == "plain":
            res = child_plain(a.data, a.work, a.epochs)
        else:
            res = child_ray(a.data, a.work, a.epochs, a.ck_every, a.child == "local", a.pyspy)
        Path(a.out).write_text(json.dumps(res))
        return
    samples = a.samples or 320  # 6 steps an epoch
    if a.pyspy:
        profile(samples, a.epochs or 16, a.pyspy, a.lock, a.name)
        return
    epochs = a.epochs or (10 if a.quick else 16)
    t0 = time.time()
    res: dict = {"load_before": load_info(), "samples": samples, "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data = _dataset(tmp, samples)
        res["steps_per_epoch"] = _steps_per_epoch(data)
        res.update(p4(data, a.rounds, epochs, a.local, a.lock))
        if not a.no_p6:
            res.update(p6(data, epochs, lock=a.lock))
    res.update({f"demo_{k.split('/')[-1]}": v for k, v in demo_quality().items()})
    res["load_after"] = load_info()
    res["wall_s"] = time.time() - t0
    lo, hi = res["p4_ratio_spread"]["min"], res["p4_ratio_spread"]["max"]
    print(f"{'figure':<50}{'value':>10}  goal")
    print(f"{'P4 plain PyTorch loop img/s (median of rounds)':<50}{res['p4_plain_img_s']:>10.1f}")
    print(f"{'P4 Ray Train img/s (median of rounds)':<50}{res['p4_ray_img_s']:>10.1f}")
    print(
        f"{f'P4 ratio Ray/plain, median of {a.rounds} rounds':<50}{res['p4_ratio']:>10.3f}  >= 0.97"
        f"   (min {lo:.3f} max {hi:.3f})"
    )
    if a.local:
        print(f"{'   our loop in local mode / plain':<50}{res['local_over_plain']:>10.3f}")
        print(f"{'   Ray cluster / our loop in local mode':<50}{res['ray_over_local']:>10.3f}")
    print("CPU cores used during the Ray run's steady state (median of rounds):")
    for k, v in res["cpu_cores_median"].items():
        print(f"   {k:<47}{v:>10.3f}")
    print(f"threads: {json.dumps(res['threads'])}")
    if "p6_ratio" in res:
        print(f"{'P6 normal step s (median)':<50}{res['p6_normal_step_s']:>10.4f}")
        print(f"{'P6 step during checkpoint write/upload s':<50}{res['p6_ckpt_step_s']:>10.4f}")
        print(f"{'P6 ratio':<50}{res['p6_ratio']:>10.3f}  <= 1.05")
    for k in ("demo_iou", "demo_delta1", "demo_abs_rel"):
        if k in res:
            print(f"{k:<50}{res[k]:>10.4f}")
    print(f"load before/after: {res['load_before']} / {res['load_after']}")
    print(f"wrote {write_result(a.name, res)}")


if __name__ == "__main__":
    main()
