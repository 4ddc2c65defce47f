"""The epoch order and the position: seeded and world-size independent, ranks cover each global batch
exactly once, the position survives a state_dict round trip and refuses another schedule."""

from __future__ import annotations

import numpy as np
import pytest

from ray_mmd.data import manifest as mf
from ray_mmd.data.order import Chunk, Plan, Position, epoch_order, rank_positions, shard_of
from ray_mmd.errors import UserError


@pytest.fixture(scope="module")
def man(packed_factory) -> mf.Manifest:
    return mf.load(packed_factory(240, 20, seed=1))


def test_epoch_order_is_a_seeded_permutation_of_the_chunk(man):
    chunk = Chunk(10, 230, 2)
    ids, sidx = epoch_order(man, chunk, 0, 0, "train", 3, True, 4)
    assert sorted(ids.tolist()) == man.sample_ids("train", 10, 230).tolist()
    assert np.array_equal(sidx, shard_of(man, ids))
    again, _ = epoch_order(man, chunk, 0, 0, "train", 3, True, 4)
    assert np.array_equal(ids, again)  # a pure function of (seed, chunk, epoch)
    for other in (
        epoch_order(man, chunk, 0, 1, "train", 3, True, 4),
        epoch_order(man, chunk, 0, 0, "train", 4, True, 4),
    ):
        assert not np.array_equal(ids, other[0])
    plain, _ = epoch_order(man, chunk, 0, 0, "train", 3, False, 4)
    assert plain.tolist() == sorted(plain.tolist())
    # a shuffle window of one shard: rows of a shard stay together
    one, s1 = epoch_order(man, chunk, 0, 0, "train", 3, True, 1)
    assert (np.diff(s1) != 0).sum() == len(np.unique(s1)) - 1


@pytest.mark.parametrize("G", [7, 16, 24])
def test_ranks_cover_each_global_batch_once_for_any_world_size(G):
    for world in (1, 2, 3, G):
        parts = [rank_positions(5, 4, G, r, world) for r in range(world)]
        assert len({len(p) for p in parts}) <= 2 and sum(len(p) for p in parts) == 4 * G
        assert sorted(np.concatenate(parts).tolist()) == list(range(5, 5 + 4 * G))


def test_plan_splits_batches_into_units():
    ids = np.arange(30)
    plan = Plan(ids, ids % 3, nb=3, n_r=10, unit=4)
    assert len(plan) == 3
    units = plan[1]
    assert [len(u.ids) for u in units] == [3, 3, 4] and np.concatenate(
        [u.ids for u in units]
    ).tolist() == list(range(10, 20))
    with pytest.raises(IndexError):
        plan[3]


def test_position_advances_round_trips_and_checks_fingerprint():
    chunks = [Chunk(0, 100, 2), Chunk(100, 200, 1)]
    p = Position(chunks, 16, {"split": "train", "seed": 0})
    p.consumed = 96
    assert p.advance(100) == 4 and p.as_tuple() == (0, 1, 0)
    assert p.advance(100) == 4 and p.as_tuple() == (1, 0, 0) and p.dropped == 8
    p.consumed = 32
    q = Position(chunks, 16, {"split": "train", "seed": 0})
    q.load_state_dict(p.state_dict())
    assert q.as_tuple() == (1, 0, 32) and q.dropped == 8 and not q.done
    assert q.advance(100) == 4 and q.done
    with pytest.raises(UserError, match="chunks"):
        Position([Chunk(0, 50, 1)], 16, {"split": "train", "seed": 0}).load_state_dict(p.state_dict())
    with pytest.raises(UserError, match="seed"):
        Position(chunks, 16, {"split": "train", "seed": 1}).load_state_dict(p.state_dict())
