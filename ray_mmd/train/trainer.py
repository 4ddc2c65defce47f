"""The driver: config -> TorchTrainer (ScalingConfig / RunConfig / FailureConfig / CheckpointConfig) -> fit.

Re-running the same command with the same run name and storage resumes: Ray Train V2 reloads the run's
checkpoint-manager snapshot from `storage/name`, hands its latest checkpoint to the workers, and the loop
verifies it (falling back to older ones if it is torn).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.train import checkpoint as ck
from ray_mmd.train import stages

log = logging.getLogger("ray_mmd.train")

_PROPAGATE_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "PYTHONPATH")


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Workers run in their own working directory: make local paths absolute on the driver."""
    for obj, attr in ((cfg.data, "url"), (cfg.run, "storage"), (cfg.data, "cache_dir"), (cfg, "parent")):
        v = getattr(obj, attr)
        if v and v != "auto" and "://" not in v and (attr != "parent" or os.sep in v):
            setattr(obj, attr, os.path.abspath(os.path.expanduser(v)))
    return cfg


def ensure_data(cfg: TrainConfig) -> None:
    """Generate + pack the synthetic set on first use when the config asks for it; else require a manifest."""
    from ray_mmd.data import manifest as mf

    if storage.exists(storage.join(cfg.data.url, mf.MANIFEST_NAME)):
        mf.load(cfg.data.url)  # malformed or foreign: one line here, not in every worker
        return
    if cfg.data.synthetic is None:
        storage.require(cfg.data.url, "dataset")
        mf.load(cfg.data.url)  # raises the one-line "pack it first" error
        return
    from ray_mmd.data.pack import make_synthetic

    s = cfg.data.synthetic
    log.info("generating a synthetic dataset (%d samples) at %s (first use)", s.samples, cfg.data.url)
    make_synthetic(cfg.data.url, s.samples, s.shard_size, seed=s.seed)


# Ray settings for the local cluster `ray-mmd train` starts by itself (never for a cluster given by
# RAY_ADDRESS / `ray job submit`, and a value the user exported wins). Figures: benchmarks/bench_train.py
# (CPU shares) and benchmarks/bench_recovery.py (kill -> next step).
LOCAL_RAY_ENV = {
    # Train V2's controller polls the workers this often: it is how soon a dead worker is noticed (P9:
    # 2 s default -> ~1.7 s of a 6 s recovery) and how often queued reports are processed
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Train's Prometheus metrics: nothing scrapes them on a local cluster without a dashboard
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # the raylet starts workers at nice 15 (so a shared node's system processes stay responsive): the
    # Train worker then yields its cores to every nice-0 process that wakes (Ray's own daemons, anything
    # else on the machine), and its two intra-op threads wait for each other at every preemption. On a
    # cluster started for this one run the worker is the work: nice 0, like a plain PyTorch process
    # (P4, benchmarks/bench_train.py; `ray job submit` drivers get 0 from Ray itself)
    "RAY_worker_niceness": "0",
}
# core-worker metrics export to the node's agent (every process, periodically): no Prometheus locally
LOCAL_RAY_SYSTEM_CONFIG = {"enable_metrics_collection": False}


def local_ray_defaults() -> dict[str, str]:
    """Set LOCAL_RAY_ENV in this (driver) process where unset; Ray Train passes these variables on to
    its controller and workers. Returns what was set."""
    added = {k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ}
    os.environ.update(added)
    return added


def connect_ray(cfg: TrainConfig, log_to_driver: bool = True) -> bool:
    """Join the cluster `ray job submit` provides (RAY_ADDRESS), or start a local one; True if we started it.

    The job's processes get RAY_ADDRESS too, and a local cluster keeps its dashboard: Train V2's detached
    PlacementGroupCleaner asks the state API whether the controller lives, finding the cluster through
    RAY_ADDRESS (else /tmp/ray/ray_current_cluster, which names whichever cluster started last on the
    machine). Without both, every run ended with a ~12 s stop timeout and a traceback, and a Tune trial
    that ASHA stopped kept its workers' CPUs."""
    import ray

    if ray.is_initialized() or cfg.run.workers[-1] == 0:  # 0 workers: in-process, no cluster needed
        return False
    env = {k: os.environ[k] for k in _PROPAGATE_ENV if k in os.environ}
    quiet = {"log_to_driver": log_to_driver, **({} if cfg.run.verbose else _quiet_ray())}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        if "://" not in address and address != "auto":
            env["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **quiet)
        return False
    with socket.socket() as so:  # the GCS port, chosen here so that the job's env can name it
        so.bind(("", 0))
        port = so.getsockname()[1]
    env["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    workers = cfg.run.workers[-1]
    local_ray_defaults()
    old = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, int(workers * cfg.run.cpus_per_worker + 0.999)),
            include_dashboard=True,  # the state API the PlacementGroupCleaner asks (see above)
            runtime_env={"env_vars": env},
            _system_config=LOCAL_RAY_SYSTEM_CONFIG,
            **quiet,
        )
    finally:
        if old is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = old
    if ray.get_runtime_context().gcs_address != env["RAY_ADDRESS"]:
        log.warning("Ray's GCS is at %s, not %s", ray.get_runtime_context().gcs_address, env["RAY_ADDRESS"])
    return True


