"""Attention, `scaled_dot_product_attention(q, k, v, mask?, is_causal?, scale?, enable_gqa?)`:

    q [*batch, h, s_q, e], k [*batch, g, s_k, e], v [*batch, g, s_k, e] → out [*batch, h, s_q, e]

Batch and head factors are local (attention is independent per batch and head); `h = g·r` under
grouped-query attention. The key sequence is `SEQ`: splitting it needs a distributed algorithm
(ring, all-gather-KV, token-ring, Ulysses). Self-attention has s_q = s_k (one factor, from the same
tokens). The head dim is contracted inside a softmax: `WHOLE`. We unify v's head dim with q's:
conservative (it stays whole) and it reads as the one `e` people expect.
"""

import torch

from ..registry import AttentionDims, Role, RuleCtx, rule

aten = torch.ops.aten


@rule(aten.scaled_dot_product_attention)
def sdpa(ctx: RuleCtx):
    q, k, v = (ctx.sig(ctx.arg(i)) for i in range(3))
    F = ctx.F
    batch = ctx.broadcast([q[:-3], k[:-3], v[:-3]], ctx.out_shape()[:-3])
    F.unify(q[-1], k[-1])
    F.unify(q[-1], v[-1])
    F.unify(k[-2], v[-2])
    F.unify(k[-3], v[-3])
    hq, hk = F.dim_size(q[-3]), F.dim_size(k[-3])
    if hq == hk:
        F.unify(q[-3], k[-3])
    else:  # grouped-query: h = (g, r)
        F.unify(q[-3], k[-3] + (F.new(hq // hk),))
    mask = ctx.arg("attn_mask")
    if mask is not None:
        ms = ctx.sig(mask)
        F.unify(ms[-1], k[-2]) if F.dim_size(ms[-1]) > 1 else None
        F.unify(ms[-2], q[-2]) if F.dim_size(ms[-2]) > 1 else None
        ctx.mark([k[-2]], Role.WHOLE)  # no distributed algorithm takes an arbitrary mask
    ctx.mark([q[-1]], Role.WHOLE)
    ctx.mark([k[-2]], Role.SEQ)
    ctx.attrs["attention"] = AttentionDims(batch=batch, heads=q[-3], kv_heads=k[-3], seq_q=q[-2],
                                           seq_k=k[-2], head_dim=q[-1])
    return batch + (q[-3], q[-2], q[-1])
