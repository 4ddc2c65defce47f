"""The --profile helper: a cProfile table with the original's columns and a torch.profiler trace."""

from __future__ import annotations

import json

import torch

from ray_mmd.profiling import profile


def _work():
    a = torch.rand(32, 32)
    return (a @ a).sum()


def test_profile_writes_table_and_trace(tmp_path):
    with profile(tmp_path / "prof", torch_steps=2) as prof:
        for _ in range(4):
            _work()
            prof.step()
    table = (tmp_path / "prof" / "cprofile.txt").read_text()
    for col in ("ncalls", "tottime", "cumtime", "percall"):
        assert col in table
    assert "_work" in table
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    assert any("mm" in e.get("name", "") for e in trace["traceEvents"])
    assert (tmp_path / "prof" / "cprofile.prof").stat().st_size > 0
    assert "aten::mm" in (tmp_path / "prof" / "torch_ops.txt").read_text()
    assert set(prof.paths) == {"cprofile_txt", "cprofile_prof", "trace", "torch_ops"}


def test_whole_block_trace_without_steps(tmp_path):
    with profile(tmp_path, torch_steps=None):
        _work()
    assert (tmp_path / "trace.json").exists()


def test_disabled_profile_writes_nothing(tmp_path):
    with profile(tmp_path / "off", enabled=False) as prof:
        _work()
        prof.step()
    assert not (tmp_path / "off").exists()


def test_cprofile_only(tmp_path):
    with profile(tmp_path, torch_trace=False):
        _work()
    assert (tmp_path / "cprofile.txt").exists() and not (tmp_path / "trace.json").exists()
