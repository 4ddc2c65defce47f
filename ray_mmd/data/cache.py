"""Selective preload: a node-local, byte-budgeted, sha256-verified LRU cache of shard files.

Several processes on one node may share a cache dir: budget bookkeeping and eviction happen under an
flock on DIR/.lock, downloads go to per-process temp names (their expected size counts against the
budget while in flight) and are renamed into place only after their sha256 matches the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ray_mmd import storage
from ray_mmd.data.manifest import ShardInfo
from ray_mmd.errors import UserError

log = logging.getLogger(__name__)

_PART = ".part-"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    """Shard files copied from (possibly remote) storage to a local dir, at most `budget_bytes` on disk.

    `get` returns a verified local path (fetching on a miss); `prefetch` fetches in the background
    without evicting the protected set. Counters: hits, misses, evictions, refetches (corrupt cached
    copy or bad download), prefetched, prefetch_skipped (would not fit), bypassed (read in place
    because the budget was full of in-flight downloads).
    """

    def __init__(self, cache_dir: str, budget_bytes: int, threads: int = 4) -> None:
        self.dir = os.path.abspath(cache_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.budget = int(budget_bytes)
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}
        self._mu = threading.Lock()
        self.counters = dict.fromkeys(
            ("hits", "misses", "evictions", "refetches", "prefetched", "prefetch_skipped", "bypassed"), 0
        )

    # ---- public ------------------------------------------------------------------------------

    def local_path(self, shard: ShardInfo) -> str:
        # Keyed by content hash, so two datasets (or two versions of one) never collide.
        return os.path.join(self.dir, f"{shard.sha256[:20]}-{os.path.basename(shard.path)}")

    def contains(self, shard: ShardInfo) -> bool:
        return os.path.exists(self.local_path(shard))

    def get(self, url: str, shard: ShardInfo) -> str | None:
        """A verified local copy of `shard` (fetched from `url` on a miss), or None to read in place."""
        path = self.local_path(shard)
        with self._mu:
            fut = self._inflight.get(path)
        if fut is not None:
            fut.result()  # a prefetch of this shard is running: wait for it instead of fetching twice
        if os.path.exists(path):
            if self._verify(path, shard):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path)  # LRU clock
                self._count("hits")
                return path
            log.warning("cached shard %s is corrupt; fetching it again", path)
            self._count("refetches")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._count("misses")
        return self._fetch(url, shard, protect=(), may_bypass=True)

    def prefetch(
        self, items: Iterable[tuple[str, ShardInfo]], protect: Iterable[ShardInfo] = ()
    ) -> list[Future]:
        """Fetch shards in the background, in the given order, never evicting `protect`."""
        keep = {self.local_path(s) for s in protect}
        futs = []
        for url, shard in items:
            path = self.local_path(shard)
            keep.add(path)
            with self._mu:
                if path in self._inflight or os.path.exists(path):
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="shard-prefetch")
                fut = self._pool.submit(self._prefetch_one, url, shard, frozenset(keep))
                self._inflight[path] = fut
            fut.add_done_callback(lambda _f, p=path: self._done(p))
            futs.append(fut)
        return futs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ---- internals ---------------------------------------------------------------------------

    def _count(self, k: str, n: int = 1) -> None:
        with self._mu:
            self.counters[k] += n

    def _done(self, path: str) -> None:
        with self._mu:
            self._inflight.pop(path, None)

    def _verify(self, path: str, shard: ShardInfo) -> bool:
        try:
            return os.path.getsize(path) == shard.bytes and sha256_file(path) == shard.sha256
        except FileNotFoundError:
            return False

    def _prefetch_one(self, url: str, shard: ShardInfo, keep: frozenset[str]) -> None:
        try:
            if self._fetch(url, shard, protect=keep, may_bypass=False) is None:
                self._count("prefetch_skipped")
            else:
                self._count("prefetched")
        except Exception:  # a failed prefetch is retried (and reported) by the reader's get()
            log.warning("prefetch of %s failed", url, exc_info=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(os.path.join(self.dir, ".lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _entries(self) -> list[tuple[str, int, float]]:
        """(path, bytes counted against the budget, mtime) of finished files and in-flight downloads."""
        out = []
        for name in os.listdir(self.dir):
            if name.startswith("."):
                continue
            p = os.path.join(self.dir, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if _PART in name:  # NAME.part-PID-TOKEN-EXPECTEDBYTES
                try:
                    pid, _, expected = name.split(_PART, 1)[1].split("-")
                    if not _pid_alive(int(pid)):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(p)  # left by a dead process
                        continue
                    out.append((p, max(int(expected), st.st_size), float("inf")))
                except ValueError:
                    continue
            else:
                out.append((p, st.st_size, st.st_mtime))
        return out

    def _reserve(self, need: int, part: str, protect: Iterable[str], evict_protected: bool) -> bool:
        """Under the lock: evict LRU files until `need` fits, then create the temp file. False = no room."""
        if need > self.budget:
            raise UserError(
                f"a shard of {need} bytes does not fit cache_bytes={self.budget}: raise cache_bytes "
                "or re-pack with smaller shards"
            )
        protect = set(protect)
        with self._locked():
            entries = self._entries()
            used = sum(b for _, b, _ in entries)
            victims = sorted((e for e in entries if e[2] != float("inf")), key=lambda e: e[2])
            if not evict_protected:
                victims = [e for e in victims if e[0] not in protect]
            else:  # protected ones last
                victims.sort(key=lambda e: e[0] in protect)
            for p, b, _ in victims:
                if used + need <= self.budget:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)  # readers that already opened it keep reading (POSIX)
                    used -= b
                    self._count("evictions")
            if used + need > self.budget:
                return False
            open(part, "wb").close()
            return True

    def _fetch(self, url: str, shard: ShardInfo, protect: Iterable[str], may_bypass: bool) -> str | None:
        path = self.local_path(shard)
        part = f"{path}{_PART}{os.getpid()}-{uuid.uuid4().hex[:8]}-{shard.bytes}"
        deadline = time.monotonic() + 30
        while not self._reserve(shard.bytes, part, protect, evict_protected=may_bypass):
            if not may_bypass:
                return None
            if os.path.exists(path):  # another process finished it meanwhile
                return path
            if time.monotonic() > deadline:
                self._count("bypassed")
                return None  # budget full of other processes' downloads: read in place
            time.sleep(0.05)
        try:
            for attempt in range(2):
                fs, src = storage.filesystem(url)
                fs.get_file(src, part)
                if self._verify(part, shard):
                    os.replace(part, path)  # atomic: readers see a whole, verified file or none
                    return path
                if attempt == 0:
                    log.warning("shard %s failed its sha256 check; fetching it again", url)
                    self._count("refetches")
            raise UserError(
                f"shard {url} does not match the sha256 in its manifest after a re-fetch: "
                "the dataset is corrupt, re-pack it"
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
