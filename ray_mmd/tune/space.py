"""The sweep file: search space, resources and ASHA settings from YAML, checked before any trial starts."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.errors import UserError
from ray_mmd.tune.record import EVAL_METRICS, SCORE

log = logging.getLogger("ray_mmd.tune")
SPACE_FILE = "space.json"
# run.* is the sweep's business (name/storage per trial, workers from sweep.resources)
_MANAGED = ("run.name", "run.storage", "run.workers", "run.cpus_per_worker", "run.use_gpu", "run.ray_address")
_DISTS = ("grid", "choice", "loguniform", "uniform", "randint")


@dataclass
class Resources:
    workers: list[int] = field(default_factory=lambda: [1, 1])  # per trial: [min, max] (elastic) or [n]
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractions let small trials share a GPU


@dataclass
class Sweep:
    """A parsed, validated sweep file."""

    name: str
    storage: str
    base: dict[str, Any]  # the stage config every trial starts from (raw, paths made absolute)
    space: dict[str, dict[str, Any]]  # dotted config key -> {dist: args}
    metric: str = SCORE
    mode: str = "min"
    num_samples: int = 1
    max_concurrent_trials: int = 2
    seed: int = 0
    asha: dict[str, Any] | None = None  # {grace_period, reduction_factor} in epochs; None = no stopping
    resources: Resources = field(default_factory=Resources)

    @property
    def url(self) -> str:
        return storage.join(self.storage, self.name)

    def fingerprint(self) -> str:
        """What makes two sweeps the same experiment: base config, space, sampling and scoring."""
        d = {
            "base": self.base,
            "space": self.space,
            "metric": self.metric,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> TrainConfig:
    """The stage config of one trial: the base with the trial's sampled values set (validated)."""
    d = copy.deepcopy(base)
    for k, v in params.items():
        _set(d, k, v)
    return TrainConfig.from_dict(d)


