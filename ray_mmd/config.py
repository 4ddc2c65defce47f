"""Typed training configuration: dataclasses, YAML loading, `key=value` overrides, validation.

A wrong key or a bad value fails at start with a one-line UserError, never mid-run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_mmd.errors import UserError


@dataclass
class SynthConfig:
    """A synthetic dataset generated and packed on first use when `data.url` has no manifest."""

    samples: int = 600
    shard_size: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    url: str = "data/demo"
    # Chunk schedule: [[lo, hi, epochs], ...] sample-id ranges; None = the whole dataset for `epochs`.
    chunks: list[list[int]] | None = None
    epochs: int = 1
    image_size: int = 56
    global_batch_size: int = 256
    # Per-worker micro-batch limit; a worker's slice above it is split and gradients accumulated.
    micro_batch_size: int | None = None
    seed: int = 0
    shuffle: bool = True
    flip_p: float = 0.5
    # Node-local shard cache (selective preload + next-chunk prefetch). "auto": on, in the temp dir, for
    # remote data (gs://); off for a local path. A Colab Drive mount is a slow local path: set a dir.
    cache_dir: str | None = "auto"
    cache_bytes: int = 2 << 30
    backend: str = "auto"  # who decodes: auto (threads up to 4 workers, else processes), thread, process, ray
    decode_workers: int = 0  # per rank; 0 = the node's cores / ranks on the node
    # where decoding runs: local (this node), decode (Ray nodes started with the custom resource
    # {"decode": N}), other (any Ray node without a GPU but this one), auto (decode nodes if the
    # cluster has some, else local); decode/other use the Ray decoder
    decode_nodes: str = "auto"
    decoded_preload_bytes: int = 0
    max_bad_fraction: float = 0.01
    synthetic: SynthConfig | None = None


@dataclass
class ModelConfig:
    name: str = "unet"
    width: int = 64


@dataclass
class LossConfig:
    mask: str = "l1+dice"
    depth: str = "rmse+ssim"
    mask_weight: float = 1.0
    depth_weight: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "onecycle"  # onecycle | cosine | constant (all by global step)
    warmup_fraction: float = 0.1
    grad_clip: float | None = 1.0
    amp: str = "auto"  # auto | off | bf16 | fp16
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    num_to_keep: int = 3


@dataclass
class EvalConfig:
    max_samples: int | None = 512
    batch_size: int = 64
    grid_rows: int = 8


@dataclass
class RunConfig:
    name: str = "run"
    storage: str = "runs"
    # [min, max]; min < max = elastic; [0, 0] = in-process (no Ray cluster; debugging, tests)
    workers: list[int] = field(default_factory=lambda: [1, 1])
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # real errors; preemptions are unlimited
    max_preemption_failures: int = -1
    elastic_resize_interval_s: float = 60.0
    log_every: int = 10
    nan_abort_after: int = 5
    progress: bool = True
    profile: bool = False
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a new local Ray


@dataclass
class DebugConfig:
    """Test hooks: recording trained ids and injected faults (off by default)."""

    record_ids: bool = False  # keep {step: sample ids} in the checkpointed state (exactly-once tests)
    kill_at_step: int | None = None  # SIGKILL one worker process at this global step, once
    kill_rank: int = 1
    fail_at_step: int | None = None  # raise once at this global step instead (in-process runs)
    kill_marker: str | None = None  # file created on kill; its presence means "already killed"
    nan_at_steps: list[int] | None = None  # make these steps' depth targets NaN (NaN tests)
    step_sleep_s: float = 0.0  # slow each step down (chaos tests need time to act)


@dataclass
class TrainConfig:
    stage: int = 1
    parent: str | None = None  # previous stage: run name under run.storage, or a checkpoint URL
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = _build(cls, d, "")
        validate(cfg)
        return cfg


# ---- building and coercion ---------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Turn a YAML value or a command-line string into `tp`, or raise a UserError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list | tuple):
            raise UserError(f"config {key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"config {key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config {key}: expected a number, got {value!r}")
        try:
            if tp is int:
                f = float(value)
                if f != int(f):
                    raise ValueError
                return int(f)
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config {key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, dict | list):
            raise UserError(f"config {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(
            f"unknown config key '{prefix}{unknown[0]}': valid keys here are {', '.join(sorted(names))}"
        )
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in d.items()})


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cls: Any = TrainConfig
    node = d
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(cls) or p not in {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"unknown config key {key!r}: see ray_mmd/config.py for the valid keys")
        tp = _hints(cls)[p]
        if i == len(parts) - 1:
            node[p] = value
            return
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        cls = inner[0]
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings onto a raw config dict (values typed later by `from_dict`)."""
    for o in overrides:
        if "=" not in o:
            raise UserError(f"bad override {o!r}: use key=value, e.g. optim.lr=0.01")
        k, v = o.split("=", 1)
        _set_dotted(d, k.strip(), v.strip())
    return d


