"""The `ray-mmd` command line, all of its argument parsing: `train`, `pipeline`, `data synth|pack|inspect`,
`tune run|leaderboard|export` (sweeps).

After training: `eval`, `predict`, `runs list|show`, `export` (their parsers live in infer_cli.py).

A UserError ends the command with its one-line message on stderr and exit code 2, no traceback; a run
that fails or stops on a NaN streak exits 1 with one line; anything else is a bug and keeps its traceback.
`-v` (before or after the command) turns on debug logging and Ray's own logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ray_mmd.errors import UserError

EXIT_USER_ERROR = 2
DEFAULT_PIPELINE = "jobs/configs/stage1.yaml,jobs/configs/stage2.yaml,jobs/configs/stage3.yaml"


def _train_args(p: argparse.ArgumentParser) -> None:
    """What `train` and `pipeline` share: where the run and the data live, and config overrides."""
    p.add_argument("--run-name", help="run name (same name + storage = resume)")
    p.add_argument("--storage", help="where runs live: local dir, Colab Drive path or gs://bucket/path")
    p.add_argument("--data", help="packed dataset URL")
    p.add_argument("--workers", help="MIN,MAX workers (elastic when MIN < MAX) or N")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.01")


def _parser() -> argparse.ArgumentParser:
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    p = argparse.ArgumentParser(prog="ray-mmd", description=__doc__.splitlines()[0], parents=[verbose])
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", parents=[verbose], help="train one stage on Ray Train (resumes if re-run)")
    t.add_argument("--config", help="YAML config (jobs/configs/*.yaml); defaults otherwise")
    t.add_argument("--stage", type=int, help="stage 1, 2 or 3 (overrides the config's)")
    t.add_argument("--parent", help="previous stage's run name (or checkpoint URL)")
    _train_args(t)

    pl = sub.add_parser("pipeline", parents=[verbose], help="stages 1 -> 2 -> 3, each resumable")
    pl.add_argument("--configs", default=DEFAULT_PIPELINE, help="the three stage configs, comma-separated")
    _train_args(pl)

    data = sub.add_parser("data", help="generate, pack and inspect datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True)

    s = dsub.add_parser("synth", help="write a synthetic MonoMaskDepth dataset (CSV + zips)")
    s.add_argument("--out", required=True, help="output URL (local path, gs://, memory://)")
    s.add_argument("--samples", type=int, required=True)
    s.add_argument("--bgs", type=int, default=10, help="background scenes (the original has ~100)")
    s.add_argument("--fgs", type=int, default=5, help="foreground people (each also used flipped)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    k = dsub.add_parser("pack", help="pack a MonoMaskDepth layout into parquet shards + manifest.json")
    k.add_argument("src", help="dataset folder (or its index .csv) URL")
    k.add_argument("dst", help="packed dataset URL")
    k.add_argument("--shard-size", type=int, default=1000)
    k.add_argument("--test-fraction", type=float, default=0.3)
    k.add_argument("--split-seed", type=int, default=0)
    k.add_argument("--max-bad-fraction", type=float, default=0.01)
    k.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    k.add_argument(
        "--overwrite", action="store_true", help="replace whatever DST holds (another dataset, foreign files)"
    )

    i = dsub.add_parser("inspect", help="counts, splits, stats, quarantine; contact sheet PNG")
    i.add_argument("dst", help="packed dataset URL")
    i.add_argument("--png", default=None, help="write a contact sheet (fg_bg | bg | mask | depth) here")
    i.add_argument("--samples", type=int, default=6, help="rows in the contact sheet")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")

    # -- tune: sweeps (ray_mmd/tune.py) --
    tn = sub.add_parser(
        "tune", parents=[verbose], help="Ray Tune sweeps: run (or resume), leaderboard, export the winner"
    )
    tsub = tn.add_subparsers(dest="tune_cmd", required=True)
    tr = tsub.add_parser("run", parents=[verbose], help="run a sweep; the same command again resumes it")
    tr.add_argument("--config", required=True, help="sweep YAML (jobs/configs/sweep*.yaml)")
    tr.add_argument("--name", help="experiment name (default: sweep.name)")
    tr.add_argument("--storage", help="where experiments live: local dir, Drive path or gs://bucket/path")
    tr.add_argument("--resume", action="store_true", help="require an existing experiment to resume")
    tb = tsub.add_parser("leaderboard", help="rebuild and print an experiment's leaderboard")
    tb.add_argument("experiment", help="experiment directory (STORAGE/NAME)")
    te = tsub.add_parser("export", help="write the best trial as a stage YAML for jobs/stage1.py --config")
    te.add_argument("experiment", help="experiment directory (STORAGE/NAME)")
    te.add_argument("--out", required=True, help="output YAML path")
    te.add_argument("--run-name", help="run.name in the exported config (default: NAME-best)")

    from ray_mmd import infer_cli  # eval, predict, runs, export

    infer_cli.add_commands(sub, parents=[verbose])
    return p


def train_config(
    args: argparse.Namespace,
    *,
    config: str | None,
    stage: int | None,
    run_name: str | None,
    parent: str | None,
):
    """The TrainConfig of one stage: the YAML, then the flags, then key=value overrides, validated once."""
    from ray_mmd.config import load

    if args.workers is not None and args.workers.replace(" ", "") in ("0", "0,0"):
        raise UserError("--workers 0: a run needs at least one worker; give --workers N or MIN,MAX (N >= 1)")
    ov = [f"stage={stage}"] if stage is not None else []
    flags = {
        "run.name": run_name,
        "run.storage": args.storage,
        "data.url": args.data,
        "run.workers": args.workers,
        "parent": parent,
    }
    ov += [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    if getattr(args, "verbose", False):
        ov.append("run.verbose=true")
    return load(config, ov)


def summary(out: Any) -> str:
    """What the user needs after a run: the numbers and where everything is."""
    from ray_mmd.storage import join

    m, url = out.metrics, out.run_url
    ev = {k[5:]: v for k, v in m.items() if k.startswith("eval/")}
    lines = [f"run finished at step {m.get('step', '?')}"]
    if ev:
        lines.append("held-out metrics: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())))
    lines += [
        f"metrics:     {join(url, 'metrics.jsonl')}  (TensorBoard: {join(url, 'tensorboard')})",
        f"PNG grid:    {join(url, 'grid_latest.png')}  (every eval: {join(url, 'grids')})",
        f"checkpoint:  {out.checkpoint}",
    ]
    return "\n".join(lines)


def _fit(cfg: Any) -> int:
    """Connect, fit, print the summary; a failed or stopped run prints one line and returns 1."""
    from ray_mmd.train import trainer
    from ray_mmd.train.metrics import NonFiniteLossError
    from ray_mmd.train.preemption import PreemptionBudgetExceeded

    try:
        out = trainer.fit(cfg)
    except (NonFiniteLossError, PreemptionBudgetExceeded) as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        # not imported above: a user mistake found before Ray starts must not wait ~1 s for `import ray`
        # (and a run that never imported ray.train cannot have failed in it)
        ray_train = sys.modules.get("ray.train")
        if ray_train is None or not isinstance(e, ray_train.TrainingFailedError):
            raise
        # Ray has already logged the worker traceback
        print(f"training failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}", file=sys.stderr)
        return 1
    print(summary(out), flush=True)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    """Stages 1, 2, 3 in order; stage N's parent is stage N-1's run. Each stage resumes if re-run."""
    parent, cfgs = None, []
    for n, path in enumerate(args.configs.split(","), start=1):  # all three checked before stage 1 runs
        name = f"{args.run_name}-stage{n}" if args.run_name else None
        cfgs.append((path, train_config(args, config=path, stage=n, run_name=name, parent=parent)))
        parent = cfgs[-1][1].run.name
    for n, (path, cfg) in enumerate(cfgs, start=1):
        print(f"== stage {n}: {path}", flush=True)
        rc = _fit(cfg)
        if rc:
            return rc
    return 0


def _tune(args: argparse.Namespace) -> int:
    from ray_mmd import tune

    if args.tune_cmd == "run":
        return tune.cli_run(args.config, args.name, args.storage, args.resume)
    if args.tune_cmd == "leaderboard":
        return tune.cli_board(args.experiment)
    return tune.cli_export(args.experiment, args.out, args.run_name)


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    # our own level: a quiet ray.init raises the root logger's (its logging_config applies here too)
    logging.getLogger("ray_mmd").setLevel(logging.DEBUG if verbose else logging.INFO)
    if args.cmd == "train":
        cfg = train_config(
            args, config=args.config, stage=args.stage, run_name=args.run_name, parent=args.parent
        )
        return _fit(cfg)
    if args.cmd == "pipeline":
        return _pipeline(args)
    if args.cmd == "tune":
        return _tune(args)

    from ray_mmd import infer_cli

    if args.cmd in infer_cli.COMMANDS:
        return infer_cli.run(args)
    if args.data_cmd == "synth":
        from ray_mmd.data import synth

        synth.generate(
            args.out,
            args.samples,
            bgs=args.bgs,
            fgs=args.fgs,
            seed=args.seed,
            workers=args.workers,
            progress=True,
        )
        print(f"wrote {args.samples} samples to {args.out}")
        return 0
    if args.data_cmd == "pack":
        from ray_mmd.data import pack

        man = pack.pack(
            args.src,
            args.dst,
            shard_size=args.shard_size,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            max_bad_fraction=args.max_bad_fraction,
            workers=args.workers,
            progress=True,
            overwrite=args.overwrite,
        )
        print(
            f"packed {man.num_samples} samples into {len(man.shards)} shards at {args.dst} "
            f"({len(man.quarantine)} quarantined)"
        )
        return 0
    from ray_mmd.data import inspect as insp

    if args.samples < 1:
        raise UserError(f"--samples must be >= 1 (got {args.samples})")
    summary = insp.inspect(args.dst, png=args.png, n=args.samples)
    print(json.dumps(summary, indent=1) if args.json else insp.format_summary(summary))
    if args.png and not args.json:
        print(f"contact sheet: {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return _run(argv)
    except UserError as e:
        print(f"ray-mmd: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ray-mmd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
