"""Ray Tune sweeps: the search space from YAML, one TorchTrainer per trial, ASHA, a resumable experiment,
the leaderboard (table + CSV + JSON), score-vs-step curves and the winner exported as a stage config.

Train V2 pattern: each trial is a function that builds the same TorchTrainer as `jobs/stage1.py`
(`trainer.build_trainer`) and calls `fit()`; a `TuneReportCallback` subclass on the Train controller
forwards each evaluation with the score. The trial's Train run is named after the trial id only, under
`EXPERIMENT/train/`, so a restarted trial (worker lost: Ray Train; driver lost: `Tuner.restore`) resumes
its own newest checkpoint. The score comes from held-out metrics, not from the losses being tuned:
`(1 - eval/iou) + eval/abs_rel`, lower is better, comparable across loss choices.

Experiment directory (local, Drive path or gs://):
  space.json            the resolved sweep (base config + space): a restore must match it
  <tune files>          Tune's experiment state (Tuner.can_restore / Tuner.restore)
  train/<trial id>/     each trial's Train run: checkpoints, metrics.jsonl, grids, TensorBoard
  trials/<trial id>/    settings.json and events/ (start, failure, aborted, done markers)
  leaderboard.{csv,json}, curves.png
"""

from __future__ import annotations

import logging
import os
import sys

from ray_mmd import storage
from ray_mmd.errors import UserError
from ray_mmd.tune.board import export_best, format_table, leaderboard, write_outputs
from ray_mmd.tune.space import SPACE_FILE, Resources, _set, check_resources, load_sweep
from ray_mmd.tune.trials import run

log = logging.getLogger("ray_mmd.tune")


def cli_run(config: str, name: str | None, storage_url: str | None, resume: bool) -> int:
    sw = load_sweep(config, name=name, storage_url=storage_url)
    board = run(sw, resume=resume)
    print(format_table(board))
    print(
        f"leaderboard: {storage.join(sw.url, 'leaderboard.csv')} (+ .json)   curves: {storage.join(sw.url, 'curves.png')}"
    )
    if board["trials"]:
        print(f"export the winner: ray-mmd tune export {sw.url} --out best.yaml")
    return 0


def cli_export(experiment: str, out: str, run_name: str | None) -> int:
    url = experiment if "://" in experiment else os.path.abspath(experiment)
    best = export_best(url, out, run_name)
    print(f"wrote {out}: trial {best['trial']} ({best['label']}), score {best['score']:.4f}")
    return 0


def cli_board(experiment: str) -> int:
    url = experiment if "://" in experiment else os.path.abspath(experiment)
    if not storage.exists(storage.join(url, SPACE_FILE)):
        raise UserError(f"no sweep experiment at {url}: pass the experiment directory (SWEEP_STORAGE/NAME)")
    board = leaderboard(url)
    write_outputs(url, board)
    print(format_table(board))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`jobs/tune.py`: the same as `ray-mmd tune run ...` (via the CLI's parser)."""
    from ray_mmd.cli import main as cli_main

    return cli_main(["tune", "run", *(sys.argv[1:] if argv is None else argv)])


__all__ = [
    "SPACE_FILE",
    "Resources",
    "UserError",
    "_set",
    "check_resources",
    "cli_board",
    "cli_export",
    "cli_run",
    "export_best",
    "format_table",
    "leaderboard",
    "load_sweep",
    "main",
    "run",
    "write_outputs",
]
