"""Softmax and normalization: the normalized dims must be whole on every rank."""

import torch

from ..registry import Role, RuleCtx, norm_dim, rule

aten = torch.ops.aten


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod)
def softmax(ctx: RuleCtx):
    sig = ctx.sig(ctx.arg(0))
    ctx.mark([sig[norm_dim(ctx.arg(1), len(sig))]], Role.WHOLE)
    return sig


@rule(aten.layer_norm, aten.rms_norm)
def layer_norm(ctx: RuleCtx):
    """`norm(x, normalized_shape, weight?, bias?)`: the trailing dims are normalized; weight and
    bias have exactly those dims."""
    x = ctx.arg(0)
    sig = ctx.sig(x)
    k = len(ctx.arg(1))
    normed = sig[len(sig) - k:]
    for name in ("weight", "bias"):
        w = ctx.arg(name)
        if w is not None:
            for a, b in zip(ctx.sig(w), normed):
                ctx.F.unify(a, b)
    ctx.mark(normed, Role.WHOLE)
    return sig


@rule(aten.group_norm, aten.batch_norm, aten.instance_norm)
def other_norm(ctx: RuleCtx):
    from ..registry import UnsupportedOp
    raise UnsupportedOp("group/batch/instance norm reduce over batch or spatial dims")
