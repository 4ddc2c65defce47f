"""Where a pack writes: a destination that holds another dataset, another tool's manifest or unrelated files
is refused (unless --overwrite), shards a smaller re-pack no longer lists are removed, and no older manifest
vouches for a destination being rewritten."""

from __future__ import annotations

import json
import os
import posixpath
import re

from ray_mmd import storage
from ray_mmd.data import manifest as mf
from ray_mmd.errors import UserError

SHARD_DIR = "shards"
QUARANTINE_NAME = "quarantine.json"
_OURS = {mf.MANIFEST_NAME, mf.BG_NAME, QUARANTINE_NAME, SHARD_DIR}  # what a pack writes at the top
_SHARD_FILE = re.compile(r"^shard-(\d{5})\.(parquet|json)$")


def _same_source(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.rstrip("/")
        return os.path.abspath(os.path.expanduser(u)) if "://" not in u else u

    return norm(a) == norm(b)


def check_destination(src_url: str | None, dst_url: str) -> None:
    """Refuse a destination that holds anything but an earlier (or partial) pack of this same source:
    another dataset, another tool's manifest.json, or unrelated files (`--overwrite` skips this).
    `src_url` None: any earlier ray-mmd pack may be replaced (make_synthetic's source is a new temp dir)."""
    fix = "pack into a new folder, or pass --overwrite to replace it"
    fs, root = storage.filesystem(dst_url)
    try:
        if not fs.exists(root):
            return
        if not fs.isdir(root):
            raise UserError(
                f"destination {dst_url!r} is a file, not a folder: choose a folder for the dataset"
            )
        names = {posixpath.basename(e.rstrip("/")) for e in fs.ls(root, detail=False)}
    except OSError as e:
        raise UserError(f"cannot read the destination {dst_url!r} ({e}): choose a readable folder") from None
    man_url = storage.join(dst_url, mf.MANIFEST_NAME)
    if mf.MANIFEST_NAME in names:
        try:
            prior = mf.Manifest.from_json(storage.read_bytes(man_url), root=dst_url)
        except (UserError, OSError, ValueError):
            raise UserError(f"{man_url} is not a ray-mmd manifest (another tool's file?): {fix}") from None
        if src_url and prior.source and not _same_source(prior.source, src_url):
            raise UserError(f"{dst_url!r} holds a different dataset (packed from {prior.source!r}): {fix}")
        return
    foreign = sorted(n for n in names if n not in _OURS and ".tmp-" not in n)
    if foreign:
        raise UserError(f"{dst_url!r} is not empty and holds no ray-mmd dataset (e.g. {foreign[0]!r}): {fix}")
    if src_url and SHARD_DIR in names:  # a partial pack: its sidecars say which source it was
        for e in sorted(fs.ls(posixpath.join(root, SHARD_DIR), detail=False)):
            if e.endswith(".json") and _SHARD_FILE.match(posixpath.basename(e)):
                try:
                    src = json.loads(fs.cat_file(e)).get("key", {}).get("src", "")
                except (OSError, ValueError, AttributeError):
                    continue
                if src and not _same_source(src, src_url):
                    raise UserError(
                        f"{dst_url!r} holds part of a different dataset (packed from {src!r}): {fix}"
                    )
                break


def remove_stale_shards(dst_url: str, keep: set[int]) -> None:
    """Shards (and sidecars) of an earlier, larger pack that the new manifest no longer lists."""
    fs, root = storage.filesystem(storage.join(dst_url, SHARD_DIR))
    if not fs.exists(root):
        return
    for e in fs.ls(root, detail=False):
        m = _SHARD_FILE.match(posixpath.basename(e.rstrip("/")))
        if m and int(m.group(1)) not in keep:
            fs.rm_file(e)


def prepare_destination(dst_url: str) -> None:
    """The destination exists and is writable, and no older manifest vouches for it any more."""
    if storage.split_url(dst_url)[0] == "gs":
        bucket = storage.split_url(dst_url)[1].split("/", 1)[0]
        if not storage.exists(f"gs://{bucket}"):
            raise UserError(f"bucket gs://{bucket} does not exist: create it or fix the destination URL")
    fs, root = storage.filesystem(dst_url)
    _, man_path = storage.filesystem(storage.join(dst_url, mf.MANIFEST_NAME))
    try:
        fs.makedirs(root, exist_ok=True)
        # an older manifest must not vouch for a destination that is being rewritten
        if fs.exists(man_path):
            fs.rm(man_path)
    except OSError as e:
        raise UserError(f"cannot write to {dst_url!r} ({e}): choose a writable destination") from e
