"""P9 recovery: seconds from a Train worker's SIGKILL to the next trained step, and where they go.

Each kill is its own run (1 worker, checkpoint every 2 steps, SIGKILL at step 5) on one local cluster
started the way `ray-mmd train` starts it (`trainer.connect_ray`). Phases, from timestamps:

  detect+decide   kill -> the controller's "[FailurePolicy] RETRY" (its health-check poll finds the dead
                  worker; Train V2 polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
  group teardown  -> "Attempting to start training worker group" (old group + backend shut down)
  actors          -> "worker actors created" (a worker process: spawned, or taken from Ray's idle pool)
  train context   -> "Train context initialized" (torch.distributed / backend setup on the worker)
  launch          -> the training function starts on the worker
  imports         -> `ray_mmd.train.loop` and what it pulls in are imported
  setup           -> the checkpoint restore starts (manifest, stream built)
  checkpoint      -> the checkpoint is found, verified, downloaded and loaded (model, optimizer built)
  rest of setup   -> the step loop starts (loss, metrics log, TensorBoard writer)
  to first batch  -> the stream's first batch after the resume position is ready
  first step      -> the first step after the kill is logged (metrics.jsonl, log_every=1)

    python benchmarks/bench_recovery.py --kills 3 [--lock /work/heavy.lock]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import heavy_lock, load_info, spread, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _probe(config: dict) -> None:
    """The Train worker's entry point here: timestamps of each phase of (re)starting, then train."""
    t: dict = {"fn_start": time.time(), "pid": os.getpid()}
    path = Path(config["_probe"]) / f"{os.getpid()}_{int(t['fn_start'] * 1000)}.json"

    def mark(k: str) -> None:
        t.setdefault(k, time.time())
        path.write_text(json.dumps(t))

    try:
        import psutil

        t["proc_start"] = psutil.Process().create_time()
    except Exception:
        pass
    mark("fn_start")
    import ray_mmd.train.loop as loop_mod
    from ray_mmd.data import stream as stream_mod
    from ray_mmd.train.checkpoint import Checkpointer

    mark("imported")
    find, load = Checkpointer.find, Checkpointer.load
    batches, run_train = stream_mod.DataStream.epoch_batches, loop_mod.train

    def timed_find(self, *a, **k):
        mark("ckpt_start")
        return find(self, *a, **k)

    def timed_load(self, *a, **k):
        try:
            return load(self, *a, **k)
        finally:
            mark("ckpt_end")

    def timed_batches(self, *a, **k):
        for b in batches(self, *a, **k):
            mark("first_batch")
            yield b

    def timed_train(*a, **k):
        mark("train_start")
        return run_train(*a, **k)

    Checkpointer.find, Checkpointer.load = timed_find, timed_load
    stream_mod.DataStream.epoch_batches = timed_batches
    loop_mod.train = timed_train
    loop_mod.train_loop_per_worker(config)


