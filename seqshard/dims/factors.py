"""Named dimension factors: every dim of every tensor is a product of factors, outermost first.

A *factor* is an integer id in a `Factors` table. Factors are found by unification, the way a type
checker finds types: every input, parameter and created tensor starts with a fresh factor per
dim, and op rules state which dims are the same (`unify`). Two facts make this work on real
models:

- union: `q`'s sequence dim and `cos`'s first dim are the same factor because `q * cos`
  broadcasts them together;
- refinement: a view that splits a dim splits its factor. `linear(x, Wqkv)` makes one factor of
  size 3·h·e; `view(n, l, 3, h, e)` refines it into three factors, and the weight's rows are now
  known to be `(3, h, e)` too, so splitting `h` slices the right rows.

Factors are never matched by size, so the analysis gives the same factors (and names) for the
same model at any input size: a plan written in factor names is portable.

Size-1 factors are allowed (a batch of one keeps its `b`), and are skipped when aligning dims.

A *joint* factor is a concatenation of dims of unequal sizes (`cat([text, video], 1)`): its
pieces are recorded (`pieces`), and a cut at the pieces' bounds gives the pieces back. Split,
a joint factor is split piece by piece: each rank holds its share of every piece, in piece
order (`cat(text_r, video_r)`), the piece's share being what splitting its `piece_atom` gives.
Refining a joint factor (a view that cuts it) drops that meaning: its parts are plain factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import sympy

Dim = tuple[int, ...]   # factor ids, outermost first; () is a dim of size 1
Sig = tuple[Dim, ...]   # one tensor


class FactorError(ValueError):
    """Two dims that an op rule says are the same cannot be aligned factor by factor."""


@dataclass
class _Entry:
    size: int
    parent: int
    expand: Dim | None = None  # refinement into sub-factors, outermost first
    name: str | None = None
    rank: int = 99            # naming priority: lower wins (user names are 0)


class Factors:
    """A union-find over factors, with refinement and names."""

    def __init__(self):
        self._e: list[_Entry] = []
        self._pieces: dict[int, tuple[Dim, ...]] = {}  # root of a joint factor → its pieces

    # ----------------------------------------------------------------------------- building
    def new(self, size: int, name: str | None = None, rank: int = 99) -> int:
        if size < 0:  # size 0: an empty dim (`q[..., rotary_dim:]` with rotary_dim = head_dim)
            raise FactorError(f"a factor must have size >= 0, got {size}")
        fid = len(self._e)
        self._e.append(_Entry(int(size), fid, None, name, rank if name else 99))
        return fid

    def join(self, pieces: list[Dim]) -> int:
        """A new joint factor: the concatenation of the dims `pieces`, in order."""
        f = self.new(sum(self.dim_size(p) for p in pieces))
        self._pieces[f] = tuple(tuple(p) for p in pieces)
        return f

    def pieces(self, f: int) -> tuple[Dim, ...] | None:
        """The dims a joint atom concatenates, in order; None for any other factor."""
        f = self.find(f)
        return self._pieces.get(f) if self._e[f].expand is None else None

    def piece_atom(self, piece: Dim) -> int | None:
        """The atom that splits a piece of a joint factor: its largest atom (the outermost of
        equal ones; the least padding); None for a piece without atoms."""
        atoms = [self.find(a) for a in self.atoms_of(piece)]
        return max(atoms, key=self.size) if atoms else None

    def fresh_sig(self, shape) -> Sig:
        return tuple((self.new(int(n)),) for n in shape)

    def find(self, f: int) -> int:
        e = self._e
        while e[f].parent != f:
            e[f].parent = e[e[f].parent].parent
            f = e[f].parent
        return f

    def size(self, f: int) -> int:
        return self._e[self.find(f)].size

    def dim_size(self, dim: Dim) -> int:
        return prod(self.size(f) for f in dim)

    def atoms(self, f: int) -> Dim:
        """The atomic factors `f` is made of (itself, unless refined)."""
        f = self.find(f)
        ex = self._e[f].expand
        if ex is None:
            return (f,)
        return tuple(a for g in ex for a in self.atoms(g))

    def atoms_of(self, dim: Dim) -> Dim:
        return tuple(a for f in dim for a in self.atoms(f))

    def atoms_sig(self, sig: Sig) -> Sig:
        return tuple(self.atoms_of(d) for d in sig)

    # ----------------------------------------------------------------------------- names
    def name(self, f: int) -> str | None:
        return self._e[self.find(f)].name

    def set_name(self, f: int, name: str, rank: int) -> None:
        """Name `f` unless it already has a name of equal or higher priority (lower rank)."""
        e = self._e[self.find(f)]
        if e.name is None or rank < e.rank:
            e.name, e.rank = name, rank

    def label(self, f: int) -> str:
        f = self.find(f)
        name = self._e[f].name
        if name is not None:
            return name
        ex = self._e[f].expand
        if ex is not None:
            return "·".join(self.label(g) for g in ex)
        return f"?{f}"

    def dim_str(self, dim: Dim) -> str:
        return "(" + ", ".join(self.label(f) for f in dim) + (",)" if len(dim) == 1 else ")")

    def sig_str(self, sig: Sig) -> str:
        return "(" + ", ".join(self.dim_str(d) for d in sig) + ")"

    def symbol(self, f: int) -> sympy.Symbol:
        """A sympy symbol for an atomic factor, named by its label."""
        return sympy.Symbol(self.label(f), positive=True, integer=True)

    # ----------------------------------------------------------------------------- unification
    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ea, eb = self._e[a], self._e[b]
        if ea.size != eb.size:
            raise FactorError(f"cannot unify factors of sizes {ea.size} and {eb.size}")
        if ea.expand is None and eb.expand is not None:
            a, b, ea, eb = b, a, eb, ea
        # a keeps its refinement (if any); b's refinement must agree with it
        eb.parent = a
        self._join_pieces(a, b)
        if eb.name is not None and (ea.name is None or eb.rank < ea.rank):
            ea.name, ea.rank = eb.name, eb.rank
        if eb.expand is not None:
            self.unify(ea.expand, eb.expand)
        return a

    def _join_pieces(self, a: int, b: int) -> None:
        """Root `a` absorbed `b`: one index space. Two joints cut alike unify piece by piece;
        cut differently, or refined, the factor is no longer a joint."""
        pa, pb = self._pieces.get(a), self._pieces.pop(b, None)
        if pb is None:
            return
        if pa is None and self._e[a].expand is None:
            self._pieces[a] = pb
        elif pa is not None and [self.dim_size(p) for p in pa] == [self.dim_size(p) for p in pb]:
            for x, y in zip(pa, pb):
                self.unify(x, y)
        else:
            self._pieces.pop(a, None)

    def refine(self, f: int, sizes: tuple[int, ...]) -> Dim:
        """Split atomic factor `f` into fresh sub-factors of the given sizes (outermost first)."""
        f = self.find(f)
        e = self._e[f]
        assert e.expand is None, "refine an atomic factor"
        if prod(sizes) != e.size:
            raise FactorError(f"cannot split a factor of size {e.size} into {sizes}")
        if len(sizes) == 1:
            return (f,)
        self._pieces.pop(f, None)  # a cut joint is a plain product of its parts
        e.expand = tuple(self.new(s) for s in sizes)
        return e.expand

    def unify(self, a: Dim, b: Dim) -> None:
        """State that dims `a` and `b` are the same: align their atomic factors by size,
        refining a factor where the other side splits it. Size-1 factors are skipped."""
        ta, tb = [self.find(f) for f in a], [self.find(f) for f in b]
        if len(ta) != len(tb):
            ta = [f for f in ta if self.size(f) > 1]
            tb = [f for f in tb if self.size(f) > 1]
        if len(ta) == len(tb) and all(self.size(x) == self.size(y) for x, y in zip(ta, tb)):
            for x, y in zip(ta, tb):  # same structure: join whole factors (names, refinements)
                self.union(x, y)
            return
        xa = [f for f in self.atoms_of(a) if self.size(f) > 1]
        xb = [f for f in self.atoms_of(b) if self.size(f) > 1]
        if prod(self.size(f) for f in xa) != prod(self.size(f) for f in xb):
            raise FactorError(f"cannot unify dims {self.dim_str(a)} and {self.dim_str(b)}: sizes differ")
        i = j = 0
        while i < len(xa):
            fa, fb = xa[i], xb[j]
            sa, sb = self.size(fa), self.size(fb)
            if sa == sb:
                self.union(fa, fb)
                i += 1
                j += 1
                continue
            # the smaller side's run of factors must end exactly where the larger factor ends
            big, big_list, small_list, k = (fa, xa, xb, j) if sa > sb else (fb, xb, xa, i)
            run, total = [], 1
            while total < self.size(big):
                total *= self.size(small_list[k])
                run.append(small_list[k])
                k += 1
            if total != self.size(big):
                raise FactorError(
                    f"cannot unify dims {self.dim_str(a)} and {self.dim_str(b)}: "
                    "their factors cross (sizes do not nest)")
            pieces = self.refine(big, tuple(self.size(f) for f in run))
            for p, r in zip(pieces, run):
                self.union(p, r)
            if sa > sb:
                i, j = i + 1, k
            else:
                i, j = k, j + 1

    def split_dim(self, dim: Dim, sizes: tuple[int, ...]) -> tuple[Dim, ...]:
        """Cut `dim` into consecutive dims of the given sizes (a view's output), refining factors
        that a boundary falls inside. Size-1 factors go with the dim after them; a size-1 output
        dim takes a size-1 factor if one is next, else is ()."""
        atoms = [self.find(f) for f in dim]  # top-level factors; opened only where cut
        out: list[Dim] = []
        k = 0
        for n in sizes:
            if n == 1:
                if k < len(atoms) and self.size(atoms[k]) == 1:
                    out.append((atoms[k],))
                    k += 1
                else:
                    out.append(())
                continue
            run, total = [], 1
            while total < n:
                if k >= len(atoms):
                    raise FactorError(f"view sizes {sizes} do not match dim {self.dim_str(dim)}")
                f = atoms[k]
                s = self.size(f)
                if total * s <= n:
                    run.append(f)
                    total *= s
                    k += 1
                elif self._e[f].expand is not None:  # a boundary inside a composite: open it
                    atoms[k:k + 1] = [self.find(g) for g in self._e[f].expand]
                else:  # a boundary inside an atom: split it into (needed, rest)
                    need = n // total
                    if total * need != n or s % need:
                        raise FactorError(f"view sizes {sizes} cut a factor of size {s} unevenly")
                    head, rest = self.refine(f, (need, s // need))
                    atoms[k:k + 1] = [head, rest]
            out.append(tuple(run))
        while k < len(atoms) and self.size(atoms[k]) == 1:  # trailing size-1 factors
            k += 1
        if k != len(atoms):
            raise FactorError(f"view sizes {sizes} do not cover dim {self.dim_str(dim)}")
        return tuple(out)
