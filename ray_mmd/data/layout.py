"""Read the MonoMaskDepth layout (index CSV + zips) in place through fsspec: no extraction to disk.

Zip member names are only ever lookup keys, never filesystem paths (no zip-slip), and a member's declared
and actual decompressed sizes are bounded (no zip bomb). Per-sample faults raise `SampleError` (the packer
quarantines them); problems with the dataset as a whole raise `UserError`.
"""

from __future__ import annotations

import csv
import io
import posixpath
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg

from ray_mmd import storage
from ray_mmd.errors import UserError

COLUMNS = (
    "ImageName",
    "MaskName",
    "Depthname",
    "BGImageName",
    "BaseImageFName",
    "DepthImageFName",
    "BGType",
    "BGImageFName",
)
DEFAULT_CSV = "index.csv"
MAX_MEMBER_BYTES = 16 << 20  # a 250x250 JPEG is ~10-30 KB; anything near this is not an image of ours
_OPEN_ZIPS = 16


class SampleError(ValueError):
    """One sample (or one member) is unusable; the message is the reason listed in the quarantine.

    `kind` groups reasons for summaries: missing, empty, oversize, corrupt, shape, bg, row.
    """

    def __init__(self, reason: str, kind: str = "corrupt") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Row:
    image_name: str
    mask_name: str
    depth_name: str
    bg_name: str
    base_zip: str
    depth_zip: str
    bg_type: str
    bg_zip: str


# ---- decode by content -----------------------------------------------------------------------


def sniff(data: bytes) -> str:
    """Image format from magic bytes (the member's extension is not trusted)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"GIF8":
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def probe(data: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, channels) from the header alone; raises SampleError."""
    kind = sniff(data)
    if not data:
        raise SampleError("zero-byte image", "empty")
    if kind == "jpeg":
        try:
            h, w, cs, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise SampleError(f"bad JPEG header ({e})") from e
        return kind, w, h, 1 if cs.lower() == "gray" else 3
    if kind == "unknown":
        raise SampleError("not an image (unknown magic bytes)", "corrupt")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return kind, im.width, im.height, 1 if im.mode in ("L", "1", "I", "F") else 3
    except Exception as e:
        raise SampleError(f"bad {kind} ({e})") from e


def decode(data: bytes) -> np.ndarray:
    """Decode image bytes by content: HxW uint8 for grayscale, HxWx3 uint8 for colour. Raises SampleError."""
    kind, _, _, ch = probe(data)
    if kind == "jpeg":
        try:  # strict: a truncated or corrupt stream is an error, not a grey smear
            a = simplejpeg.decode_jpeg(data, colorspace="GRAY" if ch == 1 else "RGB", strict=True)
        except ValueError as e:
            raise SampleError(f"corrupt JPEG ({e})") from e
        return a[..., 0] if ch == 1 else a
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("L" if ch == 1 else "RGB"))
    except Exception as e:
        raise SampleError(f"corrupt {kind} ({e})") from e


# ---- zips ------------------------------------------------------------------------------------


