"""Passes: captured graph + plan → this rank's graph.

    strategies = resolve_plan(dims, plan)             # names → factors; check every node's choice
    program = Sharder(dims, strategies, mesh, orders).run()
        shard inputs and positions   (local slices of the global inputs; arange → local positions)
        localize views               (sizes from factor sizes: local_ops.view)
        insert redistributions       (all-to-all / all-gather / reduce-scatter / all-reduce)
        replace attention            (the plan's distributed algorithm)
        seed replicated outputs once (scale_grad) and sum parameter gradients (sum_grad)

Each step is one small function; `shard.py` says how they meet.
"""

from __future__ import annotations

import torch.fx as fx

from seqshard.dims import DimAnalysis
from seqshard.planner.plan import Plan
from seqshard.planner.strategy import PlanError, Strategy, resolve

from .mesh import MeshInfo
from .shard import Program, Sharder

__all__ = ["apply_plan", "resolve_plan", "MeshInfo", "Program", "PlanError"]


def plan_nodes(dims: DimAnalysis) -> list[fx.Node]:
    """The nodes a plan decides: every op except tuple indexing (it follows its producer)."""
    import operator

    return [n for n in dims.cap.nodes() if n.op == "call_function" and n.target is not operator.getitem]


def resolve_plan(dims: DimAnalysis, plan: Plan) -> dict[fx.Node, Strategy]:
    by_name = plan.by_name()
    axis_names = plan.axis_names
    out = {}
    for n in plan_nodes(dims):
        np_ = by_name.get(n.name)
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
        out[n] = resolve(n, dims, tuple(splits), np_.algorithm, axis_names)
    return out


def orders_of(dims: DimAnalysis, plan: Plan) -> dict[int, str]:
    named = dict(plan.orders)
    atoms = {dims.F.find(a) for sig in dims.sigs.values() if sig is not None
             for s in (sig if isinstance(sig, list) else [sig]) if s is not None
             for d in s for a in dims.F.atoms_of(d)}
    return {a: named[dims.F.label(a)] for a in atoms if dims.F.label(a) in named}


def apply_plan(dims: DimAnalysis, plan: Plan, mesh: MeshInfo) -> Program:
    if tuple(plan.axis_names) != tuple(mesh.names):
        raise PlanError(f"the plan was made for mesh axes {plan.axis_names}, this mesh has "
                        f"{mesh.names}: pass mesh=init_device_mesh(device, sizes, "
                        f"mesh_dim_names={plan.axis_names})")
    strategies = resolve_plan(dims, plan)
    return Sharder(dims, strategies, mesh, orders_of(dims, plan)).run()
