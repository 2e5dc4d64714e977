"""A plan's names → strategies: plans speak of factor names and node keys (so they apply at any
size and dtype); codegen needs atoms and checked strategies.

A node's key says what it is without its FX name (`linear_3`, `to_5`: numbered over the whole
graph, so one extra cast renumbers every later node of its op):

    lm.model.layers.0.self_attn.q_proj/linear#0        the first linear of that module
    net.blocks.0.norm1/layer_norm#0>to#0               the first cast of that layer norm's output

Ops are counted within their module, and casts and copies (`IDENTITY_LIKE`, which a bf16 model
has and a float32 one lacks) by the node they copy, so they renumber nothing else. A cast the
plan lacks keeps its input's splits; an op the plan lacks is an error naming its module. A plan
entry without a key (written before keys existed, or by hand) matches by node name.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from seqshard.dims import DimAnalysis

from .layout import PlanError
from .plan import NodePlan, Plan
from .strategy import Strategy, plan_nodes, resolve, tensor_inputs

IDENTITY_LIKE = {"contiguous", "clone", "alias", "detach", "to", "_to_copy", "type_as",
                 "lift_fresh_copy"}
"""Ops that only cast or copy: a plan made where they don't appear still applies."""

__all__ = ["resolve_plan", "match_plan", "node_keys", "op_name", "orders_of"]


def op_name(n: fx.Node) -> str:
    """The op of a node as a plan writes it (`linear`, `to`, `scaled_dot_product_attention`)."""
    t = n.target
    return getattr(getattr(t, "overloadpacket", t), "__name__", str(t))


def node_keys(dims: DimAnalysis) -> dict[fx.Node, str]:
    """Every plan node's key (see the module docstring), in graph order."""
    keys: dict[fx.Node, str] = {}
    count: dict[str, int] = {}

    def key_of(x: fx.Node) -> str:
        if x in keys:
            return keys[x]
        if x.op == "call_function" and x.target is operator.getitem:
            return f"{key_of(x.args[0])}[{x.args[1]}]"
        return f"<{x.name}>"  # an input, parameter or constant: named by what it holds

    for n in plan_nodes(dims):
        op = op_name(n)
        xs = tensor_inputs(n, dims)
        stem = f"{key_of(xs[0])}>{op}" if op in IDENTITY_LIKE and xs else \
            f"{dims.cap.module_path(n)}/{op}"
        k = count.get(stem, 0)
        count[stem] = k + 1
        keys[n] = f"{stem}#{k}"
    return keys


def match_plan(dims: DimAnalysis, plan: Plan) -> dict[fx.Node, NodePlan]:
    """Each plan node of the graph → its plan entry: by key, or by node name for an entry without
    one (a plan written before keys existed, or by hand). A cast the plan lacks has none."""
    by_key = {np_.key: np_ for np_ in plan.nodes if np_.key}
    by_name = {np_.node: np_ for np_ in plan.nodes if not np_.key}
    out = {}
    for n, k in node_keys(dims).items():
        np_ = by_key.get(k) or by_name.get(n.name)
        if np_ is not None:
            out[n] = np_
    return out


def resolve_plan(dims: DimAnalysis, plan: Plan, sizes: tuple[int, ...]) -> dict[fx.Node, Strategy]:
    """Every plan node's strategy on a mesh of axis `sizes` (the plan's axes, in order)."""
    matched = match_plan(dims, plan)
    keys = node_keys(dims)
    axis_names = plan.axis_names
    out = {}
    for n in plan_nodes(dims):
        np_ = matched.get(n)
        if op_name(n) in IDENTITY_LIKE and (np_ is None or not _fits(dims, n, np_)):
            # a cast or copy that exists at one dtype or size and not another (`logits.float()`
            # is no node in float32): it keeps its input's splits; a cast of an input or a
            # parameter runs on the whole tensor
            xs = tensor_inputs(n, dims)
            if _follows_its_input(dims, n, out):
                out[n] = resolve(n, dims, out[xs[0]].splits, None, axis_names, tuple(sizes))
                continue
            if not any(x in out for x in xs):
                out[n] = resolve(n, dims, (None,) * len(axis_names), None, axis_names, tuple(sizes))
                continue
        if np_ is None:
            raise PlanError(f"the plan has no entry for node {n.name} ({_what(dims, plan, n, keys)}): "
                            "it was made for a different model (plans are per model, not per size "
                            "or dtype)")
        splits = [None] * len(axis_names)
        for s in np_.splits:
            if s.axis not in axis_names:
                raise PlanError(f"{n.name}: split on axis {s.axis!r}, but the mesh axes are {axis_names}")
            atom = dims.factor(n, s.factor)
            if atom is None:
                raise PlanError(f"{n.name} ({dims.cap.module_path(n)}) has no factor {s.factor!r}; "
                                f"its factors: {[dims.F.label(a) for a in dims.iteration_atoms(n)]}"
                                f" (the plan's entry: {np_.node}, {np_.key or np_.op})")
            splits[axis_names.index(s.axis)] = atom
        splits, algorithm = _drop_unit_axes(dims, n, splits, np_.algorithm, sizes)
        out[n] = resolve(n, dims, tuple(splits), algorithm, axis_names, tuple(sizes))
    return out


def _what(dims: DimAnalysis, plan: Plan, n: fx.Node, keys: dict) -> str:
    """`linear number 3 of module 'layers.0.mlp', which has 3 here and 2 in the plan`."""
    stem, _, k = keys[n].rpartition("#")
    if op_name(n) in IDENTITY_LIKE:
        return f"{keys[n]}: a copy the plan lacks, and its input's splits are not its own"
    module = dims.cap.module_path(n)
    here = sum(1 for key in keys.values() if key.rpartition("#")[0] == stem)
    planned = sum(1 for np_ in plan.nodes if (np_.module, np_.op) == (module, op_name(n)))
    return (f"{op_name(n)} number {int(k) + 1} of module {module or 'top'!r}, which has {here} "
            f"here and {planned} in the plan")


def _fits(dims: DimAnalysis, n: fx.Node, np_: NodePlan) -> bool:
    return all(dims.factor(n, s.factor) is not None for s in np_.splits)


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
    xs = tensor_inputs(n, dims)
    return (op_name(n) in IDENTITY_LIKE and len(xs) == 1 and xs[0] in known
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
