"""trainer.connect_ray's settings for the local cluster it starts itself (its own Ray: test_trainer.py's
module-wide cluster would make connect_ray join instead of start)."""

from __future__ import annotations

import os

import pytest

from ray_mmd.config import load
from ray_mmd.train import trainer

pytestmark = pytest.mark.slow


def test_local_cluster_detects_dead_workers_fast_and_exports_no_metrics(monkeypatch):
    import ray
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    assert not ray.is_initialized()
    for k in trainer.LOCAL_RAY_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")  # what a user exported wins
    try:
        assert trainer.connect_ray(load(None, ["run.workers=1", "run.cpus_per_worker=1"])) is True
        # Ray Train hands the health-check interval on to its controller; metrics are decided here
        assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
        assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1"
        # the cluster itself runs without core-worker metrics export
        assert (
            ray._private.worker._global_node._ray_params._system_config["enable_metrics_collection"] is False
        )
        # workers at nice 0, as a plain PyTorch process (the raylet's default is 15)
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == 0
    finally:
        ray.shutdown()


def test_a_given_cluster_keeps_its_own_settings(monkeypatch):
    """RAY_ADDRESS / `ray job submit`: the cluster's operator decides; nothing is set here."""
    for k in trainer.LOCAL_RAY_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr("ray.init", lambda **kw: None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert trainer.connect_ray(load(None, ["run.workers=1"])) is False
    assert not any(k in os.environ for k in trainer.LOCAL_RAY_ENV)
