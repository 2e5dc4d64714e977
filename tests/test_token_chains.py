"""Token-wise chains across modules run in chunks of tokens (`solver.token_chains`): a Llama
layer's `attn_norm+attn.q_proj+attn.k_proj+attn.v_proj` and `attn.o_proj+add+mlp_norm+mlp`
chunked drop what a chunked MLP keeps at its edges (the norms' outputs, the residual between
attention and the MLP), so one recomputed layer's working set shrinks by three [tokens, hidden]
tensors at long sequences.

Failures point at: which chains qualify (seqshard/solver/problem.py `token_chains`,
`_one_way`), the formulation of a module nested in a chain (solver/model.py `_region_choice`,
`_drop`, `_layer_live`; tests/test_chunk_regions.py's brute force enumerates the region sets),
or codegen (codegen/recompute.py `chunk_modules`: several inputs and outputs, one region's
output the next one's input)."""

import copy

import torch
import torch.distributed as dist
import torch.fx as fx

from seqshard.capture import capture
from seqshard.dims import analyze
from seqshard.models import AXES, build, named_plans
from seqshard.planner import Plan, plan
from seqshard.solver import token_chains
from seqshard.testing import mesh as make_mesh
from seqshard.testing import record_step

TOL = 1e-5
QKV = "layers.*.attn_norm+attn.q_proj+attn.k_proj+attn.v_proj"
MLP = "layers.*.attn.o_proj+add+mlp_norm+mlp"
DIT_CHAIN = "blocks.*.mul+add+norm2+mlp"


def test_the_chains_of_a_llama_layer():
    """Two chains per layer, between the views to and from heads: the norm and q/k/v
    projections (three outputs), and the output projection, residual add, norm, MLP and second
    add (two inputs: attention's output and the layer's input); each nests no other chain,
    the second the MLP's module region."""
    model, inputs = build("llama", "tiny", batch=2, seq=37)
    chains = token_chains(analyze(capture(model, inputs), AXES["llama"]))
    assert [r.path for r in chains] == [QKV.replace("*", "0"), MLP.replace("*", "0"),
                                        QKV.replace("*", "1"), MLP.replace("*", "1")]
    qkv, mlp = chains[:2]
    assert [x.target for x, _ in qkv.outputs] == [torch.ops.aten.linear.default] * 3
    assert [x.name for x, _ in mlp.inputs] == ["reshape", "embedding"]
    assert {d for r in chains for _, d in r.inputs + r.outputs} == {1}


def test_chains_appear_when_the_mlp_alone_is_not_enough():
    """Tiny Llama at 16M tokens on one GPU, layers recomputed: at 50 GiB the MLPs alone in
    chunks (the chain reruns the output projection and norm too); at 40 GiB the chain around
    each MLP (the module's region nested in it is then off), dropping the norm's output and
    the residual from the rerun's working set. The plan names it, keeps it through JSON and
    explains it."""
    big, inputs = build("llama", "tiny", device="meta", batch=1, seq=1 << 24)
    kw = dict(cluster="h200x1", overrides={"layers.*": "recompute"})
    mlp, chain = (plan(big, inputs, **kw, memory_budget=b * 2**30) for b in (50, 40))
    assert mlp.chunked_modules == (("layers.0.mlp", 5), ("layers.1.mlp", 5)), mlp.chunked_modules
    assert chain.chunked_modules == tuple((MLP.replace("*", str(i)), 5) for i in range(2))
    assert mlp.predicted.step_s < chain.predicted.step_s
    q = Plan.from_json(chain.to_json())
    assert q.chunked_modules == chain.chunked_modules and q.hash() == chain.hash() != mlp.hash()
    assert f"chunked: {MLP.replace('*', '0-1')} in 5 chunks" in str(chain), str(chain)
    assert "in 5 chunks of tokens" in chain.explain("layers.1.attn.o_proj")


