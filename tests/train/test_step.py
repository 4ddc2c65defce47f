"""The training step: zero host syncs, on-device skip of non-finite steps, accumulation, AMP policy."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from ray_mmd.losses import MultiTaskLoss, build_loss
from ray_mmd.models import build_model
from ray_mmd.train.step import AmpPolicy, make_optimizer, train_step

SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.rand(n, 6, size, size, generator=g),
        "mask": (torch.rand(n, 1, size, size, generator=g) > 0.5).float(),
        "depth": torch.rand(n, 1, size, size, generator=g),
    }


@pytest.fixture
def sync_counter(monkeypatch):
    counts: collections.Counter = collections.Counter()
    for name in SYNC_METHODS:
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return counts


def test_counter_sees_a_sync(sync_counter):
    torch.ones(()).item()
    bool(torch.ones(()))
    assert sync_counter["item"] == 1 and sync_counter["__bool__"] == 1


@pytest.mark.parametrize("clip", [None, 1.0])
def test_no_host_sync_over_steps(sync_counter, clip):
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    opt = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss = MultiTaskLoss()
    policy = AmpPolicy.for_device("cpu")
    skipped = torch.zeros((), dtype=torch.long)
    for i in range(4):
        out = train_step(model, _batch(seed=i), loss, opt, policy, grad_clip=clip, accum_steps=1 + i % 2)
        skipped += ~out["finite"]
    assert sum(sync_counter.values()) == 0, dict(sync_counter)
    assert set(out) >= {"loss", "mask", "depth", "grad_norm", "finite"}
    assert all(not v.requires_grad for v in out.values())
    sync_counter.clear()
    assert int(skipped) == 0  # the caller reads the count at the log interval


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_loss_skips_the_step_on_device(fused):
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    opt = make_optimizer(model.parameters(), name="adamw", lr=1e-2, fused=fused)
    loss = MultiTaskLoss()
    train_step(model, _batch(seed=1), loss, opt)  # populate optimizer state
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[model.inc.block[0].weight].items()}
    bad = _batch(seed=2)
    bad["x"][0, 0, 0, 0] = float("nan")  # poisons activations, BN statistics and the loss
    out = train_step(model, bad, loss, opt)
    assert not bool(out["finite"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for k, v in opt.state[model.inc.block[0].weight].items():
        assert torch.equal(v, state[k]), k
    out = train_step(model, _batch(seed=3), loss, opt)
    assert bool(out["finite"])
    assert not torch.equal(model.inc.block[0].weight, params["inc.block.0.weight"])


def test_accumulation_matches_one_big_batch():
    # no BatchNorm and a per-pixel-mean loss: micro-batching must give the same update
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))
    twin = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))
    twin.load_state_dict(net.state_dict())
    loss = MultiTaskLoss("l1", "wl2")
    o1 = make_optimizer(net.parameters(), name="sgd", lr=0.5)
    o2 = make_optimizer(twin.parameters(), name="sgd", lr=0.5)
    batch = _batch(n=6, size=16)
    a = train_step(net, batch, loss, o1)
    micro = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]  # uneven split
    b = train_step(twin, micro, loss, o2)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = build_model("unet", width=8)
    opt = make_optimizer(model.parameters(), lr=3e-3)
    loss = MultiTaskLoss()
    batch = _batch(n=4, size=32)
    first = train_step(model, batch, loss, opt)["loss"]
    for _ in range(8):
        last = train_step(model, batch, loss, opt)["loss"]
    assert last < first


def test_amp_policy_choices():
    cpu = AmpPolicy.for_device("cpu")
    assert cpu.mode == "fp32" and cpu.scaler is None and not cpu.channels_last
    assert AmpPolicy.for_device("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        AmpPolicy.for_device("cpu", "fp16")
    if torch.cuda.is_available():
        gpu = AmpPolicy.for_device("cuda")
        assert gpu.channels_last and gpu.mode in ("bf16", "fp16")
        assert (gpu.scaler is not None) == (gpu.mode == "fp16")


def test_bf16_step_on_cpu_keeps_fp32_weights_and_losses():
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    policy = AmpPolicy.for_device("cpu", "bf16", channels_last=True)
    policy.prepare_model(model)
    opt = make_optimizer(model.parameters(), lr=1e-3)
    batch = policy.prepare_batch(_batch())
    assert batch["x"].is_contiguous(memory_format=torch.channels_last)
    out = train_step(model, batch, MultiTaskLoss(), opt, policy)
    assert out["loss"].dtype == torch.float32 and bool(out["finite"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_plain_loss_callable():
    model = build_model("unet", width=4)
    opt = make_optimizer(model.parameters())
    l1 = build_loss("l1")
    out = train_step(model, _batch(n=2), lambda o, m, d: l1(o[:, :1], m), opt)
    assert set(out) == {"loss", "grad_norm", "finite"}
