"""Lookups, slices, concatenation and splits.

A dim is a product of factors, outermost first. Cutting it keeps a factor only where the cut
says what the factor is:

- a slice of whole rows of the dim's inner factors (`qkv[..., d:2d]` of a dim `(3, h, e)`, one
  half of a dim `(2, e/2)`) keeps the inner factors; the outer factors it picks from are whole
  there, and more than one row of them is a new factor. A strided slice that picks one position
  of the inner factors (`x[..., ::2]` of `(e/2, 2)`) keeps the outer factors;
- slices of one tensor that cut a dim into k equal consecutive pieces are a chunk: the dim
  refines into (k, rest), as `chunk`, `split` and `unbind` into equal pieces do, so `q, k, v =
  qkv[..., :d], qkv[..., d:2d], qkv[..., 2d:]` are the same factor `rest` as the weight's rows;
- any other slice (`table[:n]` of a longer table, a length the dim's factors do not nest) gives
  a new factor and needs the dim whole. A prefix of a table is not the table's factor: `freqs[:T]`
  and `freqs[:H]` of one rope table must not make frames and heights one factor;
- concatenating k same-shaped pieces makes (k, rest); other concatenations make a new *joint*
  factor (`Factors.join`: `cat([text, video], 1)` of a joint text+video attention), and need the
  pieces' dims whole unless the joint factor is split (piece by piece: each piece on its
  `piece_atom`). Empty pieces (size 0 along the dim) add nothing;
- a split of a joint factor at its pieces' bounds (`split_with_sizes(x, [T, V])`), or a slice
  that is exactly one piece (`x[:, T:]`), gives the pieces back: the same factors, split as they
  are in the joint one, so the cut is local.

Codegen (`codegen.local_ops`) turns the bounds into local bounds from the factors recorded in
`attrs["slice"]`, and slices new factors that a strategy splits after the op has run.
"""

import operator
from math import prod

import torch

from ..factors import FactorError
from ..registry import Role, RuleCtx, UnsupportedOp, norm_dim, rule

aten = torch.ops.aten


@rule(aten.embedding)
def embedding(ctx: RuleCtx):
    """`embedding(weight[v, d], ids[...]) → [..., d]`; the vocabulary is looked up: whole."""
    w, ids = ctx.sig(ctx.arg(0)), ctx.sig(ctx.arg(1))
    ctx.mark([w[0]], Role.WHOLE)
    ctx.attrs["embedding"] = dict(vocab=w[0], dim=w[1])
    return ids + (w[1],)


