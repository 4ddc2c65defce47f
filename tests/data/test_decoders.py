"""The three decoders give the training loop the same batches: threads (the reference), worker processes
(across a restart) and Ray decode actors (with the decoded preload serving the second epoch; one pool
shared by a process's streams, same-node units through reused /dev/shm slots)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from ray_mmd.data.decoders import ProcessDecoder, ThreadDecoder
from ray_mmd.data.order import Chunk
from ray_mmd.data.ray_decoder import RayDecoder
from ray_mmd.data.stream import DataStream
from ray_mmd.data.transforms import KEYS

SIZE = 32


@pytest.fixture
def base(packed, stream_cfg):
    return stream_cfg(
        packed,
        chunks=[Chunk(0, 240, 2)],
        image_size=SIZE,
        global_batch_size=16,
        seed=3,
        workers=2,
        flip_p=0.5,
    )


def test_backend_resolved_once_into_a_decoder(base):
    kinds = {
        b: type(DataStream(base.with_data(backend=b)).decoder) for b in ("thread", "process", "ray", "auto")
    }
    assert kinds == {
        "thread": ThreadDecoder,
        "process": ProcessDecoder,
        "ray": RayDecoder,
        "auto": ThreadDecoder,
    }
    many = DataStream(dataclasses.replace(base, workers=8))  # auto: past 4 workers, processes
    assert type(many.decoder) is ProcessDecoder
    # unit sizes: threads split a rank batch over the threads, a process takes a whole rank batch
    assert DataStream(base).decoder.unit_size(16) == 8 and many.decoder.unit_size(16) == 16


def test_ray_backend_and_decoded_preload(base, ray_local):
    base = dataclasses.replace(base, decoder="pil")
    ref = DataStream(base)
    ref_batches = [b for _ in range(2) for b in ref.epoch_batches()]
    rb = DataStream(base.with_data(backend="ray", decoded_preload_bytes=64 << 20))
    e1 = list(rb.epoch_batches())
    decoded_after_e1 = rb.stats()["decoded"]
    e2 = list(rb.epoch_batches())
    assert rb.done
    st_ = rb.stats()
    ids1 = {int(i) for b in e1 for i in b["sample_id"]}
    new_in_e2 = {int(i) for b in e2 for i in b["sample_id"]} - ids1  # epoch 1's dropped tail
    assert st_["decoded"] - decoded_after_e1 == len(new_in_e2) < 16  # the rest of epoch 2 from memory
    assert st_["preload_hits"] == len(e2) * 16 - len(new_in_e2)
    # preload keeps samples at the stage size (resized on the host), the reference ships decode-size
    # batches resized by the finisher: same kernel, so the model tensors agree
    assert rb._shapes["depth"] == (SIZE, SIZE) and ref._shapes["depth"] != (SIZE, SIZE)
    fin_ref, fin_rb = ref.finisher(), rb.finisher()
    for a, b in zip(ref_batches, e1 + e2, strict=True):
        assert np.array_equal(a["sample_id"], b["sample_id"])
        fa, fb = fin_ref(a), fin_rb(b)
        for k in ("x", "mask", "depth"):
            assert np.allclose(fa[k].numpy(), fb[k].numpy(), atol=1e-5), k


def test_process_backend_matches_threads_across_a_restart(base):
    ref = DataStream(base)
    want = [b for _ in range(2) for b in ref.epoch_batches()]
    a = DataStream(base.with_data(backend="process"))
    g = a.epoch_batches()
    got = [next(g) for _ in range(2)]
    g.close()
    g = a.epoch_batches()  # the same stream again: its loader resets the running workers
    got.append(next(g))
    g.close()
    state = a.state_dict()
    a.close()  # worker processes stop; a new stream (as after a preemption) carries on
    b = DataStream(base.with_data(backend="process"))
    b.load_state_dict(state)
    got += [x for _ in range(2) for x in b.epoch_batches()]
    b.close()
    assert len(got) == len(want) and b.done
    for x, y in zip(got, want, strict=True):
        for k in (*KEYS, "bg_id", "flip", "sample_id"):
            assert torch.equal(x[k], y[k]), k


def _unit_files(*decoders) -> set[str]:
    """The /dev/shm slot files these decoders of this process hold."""
    import os

    pre = tuple(f"ray-mmd-unit-{os.getpid()}-{d.sid}-" for d in decoders)
    return {n for n in os.listdir("/dev/shm") if n.startswith(pre)}


def test_ray_streams_share_one_pool_started_at_build_and_closed_by_the_last(base, ray_local):
    """Streams of one process that place decode alike share the actors, which start when the first
    stream is built; same-node units are decoded into reused /dev/shm slots that become the batches
    (no copy) and are reused once those are gone; the last close stops the actors."""
    ray = ray_local
    ref = DataStream(base)
    want = [b for _ in range(2) for b in ref.epoch_batches()]
    base = dataclasses.replace(base, ray_task_cpus=0.4)  # a placement (pool) no other test uses
    a = DataStream(base.with_data(backend="ray"))
    assert len(a.decoder._actors) == 2  # placed at build, before any unit was asked for
    b = DataStream(base.with_data(backend="ray", seed=4))  # eval-like: another order, same placement
    assert b.decoder._p is a.decoder._p and b.decoder._actors == a.decoder._actors
    actors = a.decoder._actors
    g = a.epoch_batches()
    got = [next(g) for _ in range(2)]
    list(b.epoch_batches())  # the other stream interleaves on the same actors
    g.close()  # a pass closed with units in flight: their slots are never lent again
    slots = {np.frombuffer(m, np.uint8).ctypes.data for m in a.decoder._slots.maps.values()}
    assert {x["fg_bg"].data_ptr() for x in got} <= slots  # a whole-batch unit is the batch: no copy
    j = 2
    for _ in range(2):
        for x in a.epoch_batches():  # compared and dropped: its slot comes back
            for k in (*KEYS, "bg_id", "flip", "sample_id"):
                assert torch.equal(x[k], want[j][k]), k
            j += 1
    assert a.done and j == len(want) and next(a.decoder._slots.made) < len(want)  # slots reused
    for x, y in zip(got, want, strict=False):
        assert torch.equal(x["fg_bg"], y["fg_bg"])  # batches kept meanwhile were never written over
    assert set(a.stats()["remote_nodes"]) == {ray.get_runtime_context().get_node_id()}
    a.close()
    sources = ray.get(actors[0].__ray_call__.remote(lambda self: set(self.sources)))
    assert sources == {b.decoder.sid}  # the actors forgot a's Source, still serve b
    b.close()
    assert not _unit_files(a.decoder, b.decoder)  # both streams' slot files are gone
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):  # ray.kill takes effect asynchronously
        while time.monotonic() < deadline:
            ray.get(actors[0].__ray_call__.remote(lambda self: 0), timeout=30)
            time.sleep(0.1)
    # a new stream places a fresh pool
    again = DataStream(base.with_data(backend="ray"))
    assert torch.equal(next(again.epoch_batches())["fg_bg"], want[0]["fg_bg"])
    assert again.decoder._actors != actors
    again.close()
