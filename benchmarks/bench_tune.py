"""P10: the demo sweep with ASHA vs the same trials each run to its full budget (back to back, one machine),
as a wall-time ratio, and whether both pick the same winner; the demo leaderboard (which loss pair won, by
how much); the time from a driver restart to the first trial step after a sweep restore.

    .venv/bin/python benchmarks/bench_tune.py            # jobs/configs/sweep-demo.yaml as is
    .venv/bin/python benchmarks/bench_tune.py --quick    # 2 epochs, 4 trials (a smoke run of this script)

Each sweep runs as a user runs it (`python jobs/tune.py --config X`, its own local Ray) in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _common import write_result  # noqa: E402


def sweep_file(src: Path, work: Path, name: str, quick: bool, **change: object) -> Path:
    """A copy of the sweep file with its base made absolute and `change` applied (sweep.* / set.*)."""
    doc = yaml.safe_load(src.read_text())
    if isinstance(doc.get("base"), str):
        doc["base"] = str((src.parent / doc["base"]).resolve())
    doc.setdefault("set", {})
    url = doc["set"].get("data.url")
    if url and "://" not in url and not os.path.isabs(url):
        doc["set"]["data.url"] = str(ROOT / url)  # share the generated demo set between the runs
    if quick:
        doc["set"]["data.epochs"] = 2
        doc["space"]["loss.mask"] = {"grid": doc["space"]["loss.mask"]["grid"][:2]}
    doc["sweep"]["storage"] = str(work)
    doc["sweep"]["name"] = name
    for k, v in change.items():
        sec, key = k.split("__")
        doc[sec][key.replace("_DOT_", ".")] = v
    out = work / f"{name}.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    e.pop("RAY_ADDRESS", None)
    return e


def run_sweep(cfg: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "jobs/tune.py", "--config", str(cfg)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"sweep {cfg} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    doc = yaml.safe_load(cfg.read_text())["sweep"]
    board = json.loads((Path(doc["storage"]) / doc["name"] / "leaderboard.json").read_text())
    return dt, board


def pair(row: dict) -> str:
    s = row["settings"]
    return f"{s.get('loss.mask', '?')} / {s.get('loss.depth', '?')}"


def margin(board: dict) -> tuple[str, float, str, float]:
    """The winning loss pair and its score; the best other pair and its score (completed trials first)."""
    rows = board["trials"]
    win = rows[0]
    other = next((r for r in rows[1:] if pair(r) != pair(win)), None)
    return pair(win), win["score"], pair(other) if other else "-", other["score"] if other else float("nan")


def restore_latency(cfg: Path, work: Path) -> dict:
    """Kill the driver once a trial has trained past its first checkpoint, run the same command again,
    and time from that start to the first step trained by a restored trial (its metrics.jsonl line)."""
    doc = yaml.safe_load(cfg.read_text())
    exp = Path(doc["sweep"]["storage"]) / doc["sweep"]["name"]
    cmd = [sys.executable, "jobs/tune.py", "--config", str(cfg)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ck = list((exp / "train").glob("*/checkpoint_*/meta.json")) if (exp / "train").exists() else []
            states = list(exp.glob("experiment_state-*.json"))
            if ck and states and ck[0].parts[-3] in states[0].read_text():
                break
            time.sleep(0.2)
        time.sleep(2.0)  # a few steps past the checkpoint: work the restore has to redo
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    time.sleep(3)
    t_restart = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"restore failed:\n{(r.stdout + r.stderr)[-3000:]}")
    firsts = []
    for m in (exp / "train").glob("*/metrics.jsonl"):
        for line in m.read_text().splitlines():
            d = json.loads(line)
            if d.get("kind") == "train" and d["time"] > t_restart:
                firsts.append(d["time"] - t_restart)
                break
    return {
        "restart_to_first_step_s": min(firsts) if firsts else float("nan"),
        "rerun_total_s": time.time() - t_restart,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--config", default="jobs/configs/sweep-demo.yaml")
    ap.add_argument("--skip-restore", action="store_true")
    a = ap.parse_args()
    src = (ROOT / a.config).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    try:
        asha_cfg = sweep_file(src, work, "asha", a.quick)
        full_cfg = sweep_file(src, work, "full", a.quick, sweep__asha=None)
        t_asha, b_asha = run_sweep(asha_cfg)
        t_full, b_full = run_sweep(full_cfg)
        rest = {}
        if not a.skip_restore:
            rcfg = sweep_file(src, work, "restore", a.quick, set__run_DOT_log_every=1)
            rest = restore_latency(rcfg, work)
        wa, sa, oa, soa = margin(b_asha)
        wf, sf, of, sof = margin(b_full)
        stopped = sum(r["stopped_early"] for r in b_asha["trials"])
        rows = [
            (
                "demo sweep wall time, ASHA",
                f"{t_asha:.1f} s",
                f"{stopped}/{len(b_asha['trials'])} trials stopped early",
            ),
            ("demo sweep wall time, full budget", f"{t_full:.1f} s", ""),
            ("ratio ASHA / full (goal <= 0.5)", f"{t_asha / t_full:.2f}", ""),
            ("winner, ASHA", wa, f"score {sa:.4f}; best other pair {oa} {soa:.4f} (+{soa - sa:.4f})"),
            ("winner, full budget", wf, f"score {sf:.4f}; best other pair {of} {sof:.4f} (+{sof - sf:.4f})"),
            (
                "same winning trial settings",
                str(b_asha["trials"][0]["settings"] == b_full["trials"][0]["settings"]),
                "",
            ),
            ("same winning loss pair", str(wa == wf), ""),
        ]
        if rest:
            rows.append(
                (
                    "driver restart -> first restored trial step",
                    f"{rest['restart_to_first_step_s']:.1f} s",
                    "",
                )
            )
        w = max(len(r[0]) for r in rows)
        print(f"{'figure'.ljust(w)}  value   note")
        for k, v, n in rows:
            print(f"{k.ljust(w)}  {v}  {n}")
        from ray_mmd.tune import format_table

        print("\nleaderboard (ASHA):\n" + format_table(b_asha))
        print("\nleaderboard (full budget):\n" + format_table(b_full))
        for b in (b_asha, b_full):
            for r in b["trials"]:
                r.pop("curve", None)
        path = write_result(
            "bench_tune_quick" if a.quick else "bench_tune",
            {
                "config": a.config,
                "asha_s": t_asha,
                "full_s": t_full,
                "ratio": t_asha / t_full,
                "same_winner_settings": b_asha["trials"][0]["settings"] == b_full["trials"][0]["settings"],
                "same_winner_pair": wa == wf,
                "winner_asha": {"pair": wa, "score": sa, "runner_up_pair": oa, "runner_up_score": soa},
                "winner_full": {"pair": wf, "score": sf, "runner_up_pair": of, "runner_up_score": sof},
                "restore": rest,
                "leaderboard_asha": b_asha["trials"],
                "leaderboard_full": b_full["trials"],
            },
        )
        print(f"\nwrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
