"""Synthetic generation and packing throughput, and packed size vs the source zips (bg de-duplication).

The set has the original's structure: ~100 bgs shared by all samples. Throughputs are samples/s on this
machine (noisy, shared); the comparisons that mean something are the ratios measured in the same run:
packed/source size, pack time / time to extract the zips the way the original did, and the size a packer
that stored the bg with every row would need.

    python benchmarks/bench_synth_pack.py --quick      # <= 60 s
    python benchmarks/bench_synth_pack.py --samples 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from ray_mmd.data import pack, synth  # noqa: E402


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the machine is shared: wall time is noisy)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _size(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.rglob(pattern) if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small set, <= 60 s")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--bgs", type=int, default=100)
    ap.add_argument("--fgs", type=int, default=20)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--dir", default=None, help="scratch dir (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    n = args.samples or (2000 if args.quick else 20000)
    workers = args.workers or os.cpu_count() or 1
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-synth-pack-"))
    src, dst, ext = scratch / "src", scratch / "packed", scratch / "extracted"
    try:
        t0, c0 = time.perf_counter(), _cpu()
        synth.generate(str(src), n, bgs=args.bgs, fgs=args.fgs, seed=0, workers=workers)
        t_synth, c_synth = time.perf_counter() - t0, _cpu() - c0

        t0, c0 = time.perf_counter(), _cpu()
        man = pack.pack(str(src), str(dst), shard_size=args.shard_size, workers=workers)
        t_pack, c_pack = time.perf_counter() - t0, _cpu() - c0

        # what the original did before every session: extract every zip to disk
        t0 = time.perf_counter()
        for z in sorted(src.glob("*.zip")):
            with zipfile.ZipFile(z) as zf:
                for info in zf.infolist():  # safe names only: this is our own synthetic set
                    out = ext / z.stem / info.filename
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(info))
        t_extract = time.perf_counter() - t0

        src_zips = _size(src, "*.zip")
        src_all = src_zips + _size(src, "*.csv")
        packed = _size(dst, "*.parquet") + _size(dst, "*.json")
        bg_bytes = {}
        with zipfile.ZipFile(src / synth.BG_ZIP) as zf:
            for info in zf.infolist():
                bg_bytes[info.filename] = info.file_size
        import csv

        with open(src / synth.CSV_NAME) as f:
            per_row_bg = sum(bg_bytes[r["BGImageName"]] for r in csv.DictReader(f))
        res = {
            "samples": n,
            "bgs": args.bgs,
            "fgs": args.fgs,
            "workers": workers,
            "cpu_count": os.cpu_count(),
            "synth_s": round(t_synth, 2),
            "synth_samples_per_s": round(n / t_synth, 1),
            "synth_cpu_ms_per_sample": round(1000 * c_synth / n, 3),
            "pack_s": round(t_pack, 2),
            "pack_cpu_ms_per_sample": round(1000 * c_pack / n, 3),
            "load_avg_1m": os.getloadavg()[0],
            "pack_samples_per_s": round(n / t_pack, 1),
            "extract_s": round(t_extract, 2),
            "pack_over_extract_time": round(t_pack / t_extract, 2),
            "source_zip_bytes": src_zips,
            "source_bytes_incl_csv": src_all,
            "packed_bytes": packed,
            "packed_over_source_zips": round(packed / src_zips, 3),
            "packed_if_bg_per_row_bytes": packed + per_row_bg,
            "bg_dedup_saving_vs_bg_per_row": round(1 - packed / (packed + per_row_bg), 3),
            "quarantined": len(man.quarantine),
            "shards": len(man.shards),
            "goal_packed_over_source_le": 0.8,
        }
        rows = [
            (
                "synth",
                f"{res['synth_samples_per_s']:.0f} samples/s",
                f"{t_synth:.1f} s, {workers} workers, {1000 * c_synth / n:.2f} CPU-ms/sample",
            ),
            (
                "pack",
                f"{res['pack_samples_per_s']:.0f} samples/s",
                f"{t_pack:.1f} s, {workers} workers, {1000 * c_pack / n:.2f} CPU-ms/sample",
            ),
            (
                "extract zips (original)",
                f"{n / t_extract:.0f} samples/s",
                f"pack/extract time {t_pack / t_extract:.2f}",
            ),
            ("source zips", f"{src_zips / 1e6:.1f} MB", f"+ csv {(src_all - src_zips) / 1e6:.1f} MB"),
            (
                "packed",
                f"{packed / 1e6:.1f} MB",
                f"packed/source zips {res['packed_over_source_zips']:.3f} (goal <= 0.8)",
            ),
            (
                "packed, bg per row",
                f"{(packed + per_row_bg) / 1e6:.1f} MB",
                f"de-dup saves {res['bg_dedup_saving_vs_bg_per_row']:.1%}",
            ),
        ]
        print(
            f"bench_synth_pack: {n} samples, {args.bgs} bgs, {args.fgs} fgs, load avg {os.getloadavg()[0]:.1f}"
        )
        print(f"{'what':<26}{'value':>18}  notes")
        for a, b, c in rows:
            print(f"{a:<26}{b:>18}  {c}")
        path = write_result("bench_synth_pack", res)
        print(f"wrote {path}")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
