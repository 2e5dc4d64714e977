"""Models people bring — transformers causal LMs (Llama, Qwen2, Mistral with a sliding window,
Phi-3) and diffusers video transformers (CogVideoX, Latte, Wan), built from small configs —
parallelize unmodified and train exactly, with sequence-parallel attention.

For each model: a plan made at production size on the meta device (4 H200s) and a plan that
forces the sequence split, each run at 2 and 4 gloo ranks on the tiny model: loss and every
gradient within 1e-5 of the single-device model, attention distributed in the plan (not
replicated), and seqshard collectives that actually ran.

A failure names the model and the plan; `seqshard capture` on the tiny model lists ops without
a rule with their source lines (capture/dims), and `plan.explain(...)` says why attention was
or wasn't split (strategies/solver)."""

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import real_models as R

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

TOL = 1e-5
FORCED = {  # the sequence split forced on every layer (the loss and embeddings left to the planner)
    **{name: {"lm.model.layers.*": "split:s"} for name in R.DECODERS},
    "cogvideox": {"net.transformer_blocks.*": "split:s"},
    # Latte: frames are the batch of its spatial attention and patches that of its temporal
    # one; `split:seq` is each attention's own sequence (a factor name is per node)
    "latte": {"net.transformer_blocks.*": "split:seq", "net.temporal_transformer_blocks.*": "split:seq"},
    "wan": {"net.blocks.*": "split:s"},
}


class Collectives(TorchDispatchMode):
    """Counts the seqshard custom ops that run."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "seqshard":
            self.ops[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(name, plan_json, overrides, options=None):
    """On every rank: the tiny model single-device and parallelized (`options`: more arguments
    of parallelize); worst relative error of the loss and of every gradient, the collectives
    that ran, and the plan's attention."""
    from seqshard.planner import Plan, parallelize

    model, inputs = R.build(name, "tiny")
    ref = copy.deepcopy(model)
    plan = Plan.from_json(plan_json) if plan_json else None
    pm = parallelize(model, inputs, plan=plan, overrides=overrides, **(options or {}))
    with Collectives() as seen:
        loss = pm(*inputs)
        loss.backward()
    want = ref(*inputs)
    want.backward()
    worst = [("loss", _rel(loss.detach(), want.detach()))]
    # A gradient that is zero in exact arithmetic (CogVideoX's norm_k.bias: a bias added to every
    # key leaves softmax unchanged) is float32 noise on both sides; it is measured against the
    # largest gradient's scale (1e-4 of it) instead of its own norm.
    scale = 1e-4 * max(q.grad.norm().item() for q in ref.parameters() if q.grad is not None)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, n
            continue
        assert p.grad is not None, f"{n} got no gradient"
        worst.append((n, ((p.grad - q.grad).norm() / max(q.grad.norm().item(), scale)).item()))
    return max(worst, key=lambda w: w[1]), dict(seen.ops), attention_of(pm.plan)


def attention_of(plan):
    """Each attention layout of the plan: "ring [s@sp]", "local [g@sp]" (heads split: Ulysses
    by redistribution), "local [replicated]" (not distributed)."""
    return sorted({f"{n.algorithm} [{n.split_str()}]" for n in plan.attention()})


def distributed(attention) -> bool:
    return all(not a.endswith("[replicated]") for a in attention)


_PLANS = {}


def production_plan(name):
    """The planner's own plan at production size on 4 H200s (meta device), as JSON."""
    if name not in _PLANS:
        from seqshard import planner

        model, inputs = R.build(name, "production")
        _PLANS[name] = planner.plan(model, inputs, cluster="h200x4").to_json()
    return _PLANS[name]


def check(pool, name, plan_json, overrides, options=None):
    results = pool.run(run, name, plan_json, overrides, options)
    (where, err), ops, attention = results[0]
    assert err <= TOL, f"{name}: worst relative error {err:.2e} at {where}"
    assert distributed(attention), f"{name}: attention not distributed: {attention}"
    assert ops, f"{name}: no seqshard collective ran"
    for (w, e), _, _ in results[1:]:
        assert e <= TOL, f"{name} (another rank): {e:.2e} at {w}"


@pytest.mark.parametrize("name", R.ALL)
def test_production_plan_distributes_attention(name):
    from seqshard.planner import Plan

    plan = Plan.from_json(production_plan(name))
    attention = attention_of(plan)
    assert distributed(attention), \
        f"{name}: the planner replicated attention at production size: {attention}\n{plan}"


@pytest.mark.parametrize("name", R.ALL)
def test_production_plan_runs_exactly(pool2, pool4, name):
    for pool in (pool2, pool4):
        check(pool, name, production_plan(name), None)


@pytest.mark.parametrize("name", ["llama", "wan"])
def test_production_plan_compiled_with_kernels_runs_exactly(pool2, name):
    """What parallelize runs by default on GPUs (compile and kernels "auto"): each distinct
    layer template compiled once (aot_eager here: Dynamo + AOTAutograd, as Inductor traces) and
    the fused loss, on a transformers and a diffusers model (all seven ran exactly so at world
    size 1, by hand: 2026-12-02)."""
    check(pool2, name, production_plan(name), None,
          dict(compile="layers", kernels=True, compile_backend="aot_eager"))


