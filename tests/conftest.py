"""Shared fixtures: worker pools started once per test session (see seqshard.testing): starting
a pool of 1, 2 or 4 processes that import torch costs seconds on 2 cores, and workers already run
many cases one after another; a pool that times out is restarted on its next use."""

import pytest

from seqshard.testing import WorkerPool


def _pool(n):
    pool = WorkerPool(n)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool1():
    yield from _pool(1)


@pytest.fixture(scope="session")
def pool2():
    yield from _pool(2)


@pytest.fixture(scope="session")
def pool4():
    yield from _pool(4)
