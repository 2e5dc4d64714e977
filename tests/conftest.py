"""Shared fixtures: worker pools started once per test module (see seqshard.testing)."""

import pytest

from seqshard.testing import WorkerPool


def _pool(n):
    pool = WorkerPool(n)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool2():
    yield from _pool(2)


@pytest.fixture(scope="module")
def pool4():
    yield from _pool(4)
