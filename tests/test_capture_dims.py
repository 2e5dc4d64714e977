"""Capture and factor analysis on the built-in models and on hand-written oddities.

A failure here means the factor algebra (seqshard/dims) or canonicalization (seqshard/capture)
gives a tensor the wrong factors; every later stage (plans, passes, codegen) trusts them."""

import math
import time

import pytest
import torch
import torch.nn as nn

from seqshard.capture import SDPA, capture
from seqshard.dims import Role, analyze
from seqshard.models import AXES, build

aten = torch.ops.aten


def _calls(cap, target, module_prefix=""):
    return [n for n in cap.nodes() if n.op == "call_function" and n.target == target
            and cap.module_path(n).startswith(module_prefix)]


def _lm_head(cap):
    (n,) = [n for n in cap.nodes() if cap.module_path(n) == "lm_head"]
    return n


@pytest.fixture(scope="module")
def llama_tiny():
    model, inputs = build("llama", "tiny", batch=3, seq=37)   # h=6, g=2, e=8, d=48, v=96
    cap = capture(model, inputs)
    return model, inputs, cap, analyze(cap)


def test_llama_signatures(llama_tiny):
    _, _, cap, da = llama_tiny
    (att,) = _calls(cap, SDPA, "layers.1.attn")
    q, k, v = att.args[:3]
    assert da.sig_str(q) == "((b,), (h,), (s,), (e,))"
    assert da.sig_str(k) == "((b,), (g,), (s,), (e,))", "GQA: K must stay at kv-heads"
    assert da.sig_str(v) == "((b,), (g,), (s,), (e,))"
    assert da.sig_str(att) == "((b,), (h,), (s,), (e,))"
    assert da.sig_str(_lm_head(cap)) == "((b,), (s,), (v,))"
    sizes = da.sizes()
    assert (sizes["b"], sizes["s"], sizes["g"], sizes["r"], sizes["v"], sizes["d"]) == (3, 37, 2, 3, 96, 48)
    # h = g·r: q's head factor is made of k's head factor and the group factor
    h = da.F.atoms_of(da.sig(q)[1])
    assert [da.F.label(a) for a in h] == ["g", "r"]


def test_llama_roles(llama_tiny):
    _, _, cap, da = llama_tiny
    (att,) = _calls(cap, SDPA, "layers.0.attn")
    s = da.factor(att, "s")
    assert da.roles[att][s] == Role.SEQ
    q_proj = [n for n in cap.nodes() if cap.module_path(n) == "layers.0.attn.q_proj"][0]
    assert da.roles[q_proj] == {da.factor(q_proj, "d"): Role.SUM}, "linear contracts d"
    norm = [n for n in cap.nodes() if cap.module_path(n) == "layers.0.attn_norm"][0]
    assert da.roles[norm] == {da.factor(norm, "d"): Role.WHOLE}
    assert not da.unsupported


def test_capture_keeps_meaning(llama_tiny):
    model, inputs, cap, _ = llama_tiny
    assert any("enable_gqa" in r for r in cap.rewrites)
    torch.testing.assert_close(cap.run(*inputs), model(*inputs), rtol=0, atol=0)


def test_video_dit_signatures():
    model, inputs = build("video_dit", "tiny", batch=3, frames=5, patches=7)
    cap = capture(model, inputs)
    da = analyze(cap, axes=AXES["video_dit"])
    spatial = [n for n in cap.nodes() if cap.module_path(n) == "blocks.0.attn.qkv"][0].args[0]
    temporal = [n for n in cap.nodes() if cap.module_path(n) == "blocks.1.attn.qkv"][0].args[0]
    assert da.sig_str(spatial) == "((b, t), (p,), (d,))"
    assert da.sig_str(temporal) == "((b, p), (t,), (d,))"
    (sa,) = _calls(cap, SDPA, "blocks.0.")
    (ta,) = _calls(cap, SDPA, "blocks.1.")
    assert da.sig_str(sa.args[0]) == "((b, t), (h,), (p,), (e,))"
    assert da.sig_str(ta.args[0]) == "((b, p), (h,), (t,), (e,))"
    assert da.roles[sa][da.factor(sa, "p")] == Role.SEQ
    assert da.roles[ta][da.factor(ta, "t")] == Role.SEQ
    sizes = da.sizes()
    assert (sizes["b"], sizes["t"], sizes["p"], sizes["h"]) == (3, 5, 7, 4)
    assert not da.unsupported, da.unsupported
    torch.testing.assert_close(cap.run(*inputs), model(*inputs), rtol=0, atol=0)


