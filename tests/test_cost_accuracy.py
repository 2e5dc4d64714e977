"""The step-time mechanisms added after the one-H200 runs of 2026-12-01 (issues 14 and 15), each
checked against a hand-computed number: attention rates per head dim and kernel, the eager
cross-entropy's passes over the logits and the upcast's bytes, and what a compiled program costs
(fused pointwise chains, the fused LM-head loss)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.costmodel import compute as comp
from seqshard.dims import analyze
from seqshard.strategies import Costs, candidates, plan_nodes
from seqshard.strategies.costs import fused_chains, fused_losses

T, D, FF, V = 64, 32, 96, 160


def test_attention_rate_per_head_dim_and_kernel():
    """A failure here: the H200's rates no longer depend on the head dim (the 1B shape, d64, was
    priced at d128's rate: step time 22-30% over the prediction), or a kernel's table is lost."""
    gpu = Cluster.preset("h200", gpus=1).gpu
    fa4 = gpu.with_attention_backend("fa4")
    cudnn64, cudnn72 = (0.750 + 0.810) / 2, (0.564 + 0.606) / 2  # fa4-20261201-181805.md
    assert gpu.attention_rate(32768, True, 128) == 544e12
    assert gpu.attention_rate(32768, True, 64) == pytest.approx(544e12 * cudnn64)
    assert gpu.attention_rate(131072, False, 72) == pytest.approx(559e12 * cudnn72)
    assert fa4.attention_rate(32768, True, 64) == pytest.approx(614e12 * (0.887 + 0.862) / 2)
    # between measured head dims: linear in log(head dim)
    w = math.log(96 / 72) / math.log(128 / 72)
    assert gpu.attention_rate(32768, True, 96) == pytest.approx(544e12 * (cudnn72 + w * (1 - cudnn72)))
    # a d64 attention takes its FLOPs at the d64 rate
    t = comp.attention_time(1, 32, 32768, 32768, 64, causal=True, gpu=gpu, training=True)
    assert t == pytest.approx(3.5 * 2 * 32 * 32768**2 * 64 / (544e12 * cudnn64))


def test_eager_cross_entropy_and_cast_bytes():
    """log_softmax over rows too long for shared memory: 3 reads + 1 write forward, nll's zero
    gradient + softmax backward's 3 reads + 1 write; the bf16 → fp32 cast moves 6 bytes an
    element each way."""
    ce = comp.cross_entropy(1000, dtype_bytes=4)
    assert (ce.bytes, ce.backward().bytes) == (16000, 20000)
    cast = comp.cast(1000, in_bytes=2, out_bytes=4)
    assert (cast.bytes, cast.backward().bytes) == (6000, 6000)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False), \
            nn.Linear(FF, D, bias=False)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer()])
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, x, y):
        return F.cross_entropy(self.lm_head(self.layers[0](x)).float().flatten(0, 1), y.flatten())


def _priced(**kw):
    with torch.device("meta"):
        model = _Model().to(torch.bfloat16)
    x = torch.zeros(1, T, D, dtype=torch.bfloat16, device="meta")
    y = torch.zeros(1, T, dtype=torch.long, device="meta")
    dims = analyze(capture(model, (x, y)))
    costs = Costs(dims, Cluster.preset("h200", gpus=1), (("sp", 1),), **kw)
    nodes = {n.name: n for n in plan_nodes(dims)}
    return dims, costs, nodes


def _op(nodes, op):
    (n,) = [n for n in nodes.values() if getattr(n.target, "__name__", "").startswith(op)]
    return n


def test_fused_chain_reads_and_writes_once():
    """compile="layers": silu(gate)·up is one kernel reading gate and up and writing the product
    (3·T·FF bf16 elements) where eager moves 5; the residual add reads x and down's output and
    writes the layer's output. A failure: chains priced per op again, or counting a tensor twice."""
    dims, costs, nodes = _priced(compiled=True)
    chains = fused_chains(dims)
    silu, mul, add = _op(nodes, "silu"), _op(nodes, "mul"), _op(nodes, "add")
    assert chains[silu][0] is chains[mul][0] and chains[add][0] is not chains[mul][0]
    assert chains[silu][3] and not chains[mul][3]  # one kernel launch for the chain

    def moved(n):
        (st,) = candidates(dims, n, costs.mesh)[:1]
        return costs._fused_work(n, st).bytes, costs._work(n, st).bytes

    assert moved(silu) == (T * FF * 2, 2 * T * FF * 2)          # reads gate; its output stays inside
    assert moved(mul) == (2 * T * FF * 2, 3 * T * FF * 2)       # reads up, writes the product
    assert moved(add) == (3 * T * D * 2, 3 * T * D * 2)         # x, down's output, the sum
    assert sum(moved(n)[0] for n in (silu, mul)) == 3 * T * FF * 2


