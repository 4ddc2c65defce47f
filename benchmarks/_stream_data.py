"""Datasets and result writing shared by the input-stream benchmarks (bench_input, bench_resume, bench_memory)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_mmd import storage  # noqa: E402
from ray_mmd.data import manifest as mf  # noqa: E402


def write_json(name: str, payload: dict[str, Any]) -> None:
    try:
        from benchmarks._common import write_result  # the models engineer's shared writer, if present
    except Exception:
        out = ROOT / "benchmarks" / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))
        return
    write_result(name, payload)


def source_and_pack(work: str, samples: int, shard_size: int) -> tuple[str, str]:
    """A synthetic source in the original layout plus its packed form (same samples): (src, packed)."""
    from ray_mmd.data import synth
    from ray_mmd.data.pack import pack

    src, dst = os.path.join(work, "src"), os.path.join(work, "packed")
    synth.generate(src, samples, seed=0)
    pack(src, dst, shard_size=shard_size, test_fraction=0.0)
    return src, dst


def replicate(base: str, dst_url: str, samples: int) -> mf.Manifest:
    """A packed dataset of `samples` real samples made cheaply: the base's shards again and again with
    fresh sample ids (same JPEG bytes), real parquet, real sha256, written to any URL."""
    man = mf.load(base)
    tables = [pq.read_table(os.path.join(base, s.path)) for s in man.shards]
    fs, root = storage.filesystem(dst_url)
    shards: list[mf.ShardInfo] = []
    next_id = 0
    k = 0
    while next_id < samples:
        t = tables[k % len(tables)]
        n = min(t.num_rows, samples - next_id)
        t = t.slice(0, n).set_column(0, "sample_id", pa.array(np.arange(next_id, next_id + n), pa.int64()))
        buf = io.BytesIO()
        pq.write_table(t, buf)
        data = buf.getvalue()
        rel = f"shards/shard-{k:05d}.parquet"
        fs.pipe_file(f"{root}/{rel}", data)
        shards.append(
            mf.ShardInfo(rel, n, next_id, next_id + n - 1, hashlib.sha256(data).hexdigest(), len(data))
        )
        next_id += n
        k += 1
    bg = fs.pipe_file(f"{root}/{man.bg.path}", open(os.path.join(base, man.bg.path), "rb").read())
    del bg
    ids = np.arange(samples)
    nt = int(mf.is_test(ids, man.split_seed, man.test_fraction).sum())
    out = dataclasses.replace(
        man,
        num_samples=samples,
        shards=shards,
        split_counts={"train": samples - nt, "test": nt},
        quarantine=[],
    )
    out.save(dst_url)
    return mf.load(dst_url)


def table(rows: list[tuple]) -> None:
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
