"""Wire batches -> finished device batches, prepared ahead on a side CUDA stream (the copy and finish
overlap the training step); on the CPU a pass-through.

Why: a pageable host->device copy on the step's stream waits for the queued step to finish and blocks
the host meanwhile, so the GPU drains, then idles through the copy, the finish and the launch of the
next step. On a side stream the copy of batch k+1 and its finish run while step k computes, and the
host keeps the step queue full.

Correctness on CUDA: the step's stream waits on an event recorded after each batch's finish, and every
output tensor is ``record_stream``-ed onto the consuming stream, so the caching allocator cannot hand its
memory to the side stream while the step still reads it.

Position: the stream marks a batch consumed when it yields it, so prefetching runs the stream's
``state_dict()`` ahead of training by ``depth`` batches. Pass ``state=stream.state_dict`` and checkpoint
``feed.state_dict()`` instead: the position as of the last batch handed to the loop (exactly-once).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

Batch = dict[str, Any]


def _tensors(b: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(b):
        yield b
    elif isinstance(b, dict):
        for v in b.values():
            yield from _tensors(v)
    elif isinstance(b, (list, tuple)):
        for v in b:
            yield from _tensors(v)


class DeviceFeed:
    """Iterate ``prepare(wire)`` for each wire batch of ``batches``, ``depth`` batches ahead.

    ``prepare`` is e.g. ``lambda w: policy.prepare_batch(w, finisher)``: the copy to the device plus the
    finish. ``depth``: batches prepared ahead (None: 2 on CUDA, 0 elsewhere; 0 = pass-through, each batch
    prepared when asked for). ``state``: called right after each wire batch is taken from ``batches``
    (e.g. ``stream.state_dict``); :meth:`state_dict` then returns the snapshot matching the last batch
    yielded, and the final one once ``batches`` is exhausted and every batch was yielded.

    ``thread`` (opt-in, not yet measured on a GPU): take the wire batches and issue their copy + finish
    in a producer thread, so the stream's Python and the pageable copy (which blocks its calling thread)
    leave the thread that launches the step. Meant for host-bound steps (stage 3 on an H100: the GPU is
    busy only ~70% even on a resident batch, and the data work in the same thread comes off the rate).
    """

    def __init__(
        self,
        batches: Iterable[Batch],
        prepare: Callable[[Batch], Batch],
        device: torch.device | str,
        depth: int | None = None,
        state: Callable[[], dict] | None = None,
        thread: bool = False,
    ) -> None:
        self.batches = batches
        self.prepare = prepare
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.depth = (2 if self.cuda else 0) if depth is None else int(depth)
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.thread = bool(thread) and self.depth > 0
        self._state_fn = state
        self._state = state() if state is not None else None

    def state_dict(self) -> dict | None:
        """The data position after the last batch this feed yielded (None without ``state``)."""
        return self._state

    def _snap(self) -> dict | None:
        return self._state_fn() if self._state_fn is not None else None

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.batches)
        try:
            if self.depth == 0:
                for wire in it:
                    snap = self._snap()
                    out = self.prepare(wire)
                    self._state = snap
                    yield out
            elif self.thread:
                yield from self._threaded(it)
            else:
                yield from self._ahead(it)
            self._state = self._snap()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _side_stream(self) -> torch.cuda.Stream | None:
        side = torch.cuda.Stream(self.device) if self.cuda else None
        if side is not None:
            # whatever the consumer made before (the finisher's tables, the model) is ready for the side
            side.wait_stream(torch.cuda.current_stream(self.device))
        return side

    def _prepare_on(self, side: torch.cuda.Stream | None, wire: Batch) -> tuple[Batch, Any]:
        """The device batch of `wire`, and the event that says it is ready (None without a side stream)."""
        if side is None:
            return self.prepare(wire), None
        with torch.cuda.stream(side):
            out = self.prepare(wire)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    def _hand_over(self, out: Batch, done: Any) -> Batch:
        """The consumer's stream waits for the side's copy + finish, and owns the tensors from now on."""
        if done is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(done)
            for t in _tensors(out):
                if t.is_cuda:
                    t.record_stream(consumer)
        return out

    def _ahead(self, it: Iterator[Batch]) -> Iterator[Batch]:
        side = self._side_stream()
        queue: deque[tuple[Batch, Any, dict | None]] = deque()

        def launch() -> bool:
            try:
                wire = next(it)
            except StopIteration:
                return False
            snap = self._snap()
            queue.append((*self._prepare_on(side, wire), snap))
            return True

        more = True
        while more and len(queue) < self.depth:
            more = launch()
        while queue:
            out, done, snap = queue.popleft()
            out = self._hand_over(out, done)
            if more:  # the next batch's copy + finish go in flight before this one's step is queued
                more = launch()
            self._state = snap
            yield out

    def _threaded(self, it: Iterator[Batch]) -> Iterator[Batch]:
        """Like _ahead, with next(it) + prepare in a producer thread; a bounded queue of `depth`."""
        side = self._side_stream()
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            try:
                ctx = torch.cuda.device(self.device) if side is not None else contextlib.nullcontext()
                with ctx:
                    for wire in it:
                        snap = self._snap()
                        out, done = self._prepare_on(side, wire)
                        while not stop.is_set():
                            try:
                                q.put(("batch", (out, done, snap)), timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                q.put(("end", None))
            except BaseException as e:  # handed to the consumer, raised there
                q.put(("error", e))

        worker = threading.Thread(target=produce, name="device-feed", daemon=True)
        worker.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise item
                out, done, snap = item
                out = self._hand_over(out, done)
                self._state = snap
                yield out
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue, then let it finish
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()
