"""The after-training subcommands of `ray-mmd`: eval, predict (one pair or a batch), runs list|show, export.

cli.py adds these parsers and hands the parsed arguments here; user mistakes are UserErrors (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging

from ray_mmd import storage
from ray_mmd.errors import UserError

COMMANDS = ("eval", "predict", "runs", "export")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run dir (newest verified checkpoint), checkpoint dir or .pt2"
    )
    p.add_argument("--model", default=None, help="expected model name (an error if the checkpoint differs)")
    p.add_argument("--width", type=int, default=None, help="expected model width")


def add_commands(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] = ()) -> None:
    """Add the subcommands; `parents` carries cli.py's -v so it also works after the command."""
    parents = list(parents)
    e = sub.add_parser(
        "eval",
        parents=parents,
        help="metrics of a checkpoint on a packed dataset, overall and per scene class",
    )
    _model_args(e)
    e.add_argument("--data", required=True, help="packed dataset URL")
    e.add_argument("--split", default="test", choices=("test", "train", "all"))
    e.add_argument("--chunk", default=None, help="sample-id range A:B")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-samples", type=int, default=None)
    e.add_argument("--out", default="eval", help="where eval.json and eval_grid.png go (default ./eval)")
    e.add_argument("--json", action="store_true", help="print JSON instead of the table")

    p = sub.add_parser(
        "predict", parents=parents, help="mask + depth PNGs for one fg_bg/bg pair, or a batch on Ray Data"
    )
    _model_args(p)
    p.add_argument("--fg-bg", default=None, help="one scene image with the object")
    p.add_argument("--bg", default=None, help="the same scene without it")
    p.add_argument("--input", default=None, help="batch: packed dataset or folder with fg_bg/ and bg/")
    p.add_argument("--out", required=True, help="output folder URL")
    p.add_argument("--split", default="all", choices=("test", "train", "all"), help="batch over a packed set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=None, help="actors (default: from the cluster)")
    p.add_argument("--debug-sleep-per-batch", type=float, default=0.0, help=argparse.SUPPRESS)

    r = sub.add_parser("runs", parents=parents, help="list runs under a storage URL, or show one")
    rsub = r.add_subparsers(dest="runs_cmd", required=True)
    rl = rsub.add_parser("list", parents=parents, help="runs under STORAGE_URL")
    rl.add_argument("storage_url")
    rl.add_argument("--json", action="store_true")
    rs = rsub.add_parser("show", parents=parents, help="one run: stage, steps, metrics, checkpoints, lineage")
    rs.add_argument("run")
    rs.add_argument("--json", action="store_true")

    x = sub.add_parser("export", parents=parents, help="a torch.export file that runs with plain torch")
    _model_args(x)
    x.add_argument("--out", required=True, help="output file (.pt2), local or gs://")


def _eval(a: argparse.Namespace) -> int:
    from ray_mmd import infer

    if a.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {a.batch_size})")
    loaded = infer.load_model(a.checkpoint, a.model, a.width)
    chunk = infer.parse_chunk(a.chunk)
    infer.check_writable(a.out)
    result, grid = infer.evaluate(loaded, a.data, a.split, chunk, a.batch_size, a.max_samples)
    if grid is not None:
        result["grid"] = storage.join(a.out, "eval_grid.png")
        storage.write_bytes_atomic(result["grid"], grid)
    storage.write_bytes_atomic(storage.join(a.out, "eval.json"), json.dumps(result, indent=1).encode())
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{loaded.source} on {a.data} ({a.split}, ids {result['chunk'][0]}:{result['chunk'][1]})")
        print(infer.format_eval(result))
        print(f"JSON: {storage.join(a.out, 'eval.json')}   best/worst grid: {result.get('grid', '-')}")
    return 0


def _predict(a: argparse.Namespace) -> int:
    if a.input and (a.fg_bg or a.bg):
        raise UserError("give either --input (batch) or --fg-bg and --bg (one pair), not both")
    if a.input:
        from ray_mmd.infer_batch import batch_predict

        if a.model or a.width:
            from ray_mmd.infer import load_model

            load_model(a.checkpoint, a.model, a.width)
        r = batch_predict(
            a.checkpoint,
            a.input,
            a.out,
            a.batch_size,
            a.split,
            a.concurrency,
            sleep_s=a.debug_sleep_per_batch,
        )
        print(
            f"wrote outputs for {r['written']} inputs to {a.out} ({r['skipped']} already there, {r['failed']} failed)"
        )
        return 1 if r["failed"] else 0
    if not (a.fg_bg and a.bg):
        raise UserError("predict needs --fg-bg IMG and --bg IMG (or --input URL for a batch)")
    from ray_mmd import infer

    loaded = infer.load_model(a.checkpoint, a.model, a.width)
    for url in infer.predict_pair(loaded, a.fg_bg, a.bg, a.out):
        print(url)
    return 0


def run(a: argparse.Namespace) -> int:
    """Dispatch one of COMMANDS."""
    if not getattr(a, "verbose", False):  # Ray's and Ray Data's own messages only with -v
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    if a.cmd == "eval":
        return _eval(a)
    if a.cmd == "predict":
        return _predict(a)
    if a.cmd == "export":
        from ray_mmd.export import USAGE, export_model

        meta = export_model(a.checkpoint, a.out, a.model, a.width)
        print(f"exported {meta['model']} (width {meta['width']}, {meta['image_size']}px) to {a.out}\n{USAGE}")
        return 0
    from ray_mmd import runs

    if a.runs_cmd == "list":
        found = runs.list_runs(a.storage_url)
        print(json.dumps(found, indent=1) if a.json else runs.format_list(found))
        return 0
    s = runs.show_run(a.run)
    print(json.dumps(s, indent=1) if a.json else runs.format_show(s))
    return 0
