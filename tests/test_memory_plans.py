"""Memory plans: recompute per layer class, chosen by the solver in the same CP-SAT model as the
splits, and emitted as checkpointed submodules; optimizer state on the host (model_state
"offload"), priced in the plan.

Failures point at: the formulation (seqshard/solver/model.py, its docstring; the brute-force
test compares it with a direct count), the sets it is built from (solver/problem.py
`_add_layer_classes`), codegen (seqshard/codegen/recompute.py: a layer's region, its inputs and
outputs), or collectives that do not rerun alike on every rank in backward (a hang or a
mismatch in the distributed tests)."""

import copy
import json
from dataclasses import replace
from itertools import product

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.dims import analyze
from seqshard.models import AXES, build, named_plans
from seqshard.planner import Plan, plan
from seqshard.planner.api import plan_captured
from seqshard.solver import NS, Infeasible, Model
from seqshard.solver.figures import chosen_moves, kept_attention, memory_of
from seqshard.testing import attention_layers_problem, mesh as make_mesh
from seqshard.testing import record_step

GIB = 2**30
TOL = 1e-5
# every layer recomputed; the Llama's LM head and loss in 3 chunks of tokens
RECOMPUTE = {"llama": {"layers.*": "recompute", "lm_head": "chunk:3"},
             "video_dit": {"blocks.*": "recompute"}}


