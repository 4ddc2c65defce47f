"""Builders shared by the data tests."""

from __future__ import annotations

import dataclasses

import pytest

from ray_mmd.config import DataConfig
from ray_mmd.data.stream import StreamConfig

# a name in both (cache_dir: the stream holds the resolved one) goes to the stream
_DATA = {f.name for f in dataclasses.fields(DataConfig)} - {f.name for f in dataclasses.fields(StreamConfig)}


def stream_config(url: str, **kw) -> StreamConfig:
    """A StreamConfig for `url`: keywords naming a DataConfig field go to the data section, the rest
    to the stream (chunks, workers, cache_dir, decoder, ...)."""
    data = DataConfig(url=url, **{k: v for k, v in kw.items() if k in _DATA})
    return StreamConfig(data, **{k: v for k, v in kw.items() if k not in _DATA})


@pytest.fixture(scope="session")
def packed(packed_factory) -> str:
    """240 samples over 20 bgs (seed 1): the dataset most data tests read; a module may override it."""
    return packed_factory(240, 20, seed=1)


@pytest.fixture(scope="module")
def packed_gs(packed, to_gcs) -> str:
    """This module's `packed` copied to the GCS emulator."""
    return to_gcs(packed)


@pytest.fixture
def stream_cfg():
    """stream_cfg(url, **kw) -> StreamConfig (see `stream_config`)."""
    return stream_config
