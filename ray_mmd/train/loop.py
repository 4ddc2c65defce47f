"""`train_loop_per_worker`: build the components, restore, step, log, checkpoint, evaluate — one worker
of a Ray Train run.

Every restart and every elastic resize re-runs this function from the top with a new world size, so
it always begins by restoring the newest checkpoint that verifies. The global batch and the LR
schedule (by global step) do not depend on the world size: each rank trains its slice of a constant
global batch, and the loss is weighted by the slice's share so the all-reduced gradient is the
global-batch mean. The components (checkpoint, metrics, optim, inputs, eval, faults) own the details;
this module only wires and calls them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.data import manifest as mf
from ray_mmd.data.stream import DataStream
from ray_mmd.train import inputs, stages
from ray_mmd.train import state as st
from ray_mmd.train.checkpoint import Checkpointer
from ray_mmd.train.eval import evaluate, write_grid
from ray_mmd.train.faults import DebugHooks
from ray_mmd.train.metrics import MetricsWindow, NonFiniteLossError, ProgressBar, RunLog, data_counters, plain
from ray_mmd.train.optim import build_optimizer, build_scheduler
from ray_mmd.train.preemption import PreemptionWatch
from ray_mmd.train.step import AmpPolicy, train_step

log = logging.getLogger("ray_mmd.train")

ABORTED = "ABORTED"  # file in the run dir: the run stopped on a NaN streak (the driver raises it)


@dataclass
class Run:
    """The components of one attempt on one worker, built by `build_run`; `train(run)` is the loop."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    run_url: str
    man: mf.Manifest
    stream: DataStream
    feed: inputs.FedStream  # the stream's batches on the device, prepared ahead on CUDA
    model: torch.nn.Module
    ddp: torch.nn.Module
    policy: AmpPolicy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: torch.nn.Module
    progress: st.Progress
    state: st.TrainState
    ckpt: Checkpointer
    window: MetricsWindow
    runlog: RunLog | None  # rank 0 only
    hooks: DebugHooks | None  # tests only
    preempt: PreemptionWatch
    total_steps: int

    def loss_for(self, n_local: int) -> Any:
        """Weight this rank's loss by its share of the global batch, so DDP's mean over ranks is the
        global-batch mean even when the batch does not split evenly (e.g. 3 workers, batch 64)."""
        w = n_local * self.world / self.cfg.data.global_batch_size
        return self.loss_fn if w == 1.0 else _Weighted(self.loss_fn, w)

    def flush(self) -> dict[str, float]:
        return self.window.flush(self.progress, self.scheduler.get_last_lr()[0], self.ckpt.good)

    def save(self, metrics: dict[str, Any], reason: str, sync: bool = False) -> None:
        meta = {"step": self.progress.global_step, "stage": self.cfg.stage, "run": self.cfg.run.name}
        # what eval/predict/export need: the model and the normalisation it was trained with
        meta["inference"] = {
            "model": self.cfg.model.name,
            "width": self.cfg.model.width,
            "image_size": self.cfg.data.image_size,
            "stats": {k: self.man.stats[k] for k in ("fg_bg", "bg") if k in self.man.stats},
        }
        self.ckpt.save(
            self.state, {**meta, "reason": reason}, plain(metrics), clean=self.window.streak == 0, sync=sync
        )

    def end_epoch(self) -> dict[str, float]:
        """Evaluate on the test split, sum the input counters over ranks, log both (every rank calls it)."""
        p, cfg = self.progress, self.cfg
        model = self.ddp.module if hasattr(self.ddp, "module") else self.ddp
        batches = inputs.eval_wire_batches(cfg, self.rank, self.world)
        finish = inputs.eval_finisher(cfg, self.man).to(self.device)
        t0 = time.perf_counter()
        ev, grid = evaluate(
            model, batches, self.policy, finish, sync=self.world > 1, keep_grid=self.rank == 0
        )
        if self.rank == 0:
            if grid is not None:
                write_grid(self.run_url, p.evals, grid, cfg.eval.grid_rows)
            log.info(
                "eval %d at step %d (%.1fs): %s",
                p.evals,
                p.global_step,
                time.perf_counter() - t0,
                " ".join(f"{k}={v:.4f}" for k, v in ev.items()),
            )
        p.evals += 1
        data = data_counters(self.stream.stats(), self.device, self.world, self.rank)
        ev = {f"eval/{k}": v for k, v in ev.items()}
        if self.runlog is not None:
            self.runlog.scalars(p.global_step, data, kind="data")
            self.runlog.scalars(p.global_step, ev, kind="eval")
        return {**ev, **data}


