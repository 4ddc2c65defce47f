"""Stage 1/2/3 definitions, initialisation from the previous stage's checkpoint, and lineage.

1: spine UNet ("unet") at 56, large batch, trained from scratch.
2: head/tail wrapper ("unet224") at 224; the spine is loaded from stage 1's final checkpoint and frozen.
3: the same model, all parameters trainable, initialised from stage 2's final checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ray_mmd import storage
from ray_mmd.config import TrainConfig
from ray_mmd.errors import UserError
from ray_mmd.train import checkpoint as ck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    number: int
    models: tuple[str, ...]  # model names this stage accepts
    freeze_spine: bool
    init: str  # "scratch" | "spine" (parent's whole model -> our .spine) | "full"
    needs_parent: bool


STAGES = {
    1: Stage(1, ("unet", "resnet18_unet", "resnet50"), False, "scratch", False),
    2: Stage(2, ("unet224",), True, "spine", True),
    3: Stage(3, ("unet224",), False, "full", True),
}


def stage_of(cfg: TrainConfig) -> Stage:
    s = STAGES[cfg.stage]
    if cfg.model.name not in s.models:
        raise UserError(
            f"stage {cfg.stage} trains model {'/'.join(s.models)}, not {cfg.model.name!r}: set model.name"
        )
    if s.needs_parent and not cfg.parent:
        raise UserError(
            f"stage {cfg.stage} starts from stage {cfg.stage - 1}'s checkpoint: set parent=<stage-{cfg.stage - 1} "
            "run name> (or a checkpoint URL)"
        )
    return s


def run_url(cfg: TrainConfig, name: str | None = None) -> str:
    return storage.join(cfg.run.storage, name or cfg.run.name)


def parent_checkpoint(cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The parent's newest verified checkpoint: `parent` is a run name under run.storage or a checkpoint URL."""
    ref = cfg.parent or ""
    if ck.CKPT_RE.match(ref.rstrip("/").rsplit("/", 1)[-1]):
        try:
            state, meta = ck.load_checkpoint(ref)
        except ck.CheckpointError as e:
            raise UserError(
                f"parent checkpoint {ref!r} is not usable ({e}): point parent= at another one"
            ) from None
        return state, meta, ref
    url = run_url(cfg, ref)
    if not ck.list_checkpoints(url):
        raise UserError(
            f"no checkpoints of parent run {ref!r} under {cfg.run.storage!r}: run stage {cfg.stage - 1} first"
        )
    try:
        return ck.final_checkpoint(url)
    except ck.CheckpointError as e:
        raise UserError(f"parent run {ref!r}: {e}; re-run stage {cfg.stage - 1}") from None


def init_from_parent(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, Any] | None:
    """Load the parent's weights into `model` as the stage says; return the lineage's parent record."""
    s = stage_of(cfg)
    if s.init == "scratch" and not cfg.parent:
        return None
    pstate, meta, url = parent_checkpoint(cfg)
    weights = pstate["model"]
    target = model.spine if s.init == "spine" else model
    try:
        target.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(
            f"parent checkpoint {url} does not fit stage {cfg.stage}'s {cfg.model.name} at width "
            f"{cfg.model.width} ({detail[:160]}): use the parent's model.width"
        ) from None
    parent_lineage = pstate.get("lineage", {})
    log.info("stage %d initialised (%s) from %s", cfg.stage, s.init, url)
    return {
        "run": parent_lineage.get("run"),
        "stage": meta.get("stage"),
        "step": meta.get("step"),
        "checkpoint": url,
        "parent": parent_lineage.get("parent"),
    }


def apply_freeze(model: torch.nn.Module, cfg: TrainConfig) -> None:
    from ray_mmd.models import freeze_spine, unfreeze_all

    if stage_of(cfg).freeze_spine:
        freeze_spine(model)
    else:
        unfreeze_all(model)
