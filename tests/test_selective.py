"""Selective recompute: a recomputed layer that keeps its attention's outputs, so attention runs
once per step (seqshard/runtime/selective.py), chosen per layer count by the solver (s[c] in
seqshard/solver/model.py) or forced by the override `recompute:selective`, emitted as
`selective_checkpoint(...)` calls on the last s[c] layers of each class.

Failures point at: the policy (the attention op ran again in backward: the call counts; or the
rerun got different values: the errors), codegen (seqshard/codegen/recompute.py `_checkpoint`),
composition with offload (the hooks moved the kept outputs: the offload counts), or the
formulation (the predicted peak and time against hand-computed figures)."""

import copy
import json

import pytest
import torch
import torch.distributed as dist

from seqshard.capture import capture
from seqshard.dims import analyze
from seqshard.models import AXES, build, named_plans
from seqshard.planner import Plan
from seqshard.planner.api import plan_captured
from seqshard.testing import attention_layers, record_step
from seqshard.testing import mesh as make_mesh

GIB = 2**30
TOL = 1e-5
LAYER = {"llama": "layers", "video_dit": "blocks"}
LAYERS = {"llama": 2, "video_dit": 4}
LLAMA = dict(batch=2, seq=37)
VIDEO = dict(batch=1, frames=3, patches=5)


_RUNS = {"n": 0}


def _count_attention():
    """Count the forward runs of the attention custom ops' bodies in `_RUNS` (patching the
    module globals the ops call, once per process)."""
    import seqshard.runtime.local as local
    import seqshard.runtime.ring as ring
    import seqshard.runtime.ulysses as ulysses

    for mod, name in ((ring, "ring_forward"), (ulysses, "hybrid_forward"), (local, "whole_forward")):
        fn = getattr(mod, name)
        if not hasattr(fn, "_counted"):
            def counted(*a, _fn=fn, **k):
                _RUNS["n"] += 1
                return _fn(*a, **k)
            counted._counted = True
            setattr(mod, name, counted)
    return _RUNS


def run_selective(family, config, sizes, named, mode, steps=0, compile_backend=None, sgd=False,
                  layers=False):
    """On every rank: the single-device model against the parallel one whose layers are
    recomputed per `mode` ('selective', 'plain', 'mixed': the last layer selective, or
    'offload': selective with inputs in host memory). Returns the worst relative error over
    `steps` optimizer steps after the first (AdamW, or SGD with momentum), the attention ops'
    forward runs in one step, the checkpoint calls of the code and what the offload hooks
    moved. compile_backend: torch.compile of the whole program; layers: each layer template
    compiled (`compile="layers"`, aot_eager) inside its checkpoint."""
    from seqshard.planner import parallelize
    from seqshard.runtime import offload

    offload.MIN_BYTES = 0
    layer = LAYER[family]
    spec = {"selective": {f"{layer}.*": "recompute:selective"},
            "plain": {f"{layer}.*": "recompute"},
            "mixed": {f"{layer}.*": "recompute", f"{layer}.{LAYERS[family] - 1}": "recompute:selective"},
            "offload": {f"{layer}.*": "offload recompute:selective"}}[mode]
    model, inputs = build(family, config, **sizes)
    ref = copy.deepcopy(model)
    overrides, names = named_plans(family, config)[named] if named else ({}, ("sp",))
    pm = parallelize(model, inputs, mesh=make_mesh((dist.get_world_size(),), names),
                     overrides={**overrides, **spec}, axes=AXES[family],
                     **(dict(compile="layers", compile_backend="aot_eager") if layers else {}))
    run = torch.compile(pm, backend=compile_backend) if compile_backend else pm
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if sgd else
                    torch.optim.AdamW(m.parameters(), lr=0.01) for m in (model, ref))
    counts = _count_attention()
    worst, runs = {}, None
    for step in range(steps + 1):
        offload.stats.reset()
        counts["n"] = 0
        loss_ref, loss = ref(*inputs), run(*inputs)
        loss_ref.backward()
        loss.backward()
        runs = counts["n"]
        record_step(worst, step, model, ref, loss, loss_ref, (opt, opt_ref))
    key = max(worst, key=worst.get)
    return dict(err=worst[key], where=key, runs=runs, keep=pm.plan.keep_attention,
                selective=pm.code.count("selective_checkpoint("), packed=offload.stats.packed,
                unpacked=offload.stats.unpacked)


