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


@pytest.fixture(scope="session")
def layers_4m():
    """`seqshard.testing.attention_layers(4)` at 4M tokens (each layer's input 2 GiB), captured
    on the meta device: the memory-plan tests' model (offload, groups)."""
    import torch

    from seqshard.capture import capture
    from seqshard.dims import analyze
    from seqshard.testing import attention_layers

    with torch.device("meta"):
        model = attention_layers(4).to(torch.bfloat16)
        x = torch.empty(1, 1 << 22, 256, dtype=torch.bfloat16)
    return analyze(capture(model, (x,)), axes={"x": "b s d"})
