"""Ops whose output along one dim depends on its neighbours and changes its length: `diff`
(transformers' packed-sequence detection, `diff(position_ids) != 1`) and constant padding
(transformers' causal-LM loss pads the labels by one before shifting them).

The dim they work along is WHOLE on both sides and the output gets a new factor there (its
length differs, so it is not the input's factor); the other dims pass through.
"""

import torch

from ..registry import Role, RuleCtx, norm_dim, rule

aten = torch.ops.aten


@rule(aten.diff)
def diff(ctx: RuleCtx):
    """`diff(x, n, dim, prepend?, append?)`: prepend and append share x's other dims."""
    x = ctx.sig(ctx.arg(0))
    d = norm_dim(ctx.arg("dim", -1), len(x))
    for name in ("prepend", "append"):
        extra = ctx.arg(name)
        if extra is not None:
            for i, e in enumerate(ctx.sig(extra)):
                if i != d:
                    ctx.F.unify(x[i], e)
    new = (ctx.F.new(ctx.out_shape()[d]),)
    ctx.mark([x[d], new], Role.WHOLE)
    return x[:d] + (new,) + x[d + 1:]


@rule(aten.pad, aten.constant_pad_nd)
def pad(ctx: RuleCtx):
    """`pad(x, [left_last, right_last, left_prev, right_prev, ...], ...)`: each padded trailing
    dim gets a new factor; a dim padded by (0, 0) keeps its factor."""
    x = ctx.sig(ctx.arg(0))
    pads = list(ctx.arg(1))
    out = list(x)
    shape = ctx.out_shape()
    for k in range(len(pads) // 2):
        d = len(x) - 1 - k
        if pads[2 * k] or pads[2 * k + 1]:
            out[d] = (ctx.F.new(shape[d]),)
            ctx.mark([x[d], out[d]], Role.WHOLE)
    return tuple(out)
