"""After a sweep: the leaderboard (table, CSV, JSON), score-vs-step curves and the winner as a stage YAML."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.errors import UserError
from ray_mmd.tune.record import eval_steps, events, score_of
from ray_mmd.tune.space import SPACE_FILE, trial_config

log = logging.getLogger("ray_mmd.tune")


def _eval_lines(run_url: str) -> list[dict[str, Any]]:
    return [d for d in storage.read_jsonl(storage.join(run_url, "metrics.jsonl")) if d.get("kind") == "eval"]


def _short(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in sorted(params.items()))


def leaderboard(url: str) -> dict[str, Any]:
    """Rows for every trial of an experiment, best first (trials that ran their budget before those
    that were stopped), read from the trials' own run directories."""
    from ray_mmd.data import manifest as mf

    saved = json.loads(storage.read_bytes(storage.join(url, SPACE_FILE)))
    base = saved["base"]
    fs, path = storage.filesystem(storage.join(url, "trials"))
    try:
        ids = sorted(os.path.basename(n.rstrip("/")) for n in fs.ls(path, detail=False))
    except FileNotFoundError:
        ids = []
    man = None
    rows = []
    for tid in ids:
        turl = storage.join(url, "trials", tid)
        if not storage.exists(storage.join(turl, "settings.json")):
            continue
        params = json.loads(storage.read_bytes(storage.join(turl, "settings.json")))["params"]
        cfg = trial_config(base, params)
        man = man or mf.load(cfg.data.url)
        total = eval_steps(cfg, man)[-1]
        evs = _eval_lines(storage.join(url, "train", tid))
        last = evs[-1] if evs else {}
        ev = events(turl)
        steps = int(last.get("step", 0))
        if ev.get("aborted"):
            status = "aborted (non-finite loss)"
        elif ev.get("error", 0) >= ev.get("start", 0) > 0 and steps < total:
            status = "error"
        elif steps >= total:
            status = "completed"
        elif ev.get("done"):
            status = "ended early"
        else:
            status = "stopped early"
        sc = score_of(last) if last else math.nan
        rows.append(
            {
                "trial": tid,
                "settings": params,
                "label": _short(params),
                "score": sc,
                "iou": last.get("eval/iou", math.nan),
                "abs_rel": last.get("eval/abs_rel", math.nan),
                "delta1": last.get("eval/delta1", math.nan),
                "steps": steps,
                "budget_steps": total,
                "stopped_early": status != "completed",
                "status": status,
                # trainer starts beyond the first (driver restores) + worker-group failures inside the trial
                "restarts": max(0, ev.get("start", 0) - 1) + ev.get("failure", 0),
                "trainer_starts": ev.get("start", 0),
                "curve": [[int(e["step"]), score_of(e)] for e in evs],
            }
        )

    def key(r: dict[str, Any]) -> tuple:
        s = r["score"]
        return (r["stopped_early"], math.isnan(s), s if not math.isnan(s) else 0.0)

    rows.sort(key=key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return {"experiment": url, "metric": "(1 - eval/iou) + eval/abs_rel, lower is better", "trials": rows}


_COLS = ("rank", "trial", "score", "iou", "abs_rel", "delta1", "steps", "status", "restarts", "label")


def format_table(board: dict[str, Any]) -> str:
    rows = board["trials"]
    cells = [list(_COLS)]
    for r in rows:
        cells.append(
            [
                str(r["rank"]),
                r["trial"],
                f"{r['score']:.4f}",
                f"{r['iou']:.4f}",
                f"{r['abs_rel']:.4f}",
                f"{r['delta1']:.4f}",
                f"{r['steps']}/{r['budget_steps']}",
                r["status"],
                str(r["restarts"]),
                r["label"],
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(_COLS))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(url: str, board: dict[str, Any]) -> None:
    """leaderboard.json, leaderboard.csv and curves.png in the experiment directory."""
    from ray_mmd.viz import sweep_curves

    storage.write_bytes_atomic(storage.join(url, "leaderboard.json"), json.dumps(board, indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = sorted({k for r in board["trials"] for k in r["settings"]})
    w.writerow(
        [
            "rank",
            "trial",
            "score",
            "iou",
            "abs_rel",
            "delta1",
            "steps",
            "budget_steps",
            "stopped_early",
            "status",
            "restarts",
        ]
        + keys
    )
    for r in board["trials"]:
        w.writerow(
            [
                r["rank"],
                r["trial"],
                r["score"],
                r["iou"],
                r["abs_rel"],
                r["delta1"],
                r["steps"],
                r["budget_steps"],
                r["stopped_early"],
                r["status"],
                r["restarts"],
            ]
            + [r["settings"].get(k, "") for k in keys]
        )
    storage.write_bytes_atomic(storage.join(url, "leaderboard.csv"), buf.getvalue().encode())
    curves = {f"{r['trial']} {r['label']}": r["curve"] for r in board["trials"]}
    stopped = {f"{r['trial']} {r['label']}" for r in board["trials"] if r["stopped_early"]}
    storage.write_bytes_atomic(storage.join(url, "curves.png"), sweep_curves(curves, stopped))


def export_best(url: str, out: str, run_name: str | None = None) -> dict[str, Any]:
    """Write the best trial's stage config (a full TrainConfig YAML `jobs/stage1.py --config` accepts)."""
    lb = storage.join(url, "leaderboard.json")
    if not storage.exists(storage.join(url, SPACE_FILE)):
        raise UserError(f"no sweep experiment at {url}: pass the experiment directory (SWEEP_STORAGE/NAME)")
    board = json.loads(storage.read_bytes(lb)) if storage.exists(lb) else leaderboard(url)
    done = [r for r in board["trials"] if not math.isnan(r["score"])]
    if not done:
        raise UserError(f"no trial of {url} has evaluated yet: run the sweep (again) first")
    best = done[0]
    saved = json.loads(storage.read_bytes(storage.join(url, SPACE_FILE)))
    cfg = trial_config(saved["base"], best["settings"])
    cfg.run.name = run_name or f"{url.rstrip('/').rsplit('/', 1)[-1]}-best"
    base_run = saved["base"].get("run", {})
    cfg.run.storage = base_run.get("storage", TrainConfig().run.storage)
    d = cfg.to_dict()
    d.pop("debug", None)  # test hooks never travel into a training config
    header = (
        f"# best trial {best['trial']} of sweep {url}: score {best['score']:.4f} "
        f"(IoU {best['iou']:.4f}, AbsRel {best['abs_rel']:.4f}, {best['status']})\n"
        f"# settings: {best['label']}\n"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True) if "://" not in out else None
    storage.write_bytes_atomic(out, (header + yaml.safe_dump(d, sort_keys=False)).encode())
    return best
