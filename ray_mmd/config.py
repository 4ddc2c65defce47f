"""Typed training configuration: dataclasses, YAML loading, `key=value` overrides, validation.

A wrong key or a bad value fails at start with a one-line UserError, never mid-run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ray_mmd.errors import UserError

# Every choice is a Literal: `_coerce` rejects anything else with a one-line UserError naming the key.
Backend = Literal["auto", "thread", "process", "ray"]  # who decodes (auto: threads up to 4 workers)
DecodeNodes = Literal["auto", "local", "decode", "other"]  # where the Ray decoder runs
ModelName = Literal["unet", "unet224", "resnet18_unet", "resnet50"]  # = ray_mmd.models.model_names()
OptimizerName = Literal["adamw", "adam", "sgd"]
Schedule = Literal["onecycle", "cosine", "constant"]  # all by global step
AmpMode = Literal["auto", "off", "bf16", "fp16"]
UseGpu = Literal["auto", "true", "false"]
OnPreemption = Literal["deadline", "handoff", "ignore"]  # what a preemption notice makes the run do


@dataclass
class SynthConfig:
    """A synthetic dataset generated and packed on first use when `data.url` has no manifest.

    Only at the config's own `data.url`: a `--data` URL drops it (see `load`)."""

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
    backend: Backend = "auto"
    decode_workers: int = 0  # per rank; 0 = the node's cores / ranks on the node
    # where decoding runs: local (this node), decode (Ray nodes started with the custom resource
    # {"decode": N}), other (any Ray node without a GPU but this one), auto (decode nodes if the
    # cluster has some, else local); decode/other use the Ray decoder
    decode_nodes: DecodeNodes = "auto"
    decoded_preload_bytes: int = 0
    max_bad_fraction: float = 0.01
    synthetic: SynthConfig | None = None


@dataclass
class ModelConfig:
    name: ModelName = "unet"
    width: int = 64


