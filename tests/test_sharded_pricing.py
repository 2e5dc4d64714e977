"""The planner prices sharded model state (FSDP2 over the flattened mesh, as planner/state.py runs
it): per step the all-gathers of every layer's parameters (forward, and again in backward) and
of the root's (once), the reduce-scatters of their gradients, and what of it is exposed; memory
1/world of the state plus the root's and two layers' gathered parameters; model_state="auto"
chooses it for the 40B-class case. Failures point at solver/problem.py (`_sharded_state`) or
planner/api.py (the plan notes, `_least_step_state`). Meta device only."""

import re

import pytest
import torch

from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.costmodel import collectives as coll
from seqshard.costmodel import compute as comp
from seqshard.dims import analyze
from seqshard.models import build
from seqshard.models.llama import Llama, LlamaConfig, example_inputs
from seqshard.planner.api import plan_captured
from seqshard.solver import Infeasible, build_problem
from seqshard.strategies import Costs

GIB = 2**30

# The 40B-class model of issue 17: 48 layers, d 8192; heads, kv heads and vocabulary as
# Llama-3-70B (64, 8, 128256), SwiGLU inner size 3·d = 24576: 38.3B parameters, 571 GiB of
# replicated state with mixed-precision AdamW (16 bytes a parameter).
CFG40 = LlamaConfig(vocab=128256, dim=8192, layers=48, heads=64, kv_heads=8, ffn=24576)


def _units(model, dtype_bytes=2):
    """(root bytes, [layer bytes]) as FSDP2 units: layers.i, and the rest."""
    root, layers = 0, {}
    for name, p in model.named_parameters():
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            layers[i] = layers.get(i, 0) + p.numel() * dtype_bytes
        else:
            root += p.numel() * dtype_bytes
    return root, [layers[i] for i in sorted(layers)]


def test_40b_at_256k_on_256_h100_needs_sharded_state():
    with torch.device("meta"):
        model = Llama(CFG40).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 38e9 < n < 39e9
    dims = analyze(capture(model, example_inputs(CFG40, 1, 1 << 18, device="meta")))
    kw = dict(cluster=Cluster.preset("h100", gpus=256), mesh=(("node", 32), ("gpu", 8)))
    with pytest.raises(Infeasible, match=r"571\.\d GiB of it parameters, gradients and optimizer"):
        plan_captured(dims, model_state="replicated", **kw)
    p = plan_captured(dims, model_state="sharded", **kw)
    assert p.predicted.peak_memory_bytes < 0.9 * 80e9
    note = next(x for x in p.notes if x.startswith("model state sharded"))
    share, gathered, sent, comm, exposed, overlap = map(float, re.search(
        r"([\d.]+) GiB per GPU of parameters, gradients and optimizer state \(1/256\), "
        r"\+ ([\d.]+) GiB of parameters gathered at once .* two of 48 layers'\); per step "
        r"([\d.]+) GiB sent per GPU in all-gathers \(forward, backward\) and reduce-scatters, "
        r"([\d.]+) s of collectives, ([\d.]+) s of it exposed .* outlasts ([\d.]+) s of compute",
        note).groups())
    assert share == pytest.approx(16 * n / 256 / GIB, abs=0.01)
    root, layers = _units(model)
    assert gathered == pytest.approx((root + 2 * max(layers)) / GIB, abs=0.01)
    # root gathered once and reduce-scattered once; each layer gathered twice, reduce-scattered once
    assert sent == pytest.approx(255 / 256 * (2 * root + 3 * sum(layers)) / GIB, abs=0.01)
    link = kw["cluster"].axis_link((256,), 0)
    expect = sum(coll.all_gather(x, 256, link) for x in [root] + 2 * layers) + \
        sum(coll.reduce_scatter(x, 256, link) for x in [root] + layers)
    assert comm == pytest.approx(expect, abs=1e-3) and comm > 0.5
    # communication below the step's compute: only the first gathers and last reduce-scatters show
    first_last = sum(f(x, 256, link) for f in (coll.all_gather, coll.reduce_scatter)
                     for x in (root, layers[0]))
    assert overlap > comm and exposed == pytest.approx(first_last, abs=1e-3) and exposed < 0.1 * comm
    assert p.predicted.comm_s >= exposed
    # model_state="auto": replicated and offload not solved (their state alone exceeds the budget)
    auto = plan_captured(dims, model_state="auto", **kw)
    note = next(x for x in auto.notes if x.startswith("model state sharded (auto"))
    assert auto.model_state == "sharded" and re.search(
        r"replicated: skipped, its state alone needs 571\.\d GiB per GPU \(budget 71\.7 GiB\); "
        r"sharded: [\d.]+ s/step, peak [\d.]+ GiB; offload: skipped, its state alone needs "
        r"142\.\d GiB", note), note
    assert auto.predicted.step_s == pytest.approx(p.predicted.step_s, rel=1e-3)
    print(f"\n40B-class ({n / 1e9:.1f}B) 256K tokens, 256 H100: replicated refused (571 GiB state); "
          f"sharded: peak {p.predicted.peak_memory_bytes / GIB:.1f} GiB, state {share:.2f} GiB + "
          f"{gathered:.2f} GiB gathered, {sent:.0f} GiB sent, {comm:.3f} s comm, {exposed:.3f} s "
          f"exposed, step {p.predicted.step_s:.2f} s\n{note}")


