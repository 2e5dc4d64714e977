"""Canonicalization: graph rewrites that make one model's spelling look like every other's.

These are seqshard's graph-to-graph passes (the per-rank program itself is emitted by
`seqshard.codegen`): they run once on the captured graph, before factor analysis.

    drop_metadata_nodes   `_assert_tensor_metadata` and friends carry no computation
    recognize_attention   `softmax(q @ kᵀ · scale [+ mask]) @ v` → one SDPA node
    recognize_masks       an `attn_mask` that is causal / documents / sliding window / key
                          padding → `is_causal`, or `masked_attention` with per-token tensors
                          (`masks.py`)
    fold_gqa_repeat       `repeat_interleave`, or transformers' `expand` + `reshape`, of K/V
                          along heads → `enable_gqa=True`

Attention is then one of two targets (`ATTENTION`): ATen's SDPA, or `masks.masked_attention`
(SDPA under the mask family, its per-token tensors as keyword arguments).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .masks import MASK_KWARGS, masked_attention, recognize_masks

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
ATTENTION = (SDPA, masked_attention)
"""The targets of attention nodes after canonicalization."""

SDPA_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_options(node: fx.Node) -> dict:
    """The options of an attention node by name, whether passed by position or keyword (for
    `masked_attention`, its per-token tensors too)."""
    kw = dict(zip(SDPA_OPTIONS, node.args[3:]))
    kw.update(node.kwargs)
    return kw


def mask_inputs(node: fx.Node) -> dict:
    """The per-token mask arguments of an attention node that has them (`MASK_KWARGS`)."""
    return {k: node.kwargs[k] for k in MASK_KWARGS if node.kwargs.get(k) is not None}


def canonicalize(graph: fx.Graph) -> list[str]:
    """Run every rewrite; returns what each did, for people."""
    drop_metadata_nodes(graph)
    return (recognize_attention(graph) + recognize_masks(graph, SDPA, _constant_value)
            + fold_gqa_repeat(graph))


def drop_metadata_nodes(graph: fx.Graph) -> None:
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in (aten._assert_tensor_metadata.default,):
            graph.erase_node(n)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def fold_gqa_repeat(graph: fx.Graph) -> list[str]:
    """`attention(q, repeat(k), repeat(v))` → `attention(q, k, v, enable_gqa=True)`, where
    repeat is `repeat_interleave(x, r, dim=heads)` or transformers' `repeat_kv`,
    `x[:, :, None].expand(b, g, r, s, e).reshape(b, g·r, s, e)`: the same function (query head
    i reads kv head i // r, as SDPA's GQA does), whatever the mask."""
    done = []
    for n in list(graph.nodes):
        if not _is(n, *ATTENTION):
            continue
        q, k, v = n.args[:3]
        kw = sdpa_options(n)
        if kw.get("enable_gqa"):
            continue
        (xk, rk, how), (xv, rv, _) = _repeated_heads(k), _repeated_heads(v)
        if xk is None or xv is None or rk != rv:
            continue
        n.args, n.kwargs = (q, xk, xv), {**kw, "enable_gqa": True}
        done.append(f"{n.name}: folded {how} x{rk} of K/V into enable_gqa")
    return done


def _repeated_heads(x) -> tuple:
    """(the tensor whose heads `x` repeats, repeats, how) for x [*b, g·r, s, e] made by repeating
    each head r times in place; (None, None, None) otherwise."""
    none = (None, None, None)
    if not isinstance(x, fx.Node) or _val(x) is None or _val(x).dim() < 3:
        return none
    ndim = _val(x).dim()
    heads = ndim - 3
    if _is(x, aten.repeat_interleave.self_int):
        reps = x.args[1]
        dim = x.args[2] if len(x.args) > 2 else x.kwargs.get("dim")
        if isinstance(reps, int) and dim is not None and dim % ndim == heads:
            return x.args[0], reps, "repeat_interleave"
        return none
    if not _is(x, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return none
    e = x.args[0]
    if not _is(e, aten.expand.default):
        return none
    u = e.args[0]
    while _is(u, aten.slice.Tensor) and _val(u).shape == _val(u.args[0]).shape:
        u = u.args[0]  # x[:, :, None] may export as full slices around the unsqueeze
    if not (_is(u, aten.unsqueeze.default) and u.args[1] % (ndim + 1) == heads + 1):
        return none
    src = u.args[0]
    shape, big = tuple(_val(src).shape), tuple(_val(e).shape)
    g, r = shape[heads], big[heads + 1]
    if big != shape[:heads + 1] + (r,) + shape[heads + 1:] or \
            tuple(_val(x).shape) != shape[:heads] + (g * r,) + shape[heads + 1:]:
        return none
    return src, r, "expand+reshape"


def recognize_attention(graph: fx.Graph) -> list[str]:
    """Rewrite `softmax((q @ kᵀ) · scale + mask?) @ v` into one `scaled_dot_product_attention`.

    Recognised: `matmul(q, transpose(k, -2, -1))`, then optionally a multiplication or division
    by a Python number, then optionally a causal mask (`masked_fill(triu(ones(S, S), 1).bool(),
    -inf)`, or adding a tensor mask of zeros and -inf: its values are read to see if it is the
    causal mask; another mask is passed on as `attn_mask`), `softmax(dim=-1)`, casts or a
    dropout of nothing, `matmul(p, v)`."""
    done = []
    mm = (aten.matmul.default,)
    for sm in list(graph.nodes):
        if not _is(sm, aten.softmax.int, aten._softmax.default):
            continue
        dim = sm.args[1]
        if dim not in (-1, _val(sm).dim() - 1) or len(sm.users) != 1:
            continue
        p = sm
        while len(p.users) == 1 and _keeps_probabilities(next(iter(p.users))):
            p = next(iter(p.users))
        if len(p.users) != 1:
            continue
        (pv,) = p.users
        if not (_is(pv, *mm) and pv.args[0] is p):
            continue
        x, scale, causal, mask = sm.args[0], 1.0, False, None
        if _is(x, aten.masked_fill.Scalar) and x.args[2] == float("-inf"):
            m = _constant_value(x.args[1])
            if m is None or not _is_causal_bool(m):
                continue
            causal, x = True, x.args[0]
        elif _is(x, aten.add.Tensor) and isinstance(x.args[1], fx.Node):
            m = _constant_value(x.args[1])
            if m is not None and _is_causal_additive(m):
                causal = True
            else:
                mask = x.args[1]
            x = x.args[0]
        if _is(x, aten.mul.Tensor) and isinstance(x.args[1], (int, float)):
            scale, x = float(x.args[1]), x.args[0]
        elif _is(x, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
            scale, x = 1.0 / float(x.args[1]), x.args[0]
        if not (_is(x, *mm) and _is(x.args[1], aten.transpose.int)):
            continue
        kt = x.args[1]
        nd = _val(kt).dim()
        if sorted(d % nd for d in kt.args[1:3]) != [nd - 2, nd - 1]:
            continue
        q, k, v = x.args[0], kt.args[0], pv.args[1]
        if _val(q).dim() < 3 or _val(q).shape[:-2] != _val(k).shape[:-2]:
            continue
        with graph.inserting_before(pv):
            new = graph.call_function(SDPA, (q, k, v), {"attn_mask": mask, "is_causal": causal,
                                                         "scale": scale})
        new.meta = dict(pv.meta)
        pv.replace_all_uses_with(new)
        dead = pv
        while dead is not sm:  # a dropout between them would look impure to dead-code removal
            before = dead.args[0]
            graph.erase_node(dead)
            dead = before
        graph.erase_node(sm)
        done.append(f"{new.name}: recognised matmul-softmax-matmul attention"
                    f" (causal={causal}, scale={scale:.4g})")
    return done


def _keeps_probabilities(n: fx.Node) -> bool:
    """Ops between softmax and the PV matmul that SDPA also does: a cast (eager attention
    casts fp32 probabilities back to the query's dtype), dropout that drops nothing."""
    if _is(n, aten.to.dtype, aten._to_copy.default, aten.contiguous.default, aten.alias.default):
        return True
    if _is(n, aten.dropout.default):
        return n.args[1] == 0 or (len(n.args) > 2 and n.args[2] is False)
    return False


def _constant_value(node) -> torch.Tensor | None:
    """Evaluate a subgraph that depends on no placeholder (a mask built from sizes)."""
    if not isinstance(node, fx.Node):
        return None
    order, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op != "call_function":
            return None
        seen.add(n)
        order.append(n)
        stack.extend(a for a in n.all_input_nodes)
    env = {}
    for n in sorted(order, key=lambda n: list(n.graph.nodes).index(n)):
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = dict(fx.node.map_arg(n.kwargs, lambda a: env[a]))
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        try:
            env[n] = n.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not evaluable: not a constant mask
            return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) and out.device.type != "meta" else None


def _is_causal_bool(m: torch.Tensor) -> bool:
    s = m.shape[-1]
    return m.dim() >= 2 and m.shape[-2] == s and bool(
        (m.bool() == torch.ones(s, s, dtype=torch.bool).triu(1)).all())


def _is_causal_additive(m: torch.Tensor) -> bool:
    s = m.shape[-1]
    if m.dim() < 2 or m.shape[-2] != s:
        return False
    upper = torch.ones(s, s, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(m[..., upper]).all() and (m[..., ~upper] == 0).all())

