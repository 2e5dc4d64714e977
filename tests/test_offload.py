"""Offload: a recomputed layer's inputs in host memory until its backward
(seqshard/runtime/offload.py), chosen by the solver (o[c] in seqshard/solver/model.py) or forced
by the override `offload`, emitted as `offloaded_checkpoint(...)` calls.

Failures point at: the hooks (they pack something other than the checkpoint's inputs: the
counts; or they give back a different tensor: the errors), codegen (seqshard/codegen/recompute.py
`_checkpoint`), or the formulation (the brute-force test compares it with a direct count)."""

import copy
import json
from dataclasses import replace
from itertools import product

import pytest
import torch
import torch.distributed as dist

from seqshard.costmodel import Cluster
from seqshard.models import AXES, build, named_plans
from seqshard.planner import Plan
from seqshard.planner.api import plan_captured
from seqshard.solver import NS, Infeasible, Model
from seqshard.solver.figures import chosen_moves, kept_attention, memory_of
from seqshard.testing import attention_layers_problem
from seqshard.testing import record_step
from seqshard.testing import mesh as make_mesh

GIB = 2**30
TOL = 1e-5
OFFLOAD = {"llama": {"layers.*": "offload"}, "video_dit": {"blocks.*": "offload"}}
LAYERS = {"llama": 2, "video_dit": 4}



def run_offloaded(family, config, sizes, named, steps=0, compile_backend=None):
    """On every rank: the single-device model against the parallel one with every layer
    offloaded (every tensor the hooks see moved, however small). Returns the worst relative
    error of loss, gradients and parameters over `steps` SGD steps after the first, what the
    hooks moved in the last step, and how many offloaded checkpoints the code calls."""
    from seqshard.planner import parallelize
    from seqshard.runtime import offload

    offload.MIN_BYTES = 0
    model, inputs = build(family, config, **sizes)
    ref = copy.deepcopy(model)
    overrides, names = named_plans(family, config)[named]
    pm = parallelize(model, inputs, mesh=make_mesh((dist.get_world_size(),), names),
                     overrides={**overrides, **OFFLOAD[family]}, axes=AXES[family])
    run = torch.compile(pm, backend=compile_backend) if compile_backend else pm
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref))
    worst = {}
    for step in range(steps + 1):
        offload.stats.reset()
        loss_ref, loss = ref(*inputs), run(*inputs)
        packed = offload.stats.packed
        loss_ref.backward()
        loss.backward()
        record_step(worst, step, model, ref, loss, loss_ref, (opt, opt_ref))
    key = max(worst, key=worst.get)
    s = offload.stats
    return dict(err=worst[key], where=key, packed_in_forward=packed, packed=s.packed,
                unpacked=s.unpacked, kept=s.kept, offload=pm.plan.offload,
                calls=pm.code.count("offloaded_checkpoint("),
                checkpoints=pm.code.count("torch.utils.checkpoint.checkpoint("))


def _check(results, family, packed_per_layer):
    """Exact and alike on every rank; every layer's code calls the offloaded checkpoint, and the
    hooks moved exactly the layers' activations (`packed_per_layer` each: the residual stream,
    and a DiT's conditioning), not the parameters, not the rotary tables, and never what the
    layer's ops save inside."""
    r, layers = results[0], LAYERS[family]
    assert all(x["err"] == r["err"] for x in results), "ranks disagree on the loss or gradients"
    assert r["err"] <= TOL, f"relative error {r['err']:.2e} at {r['where']}"
    assert len(r["offload"]) == layers and r["calls"] == layers and r["checkpoints"] == 0, r
    assert r["packed_in_forward"] == r["packed"] == r["unpacked"] == layers * packed_per_layer, r


LLAMA = dict(batch=2, seq=37)
VIDEO = dict(batch=1, frames=3, patches=5)


def test_offload_exact_4_ranks_3_steps(pool4):
    """Ring attention over 4 ranks, 37 tokens padded to 40; 3 optimizer steps."""
    _check(pool4.run(run_offloaded, "llama", "tiny", LLAMA, "ring", steps=3), "llama", 1)


