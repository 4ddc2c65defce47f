"""Ray Tune sweeps: the search space from YAML, one TorchTrainer per trial, ASHA, a resumable experiment,
the leaderboard (table + CSV + JSON), score-vs-step curves and the winner exported as a stage config.

Train V2 pattern: each trial is a function that builds the same TorchTrainer as `jobs/stage1.py`
(`trainer.build_trainer`) and calls `fit()`; a `TuneReportCallback` subclass on the Train controller
forwards each evaluation with the score. The trial's Train run is named after the trial id only, under
`EXPERIMENT/train/`, so a restarted trial (worker lost: Ray Train; driver lost: `Tuner.restore`) resumes
its own newest checkpoint. The score comes from held-out metrics, not from the losses being tuned:
`(1 - eval/iou) + eval/abs_rel`, lower is better, comparable across loss choices.

Experiment directory (local, Drive path or gs://):
  space.json            the resolved sweep (base config + space): a restore must match it
  <tune files>          Tune's experiment state (Tuner.can_restore / Tuner.restore)
  train/<trial id>/     each trial's Train run: checkpoints, metrics.jsonl, grids, TensorBoard
  trials/<trial id>/    settings.json and events/ (start, failure, aborted, done markers)
  leaderboard.{csv,json}, curves.png
"""

from __future__ import annotations

import bisect
import copy
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.errors import UserError

log = logging.getLogger("ray_mmd.tune")

SCORE = "score"
# what a trial reports at each evaluation (besides the score): the held-out metrics of metrics.py
EVAL_METRICS = ("iou", "dice", "abs_rel", "rmse", "delta1", "delta2", "delta3")
FAILED_SCORE = 1e6  # non-finite metrics (a diverged trial): the worst score ASHA can still compare
SPACE_FILE = "space.json"
# run.* is the sweep's business (name/storage per trial, workers from sweep.resources)
_MANAGED = ("run.name", "run.storage", "run.workers", "run.cpus_per_worker", "run.use_gpu", "run.ray_address")
_DISTS = ("grid", "choice", "loguniform", "uniform", "randint")


# ---- the sweep file --------------------------------------------------------------------------------


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


# ---- scoring and schedule ------------------------------------------------------------------------


def score_of(m: dict[str, Any]) -> float:
    """(1 - mask IoU) + depth AbsRel on the held-out split; FAILED_SCORE when either is not finite."""
    iou, absrel = m.get("eval/iou"), m.get("eval/abs_rel")
    if iou is None or absrel is None:
        return math.nan
    s = (1.0 - float(iou)) + float(absrel)
    return s if math.isfinite(s) else FAILED_SCORE


def eval_steps(cfg: TrainConfig, man: Any) -> list[int]:
    """Global steps at which a trial of `cfg` evaluates (each epoch's end, over the chunk schedule)."""
    from ray_mmd.train.inputs import chunk_schedule

    out, step, g = [], 0, cfg.data.global_batch_size
    for c in chunk_schedule(cfg, man):
        per = len(man.sample_ids("train", c.lo, c.hi)) // g
        for _ in range(c.epochs):
            step += per
            out.append(step)
    return out


def _tune_report_callback_cls():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreReport(TuneReportCallback):
        """On the Train controller: forward each evaluation (not the interval checkpoints, whose eval
        values are stale) to Tune with its epoch and score; record worker-group failures."""

        def __init__(self, evals: list[int], trial_url: str) -> None:
            super().__init__()
            self.evals = evals
            self.trial_url = trial_url

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = metrics[0]
            if m.get("reason") not in ("epoch", "final"):
                return
            out = {k: v for k, v in m.items() if k.startswith("eval/")}
            out["step"] = int(m["step"])
            out["epoch"] = bisect.bisect_right(self.evals, out["step"])
            s = score_of(m)
            out[SCORE] = FAILED_SCORE if math.isnan(s) else s
            out["final"] = m.get("reason") == "final"
            self._training_actor_item_queue.put(out)

        def after_exception(self, run_context, worker_exceptions) -> None:
            errs = {int(k): f"{type(v).__name__}: {str(v)[:300]}" for k, v in worker_exceptions.items()}
            event(self.trial_url, "failure", errs)

    return ScoreReport


# ---- trial bookkeeping (works on gs:// too: one small object per event, no appends) ------------------


