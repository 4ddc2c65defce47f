"""Ray Train overhead and checkpoint stalls, measured side by side on this machine.

P4  training throughput through Ray Train (1 worker on a local cluster, our loop) vs a plain PyTorch loop
    running the same model, global batch, stream, optimizer, LR schedule and `train_step` (goal >= 0.97).
    Measured in >= 5 alternating rounds (plain, ray / ray, plain, ...), each measurement a fresh process
    with the same torch thread count, after an untimed warm-up process (page cache, .pyc); the figure is
    the median of the per-round ratios and their spread. Both sides time the same thing the same way: the
    wall time between the ends of consecutive `train_step` calls (the Ray worker's `train_step` is wrapped
    in the worker), over the steady state only: epoch 0 (shard decoding) and each epoch's first step (the
    Ray loop's evaluation + epoch-end checkpoint) are left out on both sides; the steps after the
    checkpoint (its async upload) stay in. The Ray loop logs at its default interval (run.log_every), the
    plain loop reads its loss at the same interval. `--local` adds a third process per round: our loop
    through Ray Train's local mode (no cluster), which splits the gap into "our loop" and "Ray".
    The parent process samples the CPU time of every process on the machine (psutil, once a second) and
    the kernel's irq/softirq/steal time over each side's steady-state window: the CPU-share table
    (raylet, GCS, agents, controller, worker, ..., and what ran outside the run, by process name).
P6  step time of the steps during which an async checkpoint is written/uploaded vs ordinary steps
    (goal <= 1.05): a separate Ray process checkpointing every `--ck-every` steps (default 5); the two
    steps after each save (the write in the first, the background upload over both) vs the other steady
    steps, with the median step time at each offset after a save.
R   restore latency (`--restore`): see benchmarks/bench_recovery.py (worker SIGKILL -> next step).
Q   demo model quality (IoU, delta<1.25, AbsRel) from runs/demo-stage1 (`make demo`), if it exists.

    python benchmarks/bench_train.py --rounds 3 --data-dir /tmp/bt --name bench_train_a --no-p6
    python benchmarks/bench_train.py --rounds 2 --round-offset 3 --data-dir /tmp/bt --name bench_train_b --no-p6
    python benchmarks/bench_train.py --combine bench_train_a bench_train_b --name bench_train
    python benchmarks/bench_train.py --p6-only --data-dir /tmp/bt --name bench_train_p6
(a round is ~2 min on 2 cores: keep each locked command under ~8 min and combine the parts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def child_plain(data: str, work: str, epochs: int, in_thread: bool = False, pyspy_s: float = 0.0) -> dict:
    """A plain PyTorch loop over the same stream + model + optimizer + schedule + train_step; with
    `in_thread`, run on a second thread as Ray Train runs the training function (its TrainingThread)."""
    if in_thread:
        box: dict = {}
        t = threading.Thread(
            target=lambda: box.update(child_plain(data, work, epochs)), name="TrainingThread"
        )
        t.start()
        t.join()
        return box
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
    ends, step, spy = {}, 0, None
    spe = _steps_per_epoch(data)
    while not stream.done:
        model.train()
        for wire in stream.epoch_batches():
            batch = policy.prepare_batch(wire, finish)
            out = train_step(model, batch, loss, opt, policy, grad_clip=cfg.optim.grad_clip)
            sched.step()
            step += 1
            ends[step] = time.time()
            if step % cfg.run.log_every == 0:
                out["loss"].item()  # read at the same interval as the Ray loop's log
            if pyspy_s and step == spe + 2:
                spy = _pyspy(os.getpid(), pyspy_s, work, "plain_loop")
        model.eval()  # an epoch-end pass like the loop's evaluation would go here (not timed)
    res = {"ends": ends, "threads": _threads()}
    if spy is not None:
        spy.wait()
        res["pyspy"] = {"plain_loop": summarize_pyspy(Path(work, "pyspy_plain_loop.txt").read_text())}
    return res


class _MachineSampler(threading.Thread):
    """Cumulative CPU seconds of every process on the machine (and the kernel's irq/softirq/steal),
    once a second, in the parent: the same observer for both sides of a round."""

    def __init__(self) -> None:
        import ray  # noqa: F401  (puts Ray's vendored psutil on the path)

        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict[int, tuple[str, float]], dict[str, float]]] = []
        self.stop = threading.Event()
        self.child: int | None = None  # the measured process: its tree gets Ray roles

    def run(self) -> None:
        import psutil

        procs: dict[int, psutil.Process] = {}
        names: dict[int, str] = {}
        while not self.stop.is_set():
            tree = set()
            if self.child:
                try:
                    c = psutil.Process(self.child)
                    tree = {c.pid, *(p.pid for p in c.children(recursive=True))}
                except psutil.Error:
                    pass
            snap = {}
            for p in psutil.process_iter():
                p = procs.setdefault(p.pid, p)
                try:
                    c = p.cpu_times()
                    if p.pid in tree:  # a Ray worker's command line changes when it becomes an actor
                        names[p.pid] = "run: " + _role(p)
                    elif p.pid not in names:
                        names[p.pid] = _outside_name(p)
                    snap[p.pid] = (names[p.pid], c.user + c.system + c.children_user + c.children_system)
                except psutil.Error:
                    continue
            k = psutil.cpu_times()
            kern = {
                "busy": k.user + k.system + k.nice + k.irq + k.softirq,
                "irq+softirq": k.irq + k.softirq,
                "steal": k.steal,
            }
            self.samples.append((time.time(), snap, kern))
            self.stop.wait(1.0)

    def shares(self, t0: float, t1: float) -> dict[str, float]:
        """Cores used by each role between t0 and t1 (1.0 = one core busy all the time). `run: *` are the
        measured process tree; `outside: *` everything else on the machine, by process name (the top
        ones; the rest summed); `unattributed` = the kernel's busy time minus all processes seen
        (processes that came and went between two samples, kernel work not charged to a process)."""
        inside = [x for x in self.samples if t0 <= x[0] <= t1]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        dt = b[0] - a[0]
        out: dict[str, float] = {}
        for pid, (role, cpu) in b[1].items():
            prev = a[1][pid][1] if pid in a[1] else 0.0  # else it started inside the window
            out[role] = out.get(role, 0.0) + max(0.0, cpu - prev) / dt
        procs = sum(out.values())
        outside = sorted(((k, v) for k, v in out.items() if k.startswith("outside")), key=lambda kv: -kv[1])
        for k, _ in outside[6:]:
            out["outside: (others)"] = out.get("outside: (others)", 0.0) + out.pop(k)
        out["kernel irq+softirq"] = (b[2]["irq+softirq"] - a[2]["irq+softirq"]) / dt
        out["unattributed"] = (b[2]["busy"] - a[2]["busy"]) / dt - procs - out["kernel irq+softirq"]
        out["steal (hypervisor)"] = (b[2]["steal"] - a[2]["steal"]) / dt
        out["window_s"] = dt
        return dict(sorted(out.items(), key=lambda kv: -kv[1] if kv[0] != "window_s" else 0))


def _outside_name(p) -> str:
    try:
        name = p.name()
        if name.startswith(("python", "py")):
            cmd = p.cmdline()
            name = " ".join(os.path.basename(x) for x in cmd[:3])[:50]
    except Exception:
        name = "?"
    if p.pid == os.getpid():
        return "bench: parent + sampler"
    return "outside: " + name


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
        ("--child plain_thread", "plain loop (on a thread)"),
        ("--child plain", "plain loop"),
        ("--child local", "our loop in Ray Train local mode"),
        ("bench_train.py", "driver"),
        ("ray::IDLE", "idle_workers"),
        ("default_worker.py", "idle_workers"),
    ):
        if key in cmd:
            return role
    name = cmd.split(" ")[0]
    return "other: " + (name.split(".")[0] if name.startswith("ray::") else name[-40:])  # title: actor.method


_LOOP = None  # the real train_loop_per_worker (set before _probe_loop replaces it)


def _probe_loop(config: dict) -> None:
    """The Train worker's entry point for the benchmark: record its thread settings and the wall time
    at the end of each `train_step` (the loop calls it by its module-global name), then train."""
    from ray_mmd.train import loop

    path = config.get("_probe")
    if path:
        Path(path).write_text(json.dumps({**_threads(), "time": time.time()}))
    ends: list[float] = []
    real = loop.train_step

    def timed(*a, **k):
        out = real(*a, **k)
        ends.append(time.time())
        return out

    loop.train_step = timed
    try:
        _LOOP(config)
    finally:
        loop.train_step = real
        if path:  # a fresh run: the i-th call is global step i + 1
            Path(path + ".ends").write_text(json.dumps({i + 1: t for i, t in enumerate(ends)}))


def _pyspy(pid: int, seconds: float, work: str, role: str) -> subprocess.Popen:
    """py-spy record of `pid` for `seconds` (raw collapsed stacks per thread, idle samples included)."""
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid), "-d", str(int(seconds))]
        + ["-r", "100", "--nonblocking", "--threads", "--idle", "--format", "raw"]
        + ["-o", os.path.join(work, f"pyspy_{role}.txt")],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, f"pyspy_{role}.err"), "w"),
    )


def _pyspy_when_steady(work: str, name: str, probe: str, spe: int, seconds: float) -> threading.Thread:
    """Once the run is past epoch 1, py-spy the Train worker and the Train controller for `seconds`
    (raw collapsed stacks per thread, idle samples included, into work/pyspy_<role>.txt)."""
    import psutil

    def go() -> None:
        metrics = Path(work) / name / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline:
            if metrics.exists() and metrics.read_text().count('"eval"') >= 1:
                time.sleep(2.0)  # past the epoch-end checkpoint's upload
                break
            time.sleep(0.2)
        targets = {
            _role(p): p.pid
            for p in psutil.Process().children(recursive=True)
            if _role(p) in ("train_worker", "train_controller")
        }
        procs = [_pyspy(pid, seconds, work, role) for role, pid in targets.items()]
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
    t_init = time.time()
    try:
        started = trainer.connect_ray(cfg)
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
        if ray.is_initialized():
            ray.shutdown()
    t_down = time.time()
    ends = {int(k): v for k, v in json.loads(Path(probe + ".ends").read_text()).items()}
    first, last = ends[min(ends)], ends[max(ends)]
    threads = json.loads(Path(probe).read_text()) if os.path.exists(probe) else {}
    res = {
        "ends": ends,
        "threads": threads,
        "started_cluster": started,
        # where a run's wall time goes besides training (start-up and tear-down)
        "phases_s": {
            "ray_init": t_fit - t_init,
            "fit_to_train_fn": threads.get("time", t_fit) - t_fit,
            "train_fn_to_first_step": first - threads.get("time", t_fit),
            "training": last - first,
            "last_step_to_fit_return": t_end - last,
            "shutdown": t_down - t_end,
        },
    }
    for f in Path(work).glob("pyspy_*.err"):
        res.setdefault("pyspy_err", {})[f.stem] = f.read_text()[-2000:]
    if os.path.exists(os.path.join(work, "pyspy_targets.json")):
        res["pyspy_targets"] = json.loads(Path(work, "pyspy_targets.json").read_text())
    for f in Path(work).glob("pyspy_*.txt"):
        res.setdefault("pyspy", {})[f.stem[6:]] = summarize_pyspy(f.read_text())
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
    mode: str,
    data: str,
    epochs: int,
    ck_every: int = 0,
    timeout: float = 300,
    pyspy_s: float = 0,
    sampler: _MachineSampler | None = None,
) -> dict:
    """One measurement in a fresh process; with `sampler`, its CPU-share table over the steady window."""
    work = tempfile.mkdtemp(prefix=f"bench_train_{mode}_")
    out = os.path.join(work, "result.json")
    cmd = [sys.executable, __file__, "--child", mode, "--data", data, "--work", work, "--out", out]
    cmd += ["--epochs", str(epochs), "--ck-every", str(ck_every), "--pyspy", str(pyspy_s)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if sampler is not None:
        sampler.child = proc.pid
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        if sampler is not None:
            sampler.child = None
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({proc.returncode}):\n{err[-4000:]}")
    res = json.loads(Path(out).read_text())
    res["ends"] = {int(k): v for k, v in res["ends"].items()}
    ends = res["ends"]
    res["step_s"] = {s: ends[s] - ends[s - 1] for s in ends if s - 1 in ends}
    res["wall_s"] = time.time() - t0
    spe = _steps_per_epoch(data)
    steady = [s for s in res["step_s"] if _steady(s, spe)]
    if sampler is not None and steady:
        res["cpu_cores"] = sampler.shares(ends[min(steady) - 1], ends[max(steady)])
    shutil.rmtree(work, ignore_errors=True)
    return res


def _ips(res: dict, spe: int) -> tuple[float, float, int]:
    """Steady-state img/s: (total images / total time, batch / median step time, steps)."""
    t = [v for s, v in res["step_s"].items() if _steady(s, spe)]
    return GBS * len(t) / sum(t), GBS / statistics.median(t), len(t)


def _round(
    i: int, data: str, epochs: int, spe: int, with_local: bool, sampler: _MachineSampler, thread: bool = False
) -> dict:
    """One alternating round: plain then Ray on even rounds, Ray then plain on odd ones."""
    order = ["plain", "ray"] if i % 2 == 0 else ["ray", "plain"]
    if with_local:
        order.insert(1, "local")
    if thread:
        order.insert(1, "plain_thread")
    rec: dict = {"round": i, "order": order, "load_before": load_info()}
    for mode in order:
        res = _run_child(mode, data, epochs, sampler=sampler)
        ips, ips_med, n = _ips(res, spe)
        cpu = res.get("cpu_cores", {})
        rec[mode] = {"img_s": ips, "img_s_median_step": ips_med, "steps": n, "wall_s": res["wall_s"]}
        rec[mode]["steady_s"] = sum(v for s, v in res["step_s"].items() if _steady(s, spe))
        # the loop asks Ray for a preemption notice after every 5th step (run.preemption_poll_every):
        # what the steps that carry it take beyond the others (the plain side: the same steps, no poll)
        st = {s: v for s, v in res["step_s"].items() if _steady(s, spe)}
        poll = [v for s, v in st.items() if (s - 1) % 5 == 0]
        rest = [v for s, v in st.items() if (s - 1) % 5 != 0]
        rec[mode]["poll_step_extra_ms"] = 1000 * (statistics.median(poll) - statistics.median(rest))
        rec[mode]["threads"] = res["threads"]
        rec[mode]["cpu_cores"] = cpu
        rec[mode]["outside_cores"] = sum(v for k, v in cpu.items() if k.startswith("outside"))
        if mode == "ray":
            rec["phases_s"] = res["phases_s"]
    rec["load_after"] = load_info()
    rec["ratio"] = rec["ray"]["img_s"] / rec["plain"]["img_s"]
    rec["ratio_median_step"] = rec["ray"]["img_s_median_step"] / rec["plain"]["img_s_median_step"]
    if with_local:
        rec["local_over_plain"] = rec["local"]["img_s"] / rec["plain"]["img_s"]
        rec["ray_over_local"] = rec["ray"]["img_s"] / rec["local"]["img_s"]
    if thread:
        rec["thread_over_plain"] = rec["plain_thread"]["img_s"] / rec["plain"]["img_s"]
    print(
        f"round {i} ({'/'.join(order)}): ratio {rec['ratio']:.3f} (median-step "
        f"{rec['ratio_median_step']:.3f})  plain {rec['plain']['img_s']:.1f} ray {rec['ray']['img_s']:.1f}"
        f" img/s over {rec['plain']['steady_s']:.0f}/{rec['ray']['steady_s']:.0f} s  load1 "
        f"{rec['load_before']['load1']:.2f}->{rec['load_after']['load1']:.2f}  outside cores plain "
        f"{rec['plain']['outside_cores']:.3f} ray {rec['ray']['outside_cores']:.3f}",
        "".join(f"  {m} {rec[m]['img_s']:.1f}" for m in order if m not in ("plain", "ray")),
        flush=True,
    )
    return rec


def summarize_rounds(per_round: list[dict]) -> dict:
    """Median ratio and spread over rounds, the median CPU-share table of each side."""
    ratios = [r["ratio"] for r in per_round]
    out = {
        "p4_rounds": per_round,
        "p4_ratio": statistics.median(ratios),
        "p4_ratio_spread": spread(ratios),
        "p4_ratio_median_step": statistics.median([r["ratio_median_step"] for r in per_round]),
        "p4_plain_img_s": statistics.median([r["plain"]["img_s"] for r in per_round]),
        "p4_ray_img_s": statistics.median([r["ray"]["img_s"] for r in per_round]),
        "threads": {m: per_round[0][m]["threads"] for m in per_round[0]["order"]},
    }
    for side in ("ray", "plain"):
        roles = sorted({k for r in per_round for k in r[side].get("cpu_cores", {})})
        cpu = {k: statistics.median([r[side]["cpu_cores"].get(k, 0.0) for r in per_round]) for k in roles}
        out[f"cpu_cores_median_{side}"] = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
        extra = [r[side]["poll_step_extra_ms"] for r in per_round if "poll_step_extra_ms" in r[side]]
        if extra:
            out[f"poll_step_extra_ms_{side}"] = statistics.median(extra)
    if "local_over_plain" in per_round[0]:
        out["local_over_plain"] = statistics.median([r["local_over_plain"] for r in per_round])
        out["ray_over_local"] = statistics.median([r["ray_over_local"] for r in per_round])
    return out


_NOISE = """
import time
busy, period = {duty} * 0.02, 0.02
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(period - busy)
"""


def p4(
    data: str,
    rounds: int,
    epochs: int,
    with_local: bool,
    offset: int = 0,
    thread: bool = False,
    noise: float = 0.0,
) -> dict:
    spe = _steps_per_epoch(data)
    _run_child("plain", data, 2)  # warm-up, untimed: page cache, .pyc, synthetic data on disk
    sampler = _MachineSampler()
    sampler.start()
    # --noise: another nice-0 process busy `noise` of each 20 ms (a shared machine's other work)
    bg = subprocess.Popen([sys.executable, "-c", _NOISE.format(duty=noise)]) if noise else None
    try:
        per_round = [
            _round(offset + i, data, epochs, spe, with_local, sampler, thread) for i in range(rounds)
        ]
    finally:
        sampler.stop.set()
        if bg is not None:
            bg.kill()
    return summarize_rounds(per_round)


def p6(data: str, epochs: int, ck_every: int = 5) -> dict:
    """Steps right after a checkpoint (write + async upload) vs the other steady steps."""
    spe = _steps_per_epoch(data)
    res = _run_child("ray", data, epochs, ck_every=ck_every)
    steps = {s: t for s, t in res["step_s"].items() if _steady(s, spe)}  # epoch-first steps out
    # a checkpoint saved after step k (interval or epoch end) is written in step k+1's window and
    # uploaded in the background during k+1 and k+2
    saved = sorted(k for k in range(1, max(res["step_s"]) + 1) if k % ck_every == 0 or k % spe == 0)
    since = {s: s - max(k for k in saved if k < s) for s in steps if any(k < s for k in saved)}
    during = [t for s, t in steps.items() if since.get(s) in (1, 2)]
    normal = [t for s, t in steps.items() if since.get(s, 99) > 2]
    offsets = sorted(set(since.values()))
    return {
        "p6_ck_every": ck_every,
        "p6_normal_step_s": statistics.median(normal),
        "p6_ckpt_step_s": statistics.median(during),
        "p6_ratio": statistics.median(during) / statistics.median(normal),
        "p6_mean_ratio": statistics.mean(during) / statistics.mean(normal),
        "p6_ckpt_steps": len(during),
        "p6_normal_steps": len(normal),
        "p6_median_step_s_by_offset": {
            o: statistics.median([t for s, t in steps.items() if since.get(s) == o]) for o in offsets
        },
    }


def profile(data: str, epochs: int, seconds: float, lock: str | None, name: str, ck_every: int = 0) -> None:
    """Where the Ray run's time goes: py-spy of the Train worker and controller + the CPU-share table."""
    sampler = _MachineSampler()
    sampler.start()
    with heavy_lock(lock):
        before = load_info()
        res = _run_child("ray", data, epochs, ck_every=ck_every, pyspy_s=seconds, sampler=sampler)
        plain = _run_child("plain", data, epochs, pyspy_s=seconds, sampler=sampler)
    sampler.stop.set()
    res["pyspy"] = {**(res.get("pyspy") or {}), **plain.get("pyspy", {})}
    res["plain_cpu_cores"] = plain.get("cpu_cores")
    keys = ("pyspy", "pyspy_targets", "pyspy_err", "cpu_cores", "plain_cpu_cores", "threads", "phases_s")
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


def _print_p4(res: dict) -> None:
    lo, hi = res["p4_ratio_spread"]["min"], res["p4_ratio_spread"]["max"]
    n = len(res["p4_rounds"])
    print(f"{'figure':<50}{'value':>10}  goal")
    print(f"{'P4 plain PyTorch loop img/s (median of rounds)':<50}{res['p4_plain_img_s']:>10.1f}")
    print(f"{'P4 Ray Train img/s (median of rounds)':<50}{res['p4_ray_img_s']:>10.1f}")
    print(
        f"{f'P4 ratio Ray/plain, median of {n} rounds':<50}{res['p4_ratio']:>10.3f}  >= 0.97"
        f"   (min {lo:.3f} max {hi:.3f}, +-{res['p4_ratio_spread']['half_range_pct']:.1f}%)"
    )
    print("   per round: " + " ".join(f"{r['ratio']:.3f}" for r in res["p4_rounds"]))
    if "local_over_plain" in res:
        print(f"{'   our loop in local mode / plain':<50}{res['local_over_plain']:>10.3f}")
        print(f"{'   Ray cluster / our loop in local mode':<50}{res['ray_over_local']:>10.3f}")
    rc, pc = res["cpu_cores_median_ray"], res["cpu_cores_median_plain"]
    print(f"CPU cores over each side's steady state (median of rounds)   {'ray':>8}{'plain':>8}")
    for k in sorted(set(rc) | set(pc), key=lambda k: -max(rc.get(k, 0), pc.get(k, 0))):
        print(f"   {k:<58}{rc.get(k, 0):>8.3f}{pc.get(k, 0):>8.3f}")
    if "poll_step_extra_ms_ray" in res:
        print(
            f"steps carrying the preemption poll, extra ms (median): ray {res['poll_step_extra_ms_ray']:.1f}"
            f"  plain (no poll) {res['poll_step_extra_ms_plain']:.1f}"
        )
    print(f"threads: {json.dumps(res['threads'])}")


def combine(names: list[str], name: str) -> None:
    """One P4 figure from the rounds of several runs (each one locked command on a shared machine)."""
    from benchmarks._common import RESULTS

    parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    res: dict = {"parts": names, "samples": parts[0]["samples"], "epochs": parts[0]["epochs"]}
    res["steps_per_epoch"] = parts[0]["steps_per_epoch"]
    res.update(summarize_rounds([r for p in parts for r in p["p4_rounds"]]))
    res["load"] = [r["load_before"] for r in res["p4_rounds"]]
    # P6, from the part that measured it
    res.update({k: v for p in parts for k, v in p.items() if k.startswith("p6_")})
    _print_p4(res)
    print(f"wrote {write_result(name, res)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating plain/Ray rounds (>= 5 in all)")
    ap.add_argument("--round-offset", type=int, default=0, help="first round's number (alternation)")
    ap.add_argument("--local", action="store_true", help="also our loop in Ray Train local mode each round")
    ap.add_argument("--thread", action="store_true", help="also the plain loop on a second thread each round")
    ap.add_argument("--no-p6", action="store_true")
    ap.add_argument("--noise", type=float, default=0.0, help="P4 beside a nice-0 process busy this share")
    ap.add_argument("--p6-only", action="store_true")
    ap.add_argument("--samples", type=int, default=1600, help="45 steps an epoch at the default")
    ap.add_argument("--epochs", type=int, default=6, help="epochs 1.. are the steady state (~30 s)")
    ap.add_argument("--data-dir", help="keep the synthetic dataset here (reused by later runs)")
    ap.add_argument("--lock", help="flock this file around a --pyspy run (shared machines)")
    ap.add_argument("--name", default="bench_train", help="result file name (benchmarks/results/NAME.json)")
    ap.add_argument("--combine", nargs="+", help="result names whose P4 rounds make one figure (--name)")
    ap.add_argument("--child", choices=("plain", "plain_thread", "ray", "local"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ck-every", type=int, default=0, help="P6/--pyspy: checkpoint every N steps (P6: 5)")
    ap.add_argument(
        "--pyspy",
        type=float,
        default=0.0,
        help="instead of P4/P6: one Ray run with py-spy on the Train worker + controller for this many s",
    )
    a = ap.parse_args()
    if a.child:
        if a.child.startswith("plain"):
            res = child_plain(a.data, a.work, a.epochs, a.child == "plain_thread", a.pyspy)
        else:
            res = child_ray(a.data, a.work, a.epochs, a.ck_every, a.child == "local", a.pyspy)
        Path(a.out).write_text(json.dumps(res))
        return
    if a.combine:
        combine(a.combine, a.name)
        return
    t0 = time.time()
    res: dict = {"load_before": load_info(), "samples": a.samples, "epochs": a.epochs}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data = _dataset(a.data_dir or tmp, a.samples)
        if a.pyspy:
            profile(data, a.epochs, a.pyspy, a.lock, a.name, a.ck_every)
            return
        res["steps_per_epoch"] = _steps_per_epoch(data)
        if not a.p6_only:
            res.update(p4(data, a.rounds, a.epochs, a.local, a.round_offset, a.thread, a.noise))
        if not a.no_p6:
            res.update(p6(data, a.epochs, a.ck_every or 5))
    res.update({f"demo_{k.split('/')[-1]}": v for k, v in demo_quality().items()})
    res["load_after"] = load_info()
    res["wall_s"] = time.time() - t0
    if not a.p6_only:
        _print_p4(res)
    if "p6_ratio" in res:
        print(f"{'P6 normal step s (median)':<50}{res['p6_normal_step_s']:>10.4f}")
        print(f"{'P6 step during checkpoint write/upload s':<50}{res['p6_ckpt_step_s']:>10.4f}")
        print(
            f"{'P6 ratio (median; mean)':<50}{res['p6_ratio']:>10.3f}  <= 1.05   ({res['p6_mean_ratio']:.3f})"
        )
        print("   median step s by steps since the save: " + json.dumps(res["p6_median_step_s_by_offset"]))
    print(f"load before/after: {res['load_before']} / {res['load_after']}")
    print(f"wrote {write_result(a.name, res)}")


if __name__ == "__main__":
    main()