@pytest.mark.parametrize("family,config,sizes,named,per_layer", [
    ("llama", "tiny-mqa", LLAMA, "ulysses", 1),
    ("video_dit", "tiny", VIDEO, "dsp", 2),
])
def test_offload_exact_2_ranks(pool2, family, config, sizes, named, per_layer):
    _check(pool2.run(run_offloaded, family, config, sizes, named, steps=1), family, per_layer)


def test_offload_exact_1_rank_compiled(pool1):
    """Under torch.compile: dynamo does not trace `saved_tensors_hooks` (torch 2.13 skips its
    __init__), so each offloaded layer's call is a graph break and runs as it does in eager,
    hooks and all; the code around it is compiled."""
    _check(pool1.run(run_offloaded, "llama", "tiny", LLAMA, "ring", steps=1,
                     compile_backend="aot_eager"), "llama", 1)


# ------------------------------------------------------------------ the hooks alone
def test_hooks_move_only_the_named_checkpoint_inputs():
    """Around a non-reentrant checkpoint the hooks see its inputs and nothing the function's ops
    save; of those they move the ones named (`offload=`), but never a parameter or a small
    tensor; backward gets the same values back."""
    from torch.utils.checkpoint import checkpoint

    from seqshard.runtime import offload

    w = torch.nn.Parameter(torch.randn(512, 512))  # 1 MiB, a parameter: stays
    x = torch.randn(1024, 512, requires_grad=True)
    table = torch.randn(1024, 512)                # 2 MiB, not named: stays

    def layer(a, t, s, w):
        return (torch.nn.functional.linear(a, w).relu() * t).sum() + s.sum()

    def step(call, **kw):
        h = x * 2                                 # an activation, 2 MiB: moves
        small = x[:4] * 3                         # 8 KiB: stays
        call(layer, h, table, small, w, **kw).backward()
        g = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        return g

    offload.stats.reset()
    got = step(offload.offloaded_checkpoint, offload=(0, 2, 3))
    assert (offload.stats.packed, offload.stats.unpacked, offload.stats.kept) == (1, 1, 3), offload.stats
    assert offload.stats.bytes == 1024 * 512 * 4
    want = step(checkpoint, use_reentrant=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _chain(n=4, d=64, device="cpu"):
    """n residual layers of d features: a loss over them, every layer's input offloaded (an
    activation: the first is x * 2) or, offloaded=False, the same layers plainly."""
    from seqshard.runtime.offload import offloaded_checkpoint

    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(d, d, device=device) / d**0.5) for _ in range(n)]

    def layer(h, w):
        return torch.tanh(h @ w) + h

    def loss(x, offloaded=True):
        h = x * 2
        for w in ws:
            h = offloaded_checkpoint(layer, h, w, offload=(0,)) if offloaded else layer(h, w)
        return h.pow(2).mean()

    def grads():
        g = [w.grad.clone() for w in ws]
        for w in ws:
            w.grad = None
        return g

    return loss, grads


