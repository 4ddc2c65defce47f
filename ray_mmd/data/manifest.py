"""The packed dataset's manifest: schema, load/save, splits and chunks (sample-id ranges).

Layout of a packed dataset at DST:
    DST/manifest.json                  written last and atomically (its presence = dataset complete)
    DST/bg.parquet                     bg images once: bg_id:int32, name:str, bg_type:str, image:binary
    DST/shards/shard-00000.parquet     SHARD_SCHEMA rows sorted by sample_id

`sample_id` is the row index in the source CSV, so ids are stable across re-packs; quarantined rows
leave gaps. The split of a sample is a pure function of (split seed, sample_id), so the ids of any
chunk and split are known from the manifest alone, without opening a shard.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ray_mmd import storage
from ray_mmd.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BG_NAME = "bg.parquet"

SHARD_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("fg_bg", pa.binary()),  # encoded JPEG bytes exactly as in the source zip
        ("mask", pa.binary()),
        ("depth", pa.binary()),
        ("bg_id", pa.int32()),  # row in bg.parquet
        ("bg_type", pa.string()),
        ("image_name", pa.string()),
        ("mask_name", pa.string()),
        ("depth_name", pa.string()),
        ("bg_name", pa.string()),
    ]
)
BG_SCHEMA = pa.schema(
    [("bg_id", pa.int32()), ("name", pa.string()), ("bg_type", pa.string()), ("image", pa.binary())]
)


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root
    rows: int
    first_id: int
    last_id: int  # inclusive
    sha256: str
    bytes: int


@dataclass
class Manifest:
    num_samples: int  # packed (good) samples
    shards: list[ShardInfo]
    bg: ShardInfo  # bg.parquet (first_id/last_id = bg_id range)
    split_seed: int
    test_fraction: float
    split_counts: dict[str, int]
    # stats in [0,1] pixel units: {"fg_bg": {"mean": [r,g,b], "std": [...]}, "bg": ..., "mask": {"mean": [m],
    # "std": [s]}, "depth": ...}
    stats: dict[str, dict[str, list[float]]]
    # (width, height) of each image kind in the source: fg_bg/bg/mask 250x250, depth 320x240
    sizes: dict[str, list[int]]
    # [{"sample_id": int, "name": str, "reason": str}] rows left out of the shards
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    format_version: int = FORMAT_VERSION
    root: str = ""  # where it was loaded from; not serialized

    # ---- splits and chunks -------------------------------------------------------------------

    def split_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """Boolean array: True where the sample is in the test split."""
        return is_test(np.asarray(sample_ids, dtype=np.int64), self.split_seed, self.test_fraction)

    def sample_ids(self, split: str = "all", lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Sorted int64 ids of packed samples in [lo, hi) that belong to `split` ("train"/"test"/"all")."""
        hi = self.id_end if hi is None else hi
        parts = [
            np.arange(max(s.first_id, lo), min(s.last_id + 1, hi), dtype=np.int64)
            for s in self.shards_overlapping(lo, hi)
        ]
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        bad = np.fromiter((q["sample_id"] for q in self.quarantine), np.int64)
        if bad.size:
            ids = ids[~np.isin(ids, bad)]
        if split == "all":
            return ids
        if split not in ("train", "test"):
            raise UserError(f"unknown split {split!r}: use 'train', 'test' or 'all'")
        test = self.split_of(ids)
        return ids[test] if split == "test" else ids[~test]

    def shards_overlapping(self, lo: int, hi: int) -> list[ShardInfo]:
        """Shards holding any sample id in [lo, hi) — the only ones a chunk reads."""
        return [s for s in self.shards if s.first_id < hi and s.last_id >= lo]

    @property
    def id_end(self) -> int:
        return max((s.last_id + 1 for s in self.shards), default=0)

    def url(self, relpath: str) -> str:
        return storage.join(self.root, relpath)

    # ---- serialization -----------------------------------------------------------------------

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("root")
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, root: str = "") -> Manifest:
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"manifest format {d.get('format_version')} is not {FORMAT_VERSION}: re-pack with `ray-mmd data pack`"
            )
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        d["bg"] = ShardInfo(**d["bg"])
        return cls(**d, root=root)

    def save(self, root: str) -> None:
        """Write manifest.json atomically; call this last, after every shard is verified."""
        storage.write_bytes_atomic(storage.join(root, MANIFEST_NAME), self.to_json().encode())


def load(root: str) -> Manifest:
    """Load DST/manifest.json; a dataset without one is incomplete (or not a packed dataset)."""
    url = storage.join(root, MANIFEST_NAME)
    if not storage.exists(url):
        raise UserError(
            f"no {MANIFEST_NAME} at {root!r}: pack the dataset first with `ray-mmd data pack SRC {root}`"
        )
    return Manifest.from_json(storage.read_bytes(url).decode(), root=root)


def is_test(sample_ids: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    """Seeded per-sample split (splitmix64 hash), independent of packing order and shard size."""
    with np.errstate(over="ignore"):
        z = sample_ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(1_000_000)).astype(np.float64) < test_fraction * 1_000_000