# ------------------------------------------------------------------ exact on every rank
class Backward(TorchDispatchMode):
    """Counts the attention ops that run during backward: without recompute only their
    backward runs there; a recomputed layer runs its forward again (seqshard's distributed
    attention, or ATen's local kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if "attention" in name:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))



def run_recomputed(family, config, sizes, named, steps=0, plan_=None, compile_backend=None):
    """On every rank: the single-device model against the parallel one with every layer
    recomputed (forced by an override, or as `plan_` says). Returns the worst relative error of
    loss, gradients and parameters after `steps` SGD steps, the seqshard ops that ran in the
    last backward, and whether the code shows the checkpoint."""
    from seqshard.planner import parallelize

    model, inputs = build(family, config, **sizes)
    ref = copy.deepcopy(model)
    if plan_ is None:
        overrides, names = named_plans(family, config)[named]
        overrides = {**overrides, **RECOMPUTE[family]}
        pm = parallelize(model, inputs, mesh=make_mesh((dist.get_world_size(),), names),
                         overrides=overrides, axes=AXES[family])
    else:
        pm = parallelize(model, inputs, mesh=make_mesh((dist.get_world_size(),), ("sp",)),
                         plan=plan_, axes=AXES[family])
    run = torch.compile(pm, backend=compile_backend) if compile_backend else pm
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref))
    worst = {}
    for step in range(steps + 1):
        loss_ref, loss = ref(*inputs), run(*inputs)
        loss_ref.backward()
        with Backward() as backward:
            loss.backward()
        record_step(worst, step, model, ref, loss, loss_ref, (opt, opt_ref))
    key = max(worst, key=worst.get)
    return dict(err=worst[key], where=key, backward=backward.ops, recompute=pm.plan.recompute,
                checkpoints=pm.code.count("torch.utils.checkpoint.checkpoint(")
                + pm.code.count("selective_checkpoint("), keep=pm.plan.keep_attention,
                chunks=pm.plan.chunks, chunked=pm.code.count("recompute_chunked("))


def _check(results, layers, chunks=0):
    r = results[0]
    assert all(x["err"] == r["err"] for x in results), "ranks disagree on the loss or gradients"
    assert r["err"] <= TOL, f"relative error {r['err']:.2e} at {r['where']}"
    assert len(r["recompute"]) == layers and r["checkpoints"] == layers, r
    assert r["chunked"] == bool(chunks) and [k for _, k in r["chunks"]] == ([chunks] if chunks else []), r
    # the forward ran again in backward: once per layer, attention's forward op ran there (but
    # in a layer that keeps its attention's outputs: runtime/selective.py)
    again = sum(v for k, v in r["backward"].items() if not k.endswith("_backward"))
    assert again == layers - len(r["keep"]), f"attention ran {again} times in backward: {r['backward']}"


LLAMA = dict(batch=2, seq=37)
VIDEO = dict(batch=2, frames=5, patches=7)


@pytest.mark.parametrize("family,config,sizes,named", [
    ("llama", "tiny", LLAMA, "ring"),
    ("llama", "tiny-mqa", LLAMA, "ulysses"),
    ("video_dit", "tiny", VIDEO, "dsp"),
])
def test_recompute_exact_4_ranks_3_steps(pool4, family, config, sizes, named):
    """Every layer recomputed (and the Llama's loss in 3 chunks over 37 tokens split 4 ways and
    padded to 40: chunks of 4, 3 and 3 tokens, padding ignored)."""
    layers, chunks = (2, 3) if family == "llama" else (4, 0)
    _check(pool4.run(run_recomputed, family, config, sizes, named, steps=3), layers, chunks)


@pytest.mark.parametrize("family,config,sizes,named", [
    ("llama", "tiny", dict(batch=1, seq=29), "ulysses"),
    ("video_dit", "tiny", dict(batch=1, frames=3, patches=5), "ring"),
    ("video_dit", "tiny", dict(batch=1, frames=3, patches=5), "ulysses"),
])
def test_recompute_exact_2_ranks(pool2, family, config, sizes, named):
    layers, chunks = (2, 3) if family == "llama" else (4, 0)
    _check(pool2.run(run_recomputed, family, config, sizes, named), layers, chunks)


def solver_chosen_plan():
    """A plan made at 1M tokens under a tight budget recomputes (the solver's choice), and runs
    a 37-token copy of the model exactly."""
    big, big_inputs = build("llama", "tiny", device="meta", batch=1, seq=1 << 20)
    roomy = plan(big, big_inputs, mesh=(("sp", 4),), overrides={"*": "split:s ring zigzag"})
    tight = plan(big, big_inputs, mesh=(("sp", 4),), overrides={"*": "split:s ring zigzag"},
                 memory_budget=0.7 * roomy.predicted.peak_memory_bytes)  # 0.8: MLPs checkpointed
    return roomy.recompute, Plan.from_json(tight.to_json())


def test_solver_chosen_recompute_runs_exactly(pool4):
    roomy, tight = solver_chosen_plan()
    assert roomy == () and tight.recompute == ("layers.0", "layers.1"), (roomy, tight.recompute)
    _check(pool4.run(run_recomputed, "llama", "tiny", LLAMA, None, steps=1, plan_=tight), 2,
           dict(tight.chunks).get("cross_entropy_loss", 0))


# ------------------------------------------------------------------ the formulation
def _brute_force(pb):
    """Every (strategies, recompute, layers keeping attention's outputs) with the terms counted
    directly: (objective ns, bytes, recomputed)."""
    nodes = list(pb.strategies)
    (c,) = pb.classes
    for choice in product(*(range(len(pb.strategies[n])) for n in nodes)):
        pick = dict(zip(nodes, choice))
        base = sum(int(round(pb.mult[n] * pb.node_cost[(n, i)].time_s * NS)) for n, i in pick.items())
        base += sum(int(round(pb.tensors[k].mult * s * NS)) for (k, _, _), (s, _, _) in chosen_moves(pb, pick))
        again = sum(int(round(pb.mult[n] * pb.forward[(n, pick[n])].time_s * NS)) for n in pb.classes[c].nodes)
        again += sum(int(round(pb.tensors[k].mult * pb.move_forward.get((k, i, l), 0) * NS))
                     for (k, i, l), _ in chosen_moves(pb, pick) if pb.tensors[k].cls == c)
        attention = sum(int(round(k * pb.forward[(n, pick[n])].time_s * NS))
                        for n, k in kept_attention(pb).get(c, ()))
        for r, s in [(False, 0)] + [(True, s) for s in range(len(pb.classes[c].layers) + 1)]:
            mem = memory_of(pb, pick, frozenset({c}) if r else frozenset(), frozenset(), frozenset(),
                            {c: s} if s else None)
            yield base + (again if r else 0) - s * attention, mem.peak, r


@pytest.mark.parametrize("binding", [False, True])
def test_recompute_optimum_equals_brute_force(binding):
    """The CP-SAT model (products linearized) finds what enumerating every choice finds."""
    pb = attention_layers_problem(4)
    assert list(pb.classes) == ["layers.0"] and pb.classes["layers.0"].inputs
    plans = list(_brute_force(pb))
    assert len(plans) >= 64, len(plans)
    budget = None
    if binding:  # below the least any plan needs without recompute: only recompute fits
        least_kept = min(m for _, m, r in plans if not r)
        least = min(m for _, m, r in plans if r)
        assert least < least_kept, "recompute saves nothing here"
        budget = (least + least_kept) / 2
    feasible = [(t, m, r) for t, m, r in plans if budget is None or m <= budget]
    best = min(t for t, _, _ in feasible)
    m = Model(pb, budget)
    got = m.solve(m.time_objective(), 30, 2, 0.0)
    assert got.status == "OPTIMAL" and round(got.objective_s * NS) == best
    assert bool(got.recompute) == binding
    assert budget is None or got.memory_bytes <= budget


# ------------------------------------------------------------------ production plans
@pytest.fixture(scope="module")
def llama8b_32k():
    model, inputs = build("llama", "llama3-8b", device="meta", dtype=torch.bfloat16, seq=1 << 15)
    return analyze(capture(model, inputs))


def test_recompute_appears_as_the_budget_shrinks(llama8b_32k):
    """8 H200s, FSDP-style state, 32K tokens: plenty of memory keeps every activation; a tight
    budget recomputes the layers, fits it, and pays in step time."""
    kw = dict(cluster="h200x8", mesh=(("sp", 8),), model_state="sharded")
    roomy = plan_captured(llama8b_32k, **kw)
    assert roomy.recompute == (), roomy.recompute
    tight_budget = 0.5 * roomy.predicted.peak_memory_bytes  # (at 0.6 checkpointing the MLPs does)
    tight = plan_captured(llama8b_32k, memory_budget=tight_budget, **kw)
    assert len(tight.recompute) == 32, tight.recompute
    assert tight.predicted.peak_memory_bytes <= tight_budget
    assert tight.predicted.step_s > roomy.predicted.step_s
    text = tight.explain("layers.5")
    assert "recomputed" in text and "← chosen" in text and "budget" in text, text
    assert "recompute (inputs kept" in str(tight) and "layers.0-31" in str(tight)
    # the peak: the loss's backward (its two fp32 [4K, 128K] temporaries) with every input kept,
    # or, the loss in chunks (a near-tie in time), a recomputed layer's or a chunk's
    assert any(n.startswith("peak memory") and ("at the start of the backward" in n or
                                                "in the backward of" in n) for n in tight.notes), tight.notes
    with pytest.raises(Infeasible, match="without recompute"):
        plan_captured(llama8b_32k, memory_budget=tight_budget, recompute=False, **kw)


def test_llama_1b_at_64k_fits_one_h200():
    """It did not (seqshard refused it: "needs 140 GiB"); PyTorch with checkpointing trains it.
    Whole, it needs 201 GiB (the loss's backward adds two fp32 [64K, 128K] temporaries, 63 GiB).
    The cheapest way in: the LM head and loss in chunks (its fp32 logits are 31 GiB); with every
    layer recomputed as well it needs 29 GiB (at 64 GiB checkpointing the MLPs does: 49 GiB)."""
    model, inputs = build("llama", "llama3-1b", device="meta", dtype=torch.bfloat16, seq=1 << 16)
    dims = analyze(capture(model, inputs))
    with pytest.raises(Infeasible, match=r"the least memory any plan needs is 201\.2 GiB"):
        plan_captured(dims, cluster="h200x1", recompute=False)
    budget = 0.9 * Cluster.parse("h200x1").gpu.hbm_capacity
    p = plan_captured(dims, cluster="h200x1")
    assert p.recompute == () and p.chunks == (("cross_entropy_loss", 32),), (p.recompute, p.chunks)
    assert p.predicted.peak_memory_bytes <= budget
    q = plan_captured(dims, cluster="h200x1", memory_budget=48 * GIB)
    assert q.recompute == tuple(f"layers.{i}" for i in range(16)) and q.predicted.step_s > p.predicted.step_s


def test_forced_recompute_and_json():
    model, inputs = build("llama", "tiny", device="meta", seq=64)
    p = plan(model, inputs, cluster="h200x4", overrides={"layers.1": "recompute"})
    assert p.recompute == ("layers.1",)
    assert "an override asks for it" in p.explain("layers.1")
    q = Plan.from_json(p.to_json())
    assert q.recompute == p.recompute and q.hash() == p.hash()
    d = json.loads(p.to_json())
    del d["recompute"]  # a plan written before recompute existed still loads
    old = Plan.from_json(json.dumps(d))
    assert old.recompute == () and old.hash() != p.hash()
    with pytest.raises(ValueError, match="matches no layer"):
        plan(model, inputs, cluster="h200x4", overrides={"layers.*.attn": "recompute"})


# ------------------------------------------------------------------ optimizer state on the host
def test_optimizer_state_offloaded_to_the_host(llama8b_32k):
    """Llama-3-8B at 32K on one H200: replicated, parameters + gradients + AdamW state + fp32
    master weights alone are 120 GiB, so nothing fits; with the optimizer state on the host
    (ZeRO-Offload) the GPU holds 30 GiB of state and the plan fits, paying the host traffic and
    the CPU's AdamW step in the predicted step."""
    with pytest.raises(Infeasible, match=r"119\.7 GiB of it parameters"):
        # (with every layer's inputs on the host it squeezes in: 126.1 of 126.4 GiB)
        plan_captured(llama8b_32k, cluster="h200x1", offload=False)
    p = plan_captured(llama8b_32k, cluster="h200x1", model_state="offload")
    assert p.predicted.peak_memory_bytes <= 0.9 * Cluster.parse("h200x1").gpu.hbm_capacity
    assert any("host memory (104.7 GiB per GPU" in n for n in p.notes), p.notes
    # the gradients (15 GiB) made layer by layer: at the peak only the LM head's
    assert any("14.96 GiB parameters and optimizer state + 0.98 GiB gradients" in n for n in p.notes), p.notes
    small = Cluster.parse("h200x1")
    small = replace(small, gpu=replace(small.gpu, host_capacity=64 * GIB))
    with pytest.raises(Infeasible, match="104.7 GiB of host memory per GPU, the cluster has 64.0"):
        plan_captured(llama8b_32k, cluster=small, model_state="offload")


# ------------------------------------------------------------------ the LM head and loss in chunks
def test_loss_chunked_as_the_budget_shrinks(llama8b_32k):
    """Llama-3-8B at 32K on one H200 (optimizer state on the host): the fp32 logits of the loss
    are 15.7 GiB; under a budget that checkpointing every MLP alone does not meet, the LM head
    and loss run in chunks of at most 1 GiB of logits."""
    kw = dict(cluster="h200x1", model_state="offload")
    roomy = plan_captured(llama8b_32k, **kw)
    assert roomy.chunks == () and len(roomy.chunked_modules) == 32  # MLPs checkpointed
    tight = plan_captured(llama8b_32k, memory_budget=roomy.predicted.peak_memory_bytes - 8 * GIB, **kw)
    assert tight.chunks == (("cross_entropy_loss", 16),), tight.chunks
    assert tight.predicted.peak_memory_bytes <= roomy.predicted.peak_memory_bytes - 8 * GIB
    assert "chunked: the LM head and cross_entropy_loss run in 16 chunks" in str(tight)
    assert "in 16 chunks of tokens" in tight.explain("lm_head")
    q = Plan.from_json(tight.to_json())
    assert q.chunks == tight.chunks and q.hash() == tight.hash() != roomy.hash()
    with pytest.raises(ValueError, match="matches no LM head"):
        plan_captured(llama8b_32k, overrides={"norm": "chunk"}, **kw)
