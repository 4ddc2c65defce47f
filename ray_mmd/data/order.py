"""The epoch order and the stream's position: pure functions of the manifest and the seed, no I/O.

For (chunk c, epoch e) the order is a seeded permutation of the chunk's split ids that depends on
nothing else (not on world size, rank or batch size): shards are shuffled, grouped `window` at a time,
and the rows of each group shuffled. Global batch k is positions [consumed0 + k·G, … + G) of that order;
rank r of W takes the sub-slice [r·G//W, (r+1)·G//W). The position is (chunk, epoch, consumed): a
prefix of a world-size-independent order, so exactly-once across restarts and resizes is structural.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_mmd.data.manifest import Manifest
from ray_mmd.errors import UserError

STATE_VERSION = 1


@dataclass
class Chunk:
    """One entry of the chunk schedule: sample-id range [lo, hi), trained `epochs` times."""

    lo: int
    hi: int
    epochs: int = 1


def shard_of(man: Manifest, ids: np.ndarray) -> np.ndarray:
    """Index into man.shards of the shard holding each sample id."""
    firsts = np.array([s.first_id for s in man.shards], dtype=np.int64)
    return np.searchsorted(firsts, ids, side="right") - 1


def epoch_order(
    man: Manifest,
    chunk: Chunk,
    chunk_index: int,
    epoch: int,
    split: str,
    seed: int,
    shuffle: bool,
    window: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids in training order, index into man.shards of each id) for one (chunk, epoch)."""
    ids = man.sample_ids(split, chunk.lo, chunk.hi)
    sidx = shard_of(man, ids)
    if not shuffle or len(ids) == 0:
        return ids, sidx
    rng = np.random.default_rng([seed, chunk_index, epoch])
    uniq = np.unique(sidx)
    rank_of = np.empty(len(man.shards), dtype=np.int64)
    rank_of[uniq[rng.permutation(len(uniq))]] = np.arange(len(uniq))
    group = rank_of[sidx] // max(1, window)
    order = np.lexsort((rng.random(len(ids)), group))
    return ids[order], sidx[order]


def rank_positions(consumed0: int, batches: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """Positions in the epoch order of this rank's rows of the next `batches` global batches, in order."""
    offs = np.arange(rank * global_batch // world, (rank + 1) * global_batch // world)
    return (consumed0 + np.arange(batches)[:, None] * global_batch + offs[None, :]).ravel()


class Position:
    """(chunk, epoch, consumed) over a chunk schedule, plus the rows dropped so far; `state_dict` is what
    a checkpoint keeps. The fingerprint (what the order depends on) must match on load."""

    def __init__(self, chunks: list[Chunk], global_batch: int, fingerprint: dict) -> None:
        self.chunks, self.global_batch = chunks, global_batch
        self.fingerprint = {**fingerprint, "chunks": [[k.lo, k.hi, k.epochs] for k in chunks]}
        self.chunk_index, self.epoch, self.consumed = 0, 0, 0
        self.dropped = 0

    @property
    def done(self) -> bool:
        return self.chunk_index >= len(self.chunks)

    @property
    def chunk(self) -> Chunk:
        return self.chunks[self.chunk_index]

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.chunk_index, self.epoch, self.consumed)

    def advance(self, n_total: int) -> int:
        """The current (chunk, epoch) is over: move to the next; returns the remainder dropped."""
        left = n_total - self.consumed
        dropped = left % self.global_batch if left > 0 else 0
        self.dropped += dropped
        if self.epoch + 1 < self.chunk.epochs:
            self.epoch, self.consumed = self.epoch + 1, 0
        else:
            self.chunk_index, self.epoch, self.consumed = self.chunk_index + 1, 0, 0
        return dropped

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "chunk_index": self.chunk_index,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "dropped": self.dropped,
            "global_batch_size": self.global_batch,
            **self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.fingerprint.items():
            if k in state and state[k] != v:
                raise UserError(
                    f"saved data position was made with {k}={state[k]!r} but the config says {v!r}: "
                    "restore the original data config or start a new run"
                )
        self.chunk_index, self.epoch = int(state["chunk_index"]), int(state["epoch"])
        self.consumed = int(state["consumed"])
        self.dropped = int(state.get("dropped", 0))


@dataclass
class Unit:
    """A run of consecutive positions of one rank, decoded as one task."""

    ids: np.ndarray
    sidx: np.ndarray


class Plan:
    """Batch b -> its decode units, computed on demand: planning costs nothing per remaining sample, so
    time-to-first-batch does not grow with the chunk (or with how little of the epoch was consumed)."""

    def __init__(self, ids: np.ndarray, sidx: np.ndarray, nb: int, n_r: int, unit: int) -> None:
        self.ids, self.sidx, self.nb, self.n_r = ids, sidx, nb, n_r
        k = max(1, -(-n_r // max(1, unit)))
        self.cuts = [i * n_r // k for i in range(k + 1)]

    def __len__(self) -> int:
        return self.nb

    def __getitem__(self, b: int) -> list[Unit]:
        if not 0 <= b < self.nb:
            raise IndexError(b)
        o, c = b * self.n_r, self.cuts
        return [
            Unit(self.ids[o + c[j] : o + c[j + 1]], self.sidx[o + c[j] : o + c[j + 1]])
            for j in range(len(c) - 1)
        ]
