"""Contractions, stated as einsum equations: factors of a contracted index are summed (`SUM`:
split inputs give partial sums), all others pass through. A contraction whose output is a partial
sum adds its bias (`linear`'s, `addmm`'s `self`) on one addend only: `codegen.local_ops`."""

import torch

from ..registry import Role, RuleCtx, UnsupportedOp, rule

aten = torch.ops.aten


def einsum_sig(ctx: RuleCtx, equation: str, sigs: list) -> tuple:
    """Unify the dims that share an index letter; mark letters missing from the output `SUM`.
    Operands may have fewer leading dims than the equation ('...' broadcasting is spelled out by
    the callers as explicit letters). A factor that ends up in two dims of one operand or of the
    output (`bsd,btd->bst` on the same tokens) is `WHOLE`: split, each rank would hold only the
    diagonal blocks."""
    lhs, out = equation.replace(" ", "").split("->")
    seen: dict[str, tuple] = {}
    for letters, sig in zip(lhs.split(","), sigs):
        if len(letters) != len(sig):
            raise UnsupportedOp(f"einsum operand {letters!r} does not match rank {len(sig)}")
        if len(set(letters)) != len(letters):
            raise UnsupportedOp(f"einsum operand {letters!r} repeats an index (a diagonal)")
        for c, d in zip(letters, sig):
            if c not in seen:
                seen[c] = d
            elif ctx.F.dim_size(d) > 1 and ctx.F.dim_size(seen[c]) > 1:
                ctx.F.unify(seen[c], d)
            elif ctx.F.dim_size(seen[c]) == 1:
                seen[c] = d  # broadcast a size-1 batch dim
    ctx.mark([seen[c] for c in seen if c not in out], Role.SUM)
    for letters in lhs.split(",") + [out]:
        atoms = [{ctx.F.find(a) for a in ctx.F.atoms_of(seen[c])} for c in letters]
        for i, mine in enumerate(atoms):
            if any(mine & other for j, other in enumerate(atoms) if j != i):
                ctx.mark([seen[letters[i]]], Role.WHOLE)
    return tuple(seen[c] for c in out)


def spell_out(equation: str, ranks: list[int]) -> str:
    """The equation with '...' replaced by explicit indices (digits, which no einsum letter is;
    broadcast from the right as in numpy) and the implicit output written out (the ellipsis,
    then the letters used once, in alphabetical order)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    operands = lhs.split(",")
    if len(operands) != len(ranks):
        raise UnsupportedOp(f"einsum {equation!r} names {len(operands)} operands, got {len(ranks)}")
    width = max((r - (len(o) - 3) for o, r in zip(operands, ranks) if "..." in o), default=0)
    if width > 10:
        raise UnsupportedOp(f"einsum {equation!r}: '...' covers more than 10 dims")
    ell = "".join(str(i) for i in range(width))

    def expand(o: str, rank: int) -> str:
        return o.replace("...", ell[width - (rank - (len(o) - 3)):]) if "..." in o else o

    spelled = [expand(o, r) for o, r in zip(operands, ranks)]
    if arrow:
        out = out.replace("...", ell)
    else:
        letters = "".join(spelled)
        out = ell + "".join(sorted(c for c in set(letters) if c.isalpha() and letters.count(c) == 1))
    return ",".join(spelled) + "->" + out


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


@rule(aten.addbmm)
def addbmm(ctx: RuleCtx):
    out = einsum_sig(ctx, "bmk,bkn->mn", [ctx.sig(ctx.arg(1)), ctx.sig(ctx.arg(2))])
    return ctx.broadcast([ctx.sig(ctx.arg(0)), out], ctx.out_shape())


@rule(aten.addmv)
def addmv(ctx: RuleCtx):
    out = einsum_sig(ctx, "mk,k->m", [ctx.sig(ctx.arg(1)), ctx.sig(ctx.arg(2))])
    return ctx.broadcast([ctx.sig(ctx.arg(0)), out], ctx.out_shape())


@rule(aten.einsum)
def einsum(ctx: RuleCtx):
    """`einsum(equation, [operands])`: the equation is the rule (letters shared by operands are one
    factor; letters missing from the output are summed), and it holds on local shards as it is."""
    equation, operands = ctx.arg(0), ctx.arg(1)
    sigs = [ctx.sig(o) for o in operands]
    return einsum_sig(ctx, spell_out(equation, [len(s) for s in sigs]), sigs)
