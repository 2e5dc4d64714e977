"""Tensors made from sizes. Their factors are new; use unifies them with the model's (the
`arange(S)` of RoPE becomes the sequence factor when it meets `q`). Splitting such a factor is
local: each rank makes its own part (codegen emits the global positions of the local tokens)."""

import torch

from ..registry import Role, RuleCtx, rule

aten = torch.ops.aten


@rule(aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor,
      aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty, aten.tensor)
def create(ctx: RuleCtx):
    return ctx.fresh_out()


@rule(aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like)
def like(ctx: RuleCtx):
    return ctx.sig(ctx.arg(0))


@rule(aten.rand, aten.randn, aten.randint, aten.rand_like, aten.randn_like, aten.randint_like,
      aten.bernoulli, aten.normal, aten.multinomial)
def random(ctx: RuleCtx):
    """Random draws differ between ranks and one device: they stay whole (replicated)."""
    out = ctx.fresh_out() if "like" not in str(ctx.node.target) else ctx.sig(ctx.arg(0))
    ctx.mark(out, Role.WHOLE)
    return out
