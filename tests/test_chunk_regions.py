"""Token-wise modules inside layers run in chunks of tokens (ALST's tiled MLP): each MLP runs on
k pieces of its input's tokens, each piece checkpointed, so its [tokens, ffn] intermediates
exist one piece at a time; chosen per layer class by the solver (or `chunk:K` on the module).

Failures point at: which modules qualify (seqshard/solver/problem.py `token_regions`), the
formulation (solver/model.py: q[R], d[R], e[R]; the brute-force test counts the terms
directly), the plan's record (`Plan.chunked_modules`), or codegen (codegen/recompute.py
`chunk_modules`: the loop's input, constants and output; nested in a recomputed layer's
checkpoint)."""

import copy
from contextlib import nullcontext
from itertools import combinations, product

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.dims import analyze
from seqshard.models import AXES, build, named_plans
from seqshard.planner import Plan, plan
from seqshard.solver import NS, Model, build_problem, token_regions
from seqshard.solver.figures import chosen_moves, kept_attention, memory_of
from seqshard.strategies import Costs
from seqshard.testing import record_step
from seqshard.testing import mesh as make_mesh

TOL = 1e-5
LLAMA = dict(batch=2, seq=37)
VIDEO = dict(batch=2, frames=5, patches=7)
MLP_OP = {"llama": "silu", "video_dit": "gelu"}   # one per MLP forward
MLPS = {"llama": "layers.*.mlp", "video_dit": "blocks.*.mlp"}
LAYERS = {"llama": "layers.*", "video_dit": "blocks.*"}


class Ops(TorchDispatchMode):
    """Counts ATen ops by name."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))



def run_chunked(family, config, sizes, named, chunks=0, recompute=False, steps=3, plan_=None,
                compile_backend=None):
    """On every rank: the single-device model against the parallel one with its MLPs in
    `chunks` chunks (and its layers recomputed), or as `plan_` says; loss, every gradient and
    the parameters after `steps` SGD steps. Returns the worst relative error, the MLP op's
    count in the last forward and backward, and the chunk loops in the code."""
    from seqshard.planner import parallelize

    model, inputs = build(family, config, **sizes)
    ref = copy.deepcopy(model)
    mesh = make_mesh((dist.get_world_size(),), ("sp",))
    if plan_ is None:
        overrides = dict(named_plans(family, config)[named][0])
        overrides[MLPS[family]] = f"chunk:{chunks}"
        if recompute:
            overrides[LAYERS[family]] = "recompute"
        pm = parallelize(model, inputs, mesh=mesh, overrides=overrides, axes=AXES[family])
    else:
        pm = parallelize(model, inputs, mesh=mesh, plan=plan_, axes=AXES[family])
    run = torch.compile(pm, backend=compile_backend) if compile_backend else pm
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref))
    worst = {}
    for step in range(steps + 1):
        with Ops() if step == steps else nullcontext() as fwd:
            loss = run(*inputs)
        loss_ref = ref(*inputs)
        loss_ref.backward()
        with Ops() if step == steps else nullcontext() as bwd:
            loss.backward()
        record_step(worst, step, model, ref, loss, loss_ref, (opt, opt_ref))
    key = max(worst, key=worst.get)
    op = MLP_OP[family]
    loops = sum(m.code.count("run_in_chunks(") for m in pm.program.gm.modules()
                if isinstance(m, fx.GraphModule))
    return dict(err=worst[key], where=key, fwd=fwd.ops.get(op, 0), bwd=bwd.ops.get(op, 0),
                chunked=pm.plan.chunked_modules, recompute=pm.plan.recompute, loops=loops,
                code=pm.code)


def _check(results, mlps, k, recompute, counted=True):
    r = results[0]
    assert all(x["err"] == r["err"] for x in results), "ranks disagree on the loss or gradients"
    assert r["err"] <= TOL, f"relative error {r['err']:.2e} at {r['where']}"
    assert len(r["chunked"]) == mlps and {c for _, c in r["chunked"]} == {k}, r["chunked"]
    assert r["loops"] == mlps and len(r["recompute"]) == (mlps if recompute else 0), r
    if counted:
        # each MLP ran k times in forward; in backward once more per chunk (its checkpoint), and
        # in a recomputed layer the rerun runs the chunk loop too (the Llama's but its last
        # chunk: the rerun stops once it has made what the layer's backward needs)
        assert r["fwd"] == mlps * k, f"the MLP ran {r['fwd']} times in forward, not {mlps} × {k}"
        again = (mlps * (2 * k - 1), 2 * mlps * k) if recompute else (mlps * k,)
        assert r["bwd"] in again, f"the MLP ran {r['bwd']} times in backward, not {again}"


def test_tiled_mlp_exact_4_ranks_dsp(pool4):
    """Video DiT, DSP (frames split, patches in 3 chunks of 3, 2 and 2), 3 steps."""
    _check(pool4.run(run_chunked, "video_dit", "tiny", VIDEO, "dsp", 3), 4, 3, False)


@pytest.mark.parametrize("family,config,sizes,named,k,recompute", [
    ("llama", "tiny-mqa", dict(batch=1, seq=29), "ulysses", 16, False),   # more chunks than tokens
    ("video_dit", "tiny", dict(batch=1, frames=3, patches=5), "dsp", 2, True),
])
def test_tiled_mlp_exact_2_ranks(pool2, family, config, sizes, named, k, recompute):
    mlps = 2 if family == "llama" else 4
    _check(pool2.run(run_chunked, family, config, sizes, named, k, recompute, steps=1), mlps, k,
           recompute)


def test_tiled_mlp_exact_1_rank_compiled(pool1):
    """Under torch.compile (aot_eager), in recomputed layers: the chunk loop nested in the
    layer's checkpoint traces and stays exact."""
    _check(pool1.run(run_chunked, "llama", "tiny", LLAMA, "ring", 3, True, steps=1,
                     compile_backend="aot_eager"), 2, 3, True, counted=False)


