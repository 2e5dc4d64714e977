"""Lookups, slices, concatenation and splits.

Cutting a dim into k equal pieces (`chunk`, `unbind`, a slice of one piece) refines its factor
into (k, rest): each piece is `rest`, and the piece index `k` must be whole where it is cut.
Concatenating k same-shaped pieces makes (k, rest). Other slices and concatenations give new
factors and need the dim whole.
"""

import operator

import torch

from ..registry import Role, RuleCtx, UnsupportedOp, norm_dim, rule

aten = torch.ops.aten
INT_MAX = 2**62


@rule(aten.embedding)
def embedding(ctx: RuleCtx):
    """`embedding(weight[v, d], ids[...]) → [..., d]`; the vocabulary is looked up: whole."""
    w, ids = ctx.sig(ctx.arg(0)), ctx.sig(ctx.arg(1))
    ctx.mark([w[0]], Role.WHOLE)
    ctx.attrs["embedding"] = dict(vocab=w[0], dim=w[1])
    return ids + (w[1],)


def _pieces(ctx: RuleCtx, dim_factors, k: int):
    """Refine a dim into (k, rest); returns (k_dim, rest_dim)."""
    F = ctx.F
    n = F.dim_size(dim_factors)
    kd, rest = F.split_dim(dim_factors, (k, n // k))
    ctx.mark([kd], Role.WHOLE)
    return kd, rest


@rule(aten.slice.Tensor)
def slice_(ctx: RuleCtx):
    sig = list(ctx.sig(ctx.arg(0)))
    dim = norm_dim(ctx.arg("dim", 0), len(sig))
    n = ctx.F.dim_size(sig[dim])
    start = ctx.arg("start") or 0
    end = ctx.arg("end")
    end = n if end is None or end >= n else end
    start, end, step = start % n if start < 0 else start, end % n if end < 0 else end, ctx.arg("step", 1)
    if (start, end, step) == (0, n, 1):
        return tuple(sig)
    length = end - start
    if step == 1 and length and n % length == 0 and start % length == 0:
        _, rest = _pieces(ctx, sig[dim], n // length)
        sig[dim] = rest
        return tuple(sig)
    ctx.mark([sig[dim]], Role.WHOLE)
    sig[dim] = (ctx.F.new(int(ctx.out_shape()[dim])),)
    return tuple(sig)


@rule(aten.select.int)
def select(ctx: RuleCtx):
    sig = list(ctx.sig(ctx.arg(0)))
    dim = norm_dim(ctx.arg(1), len(sig))
    ctx.mark([sig[dim]], Role.WHOLE)
    del sig[dim]
    return tuple(sig)


@rule(aten.unbind, aten.chunk, aten.split, aten.split_with_sizes, aten.tensor_split)
def split(ctx: RuleCtx):
    sig = list(ctx.sig(ctx.arg(0)))
    pieces = ctx.out_val()
    target = ctx.node.target.overloadpacket
    dim = norm_dim(ctx.arg("dim", 0) if target is not aten.split_with_sizes
                   else ctx.arg(2, 0), len(sig))
    if target is aten.unbind:
        ctx.mark([sig[dim]], Role.WHOLE)
        rest = sig[:dim] + sig[dim + 1:]
        return [tuple(rest) for _ in pieces]
    sizes = [int(p.shape[dim]) for p in pieces]
    n = ctx.F.dim_size(sig[dim])
    if len(set(sizes)) == 1 and sizes[0] * len(sizes) == n:
        _, rest = _pieces(ctx, sig[dim], len(sizes))
        return [tuple(sig[:dim] + [rest] + sig[dim + 1:]) for _ in pieces]
    ctx.mark([sig[dim]], Role.WHOLE)
    return [tuple(sig[:dim] + [(ctx.F.new(s),)] + sig[dim + 1:]) for s in sizes]


@rule(aten.cat, aten.stack)
def cat(ctx: RuleCtx):
    tensors = ctx.arg(0)
    sigs = [ctx.sig(t) for t in tensors]
    stack = ctx.node.target.overloadpacket is aten.stack
    ndim = len(sigs[0]) + (1 if stack else 0)
    dim = norm_dim(ctx.arg(1, 0), ndim)
    shape = ctx.out_shape()
    if any(len(s) != len(sigs[0]) for s in sigs):
        raise UnsupportedOp("concatenation of tensors of different ranks")
    others = [i for i in range(len(sigs[0])) if stack or i != dim]
    out = list(sigs[0])
    for s in sigs[1:]:
        for i in others:
            ctx.F.unify(out[i], s[i])
    k = ctx.F.new(len(sigs)) if len(sigs) > 1 else None
    if stack:
        out.insert(dim, (k,) if k is not None else ())
        ctx.mark([out[dim]], Role.WHOLE)
        return tuple(out)
    if len({ctx.F.dim_size(s[dim]) for s in sigs}) == 1:
        for s in sigs[1:]:
            ctx.F.unify(sigs[0][dim], s[dim])
        out[dim] = ((k,) if k is not None else ()) + sigs[0][dim]
        ctx.mark([(k,)] if k is not None else [], Role.WHOLE)
        return tuple(out)
    ctx.mark([s[dim] for s in sigs], Role.WHOLE)
    out[dim] = (ctx.F.new(shape[dim]),)
    return tuple(out)


@rule(operator.getitem)
def getitem(ctx: RuleCtx):
    src, i = ctx.node.args
    return ctx.sigs[src][i]