def test_fused_loss_is_gemms_and_one_pass():
    """kernels=True: the LM head keeps its three GEMMs, the loss is one pass reading the bf16
    logits twice and writing them once, the fp32 cast is gone."""
    dims, costs, nodes = _priced(fused_loss=True)
    roles = fused_losses(dims)
    ce = _op(nodes, "cross_entropy_loss")
    (head,) = [n for n, r in roles.items() if r == "head"]
    assert roles[ce] == "loss" and dims.cap.module_path(head) == "lm_head"
    assert {r for n, r in roles.items() if n not in (head, ce)} == {"between"}
    (st,) = candidates(dims, ce, costs.mesh)[:1]
    assert costs._fused_loss_work(ce, st).bytes == 3 * T * V * 2
    (sh,) = candidates(dims, head, costs.mesh)[:1]
    eager = costs._work(head, sh)
    assert costs._fused_loss_work(head, sh).flops == 3 * eager.flops == 3 * 2 * T * D * V


def test_plan_prices_the_compiled_program():
    """`plan(compile="layers", kernels=True)` predicts a faster step than the eager plan of the
    same model, and says how it priced it."""
    from seqshard.planner import plan

    with torch.device("meta"):
        model = _Model().to(torch.bfloat16)
    x = torch.zeros(1, T, D, dtype=torch.bfloat16, device="meta")
    y = torch.zeros(1, T, dtype=torch.long, device="meta")
    eager = plan(model, (x, y), cluster="h200x1", memory_budget=1e15)
    fast = plan(model, (x, y), cluster="h200x1", memory_budget=1e15, compile="layers", kernels=True)
    assert fast.predicted.step_s < eager.predicted.step_s
    assert any("compiled layers" in note and "fused LM-head loss" in note for note in fast.notes)


def test_plan_lists_the_kernels_it_was_priced_for():
    """A plan priced for compile="layers" and kernels=True says what runs where (Plan.kernels,
    printed as 'kernel:' lines, kept through JSON, not in the hash); one priced plain says none."""
    from seqshard.models import AXES, build
    from seqshard.planner import Plan, plan

    model, inputs = build("llama", "tiny", batch=1, seq=64)
    kw = dict(mesh=(("sp", 2),), cluster="h200x2", axes=AXES["llama"])
    built = plan(model, inputs, compile="layers", kernels=True, **kw)
    lines = [line for line in str(built).splitlines() if line.startswith("kernel:")]
    assert lines == [
        "kernel: layers.0-1: compiled template of layers.0 (torch.compile once, run for each of "
        "its 2 layers)",
        "kernel: lm_head + cross_entropy_loss: fused linear cross-entropy "
        "(codegen/kernels/linear_ce.py: the logits in chunks, never whole)"], lines
    again = Plan.from_json(built.to_json())
    assert again.kernels == built.kernels and again.hash() == built.hash()
    plain = plan(model, inputs, **kw)
    assert plain.kernels == () and "kernel:" not in str(plain)