def test_dsp_chains_appear_under_a_tight_budget():
    """The tiny video DiT at 32M tokens (512 frames × 65536 patches) on 4 GPUs under DSP's
    splits, the memory plan the planner's own (no chunk, recompute or offload override): with
    memory to spare nothing is chunked; at 0.34 of that peak every block is recomputed with its
    mul+add+norm2+mlp chain in chunks, 2.10 s a step (while DSP's all-to-all at each block's
    input ruled chains out: the MLPs in chunks and inputs offloaded, 2.13 s); at 0.30 the
    chains are what fits (the least memory any plan needs was 33.6 GiB, now 31.1). Fails:
    solver/model.py `_add_regions` refusing a redistribution into a region (only one between
    two of its ops is refused, `Region.inner`)."""
    big, inputs = build("video_dit", "tiny", device="meta", batch=1, frames=512, patches=65536)
    kw = dict(mesh=(("sp", 4),), axes=AXES["video_dit"],
              overrides=named_plans("video_dit", "tiny")["dsp"][0])
    roomy = plan(big, inputs, **kw)
    tight, tighter = (plan(big, inputs, **kw, memory_budget=f * roomy.predicted.peak_memory_bytes)
                      for f in (0.34, 0.30))
    chains = {DIT_CHAIN.replace("*", str(i)) for i in range(4)}
    assert roomy.chunked_modules == () and roomy.recompute == ()
    assert {r for r, _ in tight.chunked_modules} == chains and len(tight.recompute) == 4, tight
    assert chains <= {r for r, _ in tighter.chunked_modules}, tighter.chunked_modules
    assert {n.split_str() for n in tight.nodes if n.algorithm} == {"t@sp", "p@sp"}


def run_chains(family, named_overrides, steps=3, compile=False):
    """On every rank: the single-device model against the parallel one with its chains in 3
    chunks under `named_overrides`; loss, every gradient and the parameters after `steps`
    SGD steps. Returns the worst relative error, the plan's chunked regions and the loops."""
    from seqshard.planner import parallelize

    if family == "llama":
        model, inputs = build("llama", "tiny", batch=2, seq=37)
        axes = AXES["llama"]
    else:  # transformers' LlamaForCausalLM from a tiny config
        import real_models as R
        model, inputs = R.build("llama", "tiny")
        axes = None
    ref = copy.deepcopy(model)
    mesh = make_mesh((dist.get_world_size(),), ("sp",))
    pm = parallelize(model, inputs, mesh=mesh, overrides=named_overrides, axes=axes,
                     compile="layers" if compile else False, compile_backend="aot_eager")
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref))
    worst = {}
    for step in range(steps):
        loss = pm(*inputs)
        loss_ref = ref(*inputs)
        loss_ref.backward()
        loss.backward()
        record_step(worst, step, model, ref, loss, loss_ref, (opt, opt_ref))
    key = max(worst, key=worst.get)
    loops = sum(m.code.count("run_in_chunks(") for m in pm.program.gm.modules()
                if isinstance(m, fx.GraphModule))
    return dict(err=worst[key], where=key, chunked=pm.plan.chunked_modules, loops=loops,
                recompute=pm.plan.recompute)


def _check(results, regions, loops):
    r = results[0]
    assert all(x["err"] == r["err"] for x in results), "ranks disagree on the loss or gradients"
    assert r["err"] <= TOL, f"relative error {r['err']:.2e} at {r['where']}"
    assert len(r["chunked"]) == regions and r["loops"] == loops, r


def test_chains_exact_2_ranks_ring_offload_selective(pool2):
    """Ring attention (zigzag) over 2 ranks, layers recomputed keeping attention's outputs
    with their inputs offloaded, both chains in 3 chunks of the local tokens (37 tokens: 19
    local, pieces of 7, 6, 6), 2 steps."""
    ov = {"*": "split:s ring zigzag", "layers.*": "offload recompute:selective",
          QKV: "chunk:3", MLP: "chunk:3"}
    _check(pool2.run(run_chains, "llama", ov, 2), 4, 4)


def test_chains_exact_2_ranks_transformers_llama(pool2):
    """transformers' LlamaForCausalLM (its RMSNorm's cast of the layer's input feeds the
    residual add: `_one_way` splits the component there), ring attention over 2 ranks, layers
    recomputed, the chains in 3 and 2 chunks, 2 steps."""
    layers = "lm.model.layers.*"
    ov = {layers: "split:s ring recompute",
          f"{layers}.input_layernorm+self_attn.q_proj+self_attn.k_proj+self_attn.v_proj": "chunk:3",
          f"{layers}.self_attn.o_proj+add+post_attention_layernorm+mlp": "chunk:2"}
    _check(pool2.run(run_chains, "llama-hf", ov, 2), 4, 4)


def test_chains_exact_1_rank_compiled_layers(pool1):
    """One rank, layers recomputed and compiled per layer (aot_eager: one template, its two
    loops, runs both layers), the chains in 4 chunks of 37 tokens, 2 steps."""
    ov = {"layers.*": "recompute", QKV: "chunk:4", MLP: "chunk:4"}
    _check(pool1.run(run_chains, "llama", ov, 2, True), 4, 2)
