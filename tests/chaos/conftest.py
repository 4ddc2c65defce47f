"""Fixtures of the chaos suite: a multi-node Ray made of `ray start --block` processes,
and the store of uninterrupted reference runs (one per configuration and session) for the bitwise checks."""

from __future__ import annotations

import pytest

from tests.chaos.chaos_harness import LocalCluster


@pytest.fixture
def cluster(tmp_path):
    """cluster(n) -> a LocalCluster with n one-CPU worker nodes; every process is stopped at the end."""
    made: list[LocalCluster] = []

    def make(workers: int) -> LocalCluster:
        c = LocalCluster(tmp_path / f"cluster{len(made)}", workers)
        made.append(c)
        return c

    yield make
    for c in made:
        c.shutdown()


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    return {"dir": tmp_path_factory.mktemp("reference"), "runs": {}}
