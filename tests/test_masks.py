"""Attention masks as per-token tensors: capture reads an `attn_mask` subgraph as causal /
documents / sliding window / key padding (`capture/masks.py`), so the sequence can be split
without an S×S mask; masks it cannot read stay, and a forced split names the line that built
them. Also: transformers' `repeat_kv` folds into `enable_gqa`, cross-attention under a sequence
override runs locally with its queries split.

A failure in the hand-written or transformers recognition tests points at capture/masks.py (the
symbolic evaluation or `_family`) or capture/canonicalize.py (`fold_gqa_repeat`,
`recognize_attention`); in the production plans at strategies/strategy.py (`whole_somewhere`,
`resolve`'s per-token inputs) or dims/ops/attention_ops.py; in the 2-rank runs at
codegen/local_ops.py (`attention`: the per-token kwargs) or the runtime's masked blocks."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqshard.capture import ATTENTION, SDPA, capture, masked_attention
from seqshard.strategies import PlanError

TOL = 1e-5


def _attention(cap):
    return [n for n in cap.nodes() if n.op == "call_function" and n.target in ATTENTION]


def _square(cap, s):
    """Nodes holding an [.., s, s] tensor (a mask or scores)."""
    return [n.name for n in cap.nodes() if isinstance(n.meta.get("val"), torch.Tensor)
            and n.meta["val"].dim() >= 2 and tuple(n.meta["val"].shape[-2:]) == (s, s)]


def _family(node) -> dict:
    """What an attention node says about its mask: target, is_causal and the per-token kwargs."""
    out = {"masked": node.target is masked_attention,
           "causal": bool(node.kwargs.get("is_causal"))}
    for key in ("positions", "segments", "window", "key_valid"):
        if node.kwargs.get(key) is not None:
            out[key] = node.kwargs[key] if key == "window" else node.kwargs[key].name
    return out


# ------------------------------------------------------------------ hand-written masks
class MaskedAttention(nn.Module):
    """One attention layer whose mask `make(i, j, extra)` is built from aranges i (query, as
    [s, 1]) and j (key, [1, s]) and the per-token inputs, the way models write masks."""

    def __init__(self, make, dim=16, heads=2):
        super().__init__()
        self.make, self.heads = make, heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, tokens):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        i = torch.arange(s, device=x.device)[:, None]
        j = torch.arange(s, device=x.device)[None, :]
        mask = self.make(i, j, tokens)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()


def _additive(m):
    return torch.where(m, 0.0, float("-inf"))


DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1]])
VALID = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])

HAND = {  # name: (mask, expected family; None: not recognised)
    "causal": (lambda i, j, t: j <= i, {"masked": False, "causal": True}),
    "causal, additive": (lambda i, j, t: _additive(i >= j), {"masked": False, "causal": True}),
    "window": (lambda i, j, t: (j <= i) & (i - j < 3),
               {"masked": True, "causal": True, "window": 3}),
    "documents": (lambda i, j, t: (t[:, :, None] == t[:, None, :])[:, None] & (j <= i),
                  {"masked": True, "causal": True, "segments": "tokens"}),
    "key padding": (lambda i, j, t: (j <= i) & (t != 0)[:, None, None, :],
                    {"masked": True, "causal": True, "key_valid": "ne_scalar"}),
    "one future key": (lambda i, j, t: j <= i + 1, None),
    "query padding": (lambda i, j, t: (j <= i) & (t != 0)[:, None, :, None], None),
}


@pytest.mark.parametrize("name", HAND)
def test_hand_written_masks(name):
    make, want = HAND[name]
    torch.manual_seed(0)
    model = MaskedAttention(make)
    x = torch.randn(2, 9, 16)
    tokens = DOCS if name == "documents" else VALID.long()
    cap = capture(model, (x, tokens))
    (att,) = _attention(cap)
    if want is None:
        assert att.target is SDPA and att.args[3] is not None, "the mask must stay"
        assert att.meta.get("seqshard_mask"), "an unread mask records why"
    else:
        assert _family(att) == want, cap.rewrites
        assert not _square(cap, 9), f"an S×S tensor is left: {_square(cap, 9)}"
    torch.testing.assert_close(cap.run(x, tokens), model(x, tokens), rtol=0, atol=1e-5)


def test_unread_mask_keeps_the_sequence_whole_and_says_where():
    """A mask seqshard cannot read: the planner still plans (the sequence whole at attention);
    forcing a split is an error that names the line that built the mask."""
    from seqshard import planner
    from seqshard.dims import analyze
    from seqshard.strategies import resolve

    model = MaskedAttention(HAND["one future key"][0])
    inputs = (torch.randn(2, 8, 16), VALID[:, :8].long())
    plan = planner.plan(model, inputs, mesh=(("sp", 2),))
    assert all(n.algorithm == "local" for n in plan.attention())
    line = r"test_masks\.py:\d+ +mask = self\.make"
    with pytest.raises(PlanError, match=line):
        planner.plan(model, inputs, mesh=(("sp", 2),), overrides={"*": "split:s ring"})
    dims = analyze(capture(model, inputs))
    (att,) = _attention(dims.cap)
    with pytest.raises(PlanError, match=r"attn_mask \w+ \(built at " + line):
        resolve(att, dims, (dims.factor(att, "s"),), "ring", ("sp",), (2,))


# ------------------------------------------------------------------ transformers' masks
S = 13  # distinct from every other size of the tiny configs


def tiny_lm(name, **extra):
    import transformers as T

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    cfg.update(extra)
    config, model = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                     "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                     "mistral": (T.MistralConfig, T.MistralForCausalLM),
                     "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM)}[name]
    if name == "mistral":
        cfg.setdefault("sliding_window", 4)
    if name == "gemma2":  # eager attention (spelled out), a sliding layer and a full one
        cfg.update(sliding_window=4, attn_logit_softcapping=None, head_dim=16)
    torch.manual_seed(0)
    return model(config(**cfg)).eval()


def packed_positions(lengths, batch=2):
    return torch.cat([torch.arange(n) for n in lengths])[None].expand(batch, -1).clone()


IDS = torch.randint(0, 128, (2, S), generator=torch.Generator().manual_seed(1))
PACKED = packed_positions([5, 3, 5])
PADDED = torch.ones(2, S, dtype=torch.long).index_fill_(1, torch.arange(3), 0)

CAUSAL = {"masked": False, "causal": True}
DOCUMENTS = {"masked": True, "causal": True, "positions": "position_ids", "segments": "cumsum"}
PADDING = {"masked": True, "causal": True, "key_valid": "ne_scalar"}
HF = {  # (model, inputs): the family of each layer's attention
    ("llama", "default"): [CAUSAL, CAUSAL],
    ("llama", "packed"): [DOCUMENTS, DOCUMENTS],
    ("llama", "padded"): [PADDING, PADDING],
    ("qwen2", "packed"): [DOCUMENTS, DOCUMENTS],
    ("mistral", "default"): [{"masked": True, "causal": True, "window": 4}] * 2,
    ("mistral", "packed"): [{**DOCUMENTS, "window": 4}] * 2,
    ("gemma2", "default"): [{"masked": True, "causal": True, "window": 4}, CAUSAL],
}


@pytest.mark.parametrize("name,inputs", HF)
def test_transformers_masks(name, inputs):
    """transformers 5 builds [B, 1, S, S] bool masks from aranges, position_ids (with its
    packed-sequence detection `cumsum(diff(position_ids) != 1)`) and attention_mask: each is
    read as the family, no S×S tensor is left, K/V stay at kv heads, and the graph computes
    what the model does."""
    pytest.importorskip("transformers")
    model = tiny_lm(name)
    kwargs = {"default": {}, "packed": {"position_ids": PACKED},
              "padded": {"attention_mask": PADDED}}[inputs]
    cap = capture(model, (IDS,), kwargs)
    atts = _attention(cap)
    assert [_family(n) for n in atts] == HF[name, inputs], cap.rewrites
    assert not _square(cap, S), f"an S×S tensor is left: {_square(cap, S)}"
    for n in atts:
        assert n.kwargs.get("enable_gqa") and n.args[1].meta["val"].shape[1] == 2, \
            "repeat_kv (expand + reshape) must fold into enable_gqa"
    with torch.no_grad():
        want = model(IDS, **kwargs).logits
        got = cap.run(IDS, *kwargs.values())
    got = got.logits if hasattr(got, "logits") else got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ production plans
class LMLoss(nn.Module):
    """What a user writes around a causal LM trained on packed documents."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, labels):
        logits = self.lm(input_ids=input_ids, position_ids=position_ids).logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_llama3_8b_packed_128k_plans_sequence_parallel_attention():
    """Llama-3-8B shapes (2 layers) on the meta device, 128K tokens of packed documents, 8 H200s:
    attention is distributed (not replicated, not tensor-parallel around a replicated mask),
    and the captured graph holds no 128K×128K mask (16 GiB of bool on every rank)."""
    T = pytest.importorskip("transformers")
    from seqshard.dims import analyze
    from seqshard.planner.api import plan_captured

    seq = 131072
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                        use_cache=False, max_position_embeddings=seq)
    with torch.device("meta"):
        model = LMLoss(T.LlamaForCausalLM(cfg)).to(torch.bfloat16)
    ids, positions, labels = (torch.zeros(1, seq, dtype=torch.long, device="meta") for _ in "ipl")
    dims = analyze(capture(model, (ids, positions, labels)))
    atts = _attention(dims.cap)
    assert [_family(n) for n in atts] == [DOCUMENTS, DOCUMENTS]
    assert not _square(dims.cap, seq)
    plan = plan_captured(dims, cluster="h200x8")
    for n in plan.attention():
        assert n.splits, f"attention replicated at 128K:\n{plan}"
    splits = {s.factor for n in plan.nodes if n.module.endswith("mlp.down_proj") for s in n.splits}
    assert splits == {"s"}, f"the MLP should be sequence-parallel, got {splits}:\n{plan}"


