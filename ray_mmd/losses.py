"""Losses by name and their sums: ``build_loss("l1+dice")``, ``build_loss("0.5*bce+dice")``.

Inputs and activations
----------------------
Every loss built here takes the model's **raw** head output (``pred``, N x 1 x H x W) and a target in
[0, 1] of the same shape. Both heads (mask and depth) get a **sigmoid**: targets live in [0, 1], so
the prediction does too. The sigmoid is applied once per call, in fp32, and shared by the terms; ``bce``
uses the logits directly (``BCEWithLogits``, numerically stable). With ``activation="none"`` the
prediction is taken as already in [0, 1] and ``bce`` becomes plain binary cross-entropy.

Losses are computed in fp32 with autocast off, whatever precision the model ran in.

Terms (``p`` = sigmoid(pred), ``t`` = target, means over all elements unless said otherwise)
-------------------------------------------------------------------------------------------
* ``rmse``  sqrt(mean((p - t)^2) + 1e-12)
* ``l1``    mean|p - t|
* ``bce``   BCEWithLogits(pred, t)
* ``dice``  1 - mean over images of (2 sum(p t) + 1) / (sum p + sum t + 1)   (soft Dice, smooth 1)
* ``ssim``  1 - SSIM(p, t): gaussian window 11, sigma 1.5, data_range 1, K = (0.01, 0.03), valid
            filtering, mean of the SSIM map -- the same value as ``pytorch_msssim.ssim``, computed by
            :func:`ssim` below (one fused filter call for the five local moments, an analytic
            backward); ``ssim_msssim`` is the same loss through pytorch-msssim itself.
* ``wl1``   sum(w |p - t|) / sum(w),   w = 1 + t  (pixel weights from the target, like the original;
            our choice of w: foreground / near pixels count up to twice as much as background / far)
* ``wl2``   sum(w (p - t)^2) / sum(w), w = 1 + t
* ``grad``  mean|dx p - dx t| + mean|dy p - dy t| (finite differences along W and H)

A spec is ``[weight*]name`` terms joined by ``+`` (whitespace ignored, names case-insensitive).
Nothing here syncs with the host: every result is a 0-dim tensor on the input's device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ray_mmd.errors import UserError

log = logging.getLogger(__name__)


class LossSpecError(UserError, ValueError):
    """A malformed loss spec or unknown loss name (a ValueError, and a UserError for the CLI)."""


# ---------------------------------------------------------------------------------------------------
# SSIM: fused moments + analytic backward
# ---------------------------------------------------------------------------------------------------

_FILTER_CACHE: dict[tuple, Tensor] = {}
_CPU_CHUNK_ELEMS = 1 << 22  # elements of the 5-moment stack per CPU chunk (16 MB: bounds the temporaries)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """1-D normalized gaussian, exactly as pytorch-msssim builds it (float32)."""
    coords = torch.arange(size, dtype=torch.float) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_matrix(n: int, size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n - size + 1) x n banded matrix M such that M @ v is the valid 1-D gaussian filtering of v.

    Like pytorch-msssim, a dimension shorter than the window is not smoothed (identity).
    """
    key = (n, size, sigma, device, dtype)
    m = _FILTER_CACHE.get(key)
    if m is None:
        if n < size:
            m = torch.eye(n, dtype=dtype)
        else:
            g = gaussian_window(size, sigma).to(dtype)
            m = torch.zeros(n - size + 1, n, dtype=dtype)
            for i in range(n - size + 1):
                m[i, i : i + size] = g
        m = m.to(device)
        if len(_FILTER_CACHE) > 64:
            _FILTER_CACHE.clear()
        _FILTER_CACHE[key] = m
    return m


def _blur(s: Tensor, mh: Tensor, mw: Tensor) -> Tensor:
    """Separable valid gaussian of a (B, H, W) stack as two batched matmuls: mh @ s @ mw^T."""
    return torch.matmul(mh, torch.matmul(s, mw.t()))


def _blur_adjoint(d: Tensor, mh: Tensor, mw: Tensor) -> Tensor:
    """Adjoint of :func:`_blur`: (B, H', W') -> (B, H, W)."""
    return torch.matmul(mh.t(), torch.matmul(d, mw))


