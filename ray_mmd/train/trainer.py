"""The driver: config -> TorchTrainer (ScalingConfig / RunConfig / FailureConfig / CheckpointConfig) -> fit.

Re-running the same command with the same run name and storage resumes: Ray Train V2 reloads the run's
checkpoint-manager snapshot from `storage/name`, hands its latest checkpoint to the workers, and the loop
verifies it (falling back to older ones if it is torn).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from ray_mmd import storage
from ray_mmd.config import TrainConfig, load
from ray_mmd.errors import UserError
from ray_mmd.train import stages
from ray_mmd.train import state as st

log = logging.getLogger("ray_mmd.train")

_PROPAGATE_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "PYTHONPATH")


def parse_args(argv: list[str], stage: int | None = None) -> TrainConfig:
    """`--config X.yaml --run-name N --storage URL --data URL --workers MIN,MAX [key=value ...]`."""
    ap = argparse.ArgumentParser(prog="ray-mmd train", description="Train one stage on Ray Train.")
    ap.add_argument("--config", help="YAML config (jobs/configs/*.yaml); defaults otherwise")
    ap.add_argument("--run-name", help="run name (same name + storage = resume)")
    ap.add_argument("--storage", help="where runs live: local dir, Colab Drive path or gs://bucket/path")
    ap.add_argument("--data", help="packed dataset URL")
    ap.add_argument("--workers", help="MIN,MAX workers (elastic when MIN < MAX) or N")
    ap.add_argument("--parent", help="previous stage's run name (or checkpoint URL)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.01")
    a = ap.parse_args(argv)
    if a.workers is not None and a.workers.replace(" ", "") in ("0", "0,0"):
        raise UserError("--workers 0: a run needs at least one worker; give --workers N or MIN,MAX (N >= 1)")
    ov = list(a.overrides)
    for key, val in (
        ("run.name", a.run_name),
        ("run.storage", a.storage),
        ("data.url", a.data),
        ("run.workers", a.workers),
        ("parent", a.parent),
    ):
        if val is not None:
            ov.append(f"{key}={val}")
    if stage is not None:
        ov.insert(0, f"stage={stage}")
    return load(a.config, ov)


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
        return
    if cfg.data.synthetic is None:
        storage.require(cfg.data.url, "dataset")
        mf.load(cfg.data.url)  # raises the one-line "pack it first" error
        return
    from ray_mmd.data.pack import make_synthetic

    s = cfg.data.synthetic
    log.info("generating a synthetic dataset (%d samples) at %s (first use)", s.samples, cfg.data.url)
    make_synthetic(cfg.data.url, s.samples, s.shard_size, seed=s.seed)


def connect_ray(cfg: TrainConfig) -> bool:
    """Join the cluster `ray job submit` provides (RAY_ADDRESS), or start a local one; True if we started it."""
    import ray

    if ray.is_initialized() or cfg.run.workers[-1] == 0:  # 0 workers: in-process, no cluster needed
        return False
    env = {k: os.environ[k] for k in _PROPAGATE_ENV if k in os.environ}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
        return False
    workers = cfg.run.workers[-1]
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(workers * cfg.run.cpus_per_worker + 0.999)),
        include_dashboard=False,
        runtime_env={"env_vars": env} if env else None,
    )
    return True


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.run.use_gpu != "auto":
        return cfg.run.use_gpu == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def build_trainer(cfg: TrainConfig):
    """TorchTrainer for `cfg` (already validated, paths resolved)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_mmd.train.loop import train_loop_per_worker

    r = cfg.run
    lo, hi = r.workers[0], r.workers[-1]
    scaling = ray.train.ScalingConfig(
        num_workers=(lo, hi) if lo < hi else hi,
        use_gpu=_use_gpu(cfg) if hi else False,
        resources_per_worker={"CPU": r.cpus_per_worker},
        elastic_resize_monitor_interval_s=r.elastic_resize_interval_s,
    )
    fs, path = storage.pyarrow_filesystem(r.storage)
    env = {k: os.environ[k] for k in _PROPAGATE_ENV if k in os.environ}
    run_config = ray.train.RunConfig(
        name=r.name,
        storage_path=path,
        storage_filesystem=fs,
        # preemptions have their own budget: they never use up max_failures
        failure_config=ray.train.FailureConfig(
            max_failures=r.max_failures, max_preemption_failures=r.max_preemption_failures
        ),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        worker_runtime_env={"env_vars": env} if env else None,
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
    """Run (or resume) one stage to the end of its data schedule."""
    resolve_paths(cfg)
    stages.stage_of(cfg)
    ensure_data(cfg)
    if cfg.parent:
        stages.parent_checkpoint(cfg)  # fail now, on the driver, if stage N-1 has nothing to give
    from ray_mmd.train.loop import ABORTED, NonFiniteLossError
    from ray_mmd.train.preemption import (
        PreemptionBudgetExceeded,
        handoff_marker,
        wait_nodes_gone,
        watch_drains_often,
    )

    aborted = storage.join(stages.run_url(cfg), ABORTED)
    storage.remove(aborted)  # an earlier attempt's: a re-run resumes from the newest checkpoint
    handoff = handoff_marker(stages.run_url(cfg))
    storage.remove(handoff)
    watch_drains_often()
    result = build_trainer(cfg).fit()
    handoffs = 0
    while storage.exists(handoff):  # the workers checkpointed on a preemption notice and stepped aside
        note = json.loads(storage.read_bytes(handoff).decode())
        storage.remove(handoff)
        if (result.metrics or {}).get("reason") == "final":  # Ray restarted it and it finished meanwhile
            break
        handoffs += 1
        budget = cfg.run.max_preemption_failures
        if budget != -1 and handoffs > budget:
            raise PreemptionBudgetExceeded(
                f"run {cfg.run.name}: {handoffs} preemptions exceed run.max_preemption_failures={budget}; "
                "re-run the same command to resume from the preemption checkpoint"
            )
        waited = wait_nodes_gone(note)
        log.warning(
            "preemption hand-off %d: resuming on the nodes that stay (the preempted ones left %.1f s after "
            "the checkpoint); notice: %s",
            handoffs,
            waited,
            note,
        )
        result = build_trainer(cfg).fit()
    if storage.exists(aborted):
        raise NonFiniteLossError(storage.read_bytes(aborted).decode())
    if result.checkpoint is not None and cfg.run.workers[-1] > 0:
        ck = storage.join(stages.run_url(cfg), os.path.basename(result.checkpoint.path.rstrip("/")))
    else:
        ck = next(iter(st.list_checkpoints(stages.run_url(cfg))), None)
    # what attempts whose driver died left behind and the newest checkpoints have since replaced
    st.prune_orphans(stages.run_url(cfg), cfg.checkpoint.num_to_keep, keep=ck)
    return Outcome(stages.run_url(cfg), ck, dict(result.metrics or {}))


def summary(out: Outcome) -> str:
    """What the user needs after a run: the numbers and where everything is."""
    m = out.metrics
    ev = {k[5:]: v for k, v in m.items() if k.startswith("eval/")}
    lines = [f"run finished at step {m.get('step', '?')}"]
    if ev:
        lines.append("held-out metrics: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())))
    lines += [
        f"metrics:     {storage.join(out.run_url, 'metrics.jsonl')}  (TensorBoard: {storage.join(out.run_url, 'tensorboard')})",
        f"PNG grid:    {storage.join(out.run_url, 'grid_latest.png')}  (every eval: {storage.join(out.run_url, 'grids')})",
        f"checkpoint:  {out.checkpoint}",
    ]
    return "\n".join(lines)


def run_cli(argv: list[str], stage: int | None = None) -> int:
    """Parse, connect, fit, print the summary; user mistakes print one line and return 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv, stage)
        connect_ray(cfg)
        out = fit(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failed run: Ray has already logged the worker traceback
        from ray.train import TrainingFailedError

        from ray_mmd.train.loop import NonFiniteLossError
        from ray_mmd.train.preemption import PreemptionBudgetExceeded

        if isinstance(e, NonFiniteLossError | PreemptionBudgetExceeded):
            print(f"training stopped: {e}", file=sys.stderr)
            return 1
        if isinstance(e, TrainingFailedError):
            print(
                f"training failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}",
                file=sys.stderr,
            )
            return 1
        raise
    print(summary(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ray-mmd train ...`."""
    return run_cli(sys.argv[1:] if argv is None else argv)


def run_pipeline(argv: list[str]) -> int:
    """Stages 1, 2, 3 in order; stage N's parent is stage N-1's run. Each stage resumes if re-run."""
    ap = argparse.ArgumentParser(prog="pipeline", description="Run stages 1 -> 2 -> 3.")
    ap.add_argument(
        "--configs", default="jobs/configs/stage1.yaml,jobs/configs/stage2.yaml,jobs/configs/stage3.yaml"
    )
    ap.add_argument("--run-name", help="base run name: stages become BASE-stage1..3")
    a, rest = ap.parse_known_args(argv)
    parent = None
    for n, path in enumerate(a.configs.split(","), start=1):
        extra = ["--config", path, *rest]
        if a.run_name:
            extra += ["--run-name", f"{a.run_name}-stage{n}"]
        if parent:
            extra += ["--parent", parent]
        print(f"== stage {n}: {path}", flush=True)
        rc = run_cli(extra, stage=n)
        if rc:
            return rc
        parent = parse_args(extra, stage=n).run.name
    return 0