def test_names_do_not_depend_on_sizes():
    """Plans are written in factor names: the same model at another size must give the same
    names on every node, or a plan made at 1M tokens could not be checked at 37."""
    def names(seq, batch):
        model, inputs = build("llama", "tiny", batch=batch, seq=seq)
        cap = capture(model, inputs)
        da = analyze(cap)
        return {n.name: da.sig_str(n) for n in cap.nodes()}
    assert names(37, 1) == names(64, 2)


def test_llama70b_on_meta_is_fast():
    t0 = time.perf_counter()
    model, inputs = build("llama", "llama3-70b", device="meta", batch=1, seq=1 << 20)
    cap = capture(model, inputs)
    da = analyze(cap)
    seconds = time.perf_counter() - t0
    print(f"\ncapture + analyze of Llama-3-70B (80 layers) on meta at 1M tokens: {seconds:.1f} s")
    assert seconds < 30
    assert len(_calls(cap, SDPA)) == 80
    assert da.sizes()["s"] == 1 << 20 and da.sizes()["g"] == 8


class ManualAttention(nn.Module):
    def __init__(self, d=24, heads=3, causal=True):
        super().__init__()
        self.h, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.h)
        if self.causal:
            mask = torch.triu(torch.ones(S, S, dtype=torch.bool, device=x.device), 1)
            scores = scores.masked_fill(mask, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D)


@pytest.mark.parametrize("causal", [True, False])
def test_spelled_out_attention_is_one_node(causal):
    model, x = ManualAttention(causal=causal), torch.randn(2, 11, 24)
    cap = capture(model, (x,))
    (att,) = _calls(cap, SDPA)
    assert att.kwargs["is_causal"] is causal
    assert not _calls(cap, aten.softmax.int), "the softmax must be gone into the attention node"
    torch.testing.assert_close(cap.run(x), model(x), rtol=1e-6, atol=1e-6)
    da = analyze(cap)
    assert da.sig_str(att) == "((b,), (h,), (s,), (e,))"


