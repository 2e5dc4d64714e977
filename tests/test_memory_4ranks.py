"""This session's memory strategies composed at 4 ranks on both built-in models (issue #14):
nested checkpoint groups (`group:2`), a partial offload (the earliest unit's inputs in host
memory, the rest recomputed on the GPU: what the solver's offload count emits) and a token-wise
chain in chunks, under llama's ring (zigzag) plan and the video DiT's DSP plan; loss, every
gradient and the parameters after 3 optimizer steps against the single-device model.

Failures point at: codegen of the three together (seqshard/codegen/recompute.py: the group's
checkpoint around its layers' checkpoints, the offloaded group's input, the chunk loop nested in
a layer's rerun), or collectives that do not rerun alike on every rank in backward (a hang or a
mismatch); tests/test_groups.py and tests/test_token_chains.py check each one alone at 1 and 2
ranks."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

from seqshard.models import AXES, build, named_plans
from seqshard.testing import mesh as make_mesh
from seqshard.testing import record_step

TOL = 1e-5


def _llama_three_layers():
    """llama "tiny-3": tiny with 3 layers (groups of 2: one group and a last layer alone)."""
    from dataclasses import replace

    from seqshard.models import llama
    llama.CONFIGS.setdefault("tiny-3", replace(llama.CONFIGS["tiny"], layers=3))


def run_composed(family, config, sizes, named, overrides, sgd, steps=3):
    """On every rank: the single-device model against the parallel one under the named plan and
    `overrides`; loss, every gradient and the parameters after `steps` optimizer steps (SGD with
    momentum if `sgd`, else AdamW). Returns the worst relative error, the plan's groups,
    offloaded layers and chunked regions, what the offload hooks moved in the last step, and the
    chunk loops in the code."""
    from seqshard.planner import parallelize
    from seqshard.runtime import offload

    if config == "tiny-3":
        _llama_three_layers()
    offload.MIN_BYTES = 0
    model, inputs = build(family, config, **sizes)
    ref = copy.deepcopy(model)
    named_overrides, names = named_plans(family, config)[named]
    pm = parallelize(model, inputs, mesh=make_mesh((dist.get_world_size(),), names),
                     overrides={**named_overrides, **overrides}, axes=AXES[family])
    opt, opt_ref = ((torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if sgd else
                     torch.optim.AdamW(m.parameters(), lr=0.01)) for m in (model, ref))
    worst = {}
    for step in range(steps):
        offload.stats.reset()
        loss_ref, loss = ref(*inputs), pm(*inputs)
        loss_ref.backward()
        loss.backward()
        record_step(worst, step, model, ref, loss, loss_ref, (opt, opt_ref))
    key = max(worst, key=worst.get)
    loops = sum(m.code.count("run_in_chunks(") for m in pm.program.gm.modules()
                if isinstance(m, fx.GraphModule))
    return dict(err=worst[key], where=key, groups=pm.plan.recompute_groups,
                offload=pm.plan.offload, chunked=pm.plan.chunked_modules,
                packed=offload.stats.packed, unpacked=offload.stats.unpacked, loops=loops)


def _check(results, groups, offload, chunked, packed):
    r = results[0]
    assert all(x["err"] == r["err"] for x in results), "ranks disagree on the loss or gradients"
    assert r["err"] <= TOL, f"relative error {r['err']:.2e} at {r['where']}"
    got = (r["groups"], r["offload"], sorted(r["chunked"]), r["packed"], r["unpacked"], r["loops"])
    assert got == (groups, offload, sorted(chunked), packed, packed, len(chunked)), r


LLAMA_CHAIN = "layers.*.attn.o_proj+add+mlp_norm+mlp"
DIT_CHAIN = "blocks.*.mul+add+norm2+mlp"


def test_llama_ring_groups_offload_chain_4_ranks(pool4):
    """Llama with 3 layers, ring attention (zigzag) over 4 ranks (37 tokens padded to 40): the
    layers in groups of 2 with only layers.0 offloaded (a layer whose spec differs is a class
    of its own: layers.0 offloaded alone, layers.1-2 one group recomputed on the GPU), each
    layer's o_proj+add+mlp_norm+mlp chain in 3 chunks (10 local tokens: 4, 3, 3). 3 AdamW
    steps exact (lr 0.01)."""
    ov = {"layers.*": "group:2", "layers.0": "offload", LLAMA_CHAIN: "chunk:3"}
    chains = tuple((LLAMA_CHAIN.replace("*", str(i)), 3) for i in range(3))
    _check(pool4.run(run_composed, "llama", "tiny-3", dict(batch=2, seq=37), "ring", ov, False),
           (("layers.1", "layers.2"),), ("layers.0",), chains, 1)


DSP_PARTIAL = {"blocks.*": "recompute", "blocks.[01]": "offload"}


def test_video_dit_dsp_offload_chunked_mlp_4_ranks(pool4):
    """Video DiT, DSP over 4 ranks (spatial blocks split the 5 frames, padded to 8; temporal
    blocks the 7 patches): every block recomputed, only the earliest of each class (blocks.0,
    blocks.1) with its inputs in host memory (two per block: the residual stream and the
    conditioning), each MLP in 3 chunks of tokens. Groups do not apply: the DiT's spatial and
    temporal blocks alternate, so no two consecutive blocks are alike (a `group:2` override is
    refused with a PlanError that says so); the chains: `test_video_dit_dsp_chain_4_ranks`.
    3 SGD steps with momentum: under AdamW the spatial blocks' key bias (whose true gradient is
    0: softmax ignores a shift of every score) gets rounding noise, which AdamW's lr·m/√v turns
    into steps of lr; 2.2e-4 at blocks.2.attn.qkv.bias after 3 steps with DSP alone, no memory
    strategy (2.6e-5 here after one step)."""
    ov = {**DSP_PARTIAL, "blocks.*.mlp": "chunk:3"}
    mlps = tuple((f"blocks.{i}.mlp", 3) for i in range(4))
    _check(pool4.run(run_composed, "video_dit", "tiny", dict(batch=2, frames=5, patches=7), "dsp",
                     ov, True), (), ("blocks.0", "blocks.1"), mlps, 4)


def test_video_dit_dsp_chain_4_ranks(pool4):
    """As `test_video_dit_dsp_offload_chunked_mlp_4_ranks`, each block's mul+add+norm2+mlp
    chain (the gated attention output and residual add, the norm, the MLP) in 3 chunks instead
    of its MLP; 3 SGD steps with momentum (as there). The chain reads the block's input, which
    DSP redistributes at every block boundary (frames split <-> patches split): the all-to-all
    runs once, on the whole tensor, before the chunk loop (its backward after the loop's), and
    the loop cuts the patches of the layout the block runs in (temporal blocks: 2 local
    patches of 8, pieces of 1, 1, 0). Fails: codegen/apply.py `_chunked_modules` (the loop's
    inputs are the redistributed values) or codegen/recompute.py `chunk_modules` (the
    collective hoisted before the loop)."""
    ov = {**DSP_PARTIAL, DIT_CHAIN: "chunk:3"}
    chains = tuple((DIT_CHAIN.replace("*", str(i)), 3) for i in range(4))
    _check(pool4.run(run_composed, "video_dit", "tiny", dict(batch=2, frames=5, patches=7), "dsp",
                     ov, True), (), ("blocks.0", "blocks.1"), chains, 4)


def test_a_redistribution_inside_a_chunked_chain_is_refused():
    """Planning alone (no ranks): DSP with the spatial blocks' MLPs forced to split patches
    while the rest of those blocks split frames puts an all-to-all between two ops of the
    chain (the norm's modulated output into the MLP, the MLP's output into the gate); forced
    into chunks, that chain is refused with an error naming both edges and what to change (a
    redistribution into a chunked region, of its input, runs before its loop:
    `test_video_dit_dsp_chain_4_ranks`)."""
    from seqshard.planner import plan
    from seqshard.solver import Infeasible

    model, inputs = build("video_dit", "tiny", batch=2, frames=5, patches=7)
    named, _ = named_plans("video_dit", "tiny")["dsp"]
    ov = {**named, DIT_CHAIN: "chunk:3", "blocks.[02].mlp.*": "split:p"}
    edges = (r"between two of its ops .*\(blocks\.0\.mul\+add\+norm2\+mlp: blocks\.0 → "
             r"blocks\.0\.mlp\.0 .*blocks\.0\.mlp\.2 → blocks\.0 .*force the region's ops to one split")
    with pytest.raises(Infeasible, match=edges):
        plan(model, inputs, mesh=(("sp", 4),), axes=AXES["video_dit"], overrides=ov, time_limit=10)