@dataclass
class LossConfig:
    mask: str = "l1+dice"  # a loss spec: names from ray_mmd.losses.LOSSES joined by "+"
    depth: str = "rmse+ssim"
    mask_weight: float = 1.0
    depth_weight: float = 1.0
    # the ssim term through torch.compile on CUDA: ~19 s compile on the first call for 1.1-1.25x on the
    # SSIM (H100); off by default, since short runs lose more to the compile than they gain
    compile_ssim: bool = False


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Schedule = "onecycle"
    warmup_fraction: float = 0.1
    grad_clip: float | None = 1.0
    amp: AmpMode = "auto"
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
    use_gpu: UseGpu = "auto"
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # real errors (-1: no limit); preemptions never use it up
    max_preemption_failures: int = -1  # preemptions (-1: no limit)
    # preemption notices (ray_mmd/train/preemption.py): ask Ray Train every N global steps (a barrier);
    # on a notice: "deadline" = checkpoint now, train on, checkpoint again just before the deadline and
    # move on; "handoff" = checkpoint now and move on; "ignore" = log and count only
    preemption_poll_every: int = 5
    on_preemption: OnPreemption = "handoff"  # measured: as little idle time as "deadline", one checkpoint
    preemption_margin_s: float = 8.0
    elastic_resize_interval_s: float = 60.0
    log_every: int = 10
    nan_abort_after: int = 5
    progress: bool = True
    profile: bool = False
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a new local Ray
    verbose: bool = False  # Ray's own INFO logs and warnings on the console (`ray-mmd -v`)


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
    if origin is Literal:
        if value not in args:
            raise UserError(f"config {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
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
    yaml_url = d["data"].get("url") if isinstance(d.get("data"), dict) else None
    d = apply_overrides(d, overrides or [])
    _synthetic_only_at_own_url(d, yaml_url, overrides or [])
    return TrainConfig.from_dict(d)


def _synthetic_only_at_own_url(d: dict[str, Any], yaml_url: Any, overrides: list[str]) -> None:
    """`data.synthetic` is a recipe for the config's own `data.url`: a URL given on the command line
    (`--data`, `data.url=`) must hold a packed dataset, so a typo is an error, never a new synthetic set.
    Overriding `data.synthetic...` as well asks for one there explicitly."""
    keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    if "data.url" not in keys or any(k == "data.synthetic" or k.startswith("data.synthetic.") for k in keys):
        return
    data = d.get("data")
    if isinstance(data, dict) and data.get("url") != yaml_url:
        data.pop("synthetic", None)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _finite(node: Any, prefix: str = "") -> None:
    """Every float anywhere in the config is finite: inf/nan parse as floats but no setting means them."""
    for f in dataclasses.fields(node):
        v, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            _finite(v, key + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"config {key}: {v} is not a finite number: give a plain number, e.g. 0.5")


def _at_least(key: str, v: float | None, lo: float, note: str = "") -> None:
    _check(v is None or v >= lo, f"config {key}: {v} is below the minimum of {lo}{note}")


def _within(key: str, v: float, lo: float, hi: float, *, open_hi: bool = False) -> None:
    ok = lo <= v < hi if open_hi else lo <= v <= hi
    _check(ok, f"config {key}: {v} is not in [{lo}, {hi}{')' if open_hi else ']'}")


def validate(cfg: TrainConfig) -> None:
    """Every value check types alone cannot express, field by field, so a run never starts with a value
    that a worker would reject (or train into NaN) minutes later. Runs on the driver, before Ray."""
    from ray_mmd.storage import safe_component

    d, m, o, c, e, r, g = cfg.data, cfg.model, cfg.optim, cfg.checkpoint, cfg.eval, cfg.run, cfg.debug
    _finite(cfg)
    _check(cfg.stage in (1, 2, 3), f"config stage: {cfg.stage} is not 1, 2 or 3")
    if cfg.parent is not None:
        _check(
            bool(cfg.parent.strip()), "config parent: empty: give stage N-1's run name or a checkpoint URL"
        )
        if "://" not in cfg.parent and "/" not in cfg.parent and "\\" not in cfg.parent:
            safe_component(cfg.parent, "parent run name")  # a name under run.storage, not a path
    _check_data(d)
    # model, loss
    _at_least("model.width", m.width, 1)
    _check_loss(cfg.loss)
    # optimizer
    _check(o.lr > 0, f"config optim.lr: {o.lr} must be > 0")
    _at_least("optim.weight_decay", o.weight_decay, 0.0)
    _within("optim.momentum", o.momentum, 0.0, 1.0, open_hi=True)
    _within("optim.warmup_fraction", o.warmup_fraction, 0.0, 1.0)
    _check(
        o.grad_clip is None or o.grad_clip > 0,
        f"config optim.grad_clip: {o.grad_clip} must be > 0 (a max gradient norm), or null to turn clipping off",
    )
    # checkpoints, eval
    _at_least("checkpoint.every_steps", c.every_steps, 1)
    _at_least("checkpoint.num_to_keep", c.num_to_keep, 2, " (fallback to an older one needs two)")
    _at_least("eval.max_samples", e.max_samples, 1, " (or null: the whole test split)")
    _at_least("eval.batch_size", e.batch_size, 1)
    _at_least("eval.grid_rows", e.grid_rows, 1)
    _check_run(r)
    # debug hooks
    _at_least("debug.kill_at_step", g.kill_at_step, 0)
    _at_least("debug.fail_at_step", g.fail_at_step, 0)
    _at_least("debug.kill_rank", g.kill_rank, 0)
    _at_least("debug.step_sleep_s", g.step_sleep_s, 0.0)
    for step in g.nan_at_steps or []:
        _at_least("debug.nan_at_steps", step, 0)


def _check_data(d: DataConfig) -> None:
    """The data section: the dataset URL, sizes, decoding and cache settings, chunks, synthetic data."""
    _check(bool(d.url.strip()), "config data.url: empty: give the packed dataset's URL (--data)")
    _at_least("data.epochs", d.epochs, 1)
    _at_least("data.image_size", d.image_size, 32)
    _at_least("data.global_batch_size", d.global_batch_size, 1)
    _at_least("data.micro_batch_size", d.micro_batch_size, 1, " (or null: the whole per-worker slice)")
    _within("data.flip_p", d.flip_p, 0.0, 1.0)
    _at_least("data.cache_bytes", d.cache_bytes, 0)
    _at_least("data.decode_workers", d.decode_workers, 0, " (0 = cores / ranks per node)")
    _check(
        d.decode_nodes not in ("decode", "other") or d.backend in ("auto", "ray"),
        f"config data.decode_nodes: {d.decode_nodes} needs data.backend ray or auto, not {d.backend}",
    )
    _at_least("data.decoded_preload_bytes", d.decoded_preload_bytes, 0, " (0 = off)")
    _within("data.max_bad_fraction", d.max_bad_fraction, 0.0, 1.0)
    _check(
        d.cache_dir is None or bool(d.cache_dir.strip()),
        "config data.cache_dir: empty: use a dir, auto or null",
    )
    for ch in d.chunks or []:
        _check(
            len(ch) in (2, 3) and 0 <= ch[0] < ch[1] and (len(ch) == 2 or ch[2] >= 1),
            f"config data.chunks: {ch} is not [lo, hi, epochs] with 0 <= lo < hi and epochs >= 1",
        )
    _check(
        d.chunks is None or len(d.chunks) > 0, "config data.chunks: empty list: use null for the whole set"
    )
    if d.synthetic is not None:
        _at_least("data.synthetic.samples", d.synthetic.samples, 1)
        _at_least("data.synthetic.shard_size", d.synthetic.shard_size, 1)
        _at_least("data.synthetic.seed", d.synthetic.seed, 0)


def _check_run(r: RunConfig) -> None:
    """The run section: name, storage, workers, failure and preemption budgets, logging cadence."""
    from ray_mmd.storage import safe_component

    safe_component(r.name, "run name")
    _check(bool(r.storage.strip()), "config run.storage: empty: give a dir or gs://bucket/path (--storage)")
    _check(
        not (len(r.workers) == 2 and r.workers[0] > r.workers[1]),
        f"config run.workers: MIN {r.workers[0]} > MAX {r.workers[-1]}; give MIN,MAX with MIN <= MAX",
    )
    _check(
        len(r.workers) in (1, 2)
        and (1 <= r.workers[0] <= r.workers[-1] or r.workers == [0] * len(r.workers)),
        f"config run.workers: {r.workers} is not MIN,MAX with 1 <= MIN <= MAX (or 0: in-process)",
    )
    _check(r.cpus_per_worker > 0, f"config run.cpus_per_worker: {r.cpus_per_worker} must be > 0")
    _at_least("run.max_failures", r.max_failures, -1, " (-1 = unlimited)")
    _at_least("run.max_preemption_failures", r.max_preemption_failures, -1, " (-1 = unlimited)")
    _at_least("run.preemption_poll_every", r.preemption_poll_every, 1, " (ask for notices every N steps)")
    _at_least("run.preemption_margin_s", r.preemption_margin_s, 0.0)
    _check(
        r.elastic_resize_interval_s > 0,
        f"config run.elastic_resize_interval_s: {r.elastic_resize_interval_s} must be > 0 seconds",
    )
    _at_least("run.log_every", r.log_every, 1)
    _at_least("run.nan_abort_after", r.nan_abort_after, 1)
    _check(r.ray_address is None or bool(r.ray_address.strip()), "config run.ray_address: empty: use null")


def _check_loss(loss: LossConfig) -> None:
    """Loss specs are compositions ("l1+dice"), checked against the loss registry by its own parser."""
    from ray_mmd.losses import LossSpecError, parse_spec

    for key, spec in (("mask", loss.mask), ("depth", loss.depth)):
        try:
            parse_spec(spec)
        except LossSpecError as e:
            raise UserError(f"config loss.{key}: {e}") from None
    _at_least("loss.mask_weight", loss.mask_weight, 0.0)
    _at_least("loss.depth_weight", loss.depth_weight, 0.0)
    _check(
        loss.mask_weight + loss.depth_weight > 0,
        "config loss: mask_weight and depth_weight are both 0, so nothing would be trained: set one > 0",
    )
    uses_ssim = any(t.name == "ssim" for spec in (loss.mask, loss.depth) for t in parse_spec(spec))
    _check(
        not loss.compile_ssim or uses_ssim,
        "config loss.compile_ssim: true but no loss term is ssim; drop the key or add ssim to loss.depth",
    )
