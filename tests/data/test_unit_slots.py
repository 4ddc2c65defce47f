"""The Ray decoder's /dev/shm slots, without Ray: a full /dev/shm (a container's 64 MB default) makes a
unit go through the object store instead of ending in SIGBUS inside an actor."""

from __future__ import annotations

import errno
import logging
import os

from ray_mmd.data import unit_slots


def _files(slots: unit_slots.UnitSlots) -> list[str]:
    d, pre = os.path.split(slots.prefix)
    return [n for n in os.listdir(d) if n.startswith(pre)]


def test_a_slot_is_made_once_and_reused():
    slots = unit_slots.UnitSlots(sid=10_001)
    a = slots.take(4096)
    assert a is not None and len(_files(slots)) == 1
    slots.give(a)
    assert slots.take(1024) is a  # big enough: reused, no new file
    slots.give(a)
    slots.close()
    assert _files(slots) == []


def test_no_room_in_dev_shm_means_no_slot_and_no_file(monkeypatch, caplog):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(unit_slots.os, "posix_fallocate", full)
    slots = unit_slots.UnitSlots(sid=10_002)
    with caplog.at_level(logging.WARNING, logger=unit_slots.__name__):
        assert slots.take(1 << 20) is None
        assert slots.take(1 << 20) is None
    assert _files(slots) == []
    assert sum("/dev/shm has no room" in r.getMessage() for r in caplog.records) == 1  # warned once
    slots.close()