def _ssim_chunk(
    x: Tensor,
    y: Tensor,
    mh: Tensor,
    mw: Tensor,
    c1: float,
    c2: float,
    scale: float,
    need_x: bool,
    need_y: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sum of the SSIM map over a chunk of images, and d(scale * sum)/dx, d/dy if asked."""
    n, c, h, w = x.shape
    m = _blur(torch.stack([x, y, x * x, y * y, x * y]).view(5 * n * c, h, w), mh, mw)
    mu1, mu2, e11, e22, e12 = m.view(5, n, c, mh.shape[0], mw.shape[0]).unbind(0)
    mu12 = mu1 * mu2
    mu1_sq, mu2_sq = mu1 * mu1, mu2 * mu2
    a1 = 2 * mu12 + c1
    a2 = 2 * (e12 - mu12) + c2
    b1 = mu1_sq + mu2_sq + c1
    b2 = (e11 - mu1_sq) + (e22 - mu2_sq) + c2
    inv_b1b2 = 1 / (b1 * b2)
    s = a1 * a2 * inv_b1b2
    total = s.sum()
    if not (need_x or need_y):
        return total, None, None
    # d s / d (local moments), times scale; E[x^2] and E[y^2] share one partial.
    inv_b1b2 = inv_b1b2 * scale
    s_b2 = s * b2.reciprocal_()
    d_e = -scale * s_b2
    d_e12 = 2 * a1 * inv_b1b2
    common = 2 * (a2 - a1) * inv_b1b2
    diff = 2 * scale * (s_b2 - s * b1.reciprocal_())
    maps = [d_e, d_e12]
    if need_x:
        maps.append(mu2 * common + mu1 * diff)
    if need_y:
        maps.append(mu1 * common + mu2 * diff)
    back = _blur_adjoint(torch.stack(maps).view(len(maps) * n * c, *s.shape[-2:]), mh, mw)
    back = back.view(len(maps), n, c, h, w)
    gx = back[2] + 2 * x * back[0] + y * back[1] if need_x else None
    gy = back[-1] + 2 * y * back[0] + x * back[1] if need_y else None
    return total, gx, gy


# On a GPU the eager SSIM is launch-bound (~30 small kernels at (256,1,56,56): ~1.4 ms for ~0.1 ms of
# work), so there the chunk function -- value and analytic gradient together -- is compiled: inductor
# fuses the elementwise maps around the four filter GEMMs into a few kernels. dynamic=True: one graph
# for every batch and image size (stage 1, stage 3, accumulation's uneven micro-batches), compiled once
# and then found in inductor's on-disk cache by later processes.
# Opt-in (loss.compile_ssim, ssim(compile=True)): the first call compiles for ~19 s for a measured
# 1.1-1.25x on the SSIM; a compile failure falls back to eager (logged once).
_COMPILED: dict[str, Callable | None] = {}


def _ssim_full(
    x: Tensor, y: Tensor, mh: Tensor, mw: Tensor, c1: float, c2: float, need_x: bool, need_y: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The whole batch as one chunk, mean scale taken from the shapes (what gets compiled)."""
    scale = 1.0 / (x.shape[0] * x.shape[1] * mh.shape[0] * mw.shape[0])
    total, gx, gy = _ssim_chunk(x, y, mh, mw, c1, c2, scale, need_x, need_y)
    return total * scale, gx, gy


def _compiled_ssim_full() -> Callable | None:
    if "full" not in _COMPILED:
        try:
            _COMPILED["full"] = torch.compile(_ssim_full, dynamic=True)
        except Exception as e:  # no inductor / triton on this install
            log.warning("torch.compile unavailable for SSIM (%s); using the eager version", e)
            _COMPILED["full"] = None
    return _COMPILED["full"]


def _ssim_fused_cuda(
    x: Tensor, y: Tensor, mh: Tensor, mw: Tensor, c1: float, c2: float, need_x: bool, need_y: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(mean SSIM, d/dx, d/dy) through the compiled function on CUDA; eager elsewhere or if compiling
    failed once."""
    fn = _compiled_ssim_full() if x.is_cuda else None
    if fn is not None:
        try:
            return fn(x, y, mh, mw, c1, c2, need_x, need_y)
        except Exception as e:  # a compiler error must not stop training: eager gives the same numbers
            log.warning("compiled SSIM failed (%s: %s); using the eager version", type(e).__name__, e)
            _COMPILED["full"] = None
    return _ssim_full(x, y, mh, mw, c1, c2, need_x, need_y)


class _SSIMFunction(torch.autograd.Function):
    """Mean SSIM whose gradient is computed in the forward pass, chunk by chunk.

    On CPU the batch is processed in chunks that stay in cache (the big cost of the straightforward
    version is allocating and touching ~20 full-size intermediates); the gradient of the mean with
    respect to x (and y) is produced in the same pass, so backward is one multiply.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, y: Tensor, mh: Tensor, mw: Tensor, c1: float, c2: float, chunk: int
    ) -> Tensor:
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, c = x.shape[:2]
        if chunk <= 0:  # the fused path (compiled on CUDA): the whole batch at once
            mean, gx, gy = _ssim_fused_cuda(x, y, mh, mw, c1, c2, need_x, need_y)
            ctx.save_for_backward(gx, gy)
            return mean
        scale = 1.0 / (n * c * mh.shape[0] * mw.shape[0])
        gx = torch.empty_like(x) if need_x else None
        gy = torch.empty_like(y) if need_y else None
        total = None
        for i in range(0, n, chunk):
            t, cx, cy = _ssim_chunk(x[i : i + chunk], y[i : i + chunk], mh, mw, c1, c2, scale, need_x, need_y)
            total = t if total is None else total + t
            if need_x:
                gx[i : i + chunk] = cx
            if need_y:
                gy[i : i + chunk] = cy
        ctx.save_for_backward(gx, gy)
        return total * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        gx, gy = ctx.saved_tensors
        return (
            gx * grad if gx is not None else None,
            gy * grad if gy is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    win_sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
    chunk: int | None = None,
    compile: bool = False,
) -> Tensor:
    """Mean SSIM of N x C x H x W images, equal to ``pytorch_msssim.ssim(x, y, data_range, size_average=True)``.

    Faster on CPU and GPU: the five local moments (x, y, x^2, y^2, xy) are filtered in one batched
    matmul pair (the separable valid gaussian as banded matrices), and the gradient is analytic (one
    adjoint filter call over three stacked maps, done in the forward pass) instead of autograd through
    ~20 saved full-size intermediates. On CPU the batch goes in chunks of ``chunk`` images (default:
    about 4M moment elements) to bound the temporaries; elsewhere in one piece. On CUDA with
    ``compile=True`` (config loss.compile_ssim) that piece is a ``torch.compile``d function: the first
    call compiles (~19 s), later calls run a handful of fused kernels (1.1-1.25x on an H100).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two N x C x H x W tensors of one shape, got {x.shape} and {y.shape}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    mh = _filter_matrix(x.shape[-2], win_size, win_sigma, x.device, dtype)
    mw = _filter_matrix(x.shape[-1], win_size, win_sigma, x.device, dtype)
    c1 = (k[0] * data_range) ** 2
    c2 = (k[1] * data_range) ** 2
    if chunk is None:
        per_image = 5 * x.shape[1] * x.shape[2] * x.shape[3]
        if x.device.type == "cuda" and compile and not torch.compiler.is_compiling():
            chunk = 0  # fused: compiled value + gradient in a few kernels
        elif x.device.type != "cpu":
            chunk = x.shape[0]
        else:
            chunk = max(1, _CPU_CHUNK_ELEMS // per_image)
    return _SSIMFunction.apply(x.contiguous(), y.contiguous(), mh, mw, c1, c2, int(chunk))


# ---------------------------------------------------------------------------------------------------
# Terms. Each takes (logits, prob, target); prob is None for terms that only need logits.
# ---------------------------------------------------------------------------------------------------


def _rmse(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    return torch.sqrt(F.mse_loss(p, t) + 1e-12)


def _l1(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    return F.l1_loss(p, t)


def _bce(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    if logits is None:  # activation="none": p already in [0, 1]
        return F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), t)
    return F.binary_cross_entropy_with_logits(logits, t)


def _dice(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    dims = tuple(range(1, p.dim()))
    inter = (p * t).sum(dims)
    return 1 - ((2 * inter + 1) / (p.sum(dims) + t.sum(dims) + 1)).mean()


def _ssim(logits: Tensor, p: Tensor, t: Tensor, compile: bool = False) -> Tensor:
    return 1 - ssim(p, t, data_range=1.0, compile=compile)


def _ssim_msssim(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    from pytorch_msssim import ssim as ms_ssim

    return 1 - ms_ssim(p, t, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5)


def _wl1(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    w = 1 + t
    return (w * (p - t).abs()).sum() / w.sum()


def _wl2(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    w = 1 + t
    return (w * (p - t).square()).sum() / w.sum()


def _grad(logits: Tensor, p: Tensor, t: Tensor) -> Tensor:
    dxp, dxt = p[..., :, 1:] - p[..., :, :-1], t[..., :, 1:] - t[..., :, :-1]
    dyp, dyt = p[..., 1:, :] - p[..., :-1, :], t[..., 1:, :] - t[..., :-1, :]
    return F.l1_loss(dxp, dxt) + F.l1_loss(dyp, dyt)


LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "rmse": _rmse,
    "l1": _l1,
    "bce": _bce,
    "dice": _dice,
    "ssim": _ssim,
    "ssim_msssim": _ssim_msssim,
    "wl1": _wl1,
    "wl2": _wl2,
    "grad": _grad,
}
_LOGITS_ONLY = {"bce"}


@dataclass(frozen=True)
class Term:
    weight: float
    name: str


def parse_spec(spec: str) -> list[Term]:
    """``"0.5*bce + dice"`` -> [Term(0.5, "bce"), Term(1.0, "dice")]; errors list the valid names."""
    if not isinstance(spec, str) or not spec.strip():
        raise LossSpecError(f"empty loss spec {spec!r}; write e.g. 'l1+dice' from: {', '.join(LOSSES)}")
    terms = []
    for raw in spec.replace(" ", "").lower().split("+"):
        weight, name = 1.0, raw
        if "*" in raw:
            w_str, _, name = raw.partition("*")
            try:
                weight = float(w_str)
            except ValueError:
                raise LossSpecError(
                    f"bad weight {w_str!r} in loss spec {spec!r}; write e.g. '0.5*bce+dice'"
                ) from None
            if not math.isfinite(weight):
                raise LossSpecError(f"weight {w_str!r} in loss spec {spec!r} is not finite")
        if name not in LOSSES:
            raise LossSpecError(f"unknown loss {name!r} in spec {spec!r}; valid losses: {', '.join(LOSSES)}")
        terms.append(Term(weight, name))
    return terms


class CompositeLoss(nn.Module):
    """Weighted sum of named terms; ``forward(pred, target) -> 0-dim tensor``."""

    def __init__(self, spec: str, activation: str = "sigmoid", compile_ssim: bool = False) -> None:
        super().__init__()
        self.compile_ssim = bool(compile_ssim)  # the ssim term through torch.compile on CUDA
        if activation not in ("sigmoid", "none"):
            raise LossSpecError(f"activation must be 'sigmoid' or 'none', got {activation!r}")
        self.spec = spec
        self.terms = parse_spec(spec)
        self.activation = activation

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            pred = pred.float()
            target = target.float()
            if self.activation == "sigmoid":
                logits = pred
                prob = pred.sigmoid() if any(t.name not in _LOGITS_ONLY for t in self.terms) else None
            else:
                logits, prob = None, pred
            total = None
            for term in self.terms:
                if term.name == "ssim":
                    v = _ssim(logits, prob, target, compile=self.compile_ssim)
                else:
                    v = LOSSES[term.name](logits, prob, target)
                v = v if term.weight == 1.0 else term.weight * v
                total = v if total is None else total + v
        return total

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, activation={self.activation!r}"


def build_loss(spec: str, activation: str = "sigmoid", compile_ssim: bool = False) -> CompositeLoss:
    """A callable ``(pred, target) -> Tensor`` for ``spec`` (see the module docstring)."""
    return CompositeLoss(spec, activation, compile_ssim)


class MultiTaskLoss(nn.Module):
    """mask_weight * mask_spec(out[:, 0]) + depth_weight * depth_spec(out[:, 1]).

    ``forward(out, mask, depth) -> (total, {"mask": t, "depth": t})``, all 0-dim device tensors
    (the parts unweighted, for logging). ``out`` is the raw N x 2 x H x W model output.
    """

    def __init__(
        self,
        mask_spec: str = "l1+dice",
        depth_spec: str = "rmse+ssim",
        mask_weight: float = 1.0,
        depth_weight: float = 1.0,
        compile_ssim: bool = False,
    ) -> None:
        super().__init__()
        self.mask_loss = build_loss(mask_spec, compile_ssim=compile_ssim)
        self.depth_loss = build_loss(depth_spec, compile_ssim=compile_ssim)
        self.mask_weight = float(mask_weight)
        self.depth_weight = float(depth_weight)

    def forward(self, out: Tensor, mask: Tensor, depth: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        lm = self.mask_loss(out[:, 0:1], mask)
        ld = self.depth_loss(out[:, 1:2], depth)
        total = self.mask_weight * lm + self.depth_weight * ld
        return total, {"mask": lm, "depth": ld}
