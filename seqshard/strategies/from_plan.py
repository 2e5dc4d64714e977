"""A plan's names → strategies: plans speak of factor and node names (so they apply at any size);
codegen needs atoms and checked strategies."""

from __future__ import annotations

import torch.fx as fx

from seqshard.dims import DimAnalysis

from .layout import PlanError
from .plan import Plan
from .strategy import Strategy, plan_nodes, resolve, tensor_inputs

IDENTITY_LIKE = {"contiguous", "clone", "alias", "detach", "to", "_to_copy", "type_as",
                 "lift_fresh_copy"}
"""Ops that only cast or copy: a plan made where they don't appear still applies."""

__all__ = ["resolve_plan", "orders_of"]


def resolve_plan(dims: DimAnalysis, plan: Plan, sizes: tuple[int, ...]) -> dict[fx.Node, Strategy]:
    """Every plan node's strategy on a mesh of axis `sizes` (the plan's axes, in order)."""
    by_name = plan.by_name()
    axis_names = plan.axis_names
    out = {}
    for n in plan_nodes(dims):
        np_ = by_name.get(n.name)
        if np_ is None and _follows_its_input(dims, n, out):
            # a cast or copy that exists at one dtype or size and not another (`logits.float()`
            # is no node in float32): it keeps its input's splits
            (x,) = tensor_inputs(n, dims)
            out[n] = resolve(n, dims, out[x].splits, None, axis_names, tuple(sizes))
            continue
        if np_ is None:
            raise PlanError(f"the plan has no entry for node {n.name} ({dims.cap.module_path(n)}): "
                            "it was made for a different model (plans are per model, not per size)")
        splits = [None] * len(axis_names)
        for s in np_.splits:
            if s.axis not in axis_names:
                raise PlanError(f"{n.name}: split on axis {s.axis!r}, but the mesh axes are {axis_names}")
            atom = dims.factor(n, s.factor)
            if atom is None:
                raise PlanError(f"{n.name} ({dims.cap.module_path(n)}) has no factor {s.factor!r}; "
                                f"its factors: {[dims.F.label(a) for a in dims.iteration_atoms(n)]}")
            splits[axis_names.index(s.axis)] = atom
        splits, algorithm = _drop_unit_axes(dims, n, splits, np_.algorithm, sizes)
        out[n] = resolve(n, dims, tuple(splits), algorithm, axis_names, tuple(sizes))
    return out


def _drop_unit_axes(dims, n, splits, algorithm, sizes):
    """A mesh axis of size 1 splits nothing: a plan made for N ranks runs on one as the captured
    model, with no redistribution steps. Attention keeps the algorithm of the axes that remain."""
    kept = [a if size > 1 else None for a, size in zip(splits, sizes)]
    if algorithm not in (None, "local") and kept != list(splits):
        seq = dims.seq_atoms(n)
        axes = [i for i, a in enumerate(kept) if a in seq]
        if not axes:
            algorithm = "local"
        elif algorithm == "hybrid" and len(axes) == 1:  # ring on the outer axis, Ulysses inner
            outer = [i for i, a in enumerate(splits) if a in seq][0]
            algorithm = "ring" if axes[0] == outer else "ulysses"
    return kept, algorithm


def _follows_its_input(dims: DimAnalysis, n: fx.Node, known: dict) -> bool:
    packet = getattr(n.target, "overloadpacket", n.target)
    xs = tensor_inputs(n, dims)
    return (getattr(packet, "__name__", "") in IDENTITY_LIKE and len(xs) == 1 and xs[0] in known
            and isinstance(dims.sigs.get(n), tuple)
            and [dims.F.find(a) for d in dims.sigs[n] for a in dims.F.atoms_of(d)]
            == [dims.F.find(a) for d in dims.sigs[xs[0]] for a in dims.F.atoms_of(d)])


def orders_of(dims: DimAnalysis, plan: Plan) -> dict[int, str]:
    """atom → "zigzag" | "contig" for every atom whose factor name the plan orders."""
    named = dict(plan.orders)
    atoms = {dims.F.find(a) for sig in dims.sigs.values() if sig is not None
             for s in (sig if isinstance(sig, list) else [sig]) if s is not None
             for d in s for a in dims.F.atoms_of(d)}
    return {a: named[dims.F.label(a)] for a in atoms if dims.F.label(a) in named}