class _Weighted:
    def __init__(self, loss_fn: Any, w: float) -> None:
        self.loss_fn, self.w = loss_fn, w

    def __call__(self, out: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor) -> Any:
        total, parts = self.loss_fn(out, mask, depth)
        return total * self.w, parts


def _setup_logging(rank: int, verbose: bool) -> None:
    """Our messages with time and rank; Ray forwards worker output to the driver. Quiet by default:
    the worker's root logger (which Ray Train sets to INFO) drops Ray's per-report INFO lines
    ("Reporting training result ...", logged under a file-path logger name outside `ray.train`)."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    lg = logging.getLogger("ray_mmd")
    lg.setLevel(logging.INFO)
    if not any(getattr(h, "_ray_mmd", False) for h in lg.handlers):
        h = logging.StreamHandler()
        h._ray_mmd = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
        lg.addHandler(h)
        lg.propagate = False


def _build_model(
    cfg: TrainConfig, device: torch.device, lineage: st.Lineage, fresh: bool
) -> tuple[torch.nn.Module, torch.nn.Module, AmpPolicy]:
    """The model (parent weights when `fresh`, else the checkpoint's come later), its DDP wrapper, AMP."""
    from ray_mmd.models import build_model

    model = build_model(cfg.model.name, width=cfg.model.width)
    if fresh:  # a new stage starts from its parent's weights
        lineage.parent = stages.init_from_parent(model, cfg)
    stages.apply_freeze(model, cfg)  # before DDP: it registers the trainable parameters
    policy = AmpPolicy.for_device(device, mode=cfg.optim.amp)
    policy.prepare_model(model)
    return model, ray.train.torch.prepare_model(model), policy


def build_run(cfg: TrainConfig) -> Run:
    """Every component of this attempt, restored from the newest verified checkpoint when there is one."""
    from ray_mmd.losses import MultiTaskLoss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_logging(rank, cfg.run.verbose)
    if cfg.optim.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.data.seed)  # same initial weights on every rank
    device = ray.train.torch.get_device()
    run_url = stages.run_url(cfg)
    man = mf.load(cfg.data.url)
    stream = inputs.build_stream(cfg, man, rank, world, ctx.get_local_world_size())
    finish = stream.finisher().to(device)  # resize/flip/normalise on the device
    local = cfg.run.workers[-1] == 0  # in-process (Ray Train's local mode): no controller
    ckpt = Checkpointer(run_url, rank=rank, world=world, local=local, num_to_keep=cfg.checkpoint.num_to_keep)
    resume = ckpt.find()

    lineage = st.Lineage(run=cfg.run.name, stage=cfg.stage)
    model, ddp, policy = _build_model(cfg, device, lineage, fresh=resume is None)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    total = inputs.total_steps(cfg, man)
    scheduler = build_scheduler(cfg, optimizer, total)
    progress, ledger = st.Progress(stage=cfg.stage), st.IdLedger()
    feed = inputs.FedStream(stream, lambda w: policy.prepare_batch(w, finish), device)
    state = st.TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        amp=policy,  # GradScaler state (fp16 GPUs)
        rng=st.RNGState(),
        data=feed,  # the position of the last batch the step consumed, not the read-ahead's
        progress=progress,
        lineage=lineage,
        config=st.Value(cfg.to_dict()),
        ids=ledger,
    )
    if resume is not None:
        ckpt.load(state, resume)
        progress.restarts += 1
        if rank == 0:
            log.info(
                "resumed from %s at global step %d (world size %d)", ckpt.last, progress.global_step, world
            )
    if rank == 0:
        log.info(
            "stage %d run %s: world size %d, global batch %d, step %d of %d",
            *(cfg.stage, cfg.run.name, world, cfg.data.global_batch_size, progress.global_step, total),
        )
    return Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        run_url=run_url,
        man=man,
        stream=stream,
        feed=feed,
        model=model,
        ddp=ddp,
        policy=policy,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=MultiTaskLoss(
            mask_spec=cfg.loss.mask,
            depth_spec=cfg.loss.depth,
            mask_weight=cfg.loss.mask_weight,
            depth_weight=cfg.loss.depth_weight,
            compile_ssim=cfg.loss.compile_ssim,
        ),
        progress=progress,
        state=state,
        ckpt=ckpt,
        window=MetricsWindow(cfg.run.nan_abort_after, cfg.run.log_every, rank),
        runlog=RunLog(run_url, resume_step=progress.global_step) if rank == 0 else None,
        hooks=DebugHooks.from_config(cfg.debug, rank, world, ledger),
        preempt=PreemptionWatch.from_config(cfg.run, rank, enabled=not local),
        total_steps=total,
    )