# ------------------------------------------------------------------ 2 ranks, exact
def run_lm(name, inputs, overrides, mesh_shape=None, **config):
    """On every rank: a tiny transformers LM with packed documents (or key padding) single-device
    and parallelized; worst relative error of the loss and every gradient, the plan's attention,
    and whether the generated code passes the per-token tensors."""
    from seqshard.planner import parallelize

    class PaddedLoss(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, labels):
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    model = (LMLoss if inputs == "packed" else PaddedLoss)(tiny_lm(name, **config)).train()
    ref = copy.deepcopy(model)
    args = (IDS, PACKED if inputs == "packed" else PADDED, IDS.roll(-1, 1))
    mesh = None
    if mesh_shape is not None:  # 2-D: the hybrid's ring axis outside, its Ulysses axis inside
        from seqshard.testing import mesh as make_mesh
        mesh = make_mesh(mesh_shape, ("ring", "ulysses"))
    pm = parallelize(model, args, overrides=overrides, mesh=mesh)
    loss = pm(*args)
    loss.backward()
    want = ref(*args)
    want.backward()
    rel = [((loss - want).abs() / want.abs()).item()]
    rel += [((p.grad - q.grad).norm() / q.grad.norm()).item()
            for p, q in zip(model.parameters(), ref.parameters())]
    per_token = "segments=" if inputs == "packed" else "key_valid="
    return max(rel), [f"{n.algorithm} [{n.split_str()}]" for n in pm.plan.attention()], \
        per_token in pm.code.replace(" ", "")


