"""`ray-mmd runs list STORAGE_URL` / `ray-mmd runs show RUN`: find runs again and see where they stand.

Everything is read from the run directories (local or gs://): checkpoint_* dirs (meta.json, and for
`show` a full verification of each), metrics.jsonl (best and latest eval), grids. Nothing is written.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ray_mmd import storage
from ray_mmd.errors import UserError
from ray_mmd.train import checkpoint as st

BEST_KEY = "eval/iou"


def _ls(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    try:
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def _meta(ckpt: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(storage.join(ckpt, st.META_FILE)))
    except Exception:
        return None


def _evals(run: str) -> list[dict[str, Any]]:
    return [d for d in storage.read_jsonl(storage.join(run, "metrics.jsonl")) if d.get("kind") == "eval"]


def _best_latest(evals: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if not evals:
        return None, None
    scored = [e for e in evals if isinstance(e.get(BEST_KEY), float)]
    return (max(scored, key=lambda e: e[BEST_KEY]) if scored else None), evals[-1]


def list_runs(storage_url: str) -> list[dict[str, Any]]:
    """One summary per run under `storage_url` (a dir holding checkpoint_* dirs or a metrics.jsonl)."""
    storage.require(storage_url, "runs storage")
    runs = []
    for name in _ls(storage_url):
        url = storage.join(storage_url, name)
        ckpts = st.list_checkpoints(url)
        has_log = storage.exists(storage.join(url, "metrics.jsonl"))
        if not ckpts and not has_log:
            continue
        meta = next((m for m in map(_meta, ckpts) if m), None) or {}
        best, latest = _best_latest(_evals(url))
        runs.append(
            {
                "run": name,
                "url": url,
                "stage": meta.get("stage"),
                "step": meta.get("step"),
                "reason": meta.get("reason"),
                "checkpoints": len(ckpts),
                "best_iou": best.get(BEST_KEY) if best else None,
                "latest_iou": latest.get(BEST_KEY) if latest else None,
            }
        )
    return runs


def _ckpt_time(url: str) -> float | None:
    fs, path = storage.filesystem(storage.join(url, st.STATE_FILE))
    try:
        info = fs.info(path)
    except Exception:
        return None
    t = info.get("mtime") or info.get("updated") or info.get("created")
    if isinstance(t, str):  # gcsfs: ISO time
        from datetime import datetime

        return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    return float(t) if t is not None else None


def show_run(run: str) -> dict[str, Any]:
    """Stage, steps, restarts, best/latest metrics, checkpoints (verified or torn), lineage, newest grid."""
    storage.require(run, "run")
    ckpts = []
    newest_state: dict[str, Any] | None = None
    for url in st.list_checkpoints(run):
        meta = _meta(url) or {}
        entry = {"checkpoint": url, "step": meta.get("step"), "reason": meta.get("reason")}
        entry.update(bytes=meta.get("bytes"), time=_ckpt_time(url))
        try:
            state, _ = st.load_checkpoint(url)
            entry["status"] = "verified"
            if newest_state is None:
                newest_state = state
        except st.CheckpointError as e:
            entry["status"] = f"torn ({str(e).split(': ', 1)[-1]})"
        ckpts.append(entry)
    evals = _evals(run)
    if not ckpts and not evals:
        raise UserError(
            f"{run} is not a run directory (no checkpoint_* dirs, no metrics.jsonl): check the URL"
        )
    best, latest = _best_latest(evals)
    progress = (newest_state or {}).get("progress", {})
    grids = [g for g in _ls(storage.join(run, "grids")) if g.endswith(".png")]
    grid = (
        storage.join(run, "grid_latest.png") if storage.exists(storage.join(run, "grid_latest.png")) else None
    )
    return {
        "run": run,
        "stage": progress.get("stage"),
        "step": progress.get("global_step"),
        "samples_seen": progress.get("samples_seen"),
        "skipped_steps": progress.get("skipped_steps"),
        "restarts": progress.get("restarts"),
        # not every trainer version counts preemptions apart from other restarts
        "preemptions": progress.get("preemptions"),
        "best": best,
        "latest": latest,
        "checkpoints": ckpts,
        "lineage": _lineage((newest_state or {}).get("lineage")),
        "grid": grid or (storage.join(run, "grids", grids[-1]) if grids else None),
    }


def _lineage(lin: dict[str, Any] | None) -> list[dict[str, Any]]:
    """This run, then its parent, grandparent, ... as flat records."""
    out = []
    if lin:
        out.append({"run": lin.get("run"), "stage": lin.get("stage"), "checkpoint": None})
        p = lin.get("parent")
        while p:
            out.append({k: p.get(k) for k in ("run", "stage", "step", "checkpoint")})
            p = p.get("parent")
    return out


def _fmt_metrics(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    keys = ("iou", "dice", "abs_rel", "rmse", "delta1")
    return f"step {d.get('step')}: " + "  ".join(
        f"{k}={d[f'eval/{k}']:.4f}" for k in keys if f"eval/{k}" in d
    )


def format_list(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs"
    lines = [f"{'run':<28}{'stage':>6}{'step':>8}{'ckpts':>7}{'best iou':>10}{'last iou':>10}  state"]
    for r in runs:
        f = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
        lines.append(
            f"{r['run']:<28}{r['stage'] or '-':>6}{r['step'] if r['step'] is not None else '-':>8}"
            f"{r['checkpoints']:>7}{f(r['best_iou']):>10}{f(r['latest_iou']):>10}  {r['reason'] or '-'}"
        )
    return "\n".join(lines)


def format_show(s: dict[str, Any]) -> str:
    pre = s["preemptions"] if s["preemptions"] is not None else "not recorded apart from restarts"
    lines = [
        f"run:         {s['run']}",
        f"stage:       {s['stage']}   step: {s['step']}   samples seen: {s['samples_seen']}",
        f"restarts:    {s['restarts']} survived (preemptions: {pre}); non-finite steps skipped: {s['skipped_steps']}",
        f"best eval:   {_fmt_metrics(s['best'])}",
        f"latest eval: {_fmt_metrics(s['latest'])}",
        "checkpoints:",
    ]
    for c in s["checkpoints"]:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"])) if c["time"] else "?"
        mb = f"{c['bytes'] / 1e6:.1f} MB" if c["bytes"] else "? MB"
        lines.append(
            f"  step {c['step']!s:>7}  {mb:>9}  {t}  {c['status']:<9} {c['reason'] or ''}  {c['checkpoint']}"
        )
    chain = " <- ".join(f"{x['run']} (stage {x['stage']})" for x in s["lineage"]) or "-"
    lines += [f"lineage:     {chain}", f"grid:        {s['grid'] or '-'}"]
    return "\n".join(lines)
