"""Builders shared by the data tests."""

from __future__ import annotations

import pytest

from ray_mmd.data.stream import StreamConfig


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
    """stream_cfg(url, **kw) -> StreamConfig (see `StreamConfig.for_url`)."""
    return StreamConfig.for_url