E2E = [  # (model, inputs, algorithm, config)
    ("llama", "packed", "ring", {}),
    ("llama", "packed", "allgather", {}),
    ("llama", "packed", "ulysses", {}),
    ("mistral", "packed", "ring", {}),                              # + sliding window
    ("llama", "padded", "allgather", {}),                           # key padding
    ("llama", "packed", "ulysses", {"num_key_value_heads": 1}),     # degree 2 > 1 kv head
]


@pytest.mark.parametrize("name,inputs,algorithm,config", E2E)
def test_two_ranks_exact(pool2, name, inputs, algorithm, config):
    pytest.importorskip("transformers")
    results = pool2.run(run_lm, name, inputs, {"*": f"split:s {algorithm}"}, **config)
    for err, attention, passed in results:
        assert err <= TOL, f"relative error {err:.2e}"
        assert attention == [f"{algorithm} [s@sp]"] * 2, attention
        assert passed, "the per-token tensors must reach the runtime call"


def test_packed_documents_hybrid_2x2_exact(pool4):
    """Packed documents under the 2-D hybrid (ring of Ulysses groups) on 4 ranks."""
    pytest.importorskip("transformers")
    results = pool4.run(run_lm, "llama", "packed", {"*": "split:s hybrid"}, (2, 2))
    for err, attention, passed in results:
        assert err <= TOL, f"relative error {err:.2e}"
        assert attention and all(a.startswith("hybrid") for a in attention), attention
        assert passed, "the per-token tensors must reach the runtime call"