def _pieces(ctx: RuleCtx, dim_factors, k: int):
    """Refine a dim into (k, rest); returns (k_dim, rest_dim)."""
    F = ctx.F
    n = F.dim_size(dim_factors)
    kd, rest = F.split_dim(dim_factors, (k, n // k))
    ctx.mark([kd], Role.WHOLE)
    return kd, rest


def _bounds(ctx: RuleCtx, node, n: int) -> tuple[int, int, int, int]:
    """(dim, start, end, step) of a slice or narrow node, as Python's slice() normalizes them."""
    c = RuleCtx(ctx.F, node, ctx.sigs)
    dim = norm_dim(c.arg("dim", 0), len(ctx.sig(node.args[0])))
    if node.target is aten.narrow.default:
        start = c.arg("start") % n if c.arg("start") < 0 else c.arg("start")
        return dim, start, start + c.arg("length"), 1
    start, end, step = slice(c.arg("start"), c.arg("end"), c.arg("step", 1)).indices(n)
    return dim, start, max(start, end), step


def _equal_pieces(ctx: RuleCtx, x, dim: int, n: int) -> int | None:
    """k when the slices of `x` along `dim` cut it into k >= 2 equal consecutive pieces."""
    cuts = set()
    for u in x.users:
        if u.op == "call_function" and u.target in (aten.slice.Tensor, aten.narrow.default):
            d, start, end, step = _bounds(ctx, u, n)
            if d == dim and step == 1 and (start, end) != (0, n):
                cuts.add((start, end))
    length = next(iter(cuts))[1] - next(iter(cuts))[0] if cuts else 0
    if not length or n % length or len(cuts) != n // length or n // length < 2:
        return None
    return n // length if all(end - start == length and start % length == 0
                              for start, end in cuts) else None


def _rows(F, dim, start: int, end: int, step: int):
    """(outer, inner) atoms of `dim` when the slice takes whole rows of the inner atoms (the
    longest such inner run; step 1), or picks one position of them from every row (step = the
    inner size); else None."""
    atoms = F.atoms_of(dim)
    n = F.dim_size(dim)
    for j in range(1, len(atoms)):
        inner = prod(F.size(a) for a in atoms[j:])
        if step == 1 and start % inner == 0 and end % inner == 0:
            return atoms[:j], atoms[j:]
        if step == inner and start < step and len(range(start, end, step)) == n // step:
            return atoms[:j], atoms[j:]
    return None


def _joint(F, dim) -> int | None:
    """The joint atom a dim is (size-1 factors aside), or None."""
    atoms = [F.find(a) for a in F.atoms_of(dim) if F.size(a) != 1]
    return atoms[0] if len(atoms) == 1 and F.pieces(atoms[0]) is not None else None


def _piece_bounds(F, joint: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for p in F.pieces(joint):
        bounds.append((start, start + F.dim_size(p)))
        start += F.dim_size(p)
    return bounds


@rule(aten.slice.Tensor, aten.narrow)
def slice_(ctx: RuleCtx):
    x = ctx.arg(0)
    sig = list(ctx.sig(x))
    F = ctx.F
    n = F.dim_size(sig[ctx.arg("dim", 0) % len(sig)])
    dim, start, end, step = _bounds(ctx, ctx.node, n)
    length = ctx.out_shape()[dim]
    ctx.attrs["slice"] = dict(dim=dim, start=start, end=end, step=step, inner=None)
    if (start, length, step) == (0, n, 1):
        return tuple(sig)
    joint = _joint(F, sig[dim])
    if joint is not None and step == 1 and (start, end) in _piece_bounds(F, joint):
        k = _piece_bounds(F, joint).index((start, end))
        ctx.mark([sig[dim]], Role.LOCAL)
        ctx.attrs["joint"], ctx.attrs["slice"]["piece"] = joint, k
        sig[dim] = F.pieces(joint)[k]
        return tuple(sig)
    rows = _rows(F, sig[dim], start, end, step) if length else None
    if rows is None and length:
        k = _equal_pieces(ctx, x, dim, n)
        if k is not None:
            try:
                F.split_dim(sig[dim], (k, n // k))
            except FactorError:  # the pieces cut a factor the dim already has unevenly
                pass
            rows = _rows(F, sig[dim], start, end, step)
    if rows is None:  # a new factor; the input's dim stays whole
        ctx.mark([sig[dim]], Role.WHOLE)
        sig[dim] = (F.new(length),)
        return tuple(sig)
    outer, inner = rows
    if step == 1:
        ctx.mark([outer], Role.WHOLE)
        count = (end - start) // prod(F.size(a) for a in inner)
        sig[dim] = ((F.new(count),) if count > 1 else ()) + inner
    else:
        ctx.mark([inner], Role.WHOLE)
        sig[dim] = outer
    ctx.attrs["slice"]["inner"] = inner
    return tuple(sig)


@rule(aten.select.int)
def select(ctx: RuleCtx):
    sig = list(ctx.sig(ctx.arg(0)))
    dim = norm_dim(ctx.arg(1), len(sig))
    ctx.mark([sig[dim]], Role.WHOLE)
    del sig[dim]
    return tuple(sig)


@rule(aten.unbind, aten.chunk, aten.split, aten.split_with_sizes, aten.tensor_split)
def split(ctx: RuleCtx):
    sig = list(ctx.sig(ctx.arg(0)))
    pieces = ctx.out_val()
    target = ctx.node.target.overloadpacket
    dim = norm_dim(ctx.arg("dim", 0) if target is not aten.split_with_sizes
                   else ctx.arg(2, 0), len(sig))
    ctx.attrs["split_dim"] = dim
    if target is aten.unbind:
        ctx.mark([sig[dim]], Role.WHOLE)
        rest = sig[:dim] + sig[dim + 1:]
        return [tuple(rest) for _ in pieces]
    sizes = [int(p.shape[dim]) for p in pieces]
    n = ctx.F.dim_size(sig[dim])
    joint = _joint(ctx.F, sig[dim])
    if joint is not None and [s for s in sizes if s] == [b - a for a, b in _piece_bounds(ctx.F, joint)]:
        ctx.mark([sig[dim]], Role.LOCAL)  # the cut gives the pieces back
        ctx.attrs["joint"] = joint
        parts = iter(ctx.F.pieces(joint))
        return [tuple(sig[:dim] + [next(parts) if s else (ctx.F.new(0),)] + sig[dim + 1:])
                for s in sizes]
    if len(set(sizes)) == 1 and sizes[0] * len(sizes) == n:
        _, rest = _pieces(ctx, sig[dim], len(sizes))
        return [tuple(sig[:dim] + [rest] + sig[dim + 1:]) for _ in pieces]
    ctx.mark([sig[dim]], Role.WHOLE)
    return [tuple(sig[:dim] + [(ctx.F.new(s),)] + sig[dim + 1:]) for s in sizes]


@rule(aten.cat, aten.stack)
def cat(ctx: RuleCtx):
    tensors = ctx.arg(0)
    sigs = [ctx.sig(t) for t in tensors]
    stack = ctx.node.target.overloadpacket is aten.stack
    ndim = len(sigs[0]) + (1 if stack else 0)
    dim = norm_dim(ctx.arg(1, 0), ndim)
    shape = ctx.out_shape()
    if any(len(s) != len(sigs[0]) for s in sigs):
        raise UnsupportedOp("concatenation of tensors of different ranks")
    others = [i for i in range(len(sigs[0])) if stack or i != dim]
    out = list(sigs[0])
    for s in sigs[1:]:
        for i in others:
            ctx.F.unify(out[i], s[i])
    if stack:
        out.insert(dim, (ctx.F.new(len(sigs)),) if len(sigs) > 1 else ())
        ctx.mark([out[dim]], Role.WHOLE)
        return tuple(out)
    pieces = [s for s in sigs if ctx.F.dim_size(s[dim]) > 0]  # empty pieces add nothing
    if len(pieces) == 1:
        out[dim] = pieces[0][dim]
        return tuple(out)
    if len({ctx.F.dim_size(s[dim]) for s in pieces}) == 1:
        for s in pieces[1:]:
            ctx.F.unify(pieces[0][dim], s[dim])
        k = ctx.F.new(len(pieces))
        out[dim] = (k,) + pieces[0][dim]
        ctx.mark([(k,)], Role.WHOLE)
        return tuple(out)
    ctx.mark([s[dim] for s in sigs], Role.WHOLE)
    out[dim] = (ctx.F.join([s[dim] for s in pieces]),)
    ctx.attrs["joint"] = out[dim][0]
    return tuple(out)


@rule(operator.getitem)
def getitem(ctx: RuleCtx):
    src, i = ctx.node.args
    return ctx.sigs[src][i]
