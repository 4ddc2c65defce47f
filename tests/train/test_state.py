"""state.py: the TrainState collection and its parts (RNG streams, progress, ledger)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ray_mmd.train import state as st


def _state() -> st.TrainState:
    return st.TrainState(
        rng=st.RNGState(), progress=st.Progress(stage=2, global_step=7), ids=st.IdLedger(), config=st.Value(1)
    )


def test_rng_streams_continue_after_a_load():
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    sd = _state().state_dict()
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    _state().load_state_dict(sd)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect


def test_skip_keeps_the_current_value():
    a = _state()
    a["ids"].record(3, 2, [1, 2])
    sd = a.state_dict()
    b = st.TrainState(rng=st.RNGState(), progress=st.Progress(), ids=st.IdLedger(), config=st.Value(2))
    b.load_state_dict(sd, skip=("config",))
    assert b["config"].value == 2 and b["progress"].global_step == 7 and b["ids"].steps["3"]["ids"] == [1, 2]


def test_missing_part_is_an_error(tmp_path):
    a = _state()
    sd = a.state_dict()
    del sd["progress"]
    with pytest.raises(KeyError, match="progress"):
        _state().load_state_dict(sd)