def _check(results, family, mode, runs_per_layer=None, packed_per_layer=0):
    r, layers = results[0], LAYERS[family]
    assert all(x["err"] == r["err"] for x in results), "ranks disagree on the loss or gradients"
    assert r["err"] <= TOL, f"relative error {r['err']:.2e} at {r['where']}"
    kept = {"selective": layers, "offload": layers, "mixed": 1, "plain": 0}[mode]
    assert len(r["keep"]) == r["selective"] == kept, r
    if runs_per_layer is not None:
        assert r["runs"] == runs_per_layer, r
    assert r["packed"] == r["unpacked"] == layers * packed_per_layer, r


@pytest.mark.parametrize("mode,runs", [("selective", 2), ("plain", 4), ("mixed", 3)])
def test_attention_runs_once_in_a_selective_layer(pool2, mode, runs):
    """Ring over 2 ranks, 2 layers: a selective layer runs its attention once per step, a plainly
    recomputed one twice (forward, and again in backward); 3 AdamW steps exact. Mixed (the last
    layer selective, the first plain) runs with each layer compiled (`compile="layers"`): the
    compiled template inside the selective checkpoint still returns the kept outputs."""
    _check(pool2.run(run_selective, "llama", "tiny", LLAMA, "ring", mode,
                     steps=2 if mode == "selective" else 0, layers=mode == "mixed"),
           "llama", mode, runs)


def test_selective_exact_4_ranks_offload(pool4):
    """Ring over 4 ranks (37 tokens padded to 40), inputs in host memory: the hooks move the
    layers' inputs only (one each), never the kept attention outputs; attention once a layer."""
    _check(pool4.run(run_selective, "llama", "tiny", LLAMA, "ring", "offload", steps=1),
           "llama", "offload", 2, packed_per_layer=1)


def test_selective_exact_2_ranks_ulysses(pool2):
    """Ulysses (MQA: K/V all-gathered): its op returns the head-layout tensors its backward
    reads, kept too. SGD: after AdamW's first step (lr·m/√v, sign-like on tiny gradients) the
    k_proj gradient is 1.7e-5 off with plain recompute too, bit for bit as here."""
    _check(pool2.run(run_selective, "llama", "tiny-mqa", LLAMA, "ulysses", "selective", steps=1,
                     sgd=True),
           "llama", "selective", 2)


def test_selective_exact_2_ranks_dsp(pool2):
    """The video DiT under DSP: attention is aten's SDPA on whole frames or whole patches (no
    runtime op), kept by the policy's aten kernels. SGD: under AdamW the key bias (whose true
    gradient is 0: softmax ignores a shift shared by every key) is 1.5e-3 off after two steps
    with plain recompute too, bit for bit as here."""
    _check(pool2.run(run_selective, "video_dit", "tiny", VIDEO, "dsp", "selective", steps=1,
                     sgd=True),
           "video_dit", "selective", 0)


def test_selective_exact_1_rank_compiled(pool1):
    """World size 1 (aten SDPA in the layers) under torch.compile of the whole program (the
    checkpoint with its context_fn traced by dynamo as selective checkpointing)."""
    _check(pool1.run(run_selective, "llama", "tiny", LLAMA, None, "selective", steps=1,
                     compile_backend="aot_eager"), "llama", "selective", 0)


def run_sdpa_count(mode):
    """World size 1, eager: how many times aten's fused SDPA kernel runs in one step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from seqshard.planner import parallelize

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    model, inputs = build("llama", "tiny", **LLAMA)
    spec = "recompute:selective" if mode == "selective" else "recompute"
    pm = parallelize(model, inputs, mesh=make_mesh((1,), ("sp",)), overrides={"layers.*": spec},
                     axes=AXES["llama"])
    with Count():
        pm(*inputs).backward()
    return Count.n


def test_sdpa_runs_once_at_world_size_1(pool1):
    """aten's CPU flash kernel: once per layer selective, twice plainly recomputed."""
    assert pool1.run(run_sdpa_count, "selective") == [2]
    assert pool1.run(run_sdpa_count, "plain") == [4]


