"""Same-node decode units through /dev/shm: files this process makes, lends to a decode actor on this
node (which decodes straight into them) and reuses, so a unit reaches the batch without the object
store's copy. Used by data/ray_decoder.py."""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterable

import numpy as np
import torch

from ray_mmd.data.transforms import KEYS

log = logging.getLogger(__name__)

SHM = "/dev/shm"  # same-node units travel through files here (tmpfs), not through the object store
SHM_PREFIX = "ray-mmd-unit-"


def unit_bytes(n: int, shapes: dict[str, tuple[int, int]]) -> int:
    return n * sum(h * w * (3 if k == "fg_bg" else 1) for k, (h, w) in shapes.items())


def wire_views(buf, n: int, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """A unit's wire arrays (fg_bg n×H×W×3, mask, depth) back to back in one buffer, as numpy views."""
    out, o = {}, 0
    for k in KEYS:
        shape = (n, *shapes[k], 3) if k == "fg_bg" else (n, *shapes[k])
        out[k] = np.frombuffer(buf, np.uint8, int(np.prod(shape)), o).reshape(shape)
        o += out[k].nbytes
    return out


def map_slot(path: str, size: int) -> mmap.mmap:
    """A shared, writable mapping of a unit file, its pages faulted in by one call (MAP_POPULATE)."""
    fd = os.open(path, os.O_RDWR)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def sweep_unit_files() -> None:
    """Remove unit files left by consumers that died (their pid is in the name) before unlinking them."""
    try:
        names = os.listdir(SHM)
    except OSError:
        return
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        try:
            os.kill(int(name[len(SHM_PREFIX) :].split("-")[0]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM, name))
        except (ValueError, PermissionError):  # not ours to judge
            continue


def _unlink(paths: Iterable[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class UnitSlots:
    """This process's unit files under /dev/shm for one decoder, each mapped once and reused: a fresh
    tmpfs page costs ~1 µs to fault in and zero here (21 MB: 20 ms, about what decoding 64 samples at
    224 costs), so a file per unit would cost more than the copies it saves. A slot is the memory of
    the tensors made from it (a whole-batch unit becomes the batch, zero_copy) and comes back here
    when the last of them is gone (a finalizer on their one numpy base)."""

    def __init__(self, sid: int) -> None:
        self.prefix = os.path.join(SHM, f"{SHM_PREFIX}{os.getpid()}-{sid}-")
        self.free: list[tuple[str, int, mmap.mmap]] = []
        self.made = itertools.count()
        self.retired: list[str] = []  # unlinked here; actors still to be told to drop their mapping
        self.maps: dict[str, mmap.mmap] = {}  # every file made and not unlinked yet
        self.mu = threading.Lock()  # slots come back from whichever thread drops a batch
        self.full = False  # /dev/shm refused a slot once (warned)
        weakref.finalize(self, _unlink, self.maps)  # also at exit: no file outlives this process

    def take(self, size: int) -> tuple[str, int, mmap.mmap] | None:
        """A free slot of at least `size` bytes, or None when /dev/shm has no room for a new one (a
        container's 64 MB default): that unit then comes through the object store."""
        with self.mu:
            for i, (_, n, _) in enumerate(self.free):
                if n >= size:
                    return self.free.pop(i)
            path = f"{self.prefix}{next(self.made)}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # reserve the pages now: a full tmpfs fails here, not with SIGBUS in an actor's write
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                _unlink([path])
                if not self.full:
                    log.warning(
                        "/dev/shm has no room for a %d-byte decode slot (%s): units come through "
                        "Ray's object store instead (slower); give /dev/shm more space",
                        size,
                        e,
                    )
                self.full = True
                return None
            finally:
                os.close(fd)
            self.maps[path] = map_slot(path, size)
            return path, size, self.maps[path]

    def give(self, slot: tuple[str, int, mmap.mmap]) -> None:
        with self.mu:
            if slot[0] in self.maps:  # else closed meanwhile: its file is gone
                self.free.append(slot)

    def lend(self, slot: tuple[str, int, mmap.mmap], n: int, shapes: dict) -> dict[str, torch.Tensor]:
        """A unit's rows as tensors over its slot; the slot is free again once they all are gone."""
        base = np.frombuffer(slot[2], np.uint8, unit_bytes(n, shapes))
        weakref.finalize(base, self.give, slot)
        return {k: torch.from_numpy(v) for k, v in wire_views(base, n, shapes).items()}

    def retire(self, slot: tuple[str, int, mmap.mmap]) -> None:
        """A slot an actor may still write into (a unit abandoned while it ran): never lent again."""
        with self.mu:
            _unlink({slot[0]})
            self.maps.pop(slot[0], None)
            self.retired.append(slot[0])

    def close(self) -> list[str]:
        """Unlink every file, lent ones too (their pages stay while mapped); returns the paths actors
        may hold mapped. Slots lent before this are dropped when they come back."""
        with self.mu:
            out = [*self.maps, *self.retired]
            _unlink(self.maps)
            self.maps.clear()
            self.free, self.retired = [], []
            return out
