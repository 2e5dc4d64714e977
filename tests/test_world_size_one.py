"""World size 1 is free: on a one-rank mesh the per-rank program is the captured model, with no
redistribution steps, no gradient sums and the local attention kernel, whatever plan it is given.

A failure points at `strategies/from_plan.py` (`from_plan._drop_unit_axes`), `strategies/strategy.py`
(`candidates` offering splits on an axis of size 1) or codegen's gradient bookkeeping."""

import copy

import pytest
import torch

from seqshard.models import AXES, build, named_plans
from seqshard.testing import WorkerPool

COLLECTIVES = ("all_gather", "all_to_all", "reduce_scatter", "all_reduce", "slice_shard",
               "shard_", "sum_grad", "scale_grad", "_attention(")


@pytest.fixture(scope="module")
def pool1():
    pool = WorkerPool(1)
    yield pool
    pool.close()


def one_rank(family, plan_name):
    from seqshard.planner import parallelize, plan

    sizes = {"llama": dict(batch=2, seq=37), "video_dit": dict(batch=1, frames=5, patches=7)}[family]
    model, inputs = build(family, "tiny", **sizes)
    ref = copy.deepcopy(model)
    if plan_name is None:
        pm = parallelize(model, inputs, axes=AXES[family])
    else:  # a plan made for 4 ranks, applied on one
        overrides, names = named_plans(family, "tiny")[plan_name]
        meta_model, meta_inputs = build(family, "tiny", device="meta", **sizes)
        mesh = tuple((n, 4 // len(names)) for n in names)
        p4 = plan(meta_model, meta_inputs, mesh=mesh, cluster="h200x4", overrides=overrides,
                  axes=AXES[family])
        assert any(n.splits for n in p4.nodes)
        from torch.distributed.device_mesh import init_device_mesh
        mesh1 = init_device_mesh("cpu", (1,) * len(names), mesh_dim_names=names)
        pm = parallelize(model, inputs, plan=p4, mesh=mesh1, axes=AXES[family])
    found = [c for c in COLLECTIVES if c in pm.code]
    loss = pm(*inputs)
    loss.backward()
    want = ref(*inputs)
    want.backward()
    worst = max(((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item()
                for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None)
    return found, (loss - want).abs().item(), worst


@pytest.mark.parametrize("family,plan_name", [("llama", None), ("llama", "ring"),
                                              ("llama", "hybrid"), ("video_dit", "dsp")])
def test_one_rank_runs_the_captured_model(pool1, family, plan_name):
    (found, loss_diff, grad_diff), = pool1.run(one_rank, family, plan_name)
    assert not found, f"a one-rank program emitted {found}"
    assert loss_diff <= 1e-6 and grad_diff <= 1e-6, (loss_diff, grad_diff)
