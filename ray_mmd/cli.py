"""The `ray-mmd` command line: `data synth|pack|inspect`, `train` (forwarded to the trainer), and
`eval`, `predict`, `runs`, `export` (infer_cli.py).

A UserError ends the command with its one-line message on stderr and exit code 2, no traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ray_mmd.errors import UserError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-mmd", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "train", help="train (arguments go to the trainer; `ray-mmd train --help`)", add_help=False
    )
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

    i = dsub.add_parser("inspect", help="counts, splits, stats, quarantine; contact sheet PNG")
    i.add_argument("dst", help="packed dataset URL")
    i.add_argument("--png", default=None, help="write a contact sheet (fg_bg | bg | mask | depth) here")
    i.add_argument("--samples", type=int, default=6, help="rows in the contact sheet")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")

    from ray_mmd import infer_cli  # eval, predict, runs, export

    infer_cli.add_commands(sub)
    return p


def _train(argv: list[str]) -> int:
    try:
        from ray_mmd.train.trainer import main as train_main
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("ray_mmd"):
            raise UserError(
                "training is not available in this install (ray_mmd.train.trainer missing)"
            ) from e
        raise
    return int(train_main(argv) or 0)


def _run(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    # `-v train ...` also forwards
    if argv[:2] in (["-v", "train"], ["--verbose", "train"]):
        logging.getLogger().setLevel(logging.DEBUG)
        return _train(argv[2:])
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    if args.cmd == "train":  # pragma: no cover - handled above
        return _train([])
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