def load(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    d: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path!r} not found: pass --config jobs/configs/<name>.yaml")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise UserError(f"config file {path!r} must hold a mapping at the top level")
    return TrainConfig.from_dict(apply_overrides(d, overrides or []))


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def validate(cfg: TrainConfig) -> None:
    """Value checks that types alone cannot express."""
    d, r, o = cfg.data, cfg.run, cfg.optim
    _check(cfg.stage in (1, 2, 3), f"config stage: {cfg.stage} is not 1, 2 or 3")
    _check(d.image_size >= 32, f"config data.image_size: {d.image_size} is below the minimum of 32")
    _check(d.global_batch_size >= 1, "config data.global_batch_size: must be >= 1")
    _check(
        d.micro_batch_size is None or d.micro_batch_size >= 1, "config data.micro_batch_size: must be >= 1"
    )
    _check(d.epochs >= 1, "config data.epochs: must be >= 1")
    _check(0.0 <= d.flip_p <= 1.0, "config data.flip_p: must be in [0, 1]")
    _check(
        d.backend in ("auto", "thread", "process", "ray"),
        f"config data.backend: {d.backend!r} is not auto, thread, process or ray",
    )
    _check(
        d.decode_nodes in ("auto", "local", "decode", "other"),
        f"config data.decode_nodes: {d.decode_nodes!r} is not auto, local, decode or other",
    )
    _check(
        d.decode_nodes not in ("decode", "other") or d.backend in ("auto", "ray"),
        f"config data.decode_nodes: {d.decode_nodes} needs data.backend ray or auto, not {d.backend}",
    )
    _check(d.decode_workers >= 0, "config data.decode_workers: must be >= 0 (0 = cores / ranks per node)")
    for c in d.chunks or []:
        _check(
            len(c) in (2, 3) and c[0] < c[1] and (len(c) == 2 or c[2] >= 1),
            f"config data.chunks: {c} is not [lo, hi, epochs] with lo < hi and epochs >= 1",
        )
    _check(cfg.model.width >= 1, "config model.width: must be >= 1")
    _check(o.lr > 0, "config optim.lr: must be > 0")
    _check(o.name in ("adamw", "sgd", "adam"), f"config optim.name: {o.name!r} is not adamw, adam or sgd")
    _check(
        o.schedule in ("onecycle", "cosine", "constant"),
        f"config optim.schedule: {o.schedule!r} is not onecycle, cosine or constant",
    )
    _check(
        o.amp in ("auto", "off", "bf16", "fp16"),
        f"config optim.amp: {o.amp!r} is not auto, off, bf16 or fp16",
    )
    _check(
        len(r.workers) in (1, 2)
        and (1 <= r.workers[0] <= r.workers[-1] or r.workers == [0] * len(r.workers)),
        f"config run.workers: {r.workers} is not MIN,MAX with 1 <= MIN <= MAX (or 0: in-process)",
    )
    _check(
        r.use_gpu in ("auto", "true", "false"),
        f"config run.use_gpu: {r.use_gpu!r} is not auto, true or false",
    )
    _check(r.log_every >= 1, "config run.log_every: must be >= 1")
    _check(r.nan_abort_after >= 1, "config run.nan_abort_after: must be >= 1")
    _check(cfg.checkpoint.every_steps >= 1, "config checkpoint.every_steps: must be >= 1")
    _check(
        cfg.checkpoint.num_to_keep >= 2, "config checkpoint.num_to_keep: keep at least 2 (fallback needs one)"
    )
    _check(bool(r.name) and "/" not in r.name, f"config run.name: {r.name!r} must be non-empty, without '/'")
