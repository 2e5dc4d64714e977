"""Writes into part of a tensor, as functionalization spells them (`capture/functionalize.py`):
`out[..., a:b] = v` is `slice_scatter(out, v, -1, a, b)`, `out[:, i] = v` is `select_scatter`.

The output has the written tensor's factors; the source has them too except along the written
dim, which is cut the way `index_ops.slice_` cuts a read: the whole dim (the source is the
dim), k equal pieces (the dim refines into (k, rest), the source is `rest`, k is whole), or
else the dim is whole on both sides."""

import torch

from ..registry import Role, RuleCtx, UnsupportedOp, norm_dim, rule

aten = torch.ops.aten


@rule(aten.slice_scatter)
def slice_scatter(ctx: RuleCtx):
    x, src = ctx.sig(ctx.arg(0)), ctx.sig(ctx.arg(1))
    if len(x) != len(src):
        raise UnsupportedOp("slice_scatter source of another rank than the tensor")
    dim = norm_dim(ctx.arg("dim", 0), len(x))
    n = ctx.F.dim_size(x[dim])
    start, end, step = slice(ctx.arg("start"), ctx.arg("end"), ctx.arg("step", 1)).indices(n)
    length = len(range(start, end, step))
    for i in range(len(x)):
        if i != dim:
            ctx.F.unify(x[i], src[i])
    if (start, length, step) == (0, n, 1):
        ctx.F.unify(x[dim], src[dim])
    elif step == 1 and length and n % length == 0 and start % length == 0:
        k, rest = ctx.F.split_dim(x[dim], (n // length, length))
        ctx.mark([k], Role.WHOLE)
        ctx.F.unify(rest, src[dim])
    else:
        ctx.mark([x[dim], src[dim]], Role.WHOLE)
    return x


@rule(aten.select_scatter)
def select_scatter(ctx: RuleCtx):
    x, src = ctx.sig(ctx.arg(0)), ctx.sig(ctx.arg(1))
    dim = norm_dim(ctx.arg("dim"), len(x))
    if len(src) != len(x) - 1:
        raise UnsupportedOp("select_scatter source of another rank than the selected slice")
    for a, b in zip(x[:dim] + x[dim + 1:], src):
        ctx.F.unify(a, b)
    ctx.mark([x[dim]], Role.WHOLE)
    return x
