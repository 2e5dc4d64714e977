"""Canonicalization: graph rewrites that make one model's spelling look like every other's.

These are seqshard's graph-to-graph passes (the per-rank program itself is emitted by
`seqshard.codegen`): they run once on the captured graph, before factor analysis.

    drop_metadata_nodes   `_assert_tensor_metadata` and friends carry no computation
    recognize_attention   `softmax(q @ kᵀ · scale [+ mask]) @ v` → one SDPA node
    fold_gqa_repeat       `repeat_interleave` of K/V along heads → `enable_gqa=True`
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

SDPA_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_options(node: fx.Node) -> dict:
    """The options of an SDPA node by name, whether passed by position or keyword."""
    kw = dict(zip(SDPA_OPTIONS, node.args[3:]))
    kw.update(node.kwargs)
    return kw


def canonicalize(graph: fx.Graph) -> list[str]:
    """Run every rewrite; returns what each did, for people."""
    drop_metadata_nodes(graph)
    return recognize_attention(graph) + fold_gqa_repeat(graph)


def drop_metadata_nodes(graph: fx.Graph) -> None:
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in (aten._assert_tensor_metadata.default,):
            graph.erase_node(n)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def fold_gqa_repeat(graph: fx.Graph) -> list[str]:
    """`sdpa(q, repeat_interleave(k, r, 1), repeat_interleave(v, r, 1))` → `sdpa(q, k, v,
    enable_gqa=True)`: the same function (SDPA's GQA repeats K/V heads the same way)."""
    done = []
    rep = aten.repeat_interleave.self_int
    for n in list(graph.nodes):
        if not _is(n, SDPA):
            continue
        q, k, v = n.args[:3]
        if not (_is(k, rep) and _is(v, rep)):
            continue
        kw = sdpa_options(n)
        if kw.get("attn_mask") is not None or kw.get("enable_gqa"):
            continue

        def parts(r):
            reps = r.args[1]
            dim = r.args[2] if len(r.args) > 2 else r.kwargs.get("dim")
            ndim = _val(r).dim()
            return reps, (dim % ndim) if dim is not None else None

        (rk, dk), (rv, dv) = parts(k), parts(v)
        ndim = _val(q).dim()
        if not (rk == rv and dk == dv == ndim - 3 and isinstance(rk, int)):
            continue
        n.args = (q, k.args[0], v.args[0])
        kw["enable_gqa"] = True
        n.kwargs = kw
        done.append(f"{n.name}: folded repeat_interleave x{rk} of K/V into enable_gqa")
    return done


def recognize_attention(graph: fx.Graph) -> list[str]:
    """Rewrite `softmax((q @ kᵀ) · scale + mask?) @ v` into one `scaled_dot_product_attention`.

    Recognised: `matmul(q, transpose(k, -2, -1))`, then optionally a multiplication or division
    by a Python number, then optionally a causal mask (`masked_fill(triu(ones(S, S), 1).bool(),
    -inf)`, or adding a tensor mask of zeros and -inf: its values are read to see if it is the
    causal mask; another mask is passed on as `attn_mask`), `softmax(dim=-1)`, `matmul(p, v)`."""
    done = []
    mm = (aten.matmul.default,)
    for sm in list(graph.nodes):
        if not _is(sm, aten.softmax.int, aten._softmax.default):
            continue
        dim = sm.args[1]
        if dim not in (-1, _val(sm).dim() - 1) or len(sm.users) != 1:
            continue
        (pv,) = sm.users
        if not (_is(pv, *mm) and pv.args[0] is sm):
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
        done.append(f"{new.name}: recognised matmul-softmax-matmul attention"
                    f" (causal={causal}, scale={scale:.4g})")
    return done


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