def test_prefetch_steps_accumulation_retained_and_eval(monkeypatch):
    """Backward prefetches the next layer's input when it unpacks one: n − 1 of n unpacks find
    their tensor fetched. Exact (bitwise) against the layers without offload in every case: two
    steps, a forward without backward, two forwards then one backward (summed losses: one
    pass over both graphs; and separately: the first backward's last prefetch crosses into the
    other forward's layers and is dropped at the end of its pass), a retained graph run
    backward twice; an eval forward under no_grad packs nothing and leaves no state. Failures
    point at the bookkeeping in seqshard/runtime/offload.py (`_pack` linking layers,
    `_prefetch_before`, `_pass_ended`)."""
    from seqshard.runtime import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    loss, grads = _chain()
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    ahead = []  # prefetched tensors not taken, seen from inside each layer's rerun

    def probe():
        ahead.append(sum(p.ahead is not None for layer in offload._state.fetched for p in layer.alive()))

    def run(backward, counts):
        offload.stats.reset()
        backward()
        s = offload.stats
        assert (s.packed, s.unpacked, s.prefetched) == counts, s
        assert offload._state.fetched == [] and offload._state.last is None, offload._state
        return grads()

    def same(a, b):
        assert all(torch.equal(p, q) for p, q in zip(a, b))

    loss(x, False).backward()
    want = grads()
    monkeypatch.setattr(torch, "tanh", lambda t, f=torch.tanh: (probe(), f(t))[1])
    for _ in range(2):
        same(run(lambda: loss(x).backward(), (4, 4, 3)), want)
    assert max(ahead) == 1, ahead  # one layer's input fetched ahead, never more

    def dropped_then_step():
        loss(x)  # a forward whose graph is freed: the next forward does not link to it
        loss(x).backward()

    same(run(dropped_then_step, (8, 4, 3)), want)
    offload.stats.reset()
    with torch.no_grad():
        loss(x)
    assert offload.stats.packed == 0 and offload._state.last is None and not offload._state.fetched
    loss(y, False).backward()
    want_y = grads()
    both = [a + b for a, b in zip(want, want_y)]
    same(run(lambda: (loss(x) + loss(y)).backward(), (8, 8, 7)), both)

    def two_backwards():
        lx, ly = loss(x), loss(y)
        ly.backward()
        lx.backward()

    def retained():
        lx = loss(x)
        lx.backward(retain_graph=True)
        lx.backward()

    same(run(two_backwards, (8, 8, 6)), both)
    same(run(retained, (4, 8, 6)), [2 * g for g in want])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetch_on_cuda(monkeypatch):
    """On the GPU, 4 layers whose 64 MiB inputs take longer to copy than a layer's backward:
    the prefetches run on the side stream (their copy's event recorded there) and the compute
    stream waits for them (a missing wait reads a half-copied input: the gradients differ).
    Exact against the same layers without offload, over two steps."""
    from seqshard.runtime import offload

    loss, grads = _chain(d=1024, device="cuda")
    x = torch.randn(16384, 1024, device="cuda")
    loss(x, False).backward()
    want = grads()
    fetched, original = [], offload._fetch_ahead

    def spy(p):
        original(p)
        fetched.append(p.landed is not None and p.ahead.device.type == "cuda")

    monkeypatch.setattr(offload, "_fetch_ahead", spy)
    for step in range(2):
        offload.stats.reset()
        loss(x).backward()
        got = grads()
        s = offload.stats
        assert (s.packed, s.unpacked, s.prefetched) == (4, 4, 3), s
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"step {step} differs"
    assert fetched == [True] * 6 and x.device in offload._side, fetched


# ------------------------------------------------------------------ the formulation
def _brute_force(pb):
    """Every (strategies, keep | recompute | offload, layers keeping attention's outputs)
    counted directly: (objective ns, bytes, mode) of those within the host's room."""
    (c,) = [c for c, lc in pb.classes.items() if lc.kind == "layer"]
    lc = pb.classes[c]
    nodes = list(pb.strategies)
    for choice in product(*(range(len(pb.strategies[n])) for n in nodes)):
        pick = dict(zip(nodes, choice))
        base = sum(int(round(pb.mult[n] * pb.node_cost[(n, i)].time_s * NS)) for n, i in pick.items())
        base += sum(int(round(pb.tensors[k].mult * s * NS)) for (k, _, _), (s, _, _) in chosen_moves(pb, pick))
        again = sum(int(round(pb.mult[n] * pb.forward[(n, pick[n])].time_s * NS)) for n in lc.nodes)
        again += sum(int(round(pb.tensors[k].mult * pb.move_forward.get((k, i, l), 0) * NS))
                     for (k, i, l), _ in chosen_moves(pb, pick) if pb.tensors[k].cls == c)
        # the last layer's inputs copied back exposed, the others' prefetched during the
        # backward of the layer above (its forward and backward's time), exposed past it
        first = rest = 0
        last = {(u, idx) for u, idx, _ in pb.layer_inputs[lc.layers[-1]]}
        for (u, idx), (count, x) in lc.inputs.items():
            st = pb.strategies[u][pick[u]]
            s = pb.costs.bytes(x, st.output if idx is None else st.output[idx]) / pb.costs.gpu.host_bandwidth
            first += int(round(((u, idx) in last) * s * NS))
            rest += int(round((count - ((u, idx) in last)) * s * NS))
        k = sum(1 for layer in lc.layers if pb.layer_inputs.get(layer))
        layer = sum(int(round((k - 1) * pb.mult[n] / len(lc.layers) * pb.node_cost[(n, pick[n])].time_s * NS))
                    for n in lc.nodes)
        fetch = first + max(0, rest - layer)
        attention = sum(int(round(k * pb.forward[(n, pick[n])].time_s * NS))
                        for n, k in kept_attention(pb).get(c, ()))
        for mode, s in [("keep", 0)] + [(m, s) for m in ("recompute", "offload")
                                        for s in range(len(lc.layers) + 1)]:
            r = frozenset({c}) if mode != "keep" else frozenset()
            mem = memory_of(pb, pick, r, r if mode == "offload" else frozenset(), frozenset(),
                            {c: s} if s else None)
            t = base + (again if mode != "keep" else 0) + (fetch if mode == "offload" else 0) \
                - s * attention
            if mem.host <= pb.costs.gpu.host_capacity - pb.host_bytes:
                yield t, mem.peak, mode


