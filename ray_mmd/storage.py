"""URL -> (filesystem, path) for every place a dataset or a run may live.

Local paths (a Colab Drive mount such as /content/drive/... is one), file://, memory://, gs://
(gcsfs; honours STORAGE_EMULATOR_HOST) and, with the `gdrive` extra, gdrive:// through PyDrive2.
Transient errors on gs:// are retried by gcsfs itself (6 tries with backoff); local filesystems
have no transient errors worth retrying.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec

from ray_mmd.errors import UserError

_SCHEMES = ("file", "memory", "gs", "gcs", "gdrive")


def _prepare_gcs_env() -> None:
    # Against an emulator, current gcsfs probes the bucket type over gRPC and waits 60 s per call;
    # the switch is read when gcsfs is first imported, so set it before that.
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def split_url(url: str) -> tuple[str, str]:
    """Return (scheme, path) with scheme "file" for plain local paths."""
    url = os.fspath(url)
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise UserError(
            f"unsupported storage URL {url!r}: use a local path, file://, memory://, gs:// or gdrive://"
        )
    if scheme == "file":
        return "file", os.path.abspath(rest)
    if scheme == "gcs":
        scheme = "gs"
    return scheme, rest.rstrip("/") if scheme != "memory" else "/" + rest.strip("/")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Turn a URL or path into an fsspec filesystem and the path inside it."""
    scheme, path = split_url(url)
    if scheme == "file":
        return fsspec.filesystem("file", auto_mkdir=True), path
    if scheme == "memory":
        return fsspec.filesystem("memory"), path
    if scheme == "gs":
        _prepare_gcs_env()
        try:
            import gcsfs
        except ImportError as e:  # pragma: no cover - gcsfs is a core dependency
            raise UserError("gs:// needs gcsfs: pip install gcsfs") from e
        kw: dict[str, Any] = {}
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            kw["token"] = "anon"  # the emulator takes no credentials
        return gcsfs.GCSFileSystem(**kw), path
    # gdrive://
    try:
        from pydrive2.fs import GDriveFileSystem
    except ImportError as e:
        raise UserError(
            f"{url!r} needs the optional gdrive extra: pip install 'ray-mmd[gdrive]' "
            "(on Colab, use the mounted path /content/drive/... instead)"
        ) from e
    root = path.split("/", 1)[0]
    return GDriveFileSystem(root), path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path, keeping its scheme."""
    url = os.fspath(url)
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts) if rest else f"{scheme}://" + "/".join(parts)
    return os.path.join(url, *parts)


def pyarrow_filesystem(url: str):
    """A pyarrow filesystem + path for Ray (RunConfig.storage_filesystem, read_parquet)."""
    import pyarrow.fs as pafs

    scheme, path = split_url(url)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(url: str) -> bool:
    """True if the URL names an existing file or directory; storage failures become a UserError."""
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except Exception as e:
        raise UserError(
            f"cannot reach {url!r} ({type(e).__name__}: {e}); check the URL and credentials"
        ) from e


def require(url: str, what: str) -> None:
    """Raise a one-line UserError unless `url` exists (a missing gs:// bucket included)."""
    scheme, path = split_url(url)
    if scheme == "gs":
        bucket = path.split("/", 1)[0]
        if not exists(f"gs://{bucket}"):
            raise UserError(f"bucket gs://{bucket} does not exist: create it or fix the {what} URL")
    if not exists(url):
        raise UserError(f"{what} not found at {url!r}: check the path")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write so that readers see either nothing or the whole file (temp name, then rename).

    On gs:// an object upload is already atomic, so it is written in place.
    """
    fs, path = filesystem(url)
    scheme, _ = split_url(url)
    parent = posixpath.dirname(path)
    if parent and scheme != "gs":
        fs.makedirs(parent, exist_ok=True)
    if scheme == "gs":
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def remove(url: str) -> None:
    """Delete a file if it is there."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm_file(path)
