"""Contractions, stated as einsum equations: factors of a contracted index are summed (`SUM`:
split inputs give partial sums), all others pass through."""

import torch

from ..registry import Role, RuleCtx, UnsupportedOp, rule

aten = torch.ops.aten


def einsum_sig(ctx: RuleCtx, equation: str, sigs: list) -> tuple:
    """Unify the dims that share an index letter; mark letters missing from the output `SUM`.
    Operands may have fewer leading dims than the equation ('...' broadcasting is spelled out by
    the callers as explicit letters)."""
    lhs, out = equation.replace(" ", "").split("->")
    seen: dict[str, tuple] = {}
    for letters, sig in zip(lhs.split(","), sigs):
        if len(letters) != len(sig):
            raise UnsupportedOp(f"einsum operand {letters!r} does not match rank {len(sig)}")
        for c, d in zip(letters, sig):
            if c not in seen:
                seen[c] = d
            elif ctx.F.dim_size(d) > 1 and ctx.F.dim_size(seen[c]) > 1:
                ctx.F.unify(seen[c], d)
            elif ctx.F.dim_size(seen[c]) == 1:
                seen[c] = d  # broadcast a size-1 batch dim
    ctx.mark([seen[c] for c in seen if c not in out], Role.SUM)
    return tuple(seen[c] for c in out)


_LETTERS = "abcdefghijklmnopqrstuvw"


@rule(aten.linear)
def linear(ctx: RuleCtx):
    x, w, b = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    xs, ws = ctx.sig(x), ctx.sig(w)
    batch = _LETTERS[: len(xs) - 1]
    if len(ws) == 1:
        return einsum_sig(ctx, f"{batch}k,k->{batch}", [xs, ws])
    out = einsum_sig(ctx, f"{batch}k,nk->{batch}n", [xs, ws])
    if b is not None:
        ctx.F.unify(ctx.sig(b)[-1], out[-1])
    return out


@rule(aten.matmul, aten.mm, aten.bmm)
def matmul(ctx: RuleCtx):
    a, b = ctx.sig(ctx.arg(0)), ctx.sig(ctx.arg(1))
    if len(a) == 1 and len(b) == 1:
        return einsum_sig(ctx, "k,k->", [a, b])
    if len(b) == 1:
        batch = _LETTERS[: len(a) - 2]
        return einsum_sig(ctx, f"{batch}mk,k->{batch}m", [a, b])
    if len(a) == 1:
        batch = _LETTERS[: len(b) - 2]
        return einsum_sig(ctx, f"k,{batch}kn->{batch}n", [a, b])
    nb = max(len(a), len(b)) - 2
    batch = _LETTERS[:nb]
    ba, bb = batch[nb - (len(a) - 2):], batch[nb - (len(b) - 2):]
    return einsum_sig(ctx, f"{ba}mk,{bb}kn->{batch}mn", [a, b])


@rule(aten.outer)
def outer(ctx: RuleCtx):
    return einsum_sig(ctx, "m,n->mn", [ctx.sig(ctx.arg(0)), ctx.sig(ctx.arg(1))])


@rule(aten.addmm)
def addmm(ctx: RuleCtx):
    out = einsum_sig(ctx, "mk,kn->mn", [ctx.sig(ctx.arg(1)), ctx.sig(ctx.arg(2))])
    return ctx.broadcast([ctx.sig(ctx.arg(0)), out], ctx.out_shape())


@rule(aten.baddbmm)
def baddbmm(ctx: RuleCtx):
    out = einsum_sig(ctx, "bmk,bkn->bmn", [ctx.sig(ctx.arg(1)), ctx.sig(ctx.arg(2))])
    return ctx.broadcast([ctx.sig(ctx.arg(0)), out], ctx.out_shape())


@rule(aten.einsum)
def einsum(ctx: RuleCtx):
    equation, operands = ctx.arg(0), ctx.arg(1)
    if "..." in equation or "->" not in equation:
        raise UnsupportedOp("einsum with '...' or an implicit output")
    return einsum_sig(ctx, equation, [ctx.sig(o) for o in operands])