@pytest.fixture(scope="module")
def layers_problem():
    pb = attention_layers_problem(4)
    return pb, list(_brute_force(pb))


@pytest.mark.parametrize("tightness", ["roomy", "recompute", "offload"])
def test_offload_optimum_equals_brute_force(layers_problem, tightness):
    """The CP-SAT model with o[c] finds what enumerating every choice finds: no offload with
    memory to spare; offload once recompute alone does not fit."""
    pb, plans = layers_problem
    least = {m: min(p for _, p, mode in plans if mode == m) for m in ("keep", "recompute", "offload")}
    assert least["offload"] < least["recompute"] < least["keep"], least
    budget = {"roomy": None, "recompute": (least["recompute"] + least["keep"]) / 2,
              "offload": (least["offload"] + least["recompute"]) / 2}[tightness]
    best = min((t, mode) for t, peak, mode in plans if budget is None or peak <= budget)
    m = Model(pb, budget)
    got = m.solve(m.time_objective(), 30, 2, 0.0)
    assert got.status == "OPTIMAL" and round(got.objective_s * NS) == best[0]
    mode = "offload" if got.offload else "recompute" if got.recompute else "keep"
    assert mode == best[1] == {"roomy": "keep"}.get(tightness, tightness)
    assert budget is None or got.memory_bytes <= budget


# ------------------------------------------------------------------ plans
def test_offload_appears_as_the_budget_shrinks(layers_4m):
    """One H200: with memory to spare every activation is kept (54 GiB: 12 GiB a layer, the qkv
    projection's whole output kept through the q, k, v views, and attention's backward 8 GiB);
    under 40 GiB the layers are recomputed, keeping their inputs (26 GiB); under 24.5 GiB only
    offloading those inputs fits (23 GiB: two layers' worth stay while copied), paying for the
    first copy back in backward (the others are prefetched)."""
    kw = dict(cluster="h200x1")
    roomy = plan_captured(layers_4m, **kw)
    recompute = plan_captured(layers_4m, memory_budget=40 * GIB, **kw)
    tight = plan_captured(layers_4m, memory_budget=24.5 * GIB, **kw)
    layers = tuple(f"layers.{i}" for i in range(4))
    assert (roomy.recompute, roomy.offload) == ((), ())
    assert (recompute.recompute, recompute.offload) == (layers, ())
    assert (tight.recompute, tight.offload) == (layers, layers)
    assert tight.predicted.peak_memory_bytes <= 24.5 * GIB < recompute.predicted.peak_memory_bytes
    # recomputed, every layer keeps its attention's outputs (2 GiB each: runtime/selective.py);
    # offloaded, the last two (the norm + qkv chain in chunks, `solver.token_chains`, makes room
    # for the second), so two attentions run again in backward, and the chains' forward (their
    # nodes' compute time)
    assert (recompute.keep_attention, tight.keep_attention) == (layers, ("layers.2", "layers.3"))
    again = sum(t.cost.compute_s - r.cost.compute_s for t, r in zip(tight.nodes, recompute.nodes))
    # three layer inputs of 2 GiB (layers.0's is the model's input) copied back at 50 GB/s:
    # layers.3's exposed, the other two prefetched during a layer's backward (75 s)
    extra = tight.predicted.step_s - recompute.predicted.step_s - again
    assert again > 0 and extra == pytest.approx(2 * GIB / 50e9, rel=1e-3), extra
    # without offload, nested groups of 2 fit (24.1 GiB: each group keeps one 2 GiB input,
    # tests/test_groups.py); less than 23.1 GiB does not
    groups = plan_captured(layers_4m, memory_budget=24.5 * GIB, offload=False, **kw)
    assert groups.offload == () and groups.recompute_groups == (layers[:2], layers[2:])
    with pytest.raises(Infeasible, match="the least memory any plan needs is 23.1 GiB"):
        plan_captured(layers_4m, memory_budget=23 * GIB, offload=False, **kw)
    text = str(tight)
    assert "offload (a recomputed layer's inputs in host memory until its backward): layers.0-3" in text
    assert any(n.startswith("offload layers.0-3: their inputs (1.50 GiB each) live in host memory")
               for n in tight.notes), tight.notes
    why = tight.explain("layers.2")
    assert "recomputed, inputs in host memory" in why and "  offload:" in why, why
    assert "chosen: offload - the memory budget" in why, why
    q = Plan.from_json(tight.to_json())
    assert q.offload == tight.offload and q.hash() == tight.hash() != recompute.hash()


