"""World size 1 is free: on a one-rank mesh the per-rank program is the captured model, with no
redistribution steps, no gradient sums and the local attention kernel, whatever plan it is given.

A failure points at `strategies/from_plan.py` (`from_plan._drop_unit_axes`), `strategies/strategy.py`
(`candidates` offering splits on an axis of size 1) or codegen's gradient bookkeeping."""

import copy

import pytest
import torch

from seqshard.models import AXES, build, named_plans

COLLECTIVES = ("all_gather", "all_to_all", "reduce_scatter", "all_reduce", "slice_shard",
               "shard_", "sum_grad", "scale_grad", "_attention(")


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
    loss_diff, worst = _step_errors(pm, model, ref, inputs)
    return found, loss_diff, worst


def _step_errors(pm, model, ref, inputs):
    """One forward and backward of the program and of the reference: the loss's absolute
    difference and the largest relative gradient difference."""
    loss = pm(*inputs)
    loss.backward()
    want = ref(*inputs)
    want.backward()
    worst = max(((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item()
                for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None)
    return (loss - want).abs().item(), worst


@pytest.mark.parametrize("family,plan_name", [("llama", None), ("llama", "ring"),
                                              ("llama", "hybrid"), ("video_dit", "dsp")])
def test_one_rank_runs_the_captured_model(pool1, family, plan_name):
    (found, loss_diff, grad_diff), = pool1.run(one_rank, family, plan_name)
    assert not found, f"a one-rank program emitted {found}"
    assert loss_diff <= 1e-6 and grad_diff <= 1e-6, (loss_diff, grad_diff)


def runtime_kernel(family):
    """The program built with local_attention="runtime" (what parallelize does where the runtime
    runs FlashAttention-4, which the model's SDPA call cannot): attention the plan keeps local
    goes through seqshard.runtime.local_attention; loss and every gradient as the model's."""
    from seqshard.planner import parallel

    sizes = {"llama": dict(batch=2, seq=37), "video_dit": dict(batch=1, frames=5, patches=7)}[family]
    model, inputs = build(family, "tiny", **sizes)
    ref = copy.deepcopy(model)
    chosen = parallel.local_attention_kernel
    parallel.local_attention_kernel = lambda dims, device: "runtime"
    try:
        pm = parallel.parallelize(model, inputs, axes=AXES[family])
    finally:
        parallel.local_attention_kernel = chosen
    calls = pm.code.count("local_attention(")
    loss_diff, worst = _step_errors(pm, model, ref, inputs)
    return calls, loss_diff / abs(ref(*inputs).item()), worst


@pytest.mark.parametrize("family", ["llama", "video_dit"])
def test_local_attention_through_the_runtime_is_exact(pool1, family):
    (calls, loss_err, grad_err), = pool1.run(runtime_kernel, family)
    assert calls >= 2, "every attention of the model should call the runtime's local attention"
    assert loss_err <= 1e-5 and grad_err <= 1e-5, (loss_err, grad_err)


def test_local_attention_kernel_is_captured_off_fa4():
    from seqshard.capture import capture
    from seqshard.dims import analyze
    from seqshard.planner.parallel import local_attention_kernel

    model, inputs = build("llama", "tiny", batch=1, seq=8)
    dims = analyze(capture(model, inputs), AXES["llama"])
    assert local_attention_kernel(dims, torch.device("cpu")) == "captured"
