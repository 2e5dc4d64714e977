"""Pointwise ops: every output element depends on the same-position input elements, so every
factor is local. Broadcasting unifies the dims it lines up. Ops tagged `pointwise` in ATen need no
entry here; these are the ones the tag misses and the identities."""

import torch

from ..registry import RuleCtx, rule

aten = torch.ops.aten


@rule(aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.where, aten.masked_fill, aten.clamp,
      aten.maximum, aten.minimum, aten.lerp, aten.addcmul, aten.addcdiv, aten.silu, aten.gelu,
      aten.relu, aten.sigmoid, aten.tanh, aten.exp, aten.log, aten.sin, aten.cos, aten.rsqrt,
      aten.sqrt, aten.neg, aten.reciprocal, aten.abs, aten.square, aten.to, aten._to_copy,
      aten.type_as, aten.clone, aten.contiguous, aten.detach, aten.alias, aten.lift_fresh_copy,
      aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge,
      aten.logical_and, aten.logical_or, aten.logical_not, aten.bitwise_and, aten.bitwise_or,
      aten.bitwise_not, aten.floor, aten.ceil, aten.round, aten.erf, aten.tanh_backward,
      aten.copy, aten.fill, aten.zero)
def pointwise(ctx: RuleCtx):
    tensors = [a for a in ctx.node.all_input_nodes if a in ctx.sigs and a.meta.get("val") is not None
               and isinstance(a.meta["val"], torch.Tensor)]
    return ctx.broadcast([ctx.sig(a) for a in tensors], ctx.out_shape())


@rule(aten.dropout, aten.native_dropout)
def dropout(ctx: RuleCtx):
    """Dropout draws its mask element by element, so it splits like any pointwise op: each rank
    draws the mask of its own elements. That is another draw than one device's (the same
    distribution, not the same values; codegen gives each shard its own random stream,
    `local_ops.dropout`), and the same values when not training or p = 0. `native_dropout`
    also returns the mask."""
    x = ctx.sig(ctx.arg(0))
    return [x, x] if ctx.node.target.overloadpacket is aten.native_dropout else x


@rule(aten.broadcast_tensors)
def broadcast_tensors(ctx: RuleCtx):
    tensors = ctx.arg(0)
    shape = tuple(int(n) for n in ctx.out_val()[0].shape)
    out = ctx.broadcast([ctx.sig(t) for t in tensors], shape)
    return [out for _ in tensors]
