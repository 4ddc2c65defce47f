"""Everything a resume needs, saved and loaded as one unit (the files: train/checkpoint.py).

`TrainState` is a named collection of objects with `state_dict()` / `load_state_dict()` (model,
optimizer, scheduler, scaler, RNGs, the data stream's position, progress, lineage, ...): adding a
stateful thing is one keyword argument.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RNGState:
    """Python, NumPy and torch (CPU + CUDA) generator states, in weights_only-loadable form."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        d: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            d["cuda"] = torch.cuda.get_rng_state_all()
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Counters of the run: global step, stage, skipped (non-finite) steps, evaluations, restarts."""

    stage: int = 1
    global_step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    evals: int = 0
    restarts: int = 0
    best: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class Lineage:
    """Where this run's weights came from: run name, stage, and the parent checkpoint (if any)."""

    run: str = ""
    stage: int = 1
    parent: dict[str, Any] | None = None  # {"run", "checkpoint", "stage", "step", "parent": ...}

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run, "stage": self.stage, "parent": self.parent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run, self.stage, self.parent = state["run"], state["stage"], state["parent"]


@dataclass
class IdLedger:
    """Debug record of the sample ids trained at each global step (all ranks), kept in the checkpoint.

    Because it is saved and restored with the weights, it lists exactly the steps that count in the
    final state: the exactly-once tests read it from the last checkpoint.
    """

    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, step: int, world_size: int, ids: list[int]) -> None:
        self.steps[str(step)] = {"world": world_size, "ids": ids}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = dict(state["steps"])


class Value:
    """A plain JSON-able value (e.g. the config) held in the state collection."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class TrainState:
    """A named set of Stateful parts, saved and restored together."""

    def __init__(self, **parts: Stateful) -> None:
        self.parts = parts

    def __getitem__(self, name: str) -> Stateful:
        return self.parts[name]

    def state_dict(self) -> dict[str, Any]:
        return {name: p.state_dict() for name, p in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any], skip: Iterable[str] = ()) -> None:
        missing = [n for n in self.parts if n not in state and n not in skip]
        if missing:
            raise KeyError(f"checkpoint lacks state for {missing}")
        for name, part in self.parts.items():
            if name not in skip and name in state:
                part.load_state_dict(state[name])
