"""`train_loop_per_worker`: restore, step, log, checkpoint, evaluate — one worker of a Ray Train run.

Every restart and every elastic resize re-runs this function from the top with a new world size, so
it always begins by restoring the newest checkpoint that verifies. The global batch and the LR
schedule (by global step) do not depend on the world size: each rank trains its slice of a constant
global batch, and the loss is weighted by the slice's share so the all-reduced gradient is the
global-batch mean.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import tempfile
import time
import uuid
from collections import deque
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.data import manifest as mf
from ray_mmd.train import stages
from ray_mmd.train import state as st
from ray_mmd.train.preemption import Decision, PreemptionWatch, handoff_marker

log = logging.getLogger("ray_mmd.train")

ABORTED = "ABORTED"  # file in the run dir: the run stopped on a NaN streak (the driver raises it)
# stream counters that add up over ranks (data/* in metrics.jsonl and TensorBoard)
_SUMMED_DATA_COUNTERS = (
    "samples",
    "quarantined",
    "decoded",
    "preload_hits",
    "shards_opened",
    "cache_hits",
    "cache_misses",
    "cache_evictions",
    "cache_refetches",
)


class NonFiniteLossError(RuntimeError):
    """K steps in a row had a NaN/inf loss."""


# ---- building blocks ----------------------------------------------------------------------------


def chunk_schedule(cfg: TrainConfig, man: mf.Manifest) -> list[tuple[int, int, int]]:
    if cfg.data.chunks:
        return [(c[0], c[1], c[2] if len(c) > 2 else cfg.data.epochs) for c in cfg.data.chunks]
    return [(0, man.id_end, cfg.data.epochs)]


def total_steps(cfg: TrainConfig, man: mf.Manifest) -> int:
    """Steps of the whole schedule (remainders smaller than a global batch are dropped)."""
    g = cfg.data.global_batch_size
    return max(
        1, sum(e * (len(man.sample_ids("train", lo, hi)) // g) for lo, hi, e in chunk_schedule(cfg, man))
    )


def lr_lambda(cfg: TrainConfig, steps: int):
    """LR multiplier as a pure function of the global step."""
    o = cfg.optim
    warm = max(1, int(o.warmup_fraction * steps))

    def f(step: int) -> float:
        if o.schedule == "constant":
            return min(1.0, (step + 1) / warm)
        if o.schedule == "onecycle":
            if step < warm:
                return 0.05 + 0.95 * step / warm
            t = min(1.0, (step - warm) / max(1, steps - warm))
            return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01
        t = min(1.0, step / steps)  # cosine
        return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01

    return f


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Fused where possible: a non-finite step is then skipped on device, without a host sync."""
    from ray_mmd.train.step import make_optimizer

    o = cfg.optim
    kw = {"momentum": o.momentum} if o.name == "sgd" else {}
    return make_optimizer(params, o.name, lr=o.lr, weight_decay=o.weight_decay, **kw)


def shard_cache_dir(setting: str | None, data_url: str) -> str | None:
    """data.cache_dir "auto": a node-local cache for remote data, none for data already on local disk."""
    if setting != "auto":
        return setting or None
    if storage.split_url(data_url)[0] == "file":
        return None
    return os.path.join(tempfile.gettempdir(), "ray_mmd_shard_cache")


def stream_config(cfg: TrainConfig, chunks: list[tuple[int, int, int]]):
    from ray_mmd.data.stream import Chunk, StreamConfig

    d = cfg.data
    return StreamConfig(
        data=d.url,
        split="train",
        chunks=[Chunk(lo, hi, e) for lo, hi, e in chunks],
        image_size=d.image_size,
        global_batch_size=d.global_batch_size,
        seed=d.seed,
        shuffle=d.shuffle,
        flip_p=d.flip_p,
        cache_dir=shard_cache_dir(d.cache_dir, d.url),
        cache_bytes=d.cache_bytes,
        backend=d.backend,
        workers=d.decode_workers,
        decoded_preload_bytes=d.decoded_preload_bytes,
        preload_group=f"{cfg.run.name}/stage{cfg.stage}",
        max_bad_fraction=d.max_bad_fraction,
    )


def _setup_logging(rank: int) -> None:
    """Our messages with time and rank; Ray forwards worker output to the driver."""
    lg = logging.getLogger("ray_mmd")
    lg.setLevel(logging.INFO)
    if not any(getattr(h, "_ray_mmd", False) for h in lg.handlers):
        h = logging.StreamHandler()
        h._ray_mmd = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
        lg.addHandler(h)
        lg.propagate = False


