"""Typed config: YAML + key=value overrides, one-line UserErrors for unknown keys and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_mmd import config
from ray_mmd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for name in ("demo", "stage1", "stage2", "stage3"):
        cfg = config.load(str(ROOT / "jobs" / "configs" / f"{name}.yaml"))
        assert cfg.stage in (1, 2, 3)
        assert cfg.data.global_batch_size >= 1


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {width: 8}\noptim: {lr: 0.1}\n")
    cfg = config.load(
        str(p),
        [
            "optim.lr=0.5",
            "run.workers=1,3",
            "data.micro_batch_size=4",
            "optim.grad_clip=none",
            "data.chunks=[[0,100,2],[100,200,1]]",
            "optim.deterministic=true",
            "data.synthetic.samples=50",
        ],
    )
    assert cfg.model.width == 8 and cfg.optim.lr == 0.5 and cfg.run.workers == [1, 3]
    assert cfg.data.micro_batch_size == 4 and cfg.optim.grad_clip is None and cfg.optim.deterministic is True
    assert cfg.data.chunks == [[0, 100, 2], [100, 200, 1]]
    assert cfg.data.synthetic is not None and cfg.data.synthetic.samples == 50
    assert config.TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["nope=1"], "unknown config key 'nope'"),
        (["optim.lr=fast"], "optim.lr"),
        (["optim.lr=-1"], "optim.lr"),
        (["run.workers=3,1"], "run.workers"),
        (["model.width=2.5"], "model.width"),
        (["optim.deterministic=maybe"], "optim.deterministic"),
        (["stage=4"], "stage"),
        (["data.backend=gpu"], "data.backend"),
        (["data.decode_workers=-1"], "data.decode_workers"),
        (["optim.amp=int8"], "optim.amp: 'int8' is not one of auto, off, bf16, fp16"),
        (["optim.name=lamb"], "optim.name: 'lamb' is not one of adamw, adam, sgd"),
        (["model.name=vit"], "model.name: 'vit' is not one of"),
        (["run.use_gpu=maybe"], "run.use_gpu"),
        (["loss.mask=l1+focal"], "config loss.mask: unknown loss 'focal'"),
        (["lr"], "key=value"),
    ],
)
def test_bad_input_is_one_line_user_error(overrides, needle):
    with pytest.raises(UserError) as e:
        config.load(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {urll: x}\n")
    with pytest.raises(UserError, match="data.urll"):
        config.load(str(p))
    with pytest.raises(UserError, match="not found"):
        config.load(str(tmp_path / "missing.yaml"))
    p.write_text("[1, 2")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(str(p))


def test_gcp_spot_cluster_yaml_validates_like_ray_up():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "gcp_spot.yaml").read_text())
    validate_config(prepare_config(cfg))
    spot = cfg["available_node_types"]["gpu_spot"]["node_config"]["scheduling"]
    assert (
        spot["provisioningModel"] == "SPOT" and cfg["available_node_types"]["head"]["resources"]["CPU"] == 0
    )


def test_kuberay_rayjob_runs_the_pipeline():
    import yaml

    job = yaml.safe_load((ROOT / "cluster" / "kuberay_rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "jobs/pipeline.py" in job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_choices_match_the_registries():
    """The Literal choices are the names the model and optimizer registries know."""
    from typing import get_args

    from ray_mmd.models import model_names
    from ray_mmd.train.step import _OPTIMIZERS

    assert sorted(get_args(config.ModelName)) == sorted(model_names())
    assert sorted(get_args(config.OptimizerName)) == sorted(_OPTIMIZERS)