class ZipReader:
    """Member bytes from zips under one root URL, keeping a few zips open (random access, no extraction)."""

    def __init__(self, root_url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> None:
        self.root = root_url
        self.max_member_bytes = max_member_bytes
        self._open: OrderedDict[str, tuple[Any, zipfile.ZipFile]] = OrderedDict()
        self._basenames: dict[str, dict[str, str]] = {}
        self._failed: dict[str, tuple[str, str]] = {}

    def __getstate__(self) -> dict:  # picklable for worker processes: reopen there
        return {"root": self.root, "max_member_bytes": self.max_member_bytes}

    def __setstate__(self, d: dict) -> None:
        self.__init__(d["root"], d["max_member_bytes"])

    def _zip(self, zip_name: str) -> zipfile.ZipFile:
        if zip_name in self._open:
            self._open.move_to_end(zip_name)
            return self._open[zip_name][1]
        if zip_name in self._failed:
            raise SampleError(*self._failed[zip_name])
        if not zip_name:
            raise SampleError("empty zip name in CSV", "row")
        url = storage.join(self.root, zip_name)
        fs, path = storage.filesystem(url)
        try:
            f = fs.open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._failed[zip_name] = (f"zip {zip_name} not found", "missing")
            raise SampleError(*self._failed[zip_name]) from None
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            f.close()
            self._failed[zip_name] = (f"zip {zip_name} unreadable ({type(e).__name__})", "corrupt")
            raise SampleError(*self._failed[zip_name]) from None
        self._open[zip_name] = (f, zf)
        while len(self._open) > _OPEN_ZIPS:
            _, (of, ozf) = self._open.popitem(last=False)
            ozf.close()
            of.close()
        return zf

    def names(self, zip_name: str) -> list[str]:
        return self._zip(zip_name).namelist()

    def read(self, zip_name: str, member: str) -> bytes:
        """Bytes of one member; SampleError if missing, empty, corrupt or larger than the bound."""
        zf = self._zip(zip_name)
        try:
            info = zf.getinfo(member)
        except KeyError:
            # the CSV may name a member without the folder it sits in inside the zip
            idx = self._basenames.get(zip_name)
            if idx is None:
                idx = {}
                for n in zf.namelist():
                    idx.setdefault(posixpath.basename(n), n)
                self._basenames[zip_name] = idx
            real = idx.get(posixpath.basename(member))
            if real is None:
                raise SampleError(f"member {member} missing from {zip_name}", "missing") from None
            info = zf.getinfo(real)
        if info.file_size > self.max_member_bytes:
            raise SampleError(
                f"member {member} declares {info.file_size} bytes (> {self.max_member_bytes} limit)",
                "oversize",
            )
        try:
            with zf.open(info) as f:
                data = f.read(self.max_member_bytes + 1)  # bounded even if the header lies
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
            raise SampleError(f"member {member} in {zip_name} corrupt ({e})") from None
        if len(data) > self.max_member_bytes:
            raise SampleError(f"member {member} inflates past {self.max_member_bytes} bytes", "oversize")
        if not data:
            raise SampleError(f"member {member} in {zip_name} is zero bytes", "empty")
        return data

    def close(self) -> None:
        for f, zf in self._open.values():
            zf.close()
            f.close()
        self._open.clear()


# ---- the layout --------------------------------------------------------------------------------


def _find_csv(url: str) -> str:
    if url.lower().endswith(".csv"):
        storage.require(url, "index CSV")
        return url
    storage.require(url, "dataset")
    fs, path = storage.filesystem(url)
    try:
        if fs.isfile(path):
            raise UserError(
                f"{url!r} is a file, not a dataset directory or .csv: pass the folder holding the CSV"
            )
        if fs.exists(posixpath.join(path, DEFAULT_CSV)):
            return storage.join(url, DEFAULT_CSV)
        csvs = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(".csv"))
    except OSError as e:
        raise UserError(f"cannot list {url!r} ({e}): check the URL and permissions") from e
    if len(csvs) != 1:
        found = ", ".join(posixpath.basename(c) for c in csvs) or "none"
        raise UserError(f"expected one index .csv in {url!r} (found {found}): pass the CSV's URL directly")
    return storage.join(url, posixpath.basename(csvs[0]))


class Layout:
    """One MonoMaskDepth dataset read in place: `len()`, rows by index or range, member bytes, decode."""

    def __init__(self, url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> None:
        self.url = url
        self.csv_url = _find_csv(url)
        self.root = self.csv_url.rsplit("/", 1)[0] if "/" in self.csv_url else "."
        try:
            text = storage.read_bytes(self.csv_url).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{self.csv_url!r} is not a UTF-8 CSV: point at the dataset's index CSV") from e
        except OSError as e:
            raise UserError(f"cannot read {self.csv_url!r} ({e}): check the URL and permissions") from e
        reader = csv.reader(io.StringIO(text))
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"{self.csv_url!r} lacks column(s) {', '.join(missing)}: a MonoMaskDepth CSV has {', '.join(COLUMNS)}"
            )
        pos = [header.index(c) for c in COLUMNS]
        width = max(pos) + 1
        self._rows: list[tuple[str, ...]] = [
            tuple(r[p].strip() for p in pos) if len(r) >= width else tuple([""] * len(COLUMNS))
            for r in reader
            if r
        ]
        self.zips = ZipReader(self.root, max_member_bytes)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int | slice) -> Row | list[Row]:
        if isinstance(i, slice):
            return [Row(*r) for r in self._rows[i]]
        return Row(*self._rows[i])

    def rows(self, lo: int = 0, hi: int | None = None) -> list[Row]:
        return self[lo:hi]  # type: ignore[return-value]

    def member(self, zip_name: str, member: str) -> bytes:
        return self.zips.read(zip_name, member)

    def sample_bytes(self, i: int) -> dict[str, bytes]:
        """Encoded bytes of sample i: fg_bg, mask, depth, bg (SampleError on any fault)."""
        return read_sample(self.zips, self[i])  # type: ignore[arg-type]

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Decoded sample i: fg_bg/bg HxWx3, mask/depth HxW, uint8."""
        return {k: decode(v) for k, v in self.sample_bytes(i).items()}

    def close(self) -> None:
        self.zips.close()


def read_sample(zips: ZipReader, row: Row) -> dict[str, bytes]:
    if not (row.image_name and row.base_zip):
        raise SampleError("CSV row is incomplete", "row")
    return {
        "fg_bg": zips.read(row.base_zip, row.image_name),
        "mask": zips.read(row.base_zip, row.mask_name),
        "depth": zips.read(row.depth_zip, row.depth_name),
        "bg": zips.read(row.bg_zip, row.bg_name),
    }