def event(trial_url: str, kind: str, data: Any = None) -> None:
    name = f"{kind}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}.json"
    storage.write_bytes_atomic(storage.join(trial_url, "events", name), json.dumps(data).encode())


def events(trial_url: str) -> dict[str, int]:
    """{kind: count} of a trial's events."""
    fs, path = storage.filesystem(storage.join(trial_url, "events"))
    try:
        names = [os.path.basename(n.rstrip("/")) for n in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for n in names:
        if n.endswith(".json"):
            k = n.split("-", 1)[0]
            out[k] = out.get(k, 0) + 1
    return out


def _trial_fn(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """One trial: build the stage's TorchTrainer (named after the trial id) and fit it."""
    import ray.tune

    from ray_mmd.data import manifest as mf
    from ray_mmd.train import stages
    from ray_mmd.train.loop import ABORTED
    from ray_mmd.train.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    trial_url = storage.join(plan["url"], "trials", trial_id)
    cfg = trial_config(plan["base"], config)
    cfg.run.name = trial_id  # never a timestamp: a restarted trial finds its own checkpoints
    cfg.run.storage = storage.join(plan["url"], "train")
    cfg.run.workers = list(plan["workers"])
    cfg.run.cpus_per_worker = plan["cpus_per_worker"]
    cfg.run.use_gpu = "true" if plan["gpus_per_worker"] > 0 else "false"
    cfg.run.progress = False
    if events(trial_url).get("done"):
        # finished before the driver was lost, but Tune's saved state had not caught up: not re-run
        log.info("trial %s already finished: not re-running it", trial_id)
        return
    storage.write_bytes_atomic(
        storage.join(trial_url, "settings.json"), json.dumps({"params": config}, default=str).encode()
    )
    event(trial_url, "start")
    aborted = storage.join(stages.run_url(cfg), ABORTED)
    storage.remove(aborted)
    evals = eval_steps(cfg, mf.load(cfg.data.url))
    res = {"CPU": plan["cpus_per_worker"]}
    if plan["gpus_per_worker"] > 0:
        res["GPU"] = plan["gpus_per_worker"]
    trainer = build_trainer(
        cfg, callbacks=[_tune_report_callback_cls()(evals, trial_url)], resources_per_worker=res
    )
    from ray.train import TrainingFailedError

    fitting = _end_train_run_when_tune_stops()
    try:
        trainer.fit()
    except TrainingFailedError as e:  # out of retries; Tune marks the trial errored (resumed on restore)
        # (other exceptions here are the teardown of a trial Tune stopped: its actors die under fit())
        event(trial_url, "error", f"{type(e).__name__}: {str(e).strip().splitlines()[-1:] or ''}")
        raise
    finally:
        fitting.set()
    if storage.exists(aborted):  # a NaN streak: a result, not an error to retry (it would recur)
        event(trial_url, "aborted", storage.read_bytes(aborted).decode())
        log.warning("trial %s stopped on non-finite losses", trial_id)
        return
    event(trial_url, "done")


def _end_train_run_when_tune_stops():
    """When Tune stops this trial (ASHA), end the process, and with it the Train controller it owns and
    that controller's workers. A graceful actor exit would wait for fit(), whose run would then train
    on to its full budget, holding the resources ASHA meant to free. Returns the event to set once
    fit() has returned on its own."""
    import threading

    from ray.train._internal.session import get_session

    session, done = get_session(), threading.Event()
    if session is None:
        return done

    def watch() -> None:
        while not done.is_set():
            if session.stop_event.wait(0.5) and not done.is_set():
                time.sleep(1.0)  # let stop() answer Tune first
                if not done.is_set():
                    os._exit(0)
                return

    threading.Thread(target=watch, name="tune-stop-watch", daemon=True).start()
    return done


def _trainable(sw: Sweep):
    from ray import tune

    plan = {
        "url": sw.url,
        "base": sw.base,
        "workers": sw.resources.workers,
        "cpus_per_worker": sw.resources.cpus_per_worker,
        "gpus_per_worker": sw.resources.gpus_per_worker,
    }
    # the trial process only waits on fit(): a token CPU (Tune refuses 0); the Train workers hold the rest
    return tune.with_resources(tune.with_parameters(_trial_fn, plan=plan), {"CPU": 0.01})


def param_space(sw: Sweep) -> dict[str, Any]:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    out = {}
    for key, spec in sw.space.items():
        ((dist, args),) = spec.items()
        out[key] = make[dist](args)
    return out


def _epochs(sw: Sweep) -> int:
    from ray_mmd.data import manifest as mf

    cfg = trial_config(sw.base, {})
    return len(eval_steps(cfg, mf.load(cfg.data.url)))


class _Printer:
    """One line per trial evaluation and per trial end, instead of Tune's status tables."""

    def __new__(cls):
        from ray.tune import Callback

        class P(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                print(
                    f"trial {trial.trial_id}: epoch {result.get('epoch')} step {result.get('step')} "
                    f"score {result.get(SCORE, float('nan')):.4f}",
                    flush=True,
                )

            def on_trial_complete(self, iteration, trials, trial, **info):
                last = trial.last_result or {}
                print(
                    f"trial {trial.trial_id}: ended at epoch {last.get('epoch')} step {last.get('step')}",
                    flush=True,
                )

            def on_trial_error(self, iteration, trials, trial, **info):
                print(f"trial {trial.trial_id}: error (see {trial.local_path})", flush=True)

        return P()


def _tuner(sw: Sweep, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    fs, path = storage.pyarrow_filesystem(sw.url)
    trainable = _trainable(sw)
    if restore:
        return tune.Tuner.restore(
            path, trainable=trainable, resume_errored=True, param_space=param_space(sw), storage_filesystem=fs
        )
    if sw.asha is not None:
        # max_t one past the schedule: a trial that reaches its budget ends on its own, not killed by ASHA
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=_epochs(sw) + 1,
            grace_period=sw.asha.get("grace_period", 1),
            reduction_factor=sw.asha.get("reduction_factor", 2),
        )
    else:
        scheduler = FIFOScheduler()
    sfs, spath = storage.pyarrow_filesystem(sw.storage)
    return tune.Tuner(
        trainable,
        param_space=param_space(sw),
        tune_config=tune.TuneConfig(
            metric=sw.metric,
            mode=sw.mode,
            num_samples=sw.num_samples,
            max_concurrent_trials=sw.max_concurrent_trials,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=sw.seed, max_concurrent=sw.max_concurrent_trials),
        ),
        run_config=tune.RunConfig(
            name=sw.name,
            storage_path=spath,
            storage_filesystem=sfs,
            callbacks=[_Printer()],
            verbose=0,
        ),
    )


def can_restore(sw: Sweep) -> bool:
    from ray import tune

    fs, path = storage.pyarrow_filesystem(sw.url)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def check_resume(sw: Sweep, resume: bool) -> bool:
    """True if the experiment exists and was made from this sweep; errors for a wrong --resume."""
    space_url = storage.join(sw.url, SPACE_FILE)
    exists = storage.exists(space_url)
    if resume and not exists:
        raise UserError(
            f"--resume: no sweep experiment at {sw.url}: check sweep.name/--storage, or drop --resume to start it"
        )
    if not exists:
        return False
    saved = json.loads(storage.read_bytes(space_url))
    if saved.get("fingerprint") != sw.fingerprint():
        raise UserError(
            f"experiment {sw.url} was made from a different search space or base config: restore it with its "
            "original sweep file, or pick a new sweep.name (--name)"
        )
    return True


def _connect(sw: Sweep) -> bool:
    """Join RAY_ADDRESS (or the base config's run.ray_address), or start a local Ray; True if we started it.

    The job's processes get RAY_ADDRESS too: Train V2 frees a stopped trial's resources from a detached
    PlacementGroupCleaner that finds the cluster through it (else through /tmp/ray/ray_current_cluster,
    which names whichever cluster started last on the machine); without it a trial that ASHA stopped
    keeps its workers' CPUs reserved and later trials never start."""
    from ray_mmd.train.trainer import connect_ray

    return connect_ray(trial_config(sw.base, {}), log_to_driver=False)


def run(sw: Sweep, resume: bool = False) -> dict[str, Any]:
    """Start the sweep, or restore it when this experiment already exists; returns the leaderboard."""
    import ray

    # Tune saves the experiment state at most this often (default 10 s+): what a lost driver can forget
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    exists = check_resume(sw, resume)
    check_data(sw)
    started = _connect(sw)
    try:
        check_resources(sw.resources, cluster_nodes())
        restore = exists and can_restore(sw)
        if not exists:
            storage.write_bytes_atomic(
                storage.join(sw.url, SPACE_FILE),
                json.dumps(
                    {"fingerprint": sw.fingerprint(), "base": sw.base, "space": sw.space}, indent=1
                ).encode(),
            )
        print(f"{'restoring' if restore else 'starting'} sweep {sw.url}", flush=True)
        _tuner(sw, restore).fit()
        board = leaderboard(sw.url)
        write_outputs(sw.url, board)
        return board
    finally:
        if started:
            ray.shutdown()


# ---- leaderboard, curves, export -----------------------------------------------------------------


def _eval_lines(run_url: str) -> list[dict[str, Any]]:
    url = storage.join(run_url, "metrics.jsonl")
    if not storage.exists(url):
        return []
    out = []
    for line in storage.read_bytes(url).decode().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if d.get("kind") == "eval":
            out.append(d)
    return out


def _short(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in sorted(params.items()))


def leaderboard(url: str) -> dict[str, Any]:
    """Rows for every trial of an experiment, best first (trials that ran their budget before those
    that were stopped), read from the trials' own run directories."""
    from ray_mmd.data import manifest as mf

    saved = json.loads(storage.read_bytes(storage.join(url, SPACE_FILE)))
    base = saved["base"]
    fs, path = storage.filesystem(storage.join(url, "trials"))
    try:
        ids = sorted(os.path.basename(n.rstrip("/")) for n in fs.ls(path, detail=False))
    except FileNotFoundError:
        ids = []
    man = None
    rows = []
    for tid in ids:
        turl = storage.join(url, "trials", tid)
        if not storage.exists(storage.join(turl, "settings.json")):
            continue
        params = json.loads(storage.read_bytes(storage.join(turl, "settings.json")))["params"]
        cfg = trial_config(base, params)
        man = man or mf.load(cfg.data.url)
        total = eval_steps(cfg, man)[-1]
        evs = _eval_lines(storage.join(url, "train", tid))
        last = evs[-1] if evs else {}
        ev = events(turl)
        steps = int(last.get("step", 0))
        if ev.get("aborted"):
            status = "aborted (non-finite loss)"
        elif ev.get("error", 0) >= ev.get("start", 0) > 0 and steps < total:
            status = "error"
        elif steps >= total:
            status = "completed"
        elif ev.get("done"):
            status = "ended early"
        else:
            status = "stopped early"
        sc = score_of(last) if last else math.nan
        rows.append(
            {
                "trial": tid,
                "settings": params,
                "label": _short(params),
                "score": sc,
                "iou": last.get("eval/iou", math.nan),
                "abs_rel": last.get("eval/abs_rel", math.nan),
                "delta1": last.get("eval/delta1", math.nan),
                "steps": steps,
                "budget_steps": total,
                "stopped_early": status != "completed",
                "status": status,
                # trainer starts beyond the first (driver restores) + worker-group failures inside the trial
                "restarts": max(0, ev.get("start", 0) - 1) + ev.get("failure", 0),
                "trainer_starts": ev.get("start", 0),
                "curve": [[int(e["step"]), score_of(e)] for e in evs],
            }
        )

    def key(r: dict[str, Any]) -> tuple:
        s = r["score"]
        return (r["stopped_early"], math.isnan(s), s if not math.isnan(s) else 0.0)

    rows.sort(key=key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return {"experiment": url, "metric": "(1 - eval/iou) + eval/abs_rel, lower is better", "trials": rows}


_COLS = ("rank", "trial", "score", "iou", "abs_rel", "delta1", "steps", "status", "restarts", "label")


def format_table(board: dict[str, Any]) -> str:
    rows = board["trials"]
    cells = [list(_COLS)]
    for r in rows:
        cells.append(
            [
                str(r["rank"]),
                r["trial"],
                f"{r['score']:.4f}",
                f"{r['iou']:.4f}",
                f"{r['abs_rel']:.4f}",
                f"{r['delta1']:.4f}",
                f"{r['steps']}/{r['budget_steps']}",
                r["status"],
                str(r["restarts"]),
                r["label"],
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(_COLS))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(url: str, board: dict[str, Any]) -> None:
    """leaderboard.json, leaderboard.csv and curves.png in the experiment directory."""
    from ray_mmd.viz import sweep_curves

    storage.write_bytes_atomic(storage.join(url, "leaderboard.json"), json.dumps(board, indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = sorted({k for r in board["trials"] for k in r["settings"]})
    w.writerow(
        [
            "rank",
            "trial",
            "score",
            "iou",
            "abs_rel",
            "delta1",
            "steps",
            "budget_steps",
            "stopped_early",
            "status",
            "restarts",
        ]
        + keys
    )
    for r in board["trials"]:
        w.writerow(
            [
                r["rank"],
                r["trial"],
                r["score"],
                r["iou"],
                r["abs_rel"],
                r["delta1"],
                r["steps"],
                r["budget_steps"],
                r["stopped_early"],
                r["status"],
                r["restarts"],
            ]
            + [r["settings"].get(k, "") for k in keys]
        )
    storage.write_bytes_atomic(storage.join(url, "leaderboard.csv"), buf.getvalue().encode())
    curves = {f"{r['trial']} {r['label']}": r["curve"] for r in board["trials"]}
    stopped = {f"{r['trial']} {r['label']}" for r in board["trials"] if r["stopped_early"]}
    storage.write_bytes_atomic(storage.join(url, "curves.png"), sweep_curves(curves, stopped))


def export_best(url: str, out: str, run_name: str | None = None) -> dict[str, Any]:
    """Write the best trial's stage config (a full TrainConfig YAML `jobs/stage1.py --config` accepts)."""
    lb = storage.join(url, "leaderboard.json")
    if not storage.exists(storage.join(url, SPACE_FILE)):
        raise UserError(f"no sweep experiment at {url}: pass the experiment directory (SWEEP_STORAGE/NAME)")
    board = json.loads(storage.read_bytes(lb)) if storage.exists(lb) else leaderboard(url)
    done = [r for r in board["trials"] if not math.isnan(r["score"])]
    if not done:
        raise UserError(f"no trial of {url} has evaluated yet: run the sweep (again) first")
    best = done[0]
    saved = json.loads(storage.read_bytes(storage.join(url, SPACE_FILE)))
    cfg = trial_config(saved["base"], best["settings"])
    cfg.run.name = run_name or f"{url.rstrip('/').rsplit('/', 1)[-1]}-best"
    base_run = saved["base"].get("run", {})
    cfg.run.storage = base_run.get("storage", TrainConfig().run.storage)
    d = cfg.to_dict()
    d.pop("debug", None)  # test hooks never travel into a training config
    header = (
        f"# best trial {best['trial']} of sweep {url}: score {best['score']:.4f} "
        f"(IoU {best['iou']:.4f}, AbsRel {best['abs_rel']:.4f}, {best['status']})\n"
        f"# settings: {best['label']}\n"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True) if "://" not in out else None
    storage.write_bytes_atomic(out, (header + yaml.safe_dump(d, sort_keys=False)).encode())
    return best


# ---- command line (argument parsing lives in cli.py) -----------------------------------------------


def cli_run(config: str, name: str | None, storage_url: str | None, resume: bool) -> int:
    sw = load_sweep(config, name=name, storage_url=storage_url)
    board = run(sw, resume=resume)
    print(format_table(board))
    print(
        f"leaderboard: {storage.join(sw.url, 'leaderboard.csv')} (+ .json)   curves: {storage.join(sw.url, 'curves.png')}"
    )
    if board["trials"]:
        print(f"export the winner: ray-mmd tune export {sw.url} --out best.yaml")
    return 0


def cli_export(experiment: str, out: str, run_name: str | None) -> int:
    url = experiment if "://" in experiment else os.path.abspath(experiment)
    best = export_best(url, out, run_name)
    print(f"wrote {out}: trial {best['trial']} ({best['label']}), score {best['score']:.4f}")
    return 0


def cli_board(experiment: str) -> int:
    url = experiment if "://" in experiment else os.path.abspath(experiment)
    if not storage.exists(storage.join(url, SPACE_FILE)):
        raise UserError(f"no sweep experiment at {url}: pass the experiment directory (SWEEP_STORAGE/NAME)")
    board = leaderboard(url)
    write_outputs(url, board)
    print(format_table(board))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`jobs/tune.py`: the same as `ray-mmd tune run ...` (via the CLI's parser)."""
    from ray_mmd.cli import main as cli_main

    return cli_main(["tune", "run", *(sys.argv[1:] if argv is None else argv)])