# ------------------------------------------------------------------ which modules qualify
def test_token_regions_are_the_mlps():
    """The MLPs qualify (linear, pointwise); attention, single projections and norms do not
    (attention needs the sequence; one op alone has no intermediate to save)."""
    for family, sizes, paths, dim in (("llama", LLAMA, ["layers.0.mlp", "layers.1.mlp"], 1),
                                      ("video_dit", VIDEO, [f"blocks.{i}.mlp" for i in range(4)], 2)):
        model, inputs = build(family, "tiny", **sizes)
        regions = token_regions(analyze(capture(model, inputs), AXES.get(family)))
        assert [r.path for r in regions] == paths and {r.dim for r in regions} == {dim}, regions


class Mixer(nn.Module):
    """A module that is not token-wise: a cumulative sum over the sequence inside it."""

    def __init__(self, d=32):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(self.up(x).cumsum(1))


class Block(nn.Module):
    def __init__(self, d=32, heads=2, mixer=False):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.mlp = Mixer(d) if mixer else nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, S, D = x.shape
        h = F.silu(x)
        q, k, v = (p(h).view(B, S, self.heads, D // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        return x + self.mlp(x)


class Layers(nn.Module):
    def __init__(self, n=2, mixer=False, d=32):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, mixer=mixer) for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()


def test_a_sequence_mixing_module_is_not_chunked():
    x = torch.randn(1, 16, 32)
    assert token_regions(analyze(capture(Layers(mixer=True), (x,)), axes={"x": "b s d"})) == []
    assert [r.path for r in token_regions(analyze(capture(Layers(), (x,)), axes={"x": "b s d"}))] \
        == ["layers.0.mlp", "layers.1.mlp"]
    with pytest.raises(ValueError, match="no token-wise module inside a layer"):
        plan(Layers(mixer=True), (x,), axes={"x": "b s d"}, overrides={"layers.*.mlp": "chunk"},
             cluster="h200x1")


# ------------------------------------------------------------------ the formulation
def _brute_force(pb):
    """Every (strategies, recompute, chunked regions, layers keeping attention's outputs) with
    the terms counted directly: any set of regions of which no two share ops (a module and the
    chain around it, `token_chains`). Yields (time, peak, r, whether some region is chunked)."""
    nodes = list(pb.strategies)
    (c,) = pb.classes
    sets = [Q for k in range(len(pb.regions) + 1) for Q in combinations(pb.regions, k)
            if not any(R2 in pb.regions[R1].excludes for R1, R2 in combinations(Q, 2))]
    for choice in product(*(range(len(pb.strategies[n])) for n in nodes)):
        pick = dict(zip(nodes, choice))
        # between two of its ops: it cannot run in chunks (its input's runs before the loop)
        redistributes = {R for R in pb.regions
                         if any(R in pb.node_regions.get(v, ()) and (key, pick[key[0]], l) in pb.move
                                and (key[0], key[1], v) in pb.regions[R].inner
                                for (key, v, j), l in pb.need.items() if pick[v] == j)}
        base = sum(int(round(pb.mult[n] * pb.node_cost[(n, i)].time_s * NS)) for n, i in pick.items())
        base += sum(int(round(pb.tensors[k].mult * s * NS)) for (k, _, _), (s, _, _) in chosen_moves(pb, pick))
        again = sum(int(round(pb.mult[n] * pb.forward[(n, pick[n])].time_s * NS)) for n in pb.classes[c].nodes)
        again += sum(int(round(pb.tensors[k].mult * pb.move_forward.get((k, i, l), 0) * NS))
                     for (k, i, l), _ in chosen_moves(pb, pick) if pb.tensors[k].cls == c)
        chunk_again = {R: sum(int(round(pb.mult[n] * pb.forward[(n, pick[n])].time_s * NS))
                              for n in pb.regions[R].nodes) for R in pb.regions}
        attention = sum(int(round(k * pb.forward[(n, pick[n])].time_s * NS))
                        for n, k in kept_attention(pb).get(c, ()))
        for r, Q in product((False, True), sets):
            if set(Q) & redistributes or not r and any(pb.regions[R].chain for R in Q):
                continue  # (a chain runs in chunks in a recomputed layer only)
            for s in range(len(pb.classes[c].layers) + 1 if r else 1):
                mem = memory_of(pb, pick, frozenset({c}) if r else frozenset(), frozenset(),
                                frozenset(Q), {c: s} if s else None)
                yield (base + (again if r else 0) + sum(chunk_again[R] for R in Q) - s * attention,
                       mem.peak, r, bool(Q))


@pytest.mark.parametrize("budget_at", [None, "chunk", "recompute"])
def test_chunk_optimum_equals_brute_force(budget_at):
    """The CP-SAT model with recompute r and chunking q (and their products) finds what
    enumerating every choice finds: with memory to spare, under a budget only chunking meets,
    and under one that needs the layers recomputed too."""
    with torch.device("meta"):
        model = Layers(d=128)
        x = torch.empty(1, 1 << 22, 128)  # the MLP's [s/4, 512] intermediates: 2 GiB each
    dims = analyze(capture(model, (x,)), axes={"x": "b s d"})
    mesh = (("sp", 4),)
    costs = Costs(dims, Cluster.preset("h200", gpus=4), mesh, training=True, dtype_bytes=4)
    # the layer's other ops forced (split s), so that every choice can be enumerated
    overrides = {"": "split:s", "layers.?": "split:s ring", "layers.?.[qkv]": "split:s"}
    pb = build_problem(dims, costs, mesh, overrides, "replicated", offload=False)
    assert list(pb.regions) == ["layers.0.mlp", "layers.0.silu+q+k+v", "layers.0.add+mlp"]
    assert pb.regions["layers.0.mlp"].inputs and pb.regions["layers.0.mlp"].excludes == ("layers.0.add+mlp",)
    plans = list(_brute_force(pb))
    assert len(plans) >= 50, len(plans)
    least = {(r, q): min(m for _, m, r_, q_ in plans if (r_, q_) == (r, q))
             for r, q in product((False, True), (False, True))}
    # chunking saves memory, in a kept layer and in a recomputed one; both together the most
    assert least[False, True] < least[False, False] and least[True, True] < least[True, False]
    assert least[True, True] < least[False, True], least
    # "chunk": chunking alone fits (recompute alone may too, but reruns more than the MLP);
    # "recompute": only both together fit
    budget = {None: None, "chunk": least[False, True] + 2**20,
              "recompute": least[True, True] + 2**20}[budget_at]
    feasible = [(t, m, r, q) for t, m, r, q in plans if budget is None or m <= budget]
    best = min(t for t, *_ in feasible)
    m = Model(pb, budget)
    got = m.solve(m.time_objective(), 30, 2, 0.0)
    assert got.status == "OPTIMAL" and round(got.objective_s * NS) == best
    assert bool(got.chunked) == (budget_at is not None)
    assert bool(got.recompute) == (budget_at == "recompute")
    assert budget is None or got.memory_bytes <= budget


# ------------------------------------------------------------------ production plans
TINY_16M = dict(mesh=(("sp", 4),), overrides={"*": "split:s ring zigzag"})


@pytest.fixture(scope="module")
def tiny_16m():
    """Tiny Llama at 16M tokens on 4 ranks: its MLPs' intermediates are 1.25 GiB per rank."""
    big, inputs = build("llama", "tiny", device="meta", batch=1, seq=1 << 24)
    roomy = plan(big, inputs, **TINY_16M)
    tight = plan(big, inputs, memory_budget=0.8 * roomy.predicted.peak_memory_bytes, **TINY_16M)
    # (0.63: recomputing alone no longer fits, the MLPs in chunks inside recomputed layers do)
    tighter = plan(big, inputs, memory_budget=0.63 * roomy.predicted.peak_memory_bytes, **TINY_16M)
    return roomy, tight, tighter


def test_chunking_appears_as_the_budget_shrinks(tiny_16m):
    """Plenty of memory: nothing chunked. Tighter: the MLPs in 2 chunks (their largest kept
    tensor 1.25 GiB > CHUNK_BYTES), layers kept. Tighter still: the layers recomputed too,
    the chunk loop inside. Each step costs predicted time."""
    roomy, tight, tighter = tiny_16m
    assert roomy.chunked_modules == () and roomy.recompute == ()
    assert tight.chunked_modules == (("layers.0.mlp", 2), ("layers.1.mlp", 2)) and tight.recompute == ()
    assert tighter.chunked_modules == tight.chunked_modules and len(tighter.recompute) == 2
    assert roomy.predicted.step_s < tight.predicted.step_s < tighter.predicted.step_s
    assert "chunked: layers.0-1.mlp in 2 chunks of tokens" in str(tight)
    assert any(n.startswith("chunk layers.0-1.mlp into 2 chunks") for n in tight.notes), tight.notes
    text = tight.explain("layers.1.mlp")
    assert "in 2 chunks of tokens" in text and "chunked - the memory budget" in text, text
    assert "whole - the plan fits without it" in roomy.explain("layers.0.mlp")
    q = Plan.from_json(tight.to_json())
    assert q.chunked_modules == tight.chunked_modules and q.hash() == tight.hash() != roomy.hash()


def test_a_16m_token_plan_runs_at_37_tokens(pool4, tiny_16m):
    """The solver's plan (ring, zigzag; layers recomputed, MLPs in 2 chunks) made at 16M
    tokens runs a 37-token copy exactly on 4 ranks, 3 steps: 37 tokens padded to 40, 10 local
    tokens in chunks of 5, the chunk loop nested in each layer's checkpoint."""
    tighter = Plan.from_json(tiny_16m[2].to_json())
    _check(pool4.run(run_chunked, "llama", "tiny", LLAMA, None, plan_=tighter), 2, 2, True)


def test_override_chunk_count():
    model, inputs = build("llama", "tiny", device="meta", seq=64)
    p = plan(model, inputs, cluster="h200x4", overrides={"layers.*.mlp": "chunk:5"})
    assert p.chunked_modules == (("layers.0.mlp", 5), ("layers.1.mlp", 5))
    assert "an override asks for it" in p.explain("layers.0.mlp")
    with pytest.raises(ValueError, match="token-wise module inside a layer"):
        plan(model, inputs, cluster="h200x4", overrides={"layers.*.attn": "chunk"})
