"""One training step (forward, losses, backward, optimizer step) and the mixed-precision policy.

Nothing in :func:`train_step` waits for the device: no ``.item()``, no ``bool(tensor)``, no copies to
the host. What the caller needs comes back as detached on-device tensors, to be read at the log
interval (one sync there, not one per step).

Non-finite steps
----------------
``out["finite"]`` is a 0-dim bool tensor: the loss and the gradient norm were finite. When it is false
the optimizer step is skipped **on device**, without the host ever looking at it:

* fused optimizers (``make_optimizer`` builds AdamW/Adam/SGD with ``fused=True``, on CPU and CUDA)
  take the flag as ``found_inf``, the same hook ``GradScaler`` uses: the fused kernel leaves
  parameters and moments alone and the step counter is rolled back;
* any other optimizer: parameters and optimizer state are snapshotted before ``step()`` and put back
  with ``torch.where(finite, new, old)`` (costs two copies of the state; CPU-resident scalar state of
  a GPU model, such as Adam's non-capturable step counter, is left as stepped, to avoid a sync);
* fp16 + ``GradScaler`` (GPUs without bf16): the scaler skips the step itself (a fused optimizer
  keeps that sync-free too) and lowers its scale.

A skipped step also restores the model's buffers (BatchNorm running statistics and counters).

The caller counts skipped steps by accumulating ``~out["finite"]`` on device and reading the sum at
the log interval (and can abort after K in a row from the same reads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Batch = Mapping[str, Tensor]
_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _cuda_bf16(device: torch.device) -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the keyword
        return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass
class AmpPolicy:
    """Autocast dtype, GradScaler and memory format for one device.

    ``for_device(device, "auto")``: CUDA with bf16 -> bf16 autocast; CUDA without (P100, T4 ...) ->
    fp16 autocast + GradScaler; CPU and others -> fp32. channels_last on CUDA.
    """

    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None = fp32, no autocast
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @classmethod
    def for_device(
        cls, device: torch.device | str, mode: str = "auto", channels_last: bool | None = None
    ) -> AmpPolicy:
        """`mode`: config.AmpMode (validated there) or "fp32"; fp16 needs CUDA, which only the worker knows."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if mode == "auto":
            mode = ("bf16" if _cuda_bf16(device) else "fp16") if cuda else "fp32"
        if mode == "fp16" and not cuda:
            raise ValueError(f"AMP mode 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'fp32'")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
        return cls(device, dtype, cuda if channels_last is None else channels_last, scaler)

    @property
    def mode(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def prepare_batch(self, batch: Batch, finish: Callable[[dict], dict] | None = None) -> dict[str, Tensor]:
        """Move a batch to the device; `finish` (the stream's BatchFinisher) then turns a uint8 wire
        batch into model tensors there, so resize/flip/normalise run on the device."""
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if finish is not None:
            out = finish(out)
        x = out.get("x")
        if self.channels_last and x is not None and x.dim() == 4:
            out["x"] = x.contiguous(memory_format=torch.channels_last)
        return out

    def state_dict(self) -> dict:
        return {"mode": self.mode, "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def make_optimizer(
    params: Iterable,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    fused: bool | None = None,
    **kw,
) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (config.OptimizerName), fused where the parameters' device supports it (the
    sync-free skip path)."""
    params = list(params)
    if fused is None:
        tensors = [p for p in params if torch.is_tensor(p)] or [
            p for g in params if isinstance(g, dict) for p in g["params"]
        ]
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    if name == "sgd":
        kw.setdefault("momentum", 0.9)
    return _OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, fused=fused, **kw)


def _split(batch: Batch, parts: int) -> list[dict[str, Tensor]]:
    n = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    if parts > n:
        raise ValueError(f"cannot split a batch of {n} into {parts} micro-batches")
    chunks = {k: v.tensor_split(parts) if torch.is_tensor(v) else [v] * parts for k, v in batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(parts)]


def _trainable(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _step_where_finite(optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
    """optimizer.step(), undone on device where ``finite`` is false; no host sync."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and all(
        g.get("fused") for g in optimizer.param_groups
    ):
        optimizer.grad_scale = None
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
            del optimizer.found_inf
        return
    params = _trainable(optimizer)
    old_params = [p.detach().clone() for p in params]
    old_state = {
        p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
        for p in params
        if p in optimizer.state
    }
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, old_params, strict=True):
            p.copy_(torch.where(finite, p, old))
        for p in params:
            before = old_state.get(p, {})
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v) and v.device == finite.device:
                    v.copy_(torch.where(finite, v, before.get(k, torch.zeros_like(v))))