def _quiet_ray() -> dict[str, Any]:
    """Quiet by default (run.verbose / `ray-mmd -v` brings Ray's own INFO logs and warnings back), with
    Ray's supported knobs: `logging_level`, the driver's `ray` logger; `logging_config`, the root logger
    of every task and actor of the job (e.g. the PlacementGroupCleaner, which warns on each poll when
    the State API is off). Ray Train's `ray.train` logs follow RunConfig(logging_config) in
    build_trainer. Our messages use the `ray_mmd` logger with its own level, so they still show."""
    import ray

    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="ERROR")}


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.run.use_gpu != "auto":
        return cfg.run.use_gpu == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def build_trainer(
    cfg: TrainConfig,
    *,
    callbacks: list[Any] | None = None,
    resources_per_worker: dict[str, float] | None = None,
):
    """TorchTrainer for `cfg` (already validated, paths resolved); `callbacks`: extra RunConfig callbacks
    (e.g. Tune's TuneReportCallback); `resources_per_worker` replaces {CPU: run.cpus_per_worker} (a sweep's
    GPU fractions)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_mmd.train.loop import train_loop_per_worker

    r = cfg.run
    lo, hi = r.workers[0], r.workers[-1]
    scaling = ray.train.ScalingConfig(
        num_workers=(lo, hi) if lo < hi else hi,
        use_gpu=_use_gpu(cfg) if hi else False,
        resources_per_worker=resources_per_worker or {"CPU": r.cpus_per_worker},
        elastic_resize_monitor_interval_s=r.elastic_resize_interval_s,
    )
    fs, path = storage.pyarrow_filesystem(r.storage)
    env = {k: os.environ[k] for k in _PROPAGATE_ENV if k in os.environ}
    run_config = ray.train.RunConfig(
        name=r.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(
            max_failures=r.max_failures, max_preemption_failures=r.max_preemption_failures
        ),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        worker_runtime_env={"env_vars": env} if env else None,
        callbacks=callbacks,
        logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.run.verbose else "WARNING"),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=scaling,
        run_config=run_config,
    )


@dataclass
class Outcome:
    run_url: str
    checkpoint: str | None
    metrics: dict[str, Any]


def fit(cfg: TrainConfig) -> Outcome:
    """Run (or resume) one stage to the end of its data schedule (joins or starts Ray if needed)."""
    resolve_paths(cfg)
    stages.stage_of(cfg)
    stages.run_url(cfg)  # the run folder stays inside run.storage
    for url, what in ((cfg.run.storage, "run.storage URL"), (cfg.data.url, "dataset URL")):
        storage.check_reachable(url, what=what)  # seconds and one line, not gcsfs's retries
    ensure_data(cfg)
    if cfg.parent:
        stages.parent_checkpoint(cfg)  # fail now, on the driver, if stage N-1 has nothing to give
    from ray_mmd.train.loop import ABORTED
    from ray_mmd.train.metrics import NonFiniteLossError
    from ray_mmd.train.preemption import fit_through_handoffs

    aborted = storage.join(stages.run_url(cfg), ABORTED)
    storage.remove(aborted)  # an earlier attempt's: a re-run resumes from the newest checkpoint
    connect_ray(cfg)  # after every check above: a user mistake never waits for a cluster
    # a preemption notice may end an attempt early on purpose: fit again on the nodes that stay
    result = fit_through_handoffs(lambda: build_trainer(cfg).fit(), stages.run_url(cfg), cfg.run)
    if storage.exists(aborted):
        raise NonFiniteLossError(storage.read_bytes(aborted).decode())
    if result.checkpoint is not None and cfg.run.workers[-1] > 0:
        last = storage.join(stages.run_url(cfg), os.path.basename(result.checkpoint.path.rstrip("/")))
    else:
        last = next(iter(ck.list_checkpoints(stages.run_url(cfg))), None)
    # what attempts whose driver died left behind and the newest checkpoints have since replaced
    ck.prune_orphans(stages.run_url(cfg), cfg.checkpoint.num_to_keep, keep=last)
    return Outcome(stages.run_url(cfg), last, dict(result.metrics or {}))