def _problem(dims, gpus, *, training=True, dtype_bytes=2):
    cluster = Cluster.preset("h100", gpus=gpus)
    mesh = (("node", gpus // 8), ("gpu", 8)) if gpus > 8 else (("sp", gpus),)
    costs = Costs(dims, cluster, mesh, training=training, dtype_bytes=dtype_bytes)
    return build_problem(dims, costs, mesh, None, "sharded"), cluster


@pytest.fixture(scope="module")
def small():
    """The `small` Llama (4 layers, d 512, vocab 4096), bf16, at 1K and 64K tokens."""
    out = {}
    for seq in (1024, 1 << 16):
        model, inputs = build("llama", "small", device="meta", dtype=torch.bfloat16, seq=seq)
        out[seq] = model, analyze(capture(model, inputs))
    return out


def test_sharded_state_prices_gathers_and_overlap(small):
    model, dims = small[1024]
    root, layers = _units(model)
    n = sum(p.numel() for p in model.parameters())
    pb, cluster = _problem(dims, 64)
    sc, link = pb.state_comm, cluster.axis_link((64,), 0)
    ag = lambda x: coll.all_gather(x, 64, link)  # noqa: E731
    rs = lambda x: coll.reduce_scatter(x, 64, link)  # noqa: E731
    assert sc.layers == 4 and sc.gathered_bytes == root + 2 * max(layers)
    assert pb.static_bytes == pytest.approx(comp.model_state(n).total / 64 + sc.gathered_bytes)
    assert sc.comm_s == pytest.approx(sum(map(ag, [root] + 2 * layers)) + sum(map(rs, [root] + layers)))
    assert sc.comm_bytes == pytest.approx(63 / 64 * (2 * root + 3 * sum(layers)))
    # the step's static time: the exposed collectives and the optimizer's step on 1/64 of the state
    assert pb.static_s == pytest.approx(sc.exposed_s + comp.optimizer_step(n / 64, cluster.gpu))
    first_last = ag(root) + ag(layers[0]) + rs(root) + rs(layers[0])
    assert first_last <= sc.exposed_s <= sc.comm_s
    # 1K tokens over 64 GPUs: too little compute to hide the rest
    assert sc.overlap_s < sc.comm_s - first_last
    assert sc.exposed_s == pytest.approx(sc.comm_s - sc.overlap_s)
    # 64x the tokens: the same collectives, more compute behind them, less exposed
    big = _problem(small[1 << 16][1], 64)[0].state_comm
    assert big.comm_s == pytest.approx(sc.comm_s) and big.overlap_s > 2 * sc.overlap_s
    assert big.exposed_s < sc.exposed_s
    # inference: each unit gathered once, nothing reduce-scattered
    inf = _problem(dims, 64, training=False)[0].state_comm
    assert inf.comm_bytes == pytest.approx(63 / 64 * (root + sum(layers)))
    assert inf.comm_s == pytest.approx(sum(map(ag, [root] + layers)))
    # one GPU: nothing to gather or reduce, nothing priced
    one = _problem(dims, 1)[0]
    assert one.state_comm.comm_s == 0 and one.static_s == pytest.approx(comp.optimizer_step(n, cluster.gpu))


def test_sharded_state_communication_grows_with_parameter_bytes(small):
    """fp32 parameters (priced on the same capture): twice the bytes gathered, sent and held,
    more seconds."""
    dims = small[1024][1]
    a = _problem(dims, 16)[0].state_comm
    b = _problem(dims, 16, dtype_bytes=4)[0].state_comm
    assert b.comm_bytes == pytest.approx(2 * a.comm_bytes)
    assert b.gathered_bytes == pytest.approx(2 * a.gathered_bytes)
    assert b.comm_s > 1.1 * a.comm_s  # latency (15 ring steps per collective) is the rest