def _profile_dir(cfg: TrainConfig, run_url: str) -> str:
    kind, path = storage.split_url(run_url)
    if kind == "file":
        return os.path.join(path, "profile")
    return os.path.join(tempfile.gettempdir(), f"ray_mmd_profile_{cfg.run.name}")


def train(r: Run) -> None:
    """The step loop: epochs of the data schedule; a log every log_every steps, a checkpoint every
    checkpoint.every_steps and at each epoch end, after the evaluation."""
    from ray_mmd.profiling import profile

    cfg, p = r.cfg, r.progress
    micro, g = cfg.data.micro_batch_size, cfg.data.global_batch_size
    bar = ProgressBar(r.rank == 0 and cfg.run.progress, r.total_steps, p.global_step, cfg.stage)
    start, last = p.global_step, {}
    # --profile (run.profile=true): cProfile table + a torch.profiler trace of 5 steps, rank 0 only
    with profile(
        _profile_dir(cfg, r.run_url), enabled=cfg.run.profile and r.rank == 0, torch_steps=5
    ) as prof:
        while not r.stream.done:
            r.ddp.train()
            for ids, batch in r.feed.epoch():  # on CUDA the next batch's copy + finish overlap this step
                step = p.global_step
                if r.hooks:
                    batch = r.hooks.before_step(step, batch, ids)
                out = train_step(
                    r.ddp,
                    batch,
                    r.loss_for(len(ids)),
                    r.optimizer,
                    r.policy,
                    accum_steps=-(-len(ids) // micro) if micro else 1,
                    grad_clip=cfg.optim.grad_clip,
                )
                r.scheduler.step()
                p.global_step += 1
                p.samples_seen += g
                r.window.add(step, out, ids, len(ids) * r.world)
                prof.step()
                if r.hooks:
                    r.hooks.after_step(p.global_step)
                if p.global_step % cfg.run.log_every == 0 and (m := r.flush()):
                    last = m
                    bar.update(p.global_step, m)
                    if r.runlog is not None:
                        r.runlog.scalars(p.global_step, {f"train/{k}": v for k, v in m.items()})
                # (the last step of an epoch gets the epoch-end checkpoint right below instead)
                if p.global_step % cfg.checkpoint.every_steps == 0 and r.feed.steps_left() > 0:
                    last.update(r.flush())
                    r.save(last, "interval")
                if (d := r.preempt.poll(p.global_step)) and r.preempt.act(d, r, {**last, **r.flush()}):
                    break  # checkpointed on a preemption notice: the driver goes on without this attempt
            if r.preempt.handed_off:
                break
            # epoch (or chunk) done: the stream's position already points at the next one
            last.update(r.flush())
            bar.update(p.global_step)
            last.update(r.end_epoch())
            reason = "final" if r.stream.done else "epoch"
            if r.preempt.pending is None:
                r.save(last, reason)
            elif r.preempt.act(r.preempt.pending, r, last, reason=reason):
                break
    bar.close()
    if r.runlog is not None:
        r.runlog.close()
    if p.global_step == start and r.rank == 0:
        log.info("nothing left to train: the data schedule of run %s is complete", cfg.run.name)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for TorchTrainer: `config` is {"cfg": TrainConfig.to_dict()}."""
    run = build_run(TrainConfig.from_dict(config["cfg"]))
    try:
        train(run)
    except NonFiniteLossError as e:
        # Not a failure for Ray to retry: a retry restores the same checkpoint and meets the same
        # streak (max_failures times over). The gradient is all-reduced, so every rank sees the streak
        # at the same step and ends here. Metrics reported without a checkpoint do not reach the
        # driver in Train V2, so the message goes through the run dir.
        if run.runlog is not None:
            run.runlog.close()
        if run.rank == 0:
            storage.write_bytes_atomic(storage.join(run.run_url, ABORTED), str(e).encode())
