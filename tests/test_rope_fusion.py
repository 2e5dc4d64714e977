"""The rotary embedding inside Ulysses' pack: `ulysses_attention(q, k, v, cos=, sin=)`
(runtime/ulysses.py) and the codegen pass that calls it (codegen/rope.py, kernels=True).

Runtime: on every K/V route (scatter in 1 or 2 pieces, the all-gather routes 'one' and
'replicate'), pipelined or not, over all-to-all and the emulated copy-engine pulls, contig and
zigzag, padded, strided shards: out, dq, dk, dv of the fused call equal those of the model's
own rotation followed by the plain call (the same fp32 arithmetic: <= 1e-6).

Models: the built-in Llama (compiled layers, aot_eager, recomputed) and transformers'
LlamaForCausalLM under a forced Ulysses plan with kernels=True at 2 ranks: loss and every
gradient within 1e-5 of the single-device model, and the program really calls Ulysses with the
tables (pm.code) and says so ("rope fused into ulysses pack": pm.code's kernel notes and the
plan's 'kernel:' rows).

The match (`rotated_before`, no ranks): the exact rotation of both q and k is matched; q alone,
a rotated k read again, tables from a parameter, the halves swapped are not.

A failure in the runtime cases only on one route points at runtime/ulysses.py's `_start_kv_piece`
/ the dk of `hybrid_backward` on that route; only with 'emulated' at `_start_to_seq`'s pull
path. "not fused" in a model test: codegen/rope.py's `_match` stopped recognising the model's
rotation (a capture change, a new slice form) or `apply_plan` no longer calls `fuse_rope`."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from seqshard import testing
from seqshard.runtime import layout, ulysses_attention

TOL, TOL_SAME = 1e-5, 1e-6

# (heads, kv heads, chunks, transport, order, seq_len, padded length, batch, [b, s, h, e] memory)
CASES = [
    (4, 2, 1, "nccl", "contig", 8, 8, 1, False),       # scatter, the buffers in place
    (4, 2, 2, "emulated", "zigzag", 7, 8, 2, True),    # pipelined, pulls, padded
    (8, 4, 2, "nccl", "zigzag", 12, 12, 1, False),     # scatter in 2 pieces
    (4, 1, 1, "nccl", "zigzag", 8, 8, 2, False),       # all-gather, 'one'
    (6, 3, 1, "emulated", "contig", 5, 6, 1, True),    # all-gather, 'replicate'
]


def rope(x, cos, sin):
    """The model's rotation (Llama/HF), autograd through torch's ops."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def rope_cases() -> list[float]:
    """Worker: per case, the worst relative difference of out, dq, dk, dv between the fused call
    and the model's rotation + the plain call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    worst = []
    for i, (h, hk, chunks, transport, order, seq_len, s, b, bshe) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        e = 8
        q, dout = (torch.randn(b, h, s, e, generator=gen) for _ in range(2))
        k, v = (torch.randn(b, hk, s, e, generator=gen) for _ in range(2))
        freqs = torch.outer(torch.arange(s).float(), torch.rand(e // 2, generator=gen) + 0.1)
        emb = torch.cat((freqs, freqs), -1)
        shard = lambda x: layout.shard(x, 2, order, rank, world)  # noqa: E731
        cos, sin = (shard(t(emb)[None, None]) for t in (torch.cos, torch.sin))  # [1, 1, s, e]

        def run(fused):
            leaves = [shard(x).transpose(1, 2).contiguous() if bshe else shard(x) for x in (q, k, v)]
            for x in leaves:
                x.requires_grad_()
            ql, kl, vl = (x.transpose(1, 2) if bshe else x for x in leaves)
            tables = dict(cos=cos, sin=sin) if fused else {}
            if not fused:
                ql, kl = rope(ql, cos, sin), rope(kl, cos, sin)
            out = ulysses_attention(ql, kl, vl, order=order, seq_len=seq_len, backend="math",
                                    chunks=chunks, transport=transport, **tables)
            out.backward(shard(dout))
            return out.detach(), *(x.grad for x in leaves)

        worst.append(max(testing.rel(a, b) for a, b in zip(run(True), run(False))))
    name = dist.group.WORLD.group_name
    q = torch.randn(1, 4, 4, 8, requires_grad=True)
    kv = [torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(torch.ops.seqshard.ulysses_attention.default,
                          (q, *kv, name, True, "contig", None, 8**-0.5, "math", 2, "nccl", None,
                           None, None, None, *torch.randn(2, 1, 1, 4, 8)))
    return worst


def test_rope_in_the_pack_equals_rope_before_on_every_route(pool2):
    worst = pool2.run(rope_cases)
    for rank in worst:
        for case, err in zip(CASES, rank):
            assert err <= TOL_SAME, f"{case}: fused differs from the model's rotation by {err:.2e}"


def run_fused(kind: str) -> dict:
    """Worker: the model single-device and parallelized with kernels=True under Ulysses."""
    from seqshard.codegen.compiled import kernel_notes
    from seqshard.planner import parallelize

    if kind == "llama":  # compiled layer templates (aot_eager), recomputed
        from seqshard.models import AXES, build, named_plans

        model, inputs = build("llama", "tiny", batch=1, seq=29)
        overrides, _ = named_plans("llama", "tiny")["ulysses"]
        options = dict(overrides={**overrides, "layers.*": "recompute"}, axes=AXES["llama"],
                       compile="layers", compile_backend="aot_eager")
    else:  # transformers' LlamaForCausalLM (tiny config: 4 heads, 2 kv heads, 13 tokens)
        import real_models as R

        model, inputs = R.build("llama", "tiny")
        options = dict(overrides={"lm.model.layers.*": "split:s ulysses"})
    ref = copy.deepcopy(model)
    pm = parallelize(model, inputs, mesh=testing.mesh((dist.get_world_size(),), ("sp",)),
                     kernels=True, **options)
    loss, want = pm(*inputs), ref(*inputs)
    loss.backward()
    want.backward()
    worst = [("loss", testing.rel(loss.detach(), want.detach()))]
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        worst.append((n, testing.rel(p.grad, q.grad)))
    calls = [line for line in pm.code.splitlines() if "ulysses_attention(" in line]
    return dict(worst=max(worst, key=lambda w: w[1]), notes=kernel_notes(pm.program.gm),
                calls=len(calls), fused=sum("cos = " in line and "sin = " in line for line in calls),
                plan=[f"{w}: {what}" for w, what in pm.plan.kernels if "rope" in what])


def _check(results, attentions: int):
    r = results[0]
    (where, err) = r["worst"]
    assert all(x["worst"] == r["worst"] for x in results), "ranks disagree"
    assert err <= TOL, f"relative error {err:.2e} at {where}"
    assert r["calls"] == attentions and r["fused"] == attentions, \
        f"not fused: {r['fused']} of {r['calls']} Ulysses calls take cos, sin"
    assert any("rope fused into ulysses pack" in n for n in r["notes"]), r["notes"]
    assert r["plan"] and all("rope fused into ulysses pack" in n for n in r["plan"]), r["plan"]


def test_llama_rope_fused_compiled_recomputed_exact_2_ranks(pool2):
    _check(pool2.run(run_fused, "llama"), 1)  # one compiled template for both layers


def test_hf_llama_rope_fused_exact_2_ranks(pool2):
    _check(pool2.run(run_fused, "hf"), 2)


class Rotated(torch.nn.Module):
    """Attention after a rotation of q and k, in the form `variant` names."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.qkv = torch.nn.Linear(16, 48, bias=False)
        self.freq = torch.nn.Parameter(torch.rand(8, 4), requires_grad=variant == "learned")

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        emb = torch.cat((self.freq, self.freq), -1)[:s]
        cos, sin = emb.cos(), emb.sin()
        half = lambda t: torch.cat((-t[..., 4:], t[..., :4]), -1)  # noqa: E731
        if self.variant == "halves swapped":
            half = lambda t: torch.cat((t[..., 4:], -t[..., :4]), -1)  # noqa: E731
        q = q * cos + half(q) * sin
        if self.variant != "q only":
            k = k * cos + half(k) * sin
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.variant == "rotated k read again":
            out = out + k.mean()
        return out.sum()


def test_the_match_is_conservative():
    """codegen/rope.py matches only the exact rotation of both q and k with constant tables and
    no other reader of the rotated values (`rotated_before`: the same matcher on the captured
    graph)."""
    from seqshard.capture import capture
    from seqshard.codegen.rope import rotated_before
    from seqshard.dims import analyze

    expected = {"both": True, "q only": False, "rotated k read again": False, "learned": False,
                "halves swapped": False}
    got = {}
    for variant in expected:
        dims = analyze(capture(Rotated(variant), (torch.randn(1, 8, 16),)), axes={"x": "b s d"})
        (attention,) = [n for n in dims.cap.nodes() if dims.attention(n) is not None]
        got[variant] = rotated_before(dims, attention)
    assert got == expected
