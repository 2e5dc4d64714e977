"""Model state: `parallelize(..., model_state="sharded")` (FSDP2 inside seqshard, see
seqshard/planner/state.py) trains exactly like the single-device model under AdamW, holds 1/N of
the parameters per rank, and resumes from a torch.distributed.checkpoint; replicated parameters'
gradients are summed in buckets.

Failures point at: `state.wrap_units` (a layer's region, its parameters read outside it: wrong
or missing gradients of one layer), `state.shard_model` (gradients averaged instead of summed:
every gradient off by the world size; loss right, parameters wrong after a step), or
`state.bucket_grad_sums` / `runtime.sharding.sum_grads` (replicated gradients).

The optimizer is AdamW with eps=1e-4: the key bias of the video DiT has a gradient that is zero
in exact arithmetic (softmax ignores a shift of every score), so at the default eps=1e-8 AdamW
divides float32 rounding noise by its own magnitude and the bias moves by lr·sign(noise), on any
two devices (measured: 1.5e-3 relative, replicated and sharded alike; 1e-7 at eps=1e-4)."""

import copy

import pytest
import torch
import torch.distributed as dist

from seqshard.models import AXES, build, named_plans
from seqshard.testing import mesh as make_mesh

TOL = 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _parallel(family, config, sizes, plan, mesh_shape, extra=None, seed=0, **options):
    from seqshard.planner import parallelize

    model, inputs = build(family, config, seed=seed, **sizes)
    overrides, names = named_plans(family, config)[plan]
    pm = parallelize(model, inputs, mesh=make_mesh(mesh_shape, names),
                     overrides={**overrides, **(extra or {})}, axes=AXES[family], **options)
    return model, inputs, pm


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1)


def train_like_one_device(family, config, sizes, plan, mesh_shape, extra=None, steps=3,
                          **options):
    """On every rank: 3 AdamW steps of the sharded model and of the single-device model.
    Returns the worst relative error (loss, every parameter after every step), where, and the
    parameter elements held here and in the model. options: more of parallelize's."""
    from torch._dynamo.utils import counters

    counters.clear()
    model, inputs, pm = _parallel(family, config, sizes, plan, mesh_shape, extra,
                                  model_state="sharded", **options)
    ref, _ = build(family, config, **sizes)
    opt, opt_ref = _adamw(model), _adamw(ref)
    worst = {}
    for step in range(steps):
        loss, loss_ref = pm(*inputs), ref(*inputs)
        loss.backward()
        loss_ref.backward()
        worst[f"loss@{step}"] = _rel(loss.detach(), loss_ref.detach())
        for o in (opt, opt_ref):
            o.step()
            o.zero_grad()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            worst[f"param {n}@{step}"] = _rel(_full(p).detach(), q.detach())
    key = max(worst, key=worst.get)
    local = sum(p.to_local().numel() for p in model.parameters())
    return dict(err=worst[key], where=key, local=local,
                total=sum(p.numel() for p in ref.parameters()),
                dtensors=all(hasattr(p, "to_local") for p in model.parameters()),
                graphs=counters["stats"]["unique_graphs"], breaks=sum(counters["graph_break"].values()),
                templates=[(name, m.layers) for name, m in pm.program.gm.named_modules()
                           if type(m).__name__ == "CompiledLayer"],
                calls=[name for name, m in pm.program.gm.named_children()
                       if "compiled_layers_0" in getattr(m, "code", "")])


def _check(results, world):
    r = results[0]
    assert all(x["err"] == r["err"] for x in results), "ranks disagree"
    assert r["err"] <= TOL, f"relative error {r['err']:.2e} at {r['where']}"
    assert all(x["dtensors"] for x in results), "a parameter is not a DTensor"
    # each rank holds about 1/world of the parameters (dim 0 rounded up per parameter)
    assert sum(x["local"] for x in results) >= r["total"]
    for x in results:
        assert x["local"] <= r["total"] / world * 1.05, (x["local"], r["total"], world)


def test_llama_ring_2_ranks(pool2):
    _check(pool2.run(train_like_one_device, "llama", "tiny", dict(batch=1, seq=29), "ring",
                     (2,)), 2)


def test_video_dit_dsp_2_ranks(pool2):
    _check(pool2.run(train_like_one_device, "video_dit", "tiny",
                     dict(batch=1, frames=3, patches=5), "dsp", (2,)), 2)