def train_step(
    model: nn.Module,
    batch: Batch | Sequence[Batch],
    loss_fn: Callable[..., Tensor | tuple[Tensor, dict[str, Tensor]]],
    optimizer: torch.optim.Optimizer,
    scaler_or_policy: AmpPolicy | torch.amp.GradScaler | None = None,
    *,
    accum_steps: int = 1,
    grad_clip: float | None = None,
    protect_buffers: bool = True,
) -> dict[str, Tensor]:
    """One optimizer step over ``batch`` (dict with ``x``, ``mask``, ``depth`` on the right device).

    ``loss_fn(out, mask, depth)`` returns a total or ``(total, parts)`` (e.g. :class:`MultiTaskLoss`).
    Gradient accumulation: pass a list of micro-batch dicts, or ``accum_steps=k`` to split ``batch``
    into k; each micro-batch's loss is weighted by its share of the samples, so the summed gradient is
    that of the whole-batch mean for per-pixel-mean losses (batch-level nonlinear terms such as RMSE
    are averaged per micro-batch). DDP gradient all-reduce happens on the last micro-batch only.

    ``protect_buffers``: a skipped step also puts back the model's buffers (BatchNorm
    running statistics, a few KB), so one bad batch cannot poison them.

    Returns detached on-device tensors: ``loss`` and each loss part (sample-weighted means over
    the micro-batches), ``grad_norm`` (total L2 norm before clipping) and ``finite`` (see module doc).
    """
    if isinstance(scaler_or_policy, AmpPolicy):
        policy = scaler_or_policy
    elif isinstance(scaler_or_policy, torch.amp.GradScaler):
        dev = next(model.parameters()).device
        policy = AmpPolicy(dev, torch.float16, False, scaler_or_policy)
    else:
        policy = AmpPolicy(next(model.parameters()).device)
    scaler = policy.scaler

    if isinstance(batch, Mapping):
        micro = _split(batch, accum_steps) if accum_steps > 1 else [batch]
    else:
        micro = list(batch)
    sizes = [m["x"].shape[0] for m in micro]
    total_n = sum(sizes)

    buffers = list(model.buffers()) if protect_buffers else []
    saved_buffers = [b.detach().clone() for b in buffers]

    logs: dict[str, Tensor] = {}
    for i, (mb, n) in enumerate(zip(micro, sizes, strict=True)):
        last = i == len(micro) - 1
        sync_ctx = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync_ctx:
            with policy.autocast():
                out = model(mb["x"])
            res = loss_fn(out, mb["mask"], mb["depth"])
            total, parts = res if isinstance(res, tuple) else (res, {})
            share = n / total_n
            scaled = total * share if len(micro) > 1 else total
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        for k, v in {"loss": total, **parts}.items():
            v = v.detach().float() * share
            logs[k] = v if k not in logs else logs[k] + v

    params = _trainable(optimizer)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    elif params:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    else:
        norm = torch.zeros((), device=logs["loss"].device)
    finite = torch.isfinite(logs["loss"]) & torch.isfinite(norm)

    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        _step_where_finite(optimizer, finite)
    with torch.no_grad():
        for b, old in zip(buffers, saved_buffers, strict=True):
            b.copy_(torch.where(finite, b, old))
    optimizer.zero_grad(set_to_none=True)

    logs["grad_norm"] = norm.detach().float()
    logs["finite"] = finite
    return logs