# ------------------------------------------------------------------ cross-attention
class CrossAttention(nn.Module):
    """Queries from x [b, t, d], keys and values from a context [b, s, d] (another sequence)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x, ctx):
        (b, t, d), s = x.shape, ctx.shape[1]
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.o(out).pow(2).mean()


def run_cross():
    from seqshard.planner import parallelize

    torch.manual_seed(0)
    model = CrossAttention()
    ref = copy.deepcopy(model)
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    pm = parallelize(model, (x, ctx), axes={"x": "b t d", "ctx": "b s d"},
                     overrides={"*": "split:s ring"})
    loss = pm(x, ctx)
    loss.backward()
    want = ref(x, ctx)
    want.backward()
    rel = [((loss - want).abs() / want.abs()).item()]
    rel += [((p.grad - q.grad).norm() / q.grad.norm()).item()
            for p, q in zip(model.parameters(), ref.parameters())]
    return max(rel), [f"{n.algorithm} [{n.split_str()}]" for n in pm.plan.attention()]


def test_cross_attention_under_a_ring_override_runs_locally(pool2):
    """`split:s ring` where s is the context of a cross-attention: the keys stay whole, the
    queries' sequence is split, and the attention is local (exact at 2 ranks)."""
    for err, attention in pool2.run(run_cross):
        assert attention == ["local [t@sp]"], attention
        assert err <= TOL, f"relative error {err:.2e}"


# ------------------------------------------------------------------ joint text+video attention
class JointBlock(nn.Module):
    """CogVideoX's pattern: text and video tokens attend jointly (concatenated along the
    sequence), and the output is split back into the two."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, text, video):
        x = torch.cat([text, video], dim=1)
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        text_out, video_out = out.split([text.shape[1], video.shape[1]], dim=1)
        video = video + video_out
        return text + text_out, video + self.mlp(video)


class Joint(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([JointBlock(), JointBlock()])

    def forward(self, text, video):
        for block in self.blocks:
            text, video = block(text, video)
        return video.pow(2).mean() + text.pow(2).mean()


JOINT_AXES = {"text": "b t d", "video": "b v d"}


def run_joint():
    from seqshard.planner import parallelize

    torch.manual_seed(0)
    model = Joint()
    ref = copy.deepcopy(model)
    inputs = (torch.randn(2, 3, 16), torch.randn(2, 11, 16))
    pm = parallelize(model, inputs, axes=JOINT_AXES, overrides={"blocks.*.mlp*": "split:v"})
    loss = pm(*inputs)
    loss.backward()
    want = ref(*inputs)
    want.backward()
    rel = [((loss - want).abs() / want.abs()).item()]
    rel += [((p.grad - q.grad).norm() / q.grad.norm()).item()
            for p, q in zip(model.parameters(), ref.parameters())]
    return max(rel), sorted({s.factor for n in pm.plan.nodes for s in n.splits})


def test_joint_attention_keeps_the_video_sequence_splittable(pool2):
    """The concatenation and split around a joint attention need the video's sequence whole
    there, not everywhere: the planner may split it in the rest of the block (gathered for the
    joint attention), and that runs exactly at 2 ranks."""
    from seqshard.dims import analyze
    from seqshard.strategies import whole_somewhere

    inputs = (torch.randn(2, 3, 16), torch.randn(2, 11, 16))
    dims = analyze(capture(Joint(), inputs), axes=JOINT_AXES)
    assert "v" not in {dims.F.label(a) for a in whole_somewhere(dims)}
    for err, factors in pool2.run(run_joint):
        assert factors == ["v"], factors
        assert err <= TOL, f"relative error {err:.2e}"
