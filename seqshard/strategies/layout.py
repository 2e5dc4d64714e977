"""Layouts: what a tensor is on each mesh axis, and the steps that move it between layouts.

A *placement* says what one mesh axis does to a tensor, as DTensor's placements do, but in
factors rather than tensor dims:

    Shard(a)     the axis splits atomic factor `a` (wherever it sits in the tensor's dims)
    R            replicated on the axis
    P            a partial sum: the axis' ranks hold addends of the value

A *layout* is one placement per mesh axis, outermost first: `(Shard(s), R)` on a 2-D mesh.
`redistribution(src, dst)` lists the collectives (or local slices) from one layout to another;
the solver prices them (`strategies.costs`) and codegen emits them (`codegen.sharder`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Shard", "Replicate", "Partial", "R", "P", "Placement", "Layout", "replicated",
           "split_axes", "sharded_atoms", "Step", "redistribution", "PlanError"]


class PlanError(ValueError):
    """A plan asks for something a node cannot do; the message names the node and the fix."""


@dataclass(frozen=True)
class Shard:
    """The mesh axis splits atomic factor `atom`."""

    atom: int

    def __str__(self) -> str:
        return f"S({self.atom})"


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """A partial sum: the value is the sum over the axis' ranks."""

    def __str__(self) -> str:
        return "P"


R, P = Replicate(), Partial()
Placement = Shard | Replicate | Partial
Layout = tuple  # tuple[Placement, ...], one per mesh axis, outermost first


def replicated(naxes: int) -> Layout:
    return (R,) * naxes


def split_axes(layout: Layout, atom: int) -> list[int]:
    """The mesh axes that split `atom` in `layout`, outermost first."""
    return [i for i, p in enumerate(layout) if isinstance(p, Shard) and p.atom == atom]


def sharded_atoms(layout: Layout) -> set[int]:
    return {p.atom for p in layout if isinstance(p, Shard)}


@dataclass(frozen=True)
class Step:
    """One collective (or local slice) on one mesh axis."""

    kind: str        # "all_reduce" | "reduce_scatter" | "all_to_all" | "all_gather" | "slice"
    axis: int
    src: int | None  # atom gathered (all_gather, all_to_all)
    dst: int | None  # atom scattered (reduce_scatter, all_to_all, slice)

    def after(self, layout: Layout) -> Layout:
        """The layout once this step has run."""
        new = list(layout)
        new[self.axis] = R if self.kind in ("all_gather", "all_reduce") else Shard(self.dst)
        return tuple(new)


def redistribution(cur: Layout, req: Layout) -> list[Step]:
    """Steps from layout `cur` to layout `req`: reductions first, then all-to-alls, gathers from
    the innermost axis out, slices from the outermost axis in (so a factor split over several
    axes is always split outer-axis-first)."""
    red, a2a, gather, sl = [], [], [], []
    for i, (c, r) in enumerate(zip(cur, req)):
        if c == r:
            continue
        if r == P:
            raise PlanError(f"cannot make a partial sum from layout {c} on axis {i}")
        if c == P:
            red.append(Step("all_reduce", i, None, None) if r == R else
                       Step("reduce_scatter", i, None, r.atom))
        elif c == R:
            sl.append(Step("slice", i, None, r.atom))
        elif r == R:
            gather.append(Step("all_gather", i, c.atom, None))
        else:
            a2a.append(Step("all_to_all", i, c.atom, r.atom))
    return red + a2a + gather[::-1] + sl
