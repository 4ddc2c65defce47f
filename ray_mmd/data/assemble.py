"""Batch assembly: one rank batch's buffer filled unit by unit from rows decoded elsewhere, rows the
decoded preload holds and rows decoded here, with units decoding ahead of the consumer; samples that
failed to decode (or whose bg image did not) are taken out and reported."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import torch

from ray_mmd.data.decoders import Decoder, decode_unit
from ray_mmd.data.manifest import Manifest
from ray_mmd.data.order import Plan, Unit
from ray_mmd.data.preload import LocalDecoded, SharedDecoded
from ray_mmd.data.shards import ShardTables
from ray_mmd.data.transforms import KEYS, alloc_wire, bg_table

Preload = LocalDecoded | SharedDecoded


class Assembler:
    """Turns planned batches into wire batches for one stream (its tables, decoder and buffer shapes);
    `count(name, n)` receives the "decoded" and "preload_hits" counts."""

    def __init__(
        self,
        man: Manifest,
        tables: ShardTables,
        decoder: Decoder,
        shapes: dict[str, tuple[int, int]],
        size: int,
        lib: str,
        unit_samples: int,
        pin_memory: bool,
        count: Callable[[str, int], None],
    ) -> None:
        self.man, self.tables, self.decoder, self.shapes = man, tables, decoder, shapes
        self.size, self._lib, self.unit_samples, self.pin_memory = size, lib, unit_samples, pin_memory
        self.count = count
        self._shards = dict(enumerate(man.shards))

    def _fill_unit(
        self,
        u: Unit,
        view: dict[str, np.ndarray],
        pre: Preload | None,
        decoded: dict | None = None,
        decoded_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """Fill `view` (unit u's rows of its batch buffer): rows decoded elsewhere (`decoded`,
        `decoded_rows`), then rows the decoded preload holds, then decode whatever is left here.

        Returns (bg_id, reason per row).
        """
        n = len(u.ids)
        bg_id, reasons = np.zeros(n, np.int64), [""] * n
        have, fresh = np.zeros(n, bool), np.zeros(n, bool)

        def take(where: np.ndarray, d: dict) -> None:
            bg_id[where] = d["bg_id"]
            for i, r in zip(where, d["reason"], strict=True):
                reasons[i] = str(r)
            have[where] = fresh[where] = True
            self.count("decoded", len(where))

        if decoded is not None:
            where = np.nonzero(decoded_rows)[0]
            for k in KEYS:
                src = np.asarray(decoded[k])
                if len(where) == n:
                    if src.ctypes.data != view[k].ctypes.data:  # else it already is the batch buffer
                        view[k][:] = src
                else:
                    view[k][where] = src
            take(where, decoded)
        if pre is not None and not have.all():
            where = np.nonzero(~have)[0]
            got, bg = pre.fill(u.ids[where], view, where)
            have[where[got]] = True
            bg_id[where[got]] = bg[got]
            self.count("preload_hits", int(got.sum()))
        if not have.all():
            where = np.nonzero(~have)[0]
            whole = len(where) == n
            into = view if whole else {k: v.numpy() for k, v in alloc_wire(len(where), self.shapes).items()}
            meta = decode_unit(
                self.tables,
                self.man.root,
                self._shards,
                u.ids[where],
                u.sidx[where],
                self.size,
                self._lib,
                into,
            )
            if not whole:
                for k in KEYS:
                    view[k][where] = into[k]
            take(where, meta)
        if pre is not None and fresh.any():
            ok = fresh & np.array([not r for r in reasons], dtype=bool)
            if ok.any():
                pre.put(u.ids[ok], {k: view[k][ok] for k in KEYS}, bg_id[ok])
        return bg_id, reasons

    def _assemble(
        self, filled: list, buf: dict[str, torch.Tensor], ids: np.ndarray, flips: np.ndarray
    ) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """One rank batch's filled buffer -> wire batch; samples that failed to decode are taken out."""
        filled = [f.result() if isinstance(f, Future) else f for f in filled]
        bg_id = np.concatenate([f[0] for f in filled])
        reasons = [r for f in filled for r in f[1]]
        _, bg_bad = bg_table(self.man, self.size, self._lib)
        known = bg_id < len(bg_bad)
        ok = np.array([not r for r in reasons], dtype=bool) & known & ~bg_bad[np.where(known, bg_id, 0)]
        bad = [
            {"sample_id": int(ids[i]), "reason": reasons[i] or "bg image does not decode"}
            for i in np.nonzero(~ok)[0]
        ]
        out = {
            **buf,
            "bg_id": torch.from_numpy(bg_id),
            "flip": torch.from_numpy(np.ascontiguousarray(flips, dtype=bool)),
            "sample_id": torch.from_numpy(ids.astype(np.int64)),
        }
        if not ok.all():
            keep = torch.from_numpy(np.nonzero(ok)[0])
            out = {k: v.index_select(0, keep) for k, v in out.items()}
        return out, bad

    def _start_batch(self, units: list[Unit], parts: list[tuple] | None, pool, pre: Preload | None) -> tuple:
        """Buffer for one planned batch and its units' fill work: decoded elsewhere (`parts`, merged
        here) or submitted to the thread pool, each unit straight into its rows of the buffer."""
        whole = parts is not None and len(parts) == 1 and parts[0][1] is not None and bool(parts[0][0].all())
        if whole and self.decoder.zero_copy and not self.pin_memory:  # the worker's memory is the batch
            buf = {key: parts[0][1][key] for key in KEYS}
        else:
            buf = alloc_wire(sum(len(u.ids) for u in units), self.shapes, pin=self.pin_memory)
        arrs = {key: v.numpy() for key, v in buf.items()}
        cuts = np.cumsum([0] + [len(u.ids) for u in units])
        views = [{key: a[lo:hi] for key, a in arrs.items()} for lo, hi in itertools.pairwise(cuts)]
        if parts is not None:
            filled = [
                self._fill_unit(u, v, pre, d, need)
                for u, v, (need, d) in zip(units, views, parts, strict=True)
            ]
        else:
            filled = [pool.submit(self._fill_unit, u, v, pre) for u, v in zip(units, views, strict=True)]
        return filled, buf

    def batches(
        self, plan: Plan | list[list[Unit]], flips: list[np.ndarray], pre: Preload | None
    ) -> Iterator[tuple[dict[str, torch.Tensor], list[dict]]]:
        """(wire batch, quarantined) per planned batch, in order; units decode ahead, straight into
        each batch's (optionally pinned) buffer."""
        workers = self.decoder.workers
        per_batch = max(1, sum(len(u.ids) for u in plan[0])) if len(plan) else 1
        ahead = max(2, -(-2 * workers * self.unit_samples // per_batch) + 1)
        pending: deque[tuple] = deque()
        pool = self.decoder.executor()
        src = self._offload_parts(plan, pre) if self.decoder.offloaded else None
        try:
            for b in range(len(plan)):
                while len(pending) < ahead and b + len(pending) < len(plan):
                    k = b + len(pending)
                    units = plan[k]
                    filled, buf = self._start_batch(units, next(src) if src is not None else None, pool, pre)
                    pending.append((filled, buf, np.concatenate([u.ids for u in units]), flips[k]))
                yield self._assemble(*pending.popleft())
        finally:
            for filled, *_ in pending:
                for f in filled:
                    if isinstance(f, Future):
                        f.cancel()
            if src is not None:
                src.close()
            # queued units are dropped; running ones (< one unit per thread) finish, so no thread
            # touches storage after the generator is closed
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _offload_parts(self, plan: Plan | list[list[Unit]], pre: Preload | None) -> Iterator[list[tuple]]:
        """Offloaded decoders: the rows not in the decoded preload are decoded elsewhere, in plan
        order. Yields per batch, per unit, (rows to decode, their decoded output or None)."""
        have = (
            pre.has(np.concatenate([u.ids for us in plan for u in us]))
            if pre is not None and len(plan)
            else None
        )
        needs, specs, o = [], [], 0
        for us in plan:
            needs.append([])
            for u in us:
                need = ~have[o : o + len(u.ids)] if have is not None else np.ones(len(u.ids), bool)
                o += len(u.ids)
                needs[-1].append(need)
                if need.any():
                    specs.append((u.ids[need], u.sidx[need]))
        decoded: Iterator[dict] = self.decoder.decode(specs) if specs else iter(())
        for ns in needs:
            yield [(need, next(decoded) if need.any() else None) for need in ns]
