"""Losses that reduce to a scalar. The token (and batch) factors are summed: split tokens give
partial sums, and a mean divides by the global count. The class dim of cross-entropy is whole."""

import torch

from ..registry import Role, RuleCtx, UnsupportedOp, rule

aten = torch.ops.aten

# reduction codes in ATen: 0 none, 1 mean, 2 sum


@rule(aten.cross_entropy_loss, aten.nll_loss, aten.nll_loss_nd)
def cross_entropy(ctx: RuleCtx):
    """`cross_entropy(logits[N, C, *d], target[N, *d])`."""
    x, t = ctx.sig(ctx.arg(0)), ctx.sig(ctx.arg(1))
    if ctx.arg("weight") is not None or ctx.arg("label_smoothing", 0.0):
        raise UnsupportedOp("cross_entropy with class weights or label smoothing")
    if len(x) < 2:
        raise UnsupportedOp("cross_entropy on unbatched logits")
    tokens = (x[0],) + tuple(x[2:])
    for a, b in zip(tokens, t):
        ctx.F.unify(a, b)
    ctx.mark([x[1]], Role.WHOLE)
    ctx.attrs["classes"] = x[1]
    reduction = ctx.arg("reduction", 1)
    if reduction == 0:
        return t
    ctx.mark(tokens, Role.SUM)
    ctx.attrs["loss"] = dict(kind="cross_entropy", tokens=list(tokens), reduction=reduction)
    return ()


@rule(aten.mse_loss, aten.l1_loss, aten.smooth_l1_loss, aten.huber_loss)
def mse(ctx: RuleCtx):
    a, b = ctx.arg(0), ctx.arg(1)
    shape = tuple(int(s) for s in torch.broadcast_shapes(a.meta["val"].shape, b.meta["val"].shape))
    sig = ctx.broadcast([ctx.sig(a), ctx.sig(b)], shape)
    reduction = ctx.arg("reduction", 1)
    if reduction == 0:
        return sig
    ctx.mark(sig, Role.SUM)
    ctx.attrs["loss"] = dict(kind="mse", tokens=list(sig), reduction=reduction)
    return ()