def test_offload_pricing_overlaps_the_copies(layers_4m):
    """Copies slower than a layer's backward: layers.3's input (copied back first) is exposed
    whole; layers.2's and layers.1's, each prefetched while the layer above runs its backward
    (T: its forward and backward in the plan, 60-80 s at 4M tokens), are exposed for what they
    take longer. At 2 GiB in 100 s: 100 + 2 × (100 − T) s, not the 300 s of copying each before
    its layer's rerun.
    Failures point at `fetch_time` (seqshard/solver/figures.py) / `Model._fetch_time` (model.py)."""
    cluster = Cluster.parse("h200x1")
    slow = replace(cluster, gpu=replace(cluster.gpu, host_bandwidth=2 * GIB / 100))
    roomy = plan_captured(layers_4m, cluster=slow)
    T = sum(n.cost.time_s for n in roomy.nodes if n.module.startswith("layers.1"))
    assert 0 < T < 100, f"the layer's backward ({T:.1f} s) should be shorter than its copy"
    recompute, offloaded = (plan_captured(layers_4m, cluster=slow, overrides={"layers.*": how})
                            for how in ("recompute", "offload"))
    extra = offloaded.predicted.step_s - recompute.predicted.step_s
    assert extra == pytest.approx(100 + 2 * (100 - T), rel=1e-6), (extra, T)
    assert any(f"for {extra * 1e3:.1f} ms more per step" in n for n in offloaded.notes), offloaded.notes
    # the whole wait is charged to layers.3, the layer whose copy backward waits for
    last = sum(n.cost.comm_s for n in offloaded.nodes if n.module.startswith("layers.3"))
    assert last == pytest.approx(extra, rel=1e-6), last


def test_offload_override_json_and_host_capacity(layers_4m):
    """`offload` forces it (and recompute); a plan offloading a layer it does not recompute is
    refused; offloaded inputs count against the host's memory."""
    p = plan_captured(layers_4m, cluster="h200x1", overrides={"layers.*": "offload"})
    assert p.offload == p.recompute == tuple(f"layers.{i}" for i in range(4))
    assert "chosen: offload - an override asks for it" in p.explain("layers.2")
    d = json.loads(p.to_json())
    d["recompute"] = d["recompute"][1:]
    with pytest.raises(ValueError, match="offloads 'layers.0' but does not recompute it"):
        Plan.from_json(json.dumps(d))
    del d["offload"]  # a plan written before offload existed still loads
    assert Plan.from_json(json.dumps(d)).offload == ()
    cluster = Cluster.parse("h200x1")
    small = replace(cluster, gpu=replace(cluster.gpu, host_capacity=4 * GIB))
    with pytest.raises(Infeasible, match="do not fit in host memory beside the optimizer state"):
        plan_captured(layers_4m, cluster=small, overrides={"layers.*": "offload"})
    assert plan_captured(layers_4m, cluster=small).offload == ()