def _mapping(obj: Any, what: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise UserError(f"sweep file: {what} must be a mapping, got {obj!r}")
    return obj


def _values_of(key: str, spec: dict[str, Any]) -> list[Any]:
    """The values of one parameter that must each make a valid config (both ends of a range)."""
    ((dist, args),) = spec.items()
    if dist in ("grid", "choice"):
        return list(args)
    return [args[0], args[1]]


def _parse_param(key: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        return {"grid": [spec]}  # a plain value: fixed for every trial
    if len(spec) != 1 or next(iter(spec)) not in _DISTS:
        raise UserError(
            f"sweep space {key}: {spec!r} is not one of {{grid: [...]}}, {{choice: [...]}}, "
            "{loguniform: [lo, hi]}, {uniform: [lo, hi]}, {randint: [lo, hi]}"
        )
    ((dist, args),) = spec.items()
    if dist in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise UserError(f"sweep space {key}: {dist} needs a non-empty list of values")
        return {dist: args}
    ok = isinstance(args, list) and len(args) == 2 and all(isinstance(a, int | float) for a in args)
    if not ok or not args[0] < args[1] or (dist == "loguniform" and args[0] <= 0):
        raise UserError(
            f"sweep space {key}: {dist} needs [lo, hi] with lo < hi"
            + (" and lo > 0" if dist == "loguniform" else "")
            + f", got {args!r}"
        )
    return {dist: args}


def load_sweep(path: str, name: str | None = None, storage_url: str | None = None) -> Sweep:
    """Parse and validate a sweep file; every mistake is one UserError line, before Ray starts."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sweep file {path!r} not found: pass --config jobs/configs/sweep-demo.yaml")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"sweep file {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    raw = _mapping(raw, "the top level")
    unknown = sorted(set(raw) - {"base", "set", "space", "sweep"})
    if unknown:
        raise UserError(f"sweep file: unknown key {unknown[0]!r}: valid keys are base, set, space, sweep")
    base_ref = raw.get("base")
    if isinstance(base_ref, str):  # a stage YAML, relative to the sweep file
        bp = (p.parent / base_ref) if not Path(base_ref).is_absolute() else Path(base_ref)
        if not bp.is_file():
            raise UserError(f"sweep base config {base_ref!r} not found next to {path!r}")
        base = _mapping(yaml.safe_load(bp.read_text()), f"base config {base_ref}")
    else:
        base = copy.deepcopy(_mapping(base_ref, "base"))
    for k, v in _mapping(raw.get("set"), "set").items():
        _set(base, k, v)

    s = _mapping(raw.get("sweep"), "sweep")
    fields_ = {f.name for f in dataclasses.fields(Sweep)} - {"base", "space"}
    bad = sorted(set(s) - fields_)
    if bad:
        raise UserError(
            f"sweep file: unknown key 'sweep.{bad[0]}': valid keys are {', '.join(sorted(fields_))}"
        )
    res = _mapping(s.get("resources"), "sweep.resources")
    rbad = sorted(set(res) - {f.name for f in dataclasses.fields(Resources)})
    if rbad:
        raise UserError(
            f"sweep file: unknown key 'sweep.resources.{rbad[0]}': valid keys are workers, cpus_per_worker, "
            "gpus_per_worker"
        )
    workers = res.get("workers", [1, 1])
    workers = [workers, workers] if isinstance(workers, int) else list(workers)
    resources = Resources(
        workers=workers,
        cpus_per_worker=float(res.get("cpus_per_worker", 1.0)),
        gpus_per_worker=float(res.get("gpus_per_worker", 0.0)),
    )
    sw = Sweep(
        name=name or s.get("name") or p.stem,
        storage=storage_url or s.get("storage", "runs/sweeps"),
        base=base,
        space={},
        metric=s.get("metric", SCORE),
        mode=s.get("mode", "min"),
        num_samples=int(s.get("num_samples", 1)),
        max_concurrent_trials=int(s.get("max_concurrent_trials", 2)),
        seed=int(s.get("seed", 0)),
        asha=s.get("asha", {"grace_period": 1, "reduction_factor": 2}),
        resources=resources,
    )
    space = _mapping(raw.get("space"), "space")
    sw.space = {k: _parse_param(k, v) for k, v in space.items()}
    validate(sw)
    return sw


def _resolve_base(sw: Sweep) -> None:
    """Trials run in their own working directories: make the base config's local paths absolute."""
    data = sw.base.setdefault("data", {})
    for obj, key in ((data, "url"), (data, "cache_dir")):
        v = obj.get(key)
        if isinstance(v, str) and v and v != "auto" and "://" not in v:
            obj[key] = os.path.abspath(os.path.expanduser(v))
    if "://" not in sw.storage:
        sw.storage = os.path.abspath(os.path.expanduser(sw.storage))


def _metric_names() -> list[str]:
    return [SCORE] + [f"eval/{m}" for m in EVAL_METRICS]


def validate(sw: Sweep) -> None:
    """Everything a trial could trip over, checked once on the driver before any trial starts."""
    from ray_mmd.losses import parse_spec

    if not sw.space or all(len(_values_of(k, v)) <= 1 and "grid" in v for k, v in sw.space.items()):
        raise UserError(
            "empty search space: add parameters under `space:`, e.g. optim.lr: {loguniform: [0.0003, 0.01]}"
        )
    if not sw.name or "/" in sw.name:
        raise UserError(f"sweep.name {sw.name!r} must be non-empty, without '/'")
    if sw.metric not in _metric_names():
        raise UserError(
            f"sweep.metric {sw.metric!r} is not reported by any trial: use one of {', '.join(_metric_names())} "
            "(losses are not comparable across loss choices)"
        )
    if sw.mode not in ("min", "max"):
        raise UserError(f"sweep.mode {sw.mode!r} is not min or max")
    if sw.num_samples < 1 or sw.max_concurrent_trials < 1:
        raise UserError("sweep.num_samples and sweep.max_concurrent_trials must be >= 1")
    if sw.asha is not None:
        a = _mapping(sw.asha, "sweep.asha")
        extra = sorted(set(a) - {"grace_period", "reduction_factor"})
        if extra:
            raise UserError(
                f"sweep.asha: unknown key {extra[0]!r}: valid keys are grace_period, reduction_factor"
            )
        if not (float(a.get("grace_period", 1)) > 0 and float(a.get("reduction_factor", 2)) > 1):
            raise UserError("sweep.asha: grace_period must be > 0 (epochs) and reduction_factor > 1")
    r = sw.resources
    if not (len(r.workers) in (1, 2) and 1 <= r.workers[0] <= r.workers[-1]):
        raise UserError(f"sweep.resources.workers: {r.workers} is not N or [MIN, MAX] with 1 <= MIN <= MAX")
    if r.cpus_per_worker < 0 or r.gpus_per_worker < 0 or (r.gpus_per_worker > 1 and r.gpus_per_worker % 1):
        raise UserError(
            "sweep.resources: cpus_per_worker and gpus_per_worker must be >= 0 (a GPU fraction < 1, or whole GPUs)"
        )
    for key in sw.space:
        if key in _MANAGED:
            raise UserError(
                f"sweep space {key}: set by the sweep (sweep.name/storage/resources), not searchable"
            )
    _resolve_base(sw)
    # every searched value must make a valid stage config on its own (the others at their base value)
    try:
        base_cfg = trial_config(sw.base, {})
    except UserError as e:
        raise UserError(f"sweep base config: {e}") from None
    for key, spec in sw.space.items():
        for v in _values_of(key, spec):
            if key in ("loss.mask", "loss.depth"):
                parse_spec(str(v))  # "unknown loss 'x' in spec 'x+dice'; valid losses: ..."
            try:
                trial_config(sw.base, {key: v})
            except UserError as e:
                msg = str(e)
                if "unknown config key" in msg:
                    raise UserError(f"sweep space: {msg}") from None
                raise UserError(f"sweep space {key}={v!r}: {msg}") from None
    for spec in ("loss.mask", "loss.depth"):
        if spec not in sw.space:
            parse_spec(getattr(base_cfg.loss, spec.split(".")[1]))
    for v in _batch_values(sw, base_cfg):
        check_batch(v, base_cfg.data.micro_batch_size, r.workers)


def _batch_values(sw: Sweep, base_cfg: TrainConfig) -> list[int]:
    spec = sw.space.get("data.global_batch_size")
    if spec is None:
        return [base_cfg.data.global_batch_size]
    return [int(v) for v in _values_of("data.global_batch_size", spec)]


MAX_ACCUM = 64  # micro-steps per optimizer step beyond which a batch is not worth serving this way


def check_batch(global_batch: int, micro: int | None, workers: list[int]) -> None:
    """A global batch the trial's world can serve: every rank gets a slice, and the smallest world does
    not need more than MAX_ACCUM micro-batches per step."""
    lo, hi = workers[0], workers[-1]
    if global_batch < hi:
        raise UserError(
            f"global batch {global_batch} cannot be split over {hi} workers (a rank would get no samples): "
            f"use data.global_batch_size >= {hi} or fewer sweep.resources.workers"
        )
    per_rank = math.ceil(global_batch / lo)
    if micro and math.ceil(per_rank / micro) > MAX_ACCUM:
        raise UserError(
            f"global batch {global_batch} needs more than {MAX_ACCUM} micro-batches of {micro} per step on "
            f"{lo} worker(s): raise data.micro_batch_size or the minimum workers, or search smaller batches"
        )


def check_data(sw: Sweep) -> None:
    """The dataset exists (or is generated now) and holds at least one global batch of training samples."""
    from ray_mmd.data import manifest as mf
    from ray_mmd.train.trainer import ensure_data

    cfg = trial_config(sw.base, {})
    ensure_data(cfg)
    n_train = len(mf.load(cfg.data.url).sample_ids("train"))
    for g in _batch_values(sw, cfg):
        if g > n_train:
            raise UserError(
                f"global batch {g} is larger than the {n_train} training samples of {cfg.data.url}: "
                "search smaller data.global_batch_size values"
            )


def check_resources(resources: Resources, nodes: list[dict[str, float]]) -> None:
    """A trial's minimum world (workers x {CPU, GPU}) must fit on the cluster's live nodes."""
    need_c, need_g, n = resources.cpus_per_worker, resources.gpus_per_worker, resources.workers[0]
    if need_c == 0 and need_g == 0:
        return
    fit = 0
    for res in nodes:
        by_c = math.floor(res.get("CPU", 0.0) / need_c + 1e-9) if need_c else math.inf
        by_g = math.floor(res.get("GPU", 0.0) / need_g + 1e-9) if need_g else math.inf
        fit += min(by_c, by_g)
    if fit < n:
        have = ", ".join(f"{{CPU: {r.get('CPU', 0):g}, GPU: {r.get('GPU', 0):g}}}" for r in nodes) or "none"
        raise UserError(
            f"a trial needs {n} worker(s) x {{CPU: {need_c:g}, GPU: {need_g:g}}} but the cluster's nodes offer "
            f"{have}: lower sweep.resources (workers, cpus_per_worker, gpus_per_worker) or add nodes"
        )


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
