"""Reductions. A sum (or mean) over a split factor is a partial sum; a max, variance or arg-
reduction over it needs the whole factor."""

import torch

from ..registry import Role, RuleCtx, norm_dim, rule

aten = torch.ops.aten


def _reduce(ctx: RuleCtx, role: Role):
    sig = ctx.sig(ctx.arg(0))
    dims = ctx.arg(1)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(len(sig)))
    elif isinstance(dims, int):
        dims = [dims]
    dims = sorted({norm_dim(d, len(sig)) for d in dims})
    keep = bool(ctx.arg("keepdim", False))
    ctx.mark([sig[d] for d in dims], role)
    if ctx.node.target.overloadpacket is aten.mean:
        ctx.attrs["mean_over"] = [sig[d] for d in dims]
    out = tuple(() if d in dims else sig[d] for d in range(len(sig))) if keep else \
        tuple(sig[d] for d in range(len(sig)) if d not in dims)
    return out


@rule(aten.sum, aten.mean)
def sum_(ctx: RuleCtx):
    return _reduce(ctx, Role.SUM)


@rule(aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.std, aten.argmax, aten.argmin,
      aten.prod, aten.logsumexp, aten.norm, aten.linalg_vector_norm, aten.var_mean, aten.std_mean,
      aten.all, aten.any)
def whole_reduce(ctx: RuleCtx):
    out = _reduce(ctx, Role.WHOLE)
    val = ctx.out_val()
    if isinstance(val, (list, tuple)):  # (values, indices) or (var, mean)
        return [out for _ in val]
    return out