@torch.library.custom_op("seqshard_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesMystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(mystery(x)) + 1


def test_unknown_op_is_reported_and_whole():
    cap = capture(UsesMystery(), (torch.randn(2, 5, 8),))
    da = analyze(cap)
    (node,) = [n for n in cap.nodes() if n.op == "call_function" and "mystery" in str(n.target)]
    assert "no rule" in da.unsupported[node]
    assert "test_capture_dims.py" in cap.source(node) and "mystery(x)" in cap.source(node)
    # every factor it touches must stay whole: nothing may split what we cannot reason about
    assert set(da.roles[node].values()) == {Role.WHOLE}
    assert len(da.roles[node]) == 6   # 3 input factors, 3 fresh output factors
    text = da.summary()
    assert "no rule" in text and "mystery" in text


def test_axes_errors_name_the_fix():
    model, inputs = build("video_dit", "tiny", batch=1, frames=2, patches=3)
    cap = capture(model, inputs)
    with pytest.raises(ValueError, match="names 3 dims, but x has 4"):
        analyze(cap, axes={"x": "b t p"})
    with pytest.raises(ValueError, match="does not take"):
        analyze(cap, axes={"video": "b t p c"})


# ------------------------------------------------------------------ slices: which factors a cut keeps
class Cuts(nn.Module):
    """Every kind of cut `index_ops` tells apart (tests/test_fuzz_plans.py runs them split)."""

    def __init__(self, d=24, heads=4):
        super().__init__()
        self.h, self.e = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.lin = nn.Linear(d, d, bias=False)
        self.register_buffer("table", torch.randn(16, d))
        self.register_buffer("pairs", torch.randn(5, d))

    def forward(self, x, video):                   # x: [b, s, d], video: [b, t, y, d]
        B, S, D = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]   # a partition: pieces
        q = q.view(B, S, self.h, self.e)
        rot, rest = q[..., :4], q[..., 4:]                            # 4 + 2 of 6: new factors
        full, empty = q[..., :self.e], q[..., self.e:]                # the rest is empty
        q = torch.cat((rot, rest), -1) + torch.cat((full, empty), -1)
        T, H = video.shape[1:3]
        frames = self.table[:T][None, :, None]                        # prefixes: new factors
        heights = self.table[:H][None, None, :]
        pairs = self.pairs.view(5, D // 2, 2).flatten(-2)[..., 1::2]  # one of each pair
        y = (q.flatten(2) + k + v).sum() + (x + self.lin(x)).sum()    # x + lin(x): [d, d]
        return y + (video * frames * heights).sum() + pairs.sum()


def test_cuts_keep_factors_only_where_they_say_what_a_factor_is():
    model = Cuts()
    x, video = torch.randn(2, 5, 24), torch.randn(2, 4, 4, 24)
    cap = capture(model, (x, video))
    da = analyze(cap, axes={"x": "b s d", "video": "b t y d"})
    assert not da.unsupported, da.unsupported
    torch.testing.assert_close(cap.run(x, video), model(x, video))
    sl = {n.name: n for n in _calls(cap, aten.slice.Tensor)}
    q, k, v = (sl[f"slice_{i}"] for i in (1, 2, 3))
    # q, k, v cut a Linear(d, 3d) into equal pieces: one factor, the weight's rows (3, ·)
    assert da.sig(q)[-1] == da.sig(k)[-1] == da.sig(v)[-1]
    (qkv,) = [n for n in cap.nodes() if cap.module_path(n) == "qkv"]
    assert len(da.atoms(qkv)[-1]) == 3, da.sig_str(qkv)  # (3, h, e) once q is viewed as heads
    # 4 + 2 of a head dim of 6: 2 divides 6 but the cut is no partition into pieces of 2
    rot, rest = sl["slice_4"], sl["slice_5"]
    heads = rot.args[0]                                                 # q.view(B, S, h, e)
    e = da.atoms(heads)[-1]
    assert len(e) == 1, f"the head dim must not be refined into (3, 2): {da.sig_str(heads)}"
    for n in (rot, rest):
        assert da.atoms(n)[-1][0] != e[0] and da.roles[n][e[0]] == Role.WHOLE
    # q[..., e:] is empty: a factor of size 0, and the concatenation ignores it
    empty = sl["slice_6"]                                   # q[..., :e] is no node: the whole dim
    assert da.F.dim_size(da.sig(empty)[-1]) == 0
    (cat_empty,) = [n for n in _calls(cap, aten.cat.default) if empty in n.args[0]]
    assert da.atoms(cat_empty)[-1] == e
    # table[:T] and table[:H] with T = H: frames and heights stay two factors
    assert da.factor(sl["slice_7"], "t") is not None and da.factor(sl["slice_8"], "y") is not None
    assert da.factor(sl["slice_7"], "t") != da.factor(sl["slice_8"], "y")
    # [..., 1::2] of a dim cut into pairs keeps the pairs' index, the pair member is whole
    pairs = sl["slice_9"]
    assert [da.F.size(a) for a in da.atoms(pairs)[-1]] == [12], da.sig_str(pairs)
    # x + lin(x): lin's weight has d twice, and no strategy splits d at the linear
    (lin,) = [n for n in cap.nodes() if cap.module_path(n) == "lin"]
    w = lin.args[1]
    assert da.sig_str(w) == "((d,), (d,))"
    from seqshard.strategies import PlanError, resolve
    with pytest.raises(PlanError, match="indexes two dims of one tensor"):
        resolve(lin, da, (da.factor(lin, "d"),), None, ("sp",), (2,))
