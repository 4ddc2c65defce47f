"""Each loss against its direct formula, SSIM against pytorch-msssim, composition, weights, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_msssim import ssim as ms_ssim

from ray_mmd.losses import LOSSES, MultiTaskLoss, build_loss, parse_spec, ssim

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pt():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64)
    target = torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64)
    return logits, target


def _direct(name: str, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(z)
    if name == "rmse":
        return ((p - t) ** 2).mean().sqrt()
    if name == "l1":
        return (p - t).abs().mean()
    if name == "bce":
        return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    if name == "dice":
        per = [(2 * (pi * ti).sum() + 1) / (pi.sum() + ti.sum() + 1) for pi, ti in zip(p, t, strict=True)]
        return 1 - torch.stack(per).mean()
    if name in ("ssim", "ssim_msssim"):
        return 1 - ms_ssim(p, t, data_range=1.0)
    if name == "wl1":
        return ((1 + t) * (p - t).abs()).sum() / (1 + t).sum()
    if name == "wl2":
        return ((1 + t) * (p - t) ** 2).sum() / (1 + t).sum()
    if name == "grad":
        gx = ((p[..., 1:] - p[..., :-1]) - (t[..., 1:] - t[..., :-1])).abs().mean()
        gy = ((p[..., 1:, :] - p[..., :-1, :]) - (t[..., 1:, :] - t[..., :-1, :])).abs().mean()
        return gx + gy
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_matches_its_formula(name, pt):
    z, t = pt
    got = build_loss(name)(z.float(), t.float())
    want = _direct(name, z, t)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)


def test_activation_none_takes_probabilities(pt):
    z, t = pt
    p = torch.sigmoid(z).float()
    for name in ("l1", "bce", "ssim", "dice"):
        assert torch.allclose(
            build_loss(name, activation="none")(p, t.float()),
            build_loss(name)(z.float(), t.float()),
            atol=1e-5,
        )


@pytest.mark.parametrize("shape", [(2, 1, 40, 33), (4, 3, 11, 64), (2, 1, 8, 20), (16, 1, 56, 56)])
def test_ssim_matches_pytorch_msssim_value_and_gradient(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, requires_grad=True)
    y = (x.detach() * 0.7 + 0.3 * torch.rand(shape, generator=g)).requires_grad_()
    ours = ssim(x, y, compile=True)
    gx, gy = torch.autograd.grad(ours, [x, y])
    ref = ms_ssim(x, y, data_range=1.0)
    rx, ry = torch.autograd.grad(ref, [x, y])
    assert abs(ours.item() - ref.item()) < 1e-5
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gy, ry, atol=1e-5)


def test_ssim_chunking_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 1, 20, 18, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, 1, 20, 18, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(ssim(x, y, chunk=2), ssim(x, y, chunk=5))
    xs, ys = x[:2, :, :13, :12].detach(), y[:2, :, :13, :12].detach()
    assert torch.autograd.gradcheck(
        lambda a, b: ssim(a, b, chunk=1), (xs.requires_grad_(), ys.requires_grad_())
    )
    assert torch.allclose(ssim(x, x.detach()), torch.ones((), dtype=torch.float64))


def test_composition_and_weights(pt):
    z, t = pt
    z, t = z.float(), t.float()
    l1, dice, bce = (build_loss(n)(z, t) for n in ("l1", "dice", "bce"))
    assert torch.allclose(build_loss("l1+dice")(z, t), l1 + dice)
    assert torch.allclose(build_loss(" 0.5*BCE + dice ")(z, t), 0.5 * bce + dice)
    assert torch.allclose(build_loss("2*l1+0.25*l1")(z, t), 2.25 * l1)
    assert parse_spec("0.5*bce+dice")[0].weight == 0.5


@pytest.mark.parametrize("spec", ["l2", "l1+foo", "", "x*l1", "l1+", "inf*l1"])
def test_bad_specs_give_one_clear_error(spec):
    with pytest.raises(ValueError) as e:
        build_loss(spec)
    if spec in ("l2", "l1+foo"):
        for name in LOSSES:
            assert name in str(e.value)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.01, 10), st.sampled_from(["l1", "rmse", "wl2", "dice"])), min_size=1, max_size=4
    )
)
def test_any_weighted_sum_equals_sum_of_parts(terms):
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(2, 1, 12, 12, generator=g), torch.rand(2, 1, 12, 12, generator=g)
    spec = "+".join(f"{w!r}*{n}" for w, n in terms)
    want = sum(w * build_loss(n)(z, t) for w, n in terms)
    assert torch.allclose(build_loss(spec)(z, t), want, rtol=1e-5, atol=1e-6)


def test_multitask_loss_parts_and_weights():
    g = torch.Generator().manual_seed(4)
    out = torch.randn(2, 2, 24, 24, generator=g, requires_grad=True)
    mask, depth = (torch.rand(2, 1, 24, 24, generator=g) > 0.5).float(), torch.rand(2, 1, 24, 24, generator=g)
    total, parts = MultiTaskLoss(mask_weight=2.0, depth_weight=0.5)(out, mask, depth)
    assert torch.allclose(parts["mask"], build_loss("l1+dice")(out[:, :1], mask))
    assert torch.allclose(parts["depth"], build_loss("rmse+ssim")(out[:, 1:], depth))
    assert torch.allclose(total, 2 * parts["mask"] + 0.5 * parts["depth"])
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in parts.values())
    total.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()


def test_loss_runs_in_fp32_under_autocast():
    z, t = torch.randn(2, 1, 16, 16).bfloat16(), torch.rand(2, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = build_loss("rmse+ssim")(z, t)
    assert v.dtype == torch.float32
    assert torch.allclose(v, build_loss("rmse+ssim")(z.float(), t), atol=1e-6)


def test_bce_uses_logits_stably():
    z = torch.tensor([[[[100.0, -100.0]]]])
    t = torch.tensor([[[[1.0, 0.0]]]])
    assert torch.isfinite(build_loss("bce")(z, t)) and build_loss("bce")(z, t) < 1e-6
    assert torch.allclose(build_loss("bce")(z, 1 - t), F.binary_cross_entropy_with_logits(z, 1 - t))


def test_fused_whole_batch_path_equals_chunked_value_and_gradient():
    # chunk=0 is the path CUDA takes (compiled there); on the CPU the same function runs eagerly
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 1, 30, 27, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(6, 1, 30, 27, generator=g, dtype=torch.float64, requires_grad=True)
    a = ssim(x, y, chunk=0)
    ga = torch.autograd.grad(a, [x, y])
    b = ssim(x, y, chunk=4)
    gb = torch.autograd.grad(b, [x, y])
    assert torch.allclose(a, b) and all(torch.allclose(u, v) for u, v in zip(ga, gb, strict=True))
    assert torch.autograd.gradcheck(
        lambda u, v: ssim(u, v, chunk=0), (x[:2, :, :13, :12].detach().requires_grad_(), y[:2, :, :13, :12])
    )


def test_fused_ssim_traces_as_one_graph():
    # what torch.compile sees on CUDA: no graph breaks (the 'eager' backend only traces, so this is cheap)
    from ray_mmd import losses

    torch._dynamo.reset()
    fn = torch.compile(losses._ssim_full, backend="eager", fullgraph=True)
    x, y = torch.rand(3, 1, 20, 20), torch.rand(3, 1, 20, 20)
    mh = losses._filter_matrix(20, 11, 1.5, x.device, x.dtype)
    got = fn(x, y, mh, mh, 1e-4, 9e-4, True, False)
    want = losses._ssim_full(x, y, mh, mh, 1e-4, 9e-4, True, False)
    assert torch.allclose(got[0], want[0]) and torch.allclose(got[1], want[1]) and got[2] is None
    assert torch.allclose(got[0], ssim(x, y))


def test_compile_ssim_is_an_explicit_opt_in():
    from ray_mmd.config import load
    from ray_mmd.errors import UserError
    from ray_mmd.losses import MultiTaskLoss

    assert load(None, []).loss.compile_ssim is False  # off unless the config says so
    assert load(None, ["loss.compile_ssim=true"]).loss.compile_ssim is True
    with pytest.raises(UserError, match="loss.compile_ssim"):
        load(None, ["loss.compile_ssim=true", "loss.depth=rmse"])
    on, off = MultiTaskLoss(compile_ssim=True), MultiTaskLoss()
    assert on.depth_loss.compile_ssim and not off.depth_loss.compile_ssim
    out, m, d = torch.randn(2, 2, 24, 24), torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    assert torch.equal(on(out, m, d)[0], off(out, m, d)[0])  # the CPU never compiles: same numbers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in benchmarks/gpu_suite.sh)")
@pytest.mark.parametrize("shape", [(8, 1, 56, 56), (4, 1, 224, 224)])
def test_cuda_compiled_ssim_matches_pytorch_msssim(shape):
    g = torch.Generator().manual_seed(6)
    x = torch.rand(shape, generator=g).cuda().requires_grad_()
    y = (0.6 * x.detach() + 0.4 * torch.rand(shape, generator=g).cuda()).requires_grad_()
    ours = ssim(x, y, compile=True)
    gx, gy = torch.autograd.grad(ours, [x, y])
    # reference in float64: pytorch-msssim's fp32 conv runs on TF32 tensor cores under cuDNN's default
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = ms_ssim(x64, y64, data_range=1.0)
    rx, ry = (g.float() for g in torch.autograd.grad(ref, [x64, y64]))
    assert abs(ours.item() - ref.item()) < 1e-5
    for a, b in ((gx, rx), (gy, ry)):  # per-pixel gradients are ~1/numel: compare relative norms
        assert ((a - b).norm() / b.norm()).item() < 1e-4