def test_video_dit_ulysses_2_ranks(pool2):
    _check(pool2.run(train_like_one_device, "video_dit", "tiny",
                     dict(batch=1, frames=5, patches=7), "ulysses", (2,)), 2)


def test_llama_hybrid_2x2_recomputed(pool4):
    """A 2-axis mesh (flattened for the state) and recomputed layers (checkpointed submodules
    inside FSDP units: the rerun in backward must find the layer's parameters gathered)."""
    _check(pool4.run(train_like_one_device, "llama", "tiny-mha", dict(batch=2, seq=37), "hybrid",
                     (2, 2), {"layers.*": "recompute", "lm_head": "chunk:3"}), 4)


def test_compiled_layers_2_ranks(pool2):
    """compile="layers" with sharded state: each layer's compiled template runs inside its FSDP
    unit (`wrap_units` moves the call of `compiled_layers_0` into `unit_layers_i`), its
    parameters gathered by FSDP before it; Dynamo compiles the one template once for both
    layers and both steps, with no graph break (aot_eager: Dynamo + AOTAutograd, as
    tests/test_compiled_layers.py)."""
    results = pool2.run(train_like_one_device, "llama", "tiny", dict(batch=1, seq=29), "ring",
                        (2,), steps=2, compile="layers", compile_backend="aot_eager")
    _check(results, 2)
    r = results[0]
    assert r["graphs"] == 1 and r["breaks"] == 0, (r["graphs"], r["breaks"])
    # one template, called from inside each layer's unit
    assert r["templates"] == [("compiled_layers_0", ["layers.0", "layers.1"])], r["templates"]
    assert r["calls"] == ["unit_layers_0", "unit_layers_1"], r["calls"]


# ------------------------------------------------------------------ checkpoint and resume
def resume_reproduces(path):
    """Two steps, save (model and AdamW state, torch.distributed.checkpoint), one more step;
    then a model built from another seed loads the checkpoint and takes that step: the loss and
    the parameters after it must be bit-identical."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    sizes = dict(batch=1, seq=29)
    model, inputs, pm = _parallel("llama", "tiny", sizes, "ulysses", (2,), model_state="sharded")
    opt = _adamw(model)
    for _ in range(2):
        pm(*inputs).backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    expected = pm(*inputs)
    expected.backward()
    opt.step()
    after = [_full(p).detach().clone() for p in model.parameters()]

    other, _, pm2 = _parallel("llama", "tiny", sizes, "ulysses", (2,), seed=7,
                              model_state="sharded")
    opt2 = _adamw(other)
    msd, osd = get_state_dict(other, opt2)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(other, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loss = pm2(*inputs)
    loss.backward()
    opt2.step()
    same = all(torch.equal(a, _full(p).detach()) for a, p in zip(after, other.parameters()))
    return loss.item(), expected.item(), same


def test_checkpoint_resume_is_exact(pool2, tmp_path):
    for loss, expected, same in pool2.run(resume_reproduces, str(tmp_path / "ckpt")):
        assert loss == expected and same, (loss, expected, same)


# ------------------------------------------------------------------ replicated: buckets
def replicated_buckets(bucket_bytes):
    from seqshard.planner import state

    state.BUCKET_BYTES = bucket_bytes
    try:
        model, inputs, pm = _parallel("llama", "tiny", dict(batch=1, seq=29), "ring", (2,))
    finally:
        state.BUCKET_BYTES = 25 * 2**20
    ref = copy.deepcopy(model)
    loss, loss_ref = pm(*inputs), ref(*inputs)
    loss.backward()
    loss_ref.backward()
    err = max(_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    code = pm.code
    return err, code.count("sum_grads("), code.count("sum_grad(")


@pytest.mark.parametrize("bucket_bytes,buckets", [(25 * 2**20, 1), (20_000, 12)])
def test_replicated_gradients_summed_in_buckets(pool2, bucket_bytes, buckets):
    """The default bucket holds the whole tiny model (178 kB: one all-reduce); 20 kB buckets,
    filled in the order of first use: embedding + norm, then per layer q k v | o + norm | gate |
    up | down + the next norm, then the LM head: 12."""
    err, sums, singles = pool2.run(replicated_buckets, bucket_bytes)[0]
    assert err <= TOL and sums == buckets and singles == 0, (err, sums, singles)
