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
        """URL of a file of this dataset; a path that would leave the dataset root is refused."""
        return storage.join_under(self.root, relpath, what="shard path") if self.root else relpath

    # ---- serialization -----------------------------------------------------------------------

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("root")
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, root: str = "") -> Manifest:
        """Parse and check a manifest; anything malformed is a one-line UserError naming the fix.

        Shard paths must be relative and stay inside `root` (a manifest is data, not a way to make
        a reader open /etc/passwd or another bucket).
        """
        where = storage.join(root, MANIFEST_NAME) if root else MANIFEST_NAME
        fix = f"re-pack it with `ray-mmd data pack SRC {root or 'DST'}`"

        def bad(problem: str) -> UserError:
            return UserError(f"{where} is not a valid ray-mmd manifest ({problem}): {fix}")

        try:
            d = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        except UnicodeDecodeError:
            raise bad("not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise bad(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(d, dict):
            raise bad(f"a JSON {type(d).__name__}, not an object")
        if "format_version" not in d:
            raise bad("no format_version; another tool's file?")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{where}: manifest format {d.get('format_version')!r} is not {FORMAT_VERSION}: {fix}"
            )
        for name, want in _FIELDS.items():
            if name not in d:
                raise bad(f"lacks {name!r}")
            if not _is(d[name], want):
                raise bad(f"{name!r} is {_tname(d[name])}, not {_tname_of(want)}")
        shards = [_shard(x, f"shards[{i}]", bad, root) for i, x in enumerate(d["shards"])]
        bg = _shard(d["bg"], "bg", bad, root)
        for i, q in enumerate(d.get("quarantine") or []):
            if not isinstance(q, dict) or not _is(q.get("sample_id"), int):
                raise bad(f"quarantine[{i}] has no integer sample_id")
        for k, v in d["split_counts"].items():
            if not _is(v, int):
                raise bad(f"split_counts[{k!r}] is {_tname(v)}, not an integer")
        for k, v in d["sizes"].items():
            if not (isinstance(v, list) and len(v) == 2 and all(_is(x, int) for x in v)):
                raise bad(f"sizes[{k!r}] is not [width, height]")
        for k, v in d["stats"].items():
            if not (isinstance(v, dict) and all(isinstance(v.get(m), list) for m in ("mean", "std"))):
                raise bad(f"stats[{k!r}] lacks mean/std lists")
        kw = {k: d[k] for k in _FIELDS}
        kw.update(shards=shards, bg=bg)
        for k in ("quarantine", "source", "format_version"):
            if k in d:
                kw[k] = d[k]
        if not isinstance(kw.get("quarantine", []), list) or not isinstance(kw.get("source", ""), str):
            raise bad("quarantine is not a list or source is not a string")
        return cls(**kw, root=root)

    def save(self, root: str) -> None:
        """Write manifest.json atomically; call this last, after every shard is verified."""
        storage.write_bytes_atomic(storage.join(root, MANIFEST_NAME), self.to_json().encode())


def load(root: str) -> Manifest:
    """Load DST/manifest.json; a dataset without one is incomplete (or not a packed dataset)."""
    url = storage.join(root, MANIFEST_NAME)
    # gs://: endpoint, credentials and bucket in seconds and one line, before gcsfs's retries
    storage.check_reachable(root, need_bucket=True, what="dataset URL")
    if not storage.exists(url):
        raise UserError(
            f"no {MANIFEST_NAME} at {root!r}: pack the dataset first with `ray-mmd data pack SRC {root}`"
        )
    try:
        raw = storage.read_bytes(url)
    except (OSError, ValueError) as e:  # a directory named manifest.json, no permission, ...
        raise UserError(f"cannot read {url!r} ({type(e).__name__}: {e}): check the dataset path") from None
    return Manifest.from_json(raw, root=root)


# required fields and their JSON types (bool is not a number here)
_FIELDS: dict[str, Any] = {
    "num_samples": int,
    "shards": list,
    "bg": dict,
    "split_seed": int,
    "test_fraction": (int, float),
    "split_counts": dict,
    "stats": dict,
    "sizes": dict,
}
_SHARD_FIELDS: dict[str, Any] = {
    "path": str,
    "rows": int,
    "first_id": int,
    "last_id": int,
    "sha256": str,
    "bytes": int,
}


def _is(v: Any, want: Any) -> bool:
    return isinstance(v, want) and not isinstance(v, bool)


def _tname(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def _tname_of(want: Any) -> str:
    return {int: "an integer", list: "a list", dict: "an object", str: "a string"}.get(want, "a number")


def _shard(x: Any, name: str, bad: Any, root: str) -> ShardInfo:
    if not isinstance(x, dict):
        raise bad(f"{name} is {_tname(x)}, not an object")
    for k, want in _SHARD_FIELDS.items():
        if k not in x:
            raise bad(f"{name} lacks {k!r}")
        if not _is(x[k], want):
            raise bad(f"{name}.{k} is {_tname(x[k])}, not {_tname_of(want)}")
    if x["rows"] < 0 or x["first_id"] < 0 or x["last_id"] < x["first_id"] - 1:
        raise bad(f"{name} has rows/id range {x['rows']}, {x['first_id']}..{x['last_id']}")
    # confined to the dataset root: checked here, once, so no reader ever opens a path outside it
    try:
        storage.join_under(root or "/dataset-root", x["path"], what="shard path")
    except UserError as e:
        where = storage.join(root, MANIFEST_NAME) if root else MANIFEST_NAME
        raise UserError(f"{where}: {name}: {e}") from None
    return ShardInfo(**{k: x[k] for k in _SHARD_FIELDS})


def is_test(sample_ids: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    """Seeded per-sample split (splitmix64 hash), independent of packing order and shard size."""
    with np.errstate(over="ignore"):
        z = sample_ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(1_000_000)).astype(np.float64) < test_fraction * 1_000_000
