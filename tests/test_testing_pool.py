"""The worker pool itself: results in rank order, errors carry the failing rank's traceback."""

import pytest
import torch
import torch.distributed as dist

from seqshard.testing import WorkerError


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_one():
    if dist.get_rank() == 1:
        raise ValueError("planted")
    return 0


def test_pool_runs_on_every_rank(pool2):
    assert pool2.run(_allreduce_rank) == [(0, 1.0), (1, 1.0)]


def test_pool_reports_the_failing_rank(pool2):
    with pytest.raises(WorkerError, match=r"rank 1 of 2(.|\n)*planted"):
        pool2.run(_fail_on_one)
    assert pool2.run(_allreduce_rank)[0] == (0, 1.0)  # still usable afterwards
