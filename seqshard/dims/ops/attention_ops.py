"""Attention, `scaled_dot_product_attention(q, k, v, mask?, is_causal?, scale?, enable_gqa?)` and
`masked_attention(q, k, v, ..., positions?, segments?, window?, key_valid?)` (capture/masks.py):

    q [*batch, h, s_q, e], k [*batch, g, s_k, e], v [*batch, g, s_k, e] → out [*batch, h, s_q, e]
    positions, segments, key_valid [batch or 1, s_k]

Batch and head factors are local (attention is independent per batch and head); `h = g·r` under
grouped-query attention. The key sequence is `SEQ`: splitting it needs a distributed algorithm
(ring, all-gather-KV, token-ring, Ulysses). Self-attention has s_q = s_k (one factor, from the same
tokens). The head dim is contracted inside a softmax: `WHOLE`. We unify v's head dim with q's:
conservative (it stays whole) and it reads as the one `e` people expect.

The per-token mask tensors have the batch and sequence factors; every algorithm takes them whole
(strategies keep them replicated over the sequence). An `attn_mask` the capture could not read as
per-token tensors is [*batch, h or 1, s_q, s_k]: its dims are the attention's, and the strategy
refuses to split its sequence (naming the line that built it).
"""

import torch

from seqshard.capture import MASK_KWARGS, masked_attention

from ..registry import AttentionDims, Role, RuleCtx, rule

aten = torch.ops.aten


@rule(aten.scaled_dot_product_attention, masked_attention)
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
        _unify_if_sized(F, ms[-1], k[-2])
        _unify_if_sized(F, ms[-2], q[-2])
        if len(ms) >= 3:
            _unify_if_sized(F, ms[-3], q[-3])
        for m, b in zip(reversed(ms[:-3]), reversed(batch)):
            _unify_if_sized(F, m, b)
    for key in MASK_KWARGS:
        t = ctx.arg(key)
        if key == "window" or t is None:
            continue
        ts = ctx.sig(t)                                  # [batch or 1, s_k]
        F.unify(ts[-1], k[-2])
        if len(batch) == 1:
            _unify_if_sized(F, ts[0], batch[0])
    ctx.mark([q[-1]], Role.WHOLE)
    ctx.mark([k[-2]], Role.SEQ)
    ctx.attrs["attention"] = AttentionDims(batch=batch, heads=q[-3], kv_heads=k[-3], seq_q=q[-2],
                                           seq_k=k[-2], head_dim=q[-1])
    return batch + (q[-3], q[-2], q[-1])


def _unify_if_sized(F, a, b) -> None:
    """Unify a mask dim with the attention dim it broadcasts to, unless it has size 1."""
    if F.dim_size(a) > 1:
        F.unify(a, b)