NOT_YET = {}  # name → why its forced split does not run yet (a strict xfail)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=NOT_YET[n], strict=True))
                                  if n in NOT_YET else n for n in R.ALL])
def test_forced_sequence_split_runs_exactly(pool2, pool4, name):
    for pool in (pool2, pool4):
        check(pool, name, None, FORCED[name])


@pytest.mark.parametrize("name", ["llama", "wan"])
def test_plan_applies_across_dtypes(pool2, name):
    """Plans key nodes by module, op and count (casts by what they cast), not by FX name, which
    a bf16 model's casts renumber (Wan's float32 `to_8` is norm2's weight cast, its bf16 `to_8`
    a cast of the activations): the bf16 production plan runs the float32 tiny model exactly,
    and the float32 production plan, and a plan written before keys existed, apply to the bf16
    tiny model. A failure here points at `strategies/from_plan.py` (node_keys, resolve_plan)."""
    import json

    from seqshard import planner
    from seqshard.capture import capture
    from seqshard.codegen import MeshInfo, PlanError, apply_plan
    from seqshard.dims import analyze
    from seqshard.planner import Plan

    bf16 = planner.plan(*R.build(name, "production", dtype=torch.bfloat16), cluster="h200x4")
    check(pool2, name, bf16.to_json(), None)
    keyless = json.loads(production_plan(name))
    for n in keyless["nodes"]:
        del n["key"]
    dims = analyze(capture(*R.build(name, "tiny", dtype=torch.bfloat16)))
    for plan in (Plan.from_json(production_plan(name)), Plan.from_json(json.dumps(keyless))):
        program = apply_plan(dims, plan, MeshInfo.virtual((("sp", 2),)))
        assert "seqshard" in program.gm.code, f"{name}: no collective in the bf16 program"
    # a plan that does not fit (an op it lacks) says which op of which module
    linear = next(n for n in bf16.nodes if n.op == "linear")
    short = Plan(mesh=bf16.mesh, nodes=tuple(n for n in bf16.nodes if n is not linear))
    with pytest.raises(PlanError, match=f"linear number 1 of module '{linear.module}', which "
                                        "has 1 here and 0 in the plan"):
        apply_plan(dims, short, MeshInfo.virtual((("sp", 2),)))


class _JointAttention(torch.nn.Module):
    """CogVideoX's joint attention in a few lines: cat([text, video]), attention, split back."""

    def __init__(self, causal: bool, d: int = 8, heads: int = 2):
        super().__init__()
        self.causal, self.heads = causal, heads
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, text, video):
        x = torch.cat([text, video], 1)
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        t, v = a.transpose(1, 2).flatten(2).split([text.shape[1], video.shape[1]], 1)
        return t.pow(2).mean() + v.pow(2).mean()


def _joint_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 5, 8, generator=gen), torch.randn(1, 7, 8, generator=gen)


def run_joint(plan_json):
    """On every rank: worst relative error of the loss and gradients of `_JointAttention`."""
    from seqshard.planner import Plan, parallelize

    torch.manual_seed(0)
    model, inputs = _JointAttention(False), _joint_inputs()
    ref = copy.deepcopy(model)
    loss = parallelize(model, inputs, plan=Plan.from_json(plan_json))(*inputs)
    loss.backward()
    want = ref(*inputs)
    want.backward()
    return max([_rel(loss.detach(), want.detach())] + [_rel(p.grad, q.grad) for p, q in
                                                        zip(model.parameters(), ref.parameters())])


def test_joint_sequence_split_only_where_order_does_not_matter(pool2):
    """A concatenated sequence split piece by piece (each rank: its share of the text, then of
    the video; 5 and 7 tokens, so both are padded inside the local sequence and the runtime
    masks those keys) serves full attention exactly, which does not depend on the order of the
    tokens; causal attention does, and the override that forces it is refused naming the
    attention node (strategies/strategy.py `resolve`). Fails if the joint factor is no longer
    split (dims/ops/index_ops.py `cat`, `split`), if its padding is not masked
    (codegen/local_ops.py `_joint_keys`), or if causal attention over it is planned."""
    from seqshard import planner
    from seqshard.strategies import PlanError

    torch.manual_seed(0)
    inputs = _joint_inputs()
    plan = planner.plan(_JointAttention(False), inputs, mesh=(("sp", 2),),
                        overrides={"*": "split:s ring"}, time_limit=10)
    assert attention_of(plan) == ["ring [s@sp]"], attention_of(plan)
    assert plan.node("cat").split_str() == plan.node("split_with_sizes").split_str() == "s@sp"
    assert max(pool2.run(run_joint, plan.to_json())) <= TOL
    with pytest.raises(PlanError, match="scaled_dot_product_attention.*concatenation"):
        planner.plan(_JointAttention(True), inputs, mesh=(("sp", 2),),
                     overrides={"*": "split:s ring"}, time_limit=10)
