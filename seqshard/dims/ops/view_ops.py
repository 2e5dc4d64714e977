"""Views and layout ops keep their factors: a reshape regroups them, a permute reorders the dims,
so under any split these run locally on local shards (codegen rewrites the sizes). A view that
cuts a factor refines it (`view(n, l, 3·h·e) → (n, l, 3, h, e)`)."""

import torch

from ..registry import RuleCtx, norm_dim, rule

aten = torch.ops.aten


@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
      aten.unsqueeze, aten.view_as, aten.reshape_as)
def reshape(ctx: RuleCtx):
    """Regroup the input's factors into the output's dims by size."""
    x = ctx.arg(0)
    flat = tuple(f for d in ctx.sig(x) for f in d)
    return ctx.F.split_dim(flat, ctx.out_shape())


@rule(aten.permute)
def permute(ctx: RuleCtx):
    sig = ctx.sig(ctx.arg(0))
    return tuple(sig[norm_dim(d, len(sig))] for d in ctx.arg(1))


@rule(aten.transpose, aten.swapaxes, aten.swapdims)
def transpose(ctx: RuleCtx):
    sig = list(ctx.sig(ctx.arg(0)))
    a, b = norm_dim(ctx.arg(1), len(sig)), norm_dim(ctx.arg(2), len(sig))
    sig[a], sig[b] = sig[b], sig[a]
    return tuple(sig)


@rule(aten.t, aten.numpy_T, aten.mT)
def t(ctx: RuleCtx):
    sig = ctx.sig(ctx.arg(0))
    if ctx.node.target == aten.mT.default:
        return sig[:-2] + (sig[-1], sig[-2])
    return tuple(reversed(sig))


@rule(aten.expand, aten.expand_as, aten.broadcast_to)
def expand(ctx: RuleCtx):
    """Size-1 dims grow into new factors; splitting one of them just expands to the local size."""
    sig = ctx.sig(ctx.arg(0))
    shape = ctx.out_shape()
    lead = len(shape) - len(sig)
    out = [(ctx.F.new(n),) if n > 1 else () for n in shape[:lead]]
    for d, n in zip(sig, shape[lead:]):
        out.append(d if ctx.F.dim_size(d) == n else (ctx.F.new(n),))
    return tuple(out)


@rule(aten.repeat_interleave.self_int)
def repeat_interleave(ctx: RuleCtx):
    """`repeat_interleave(x, r, dim)`: the dim becomes (its factors, r) - each element r times."""
    sig = list(ctx.sig(ctx.arg(0)))
    reps, dim = ctx.arg(1), ctx.arg(2)
    if dim is None:
        from ..registry import UnsupportedOp
        raise UnsupportedOp("repeat_interleave without dim flattens the tensor")
    dim = norm_dim(dim, len(sig))
    sig[dim] = sig[dim] + ((ctx.F.new(reps),) if reps > 1 else ())
    return tuple(sig)


@rule(aten.repeat)
def repeat(ctx: RuleCtx):
    """`repeat(x, reps)`: each dim becomes (copies, its factors)."""
    sig = ctx.sig(ctx.arg(0))
    reps = ctx.arg(1)
    lead = len(reps) - len(sig)
    out = [(ctx.F.new(r),) if r > 1 else () for r in reps[:lead]]
    for d, r in zip(sig, reps[lead:]):
        out.append(((ctx.F.new(r),) if r > 1 else ()) + d)
    return tuple(out)