# ------------------------------------------------------------------ the formulation
@pytest.fixture(scope="module")
def layers_4m():
    """At 4M tokens each layer's input and its attention output are 2 GiB (lse 64 MiB)."""
    with torch.device("meta"):
        model = attention_layers(8).to(torch.bfloat16)
        x = torch.empty(1, 1 << 22, 256, dtype=torch.bfloat16)
    return analyze(capture(model, (x,)), axes={"x": "b s d"})


def test_selective_layers_as_the_budget_shrinks(layers_4m):
    """With memory to spare nothing is recomputed; with none to spare every layer is recomputed
    plainly; in between, the last k layers keep their attention outputs (2 GiB + 64 MiB each),
    k as large as fits: each such layer adds exactly that to the peak, and saves exactly its
    attention's forward (the planner's own price) on the step."""
    kw = dict(cluster="h200x1", offload=False)
    roomy = plan_captured(layers_4m, **kw)
    assert (roomy.recompute, roomy.keep_attention) == ((), ())
    forced = {k: plan_captured(layers_4m, overrides={"layers.*": "recompute" + s}, **kw)
              for k, s in (("plain", ""), ("selective", ":selective"))}
    plain, every = forced["plain"], forced["selective"]
    assert every.keep_attention == every.recompute == tuple(f"layers.{i}" for i in range(8))
    kept = (2 * GIB + 64 * 2**20)  # out [1, 4M, 256] bf16 and lse [1, 4, 4M] fp32
    # the last layer's rerun makes its output again no more: 7 more layers' outputs kept
    assert every.predicted.peak_memory_bytes - plain.predicted.peak_memory_bytes == \
        pytest.approx(7 * kept, rel=1e-6)
    attn = next(n for n in plain.nodes if n.algorithm)
    saved = plain.predicted.step_s - every.predicted.step_s
    assert saved > 0 and saved == pytest.approx(8 * (attn.cost.time_s - next(
        n for n in every.nodes if n.algorithm).cost.time_s), rel=1e-6)
    # a budget with room for 3 more kept outputs than plain recompute: the last 4 keep them
    # (the first one costs nothing: its output is counted once, not again in its rerun)
    budget = plain.predicted.peak_memory_bytes + 3.5 * kept
    mid = plan_captured(layers_4m, memory_budget=budget, **kw)
    assert mid.recompute == plain.recompute
    assert mid.keep_attention == ("layers.4", "layers.5", "layers.6", "layers.7"), mid.keep_attention
    # within the solver's gap (1e-4 of the step) the plan may also run a chain in chunks (the
    # second pass takes the least memory among plans as fast): compare it with plain recompute
    # chunked the same way
    same = plain if not mid.chunked_modules else plan_captured(layers_4m, overrides={
        "layers.*": "recompute", **{m: f"chunk:{k}" for m, k in mid.chunked_modules}}, **kw)
    assert same.chunked_modules == mid.chunked_modules
    assert mid.predicted.peak_memory_bytes == pytest.approx(
        same.predicted.peak_memory_bytes + 3 * kept, rel=1e-6)
    assert mid.predicted.step_s == pytest.approx(same.predicted.step_s - saved / 2, rel=1e-6)
    text = str(mid)
    assert "recompute keeping attention's outputs (attention not run again in backward): " \
        "layers.4-7" in text, text
    assert any(n.startswith("recompute layers.4-7 keeping attention's outputs") for n in mid.notes), mid.notes
    why = mid.explain("layers.6")
    assert "selective:" in why and "4 of 8 layers keep" in why, why
    q = Plan.from_json(mid.to_json())
    assert q.keep_attention == mid.keep_attention and q.hash() == mid.hash() != plain.hash()
    d = json.loads(mid.to_json())
    del d["keep_attention"]  # a plan written before selective recompute existed still loads
    assert Plan.from_json(json.dumps(d)).keep_attention == ()
    d["keep_attention"], d["recompute"] = ["layers.7"], ["layers.6"]
    with pytest.raises(ValueError, match="keeps the attention outputs of 'layers.7' but does not recompute"):
        Plan.from_json(json.dumps(d))