def _gather_ids(ids: list[int], world: int) -> list[int]:
    if world == 1 or not dist.is_initialized():
        return ids
    out: list[Any] = [None] * world
    dist.all_gather_object(out, ids)
    return [i for part in out for i in part]


# ---- the loop -----------------------------------------------------------------------------------


class _Run:
    """State and plumbing of one attempt on one worker; `train()` is the loop itself."""

    def __init__(self, cfg: TrainConfig) -> None:
        from ray_mmd.data.stream import DataStream
        from ray_mmd.losses import MultiTaskLoss
        from ray_mmd.models import build_model
        from ray_mmd.train.step import AmpPolicy

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        _setup_logging(self.rank)
        self.run_url = stages.run_url(cfg)
        self.device = ray.train.torch.get_device()
        if cfg.optim.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(cfg.data.seed)  # same initial weights on every rank

        self.man = mf.load(cfg.data.url)
        chunks = chunk_schedule(cfg, self.man)
        self.total_steps = total_steps(cfg, self.man)
        # the node's cores are shared by the ranks on it: that many decode workers each
        decode_workers = cfg.data.decode_workers or max(
            1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())
        )
        self.stream = DataStream(
            dataclasses.replace(stream_config(cfg, chunks), workers=decode_workers),
            rank=self.rank,
            world_size=self.world,
        )
        self.finish = self.stream.finisher().to(self.device)  # resize/flip/normalise on the device

        self.model = build_model(cfg.model.name, width=cfg.model.width)
        self.progress = st.Progress(stage=cfg.stage)
        self.lineage = st.Lineage(run=cfg.run.name, stage=cfg.stage)
        self.ledger = st.IdLedger()

        self.local_mode = cfg.run.workers[-1] == 0
        ckpt = None if self.local_mode else ray.train.get_checkpoint()
        preferred = storage.join(self.run_url, os.path.basename(ckpt.path.rstrip("/"))) if ckpt else None
        found = st.restore_latest(self.run_url, preferred)
        if found is None:
            self.lineage.parent = stages.init_from_parent(self.model, cfg)
        stages.apply_freeze(self.model, cfg)

        self.policy = AmpPolicy.for_device(self.device, mode=cfg.optim.amp)
        self.policy.prepare_model(self.model)
        self.ddp = ray.train.torch.prepare_model(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.loss_fn = MultiTaskLoss(
            mask_spec=cfg.loss.mask,
            depth_spec=cfg.loss.depth,
            mask_weight=cfg.loss.mask_weight,
            depth_weight=cfg.loss.depth_weight,
        )
        parts: dict[str, Any] = dict(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            amp=self.policy,  # GradScaler state (fp16 GPUs)
            rng=st.RNGState(),
            data=self.stream,
            progress=self.progress,
            lineage=self.lineage,
            config=st.Value(cfg.to_dict()),
            ids=self.ledger,
        )
        self.state = st.TrainState(**parts)

        self.last_ckpt: str | None = None
        self.good_ckpt: str | None = None
        self.streak = 0  # non-finite steps in a row, as of the last flush
        if found is not None:
            sd, meta, url = found
            # the config is the one given now (e.g. a longer schedule); everything else resumes
            self.state.load_state_dict(sd, skip=("config",))
            self.progress.restarts += 1
            self.last_ckpt = self.good_ckpt = url
            if self.rank == 0:  # what an attempt whose driver died left beyond num_to_keep
                st.prune_orphans(self.run_url, cfg.checkpoint.num_to_keep, keep=url)
            if self.rank == 0:
                log.info(
                    "resumed from %s at global step %d (world size %d)",
                    url,
                    self.progress.global_step,
                    self.world,
                )
        self.token = uuid.uuid4().hex[:6]
        self.preempt = PreemptionWatch.from_config(cfg.run, self.rank, enabled=not self.local_mode)
        self.pending: Decision | None = None  # a preemption checkpoint asked at an epoch's last step
        self.handed_off = False
        if self.rank == 0:
            log.info(
                "stage %d run %s: world size %d, global batch %d, step %d of %d",
                cfg.stage,
                cfg.run.name,
                self.world,
                cfg.data.global_batch_size,
                self.progress.global_step,
                self.total_steps,
            )
        self.writer = None
        if self.rank == 0:
            from ray_mmd.train.eval import RunLog

            self.writer = RunLog(self.run_url, resume_step=self.progress.global_step)

    # -- checkpoint ------------------------------------------------------------------------------

    def save(self, metrics: dict[str, Any], reason: str, sync: bool = False) -> None:
        """Rank 0 writes the files, every rank reports (report is a barrier); upload runs in the background
        (sync=True: report returns once the checkpoint is on storage)."""
        step = self.progress.global_step
        checkpoint = None
        name = st.checkpoint_dir_name(step, f"{int(time.time() * 1000):x}{self.token}")
        if self.rank == 0:
            tmp = tempfile.mkdtemp(prefix="ray_mmd_ckpt_")
            st.write_checkpoint(
                tmp,
                self.state.state_dict(),
                {"step": step, "stage": self.cfg.stage, "run": self.cfg.run.name, "reason": reason},
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        self.last_ckpt = storage.join(self.run_url, name)
        if self.streak == 0:
            self.good_ckpt = self.last_ckpt
        if self.local_mode:  # no controller to persist it: copy it into the run dir ourselves
            st.persist_local(tmp, self.last_ckpt, self.run_url, self.cfg.checkpoint.num_to_keep)
            ray.train.report({**metrics, "step": step, "reason": reason})
            return
        ray.train.report(
            {**metrics, "step": step, "reason": reason, "world_size": self.world},
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC
            if sync
            else ray.train.CheckpointUploadMode.ASYNC,
        )

    def on_preemption(self, d: Decision, metrics: dict[str, Any], reason: str | None = None) -> bool:
        """A notice (or its deadline): checkpoint this step now, synchronously and verified; True = stop and
        hand the run over (see ray_mmd/train/preemption.py). At an epoch's last step the epoch-end
        checkpoint is the one (`reason` = its reason), right after the evaluation."""
        step, n = self.progress.global_step, d.notice
        if self.writer is not None and d.reason == "preempt-notice" and reason is None:
            self.writer.scalars(
                step,
                {"preempt/notices": self.preempt.notices, "preempt/deadline_in_s": n.deadline - n.seen_at},
                kind="preemption",
            )
        if not d.checkpoint:
            return False
        if reason is None and self.stream.steps_left() == 0:  # the epoch-end checkpoint follows at once
            self.pending = d
            return False
        t0 = time.time()
        self.save(_plain(metrics), reason or d.reason, sync=True)
        ok = True
        if self.rank == 0:
            try:
                st.load_checkpoint(self.last_ckpt)
            except st.CheckpointError as e:  # keep training: Ray restarts from the newest one that verifies
                log.error("preemption checkpoint did not verify: %s", e)
                ok = False
        ok = bool(self.preempt.agree(ok))
        dt = time.time() - t0
        self.preempt.checkpointed(dt)
        if self.rank == 0:
            log.warning(
                "preemption checkpoint %s at step %d verified: %.2f s to write, %.2f s after the notice, "
                "%.1f s before the deadline",
                self.last_ckpt,
                step,
                dt,
                time.time() - n.seen_at,
                n.deadline - time.time(),
            )
        if self.writer is not None:
            self.writer.scalars(
                step,
                {
                    "preempt/checkpoint_s": dt,
                    "preempt/notice_to_checkpoint_s": time.time() - n.seen_at,
                    "preempt/deadline_left_s": n.deadline - time.time(),
                    "preempt/verified": float(ok),
                    "preempt/final": float(d.stop),
                },
                kind="preemption",
            )
        stop = d.stop and ok and not self.stream.done
        if stop:
            self.hand_off()
        return stop

    def hand_off(self) -> None:
        """End this attempt cleanly; the driver sees the marker and fits again on the nodes that stay."""
        self.handed_off = True
        if self.rank == 0 and self.preempt.notice is not None:
            storage.write_bytes_atomic(handoff_marker(self.run_url), self.preempt.notice.to_json().encode())

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> None:
        from ray_mmd.train.eval import evaluate
        from ray_mmd.train.step import train_step

        cfg, p = self.cfg, self.progress
        bar = None
        if self.rank == 0 and cfg.run.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=p.global_step,
                desc=f"stage {cfg.stage}",
                unit="step",
                mininterval=2.0,
                dynamic_ncols=True,
            )
        window: list[dict[str, torch.Tensor]] = []
        ids_ring: deque[tuple[int, torch.Tensor]] = deque(
            maxlen=max(cfg.run.nan_abort_after, cfg.run.log_every)
        )
        t_window = [time.perf_counter(), 0]  # start, images
        start_step = p.global_step
        last_metrics: dict[str, Any] = {}
        g = cfg.data.global_batch_size
        micro = cfg.data.micro_batch_size

        def flush() -> dict[str, float]:
            """The only host sync: losses and finite flags of the steps since the last flush."""
            if not window:
                return {}
            stacked = {k: torch.stack([w[k] for w in window]).float().cpu() for k in window[0]}
            finite = stacked.pop("finite").bool().tolist()
            steps = [s for s, _ in list(ids_ring)[-len(finite) :]]
            for ok, s in zip(finite, steps, strict=False):
                if ok:
                    self.streak = 0
                    continue
                p.skipped_steps += 1
                self.streak += 1
                if self.streak >= cfg.run.nan_abort_after:
                    bad = dict(ids_ring).get(s)
                    raise NonFiniteLossError(
                        f"{self.streak} non-finite losses in a row ending at global step {s}; offending batch "
                        f"sample ids (rank {self.rank}): {bad.tolist() if bad is not None else '?'}; last good "
                        f"checkpoint (before the streak): {self.good_ckpt or 'none'}"
                    )
            good = ~torch.isnan(stacked["loss"]) & ~torch.isinf(stacked["loss"])
            out = {k: float(v[good].mean()) if good.any() else float("nan") for k, v in stacked.items()}
            window.clear()
            dt = time.perf_counter() - t_window[0]
            out["img_per_s"] = t_window[1] / dt if dt > 0 else 0.0
            out["skipped_steps"] = p.skipped_steps
            out["lr"] = self.scheduler.get_last_lr()[0]
            t_window[0], t_window[1] = time.perf_counter(), 0
            return out

        from ray_mmd.profiling import profile

        local_run = storage.split_url(self.run_url)[0] == "file"
        prof_dir = (
            os.path.join(storage.split_url(self.run_url)[1], "profile")
            if local_run
            else os.path.join(tempfile.gettempdir(), f"ray_mmd_profile_{cfg.run.name}")
        )
        # --profile (run.profile=true): cProfile table + a torch.profiler trace of 5 steps, rank 0 only
        with profile(prof_dir, enabled=cfg.run.profile and self.rank == 0, torch_steps=5) as prof:
            while not self.stream.done:
                self.ddp.train()
                for wire in self.stream.epoch_batches():
                    step = p.global_step
                    ids = wire["sample_id"]  # stays on the host: the id ledger needs no device sync
                    n_local = len(ids)
                    batch = self.policy.prepare_batch(wire, self.finish)
                    if cfg.debug.nan_at_steps and step in cfg.debug.nan_at_steps:
                        # a NaN target makes the loss non-finite without touching BatchNorm statistics
                        batch = {**batch, "depth": torch.full_like(batch["depth"], float("nan"))}
                    if cfg.debug.record_ids:
                        self.ledger.record(step, self.world, _gather_ids(ids.tolist(), self.world))
                    out = train_step(
                        self.ddp,
                        batch,
                        self._loss_for(n_local),
                        self.optimizer,
                        self.policy,
                        accum_steps=-(-n_local // micro) if micro else 1,
                        grad_clip=cfg.optim.grad_clip,
                    )
                    self.scheduler.step()
                    p.global_step += 1
                    p.samples_seen += g
                    window.append(out)
                    prof.step()
                    ids_ring.append((step, ids))
                    t_window[1] += n_local * self.world
                    if cfg.debug.step_sleep_s:
                        time.sleep(cfg.debug.step_sleep_s)
                    self._maybe_kill()
                    if p.global_step % cfg.run.log_every == 0:
                        m = flush()
                        if m:
                            last_metrics = m
                            if bar is not None:
                                bar.set_postfix(
                                    loss=f"{m['loss']:.4f}",
                                    mask=f"{m.get('mask', 0):.3f}",
                                    depth=f"{m.get('depth', 0):.3f}",
                                    img_s=f"{m['img_per_s']:.0f}",
                                )
                                bar.update(p.global_step - bar.n)
                            if self.writer is not None:
                                self.writer.scalars(p.global_step, {f"train/{k}": v for k, v in m.items()})
                    # (the last step of an epoch gets the epoch-end checkpoint right below instead)
                    if p.global_step % cfg.checkpoint.every_steps == 0 and self.stream.steps_left() > 0:
                        last_metrics.update(flush())
                        self.save(_plain(last_metrics), "interval")
                    d = self.preempt.poll(p.global_step)  # a barrier every run.preemption_poll_every steps
                    if d is not None and self.on_preemption(d, {**last_metrics, **flush()}):
                        break
                if self.handed_off:
                    break
                # epoch (or chunk) done: the stream's position already points at the next one
                last_metrics.update(flush())
                if bar is not None:
                    bar.update(p.global_step - bar.n)
                ev = evaluate(self, p.evals)
                p.evals += 1
                data = self._data_counters()
                last_metrics.update({**{f"eval/{k}": v for k, v in ev.items()}, **data})
                if self.writer is not None:
                    self.writer.scalars(p.global_step, data, kind="data")
                    self.writer.scalars(p.global_step, {f"eval/{k}": v for k, v in ev.items()}, kind="eval")
                reason = "final" if self.stream.done else "epoch"
                if self.pending is not None:
                    d, self.pending = self.pending, None
                    if self.on_preemption(d, _plain(last_metrics), reason=reason):
                        break
                else:
                    self.save(_plain(last_metrics), reason)
        if bar is not None:
            bar.close()
        if self.writer is not None:
            self.writer.close()
        if p.global_step == start_step and self.rank == 0:
            log.info("nothing left to train: the data schedule of run %s is complete", cfg.run.name)

    def _data_counters(self) -> dict[str, float]:
        """The input pipeline's counters of this attempt (samples, quarantined, cache hits/misses...),
        summed over ranks. Called at epoch end by every rank, where a sync costs nothing."""
        s = self.stream.stats()
        keys = [k for k in _SUMMED_DATA_COUNTERS if k in s]
        t = torch.tensor([float(s[k]) for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        out = {f"data/{k}": v for k, v in zip(keys, t.tolist(), strict=True)}
        out["data/dropped"] = float(s["dropped_total"])  # the epoch remainders: the same on every rank
        if self.rank == 0:
            log.info("data: %s", " ".join(f"{k[5:]}={v:.0f}" for k, v in out.items()))
        return out

    def _loss_for(self, n_local: int):
        """Weight this rank's loss by its share of the global batch, so DDP's mean over ranks is the
        global-batch mean even when the batch does not split evenly (e.g. 3 workers, batch 64)."""
        w = n_local * self.world / self.cfg.data.global_batch_size
        if w == 1.0:
            return self.loss_fn

        def weighted(out: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor):
            total, parts = self.loss_fn(out, mask, depth)
            return total * w, parts

        return weighted

    def _maybe_kill(self) -> None:
        """Chaos hook: SIGKILL this worker process once at a given step (tests only)."""
        d = self.cfg.debug
        at = d.kill_at_step if d.kill_at_step is not None else d.fail_at_step
        if at is None or self.progress.global_step != at:
            return
        if self.rank != d.kill_rank % self.world or not d.kill_marker or os.path.exists(d.kill_marker):
            return
        with open(d.kill_marker, "w") as f:
            f.write(str(os.getpid()))
        if d.kill_at_step is None:
            raise RuntimeError(f"chaos: injected failure at step {at}")
        log.warning("chaos: SIGKILL worker pid %d at step %d", os.getpid(), self.progress.global_step)
        os.kill(os.getpid(), signal.SIGKILL)


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, int | str) else float(v)) for k, v in m.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for TorchTrainer: `config` is {"cfg": TrainConfig.to_dict()}."""
    cfg = TrainConfig.from_dict(config["cfg"])
    run = _Run(cfg)
    try:
        run.train()
    except NonFiniteLossError as e:
        # Not a failure for Ray to retry: a retry restores the same checkpoint and meets the same
        # streak (max_failures times over). The gradient is all-reduced, so every rank sees the streak
        # at the same step and ends here. Metrics reported without a checkpoint do not reach the
        # driver in Train V2, so the message goes through the run dir.
        if run.writer is not None:
            run.writer.close()
        if run.rank == 0:
            storage.write_bytes_atomic(storage.join(run.run_url, ABORTED), str(e).encode())