def _controller_events(session: str, t0: float) -> list[tuple[float, str]]:
    """(time, message) of the Train controllers' log lines after t0."""
    out = []
    for f in (Path(session) / "logs" / "train").glob("ray-train-sys-controller-*.log"):
        for line in f.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            ts = dt.datetime.strptime(d["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if ts >= t0:
                out.append((ts, d["message"]))
    return sorted(out)


def _first(events: list[tuple[float, str]], needle: str, after: float) -> float | None:
    return next((t for t, m in events if needle in m and t >= after), None)


def one_kill(data: str, tmp: str, i: int, session: str, extra: list[str]) -> dict:
    from benchmarks.bench_train import _cfg
    from ray_mmd.train import trainer

    marker = Path(tmp) / f"kill{i}"
    probes = Path(tmp) / f"probe{i}"
    probes.mkdir()
    name = f"restore{i}"
    cfg = _cfg(
        data,
        tmp,
        name,
        "data.epochs=1",
        "checkpoint.every_steps=2",
        "debug.kill_at_step=5",
        "debug.kill_rank=0",
        f"debug.kill_marker={marker}",
        "run.cpus_per_worker=1",
        "run.log_every=1",  # the first step after the kill is read from metrics.jsonl
        *extra,
    )
    trainer.resolve_paths(cfg)
    from ray_mmd.train import loop

    real = loop.train_loop_per_worker
    loop.train_loop_per_worker = _probe  # build_trainer imports it by name; pickled by value (__main__)
    try:
        tr = trainer.build_trainer(cfg)
    finally:
        loop.train_loop_per_worker = real
    tr.train_loop_config = {**tr.train_loop_config, "_probe": str(probes)}
    t_fit = time.time()
    tr.fit()
    lines = [json.loads(x) for x in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
    killed = marker.stat().st_mtime
    first_step = min(x["time"] for x in lines if x["kind"] == "train" and x["time"] > killed)
    attempts = [json.loads(p.read_text()) for p in probes.glob("*.json")]
    again = min((a for a in attempts if a["fn_start"] > killed), key=lambda a: a["fn_start"])
    ev = _controller_events(session, t_fit - 1)
    marks = [("kill", killed)]
    for label, needle in (
        ("detect+decide", "[FailurePolicy]"),
        ("group teardown", "Attempting to start training worker group"),
        ("actors", "worker actors created"),
        ("train context", "Train context initialized"),
    ):
        t = _first(ev, needle, marks[-1][1] - 0.01)
        if t is not None:
            marks.append((label, t))
    for label, key in (
        ("launch", "fn_start"),
        ("imports", "imported"),
        ("setup", "ckpt_start"),
        ("checkpoint", "ckpt_end"),
        ("rest of setup", "train_start"),
        ("to first batch", "first_batch"),
    ):
        if key in again:
            marks.append((label, again[key]))
    marks.append(("first step", first_step))
    phases = {label: t - marks[k - 1][1] for k, (label, t) in enumerate(marks) if k > 0}
    return {
        "total_s": first_step - killed,
        "phases_s": phases,
        "worker_process_age_at_launch_s": again["fn_start"] - again.get("proc_start", again["fn_start"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="(make bench) the same 3 kills, ~2 min")
    ap.add_argument("--lock", help="flock this file for the measurement (shared machines)")
    ap.add_argument("--name", default="bench_recovery")
    ap.add_argument("overrides", nargs="*", help="extra config key=value for the runs")
    a = ap.parse_args()
    import ray

    from benchmarks.bench_train import _dataset
    from ray_mmd.train import trainer

    res: dict = {"load_before": load_info()}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_recovery_") as tmp, heavy_lock(a.lock):
        data = _dataset(tmp, 480)
        res["load_before"] = load_info()
        cfg = _cfg_for_connect(data, tmp)
        trainer.connect_ray(cfg)
        try:
            session = ray._private.worker._global_node.get_session_dir_path()
            kills = [one_kill(data, tmp, i, session, a.overrides) for i in range(a.kills)]
        finally:
            ray.shutdown()
    totals = [k["total_s"] for k in kills]
    labels = list(kills[0]["phases_s"])
    res.update(
        {
            "kills": kills,
            "restore_s": totals,
            "restore_median_s": statistics.median(totals),
            "restore_spread": spread(totals),
            "phases_median_s": {
                lb: statistics.median([k["phases_s"].get(lb, 0.0) for k in kills]) for lb in labels
            },
            "overrides": a.overrides,
            "load_after": load_info(),
            "wall_s": time.time() - t0,
        }
    )
    print(f"{'phase (median of ' + str(a.kills) + ' kills)':<40}{'s':>8}")
    for lb, v in res["phases_median_s"].items():
        print(f"  {lb:<38}{v:>8.2f}")
    print(f"{'kill -> next trained step, median':<40}{res['restore_median_s']:>8.2f}  (goal <= 5)")
    print(f"  each: {', '.join(f'{x:.2f}' for x in totals)}")
    print(f"load before/after: {res['load_before']} / {res['load_after']}")
    print(f"wrote {write_result(a.name, res)}")


def _cfg_for_connect(data: str, tmp: str):
    from benchmarks.bench_train import _cfg

    return _cfg(data, tmp, "connect", "run.cpus_per_worker=1")


if __name__ == "__main__":
    main()
