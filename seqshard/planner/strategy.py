"""Strategies: what splitting a node's factors means for its inputs and its output.

A node's strategy splits, on each mesh axis, at most one atomic factor of its iteration space
(the factors of its inputs and outputs). From the node's factor roles (`seqshard.dims`) follow:

    every input holding the factor  → split on that axis, the others replicated on it
    the output holding the factor   → split on that axis
    a SUM factor (contracted)       → the output is a partial sum on that axis
    a SEQ factor (attention)        → needs a distributed attention algorithm
    a WHOLE factor                  → illegal: the op needs it whole

A *layout* says, per mesh axis, what a tensor is on it: an atom (split), `R` (replicated) or `P`
(partial sum). Moving between layouts is a list of steps (`redistribution`): all-reduce,
reduce-scatter, all-to-all, all-gather, local slice - priced by the planner, emitted by the passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from seqshard.dims import DimAnalysis, Role

R, P = "R", "P"
Layout = tuple  # per mesh axis: atom id (int) | "R" | "P"

SEQ_ALGORITHMS = ("ring", "allgather", "ulysses", "hybrid", "tokenring")


class PlanError(ValueError):
    """A plan asks for something a node cannot do; the message names the node and the fix."""


@dataclass(frozen=True)
class Strategy:
    splits: tuple                  # per mesh axis: atom id or None
    algorithm: str | None          # attention nodes only
    inputs: tuple                  # (input node, required layout) for every tensor input
    output: object                 # Layout, or a list of Layouts for multi-output nodes


def replicated(naxes: int) -> Layout:
    return (R,) * naxes


def tensor_inputs(node: fx.Node, dims: DimAnalysis) -> list[fx.Node]:
    return [x for x in node.all_input_nodes if isinstance(dims.sigs.get(x), tuple)]


def atoms_of(dims: DimAnalysis, sig) -> set[int]:
    return {dims.F.find(a) for d in sig for a in dims.F.atoms_of(d)}


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == torch.ops.aten.scaled_dot_product_attention.default


def resolve(node: fx.Node, dims: DimAnalysis, splits: tuple, algorithm: str | None,
            axis_names: tuple[str, ...]) -> Strategy:
    """The strategy of `node` when mesh axis i splits atom `splits[i]` (None: nothing)."""
    roles = dims.roles.get(node, {})
    space = set(dims.iteration_atoms(node))
    where = f"{node.name} ({dims.cap.module_path(node) or 'top'}: {dims.cap.source(node)})"
    for axis, a in zip(axis_names, splits):
        if a is None:
            continue
        label = dims.F.label(a)
        if a not in space:
            raise PlanError(f"{where} has no factor {label!r} to split on axis {axis!r}")
        role = roles.get(a, Role.LOCAL)
        if role == Role.WHOLE:
            why = dims.unsupported.get(node)
            raise PlanError(f"{where} needs factor {label!r} whole"
                            + (f" ({why}; it runs replicated)" if why else "")
                            + f"; it cannot be split on axis {axis!r} here - split another "
                            "factor or let this node be replicated")
        if role == Role.SEQ and algorithm not in SEQ_ALGORITHMS:
            raise PlanError(f"{where} splits the attention sequence {label!r}: choose an "
                            f"algorithm from {SEQ_ALGORITHMS}, not {algorithm!r}")
    if is_attention(node):
        att = dims.attrs[node]["attention"]
        seq = {dims.F.find(a) for d in (att["seq_k"],) for a in dims.F.atoms_of(d)}
        seq_split = [a for a in splits if a in seq]
        if algorithm in SEQ_ALGORITHMS and not seq_split:
            raise PlanError(f"{where}: algorithm {algorithm!r} needs the sequence split")
        if algorithm == "hybrid" and len(seq_split) != 2:
            raise PlanError(f"{where}: the hybrid algorithm splits the sequence over two mesh "
                            "axes (ring on the outer, Ulysses on the inner)")
        if algorithm is None:
            algorithm = "local"
        if seq_split and atoms_of(dims, (att["seq_q"],)) != seq:
            raise PlanError(f"{where}: distributed attention needs self-attention (queries and "
                            "keys from the same sequence)")
    elif algorithm not in (None, "local"):
        raise PlanError(f"{where} is not attention; it takes no algorithm ({algorithm!r})")

    inputs = []
    for x in tensor_inputs(node, dims):
        have = atoms_of(dims, dims.sigs[x])
        inputs.append((x, tuple(a if a is not None and a in have else R for a in splits)))

    def out_layout(sig):
        have = atoms_of(dims, sig)
        return tuple(R if a is None else a if a in have else
                     (P if roles.get(a) == Role.SUM else R) for a in splits)

    sig = dims.sigs[node]
    output = [out_layout(s) if s is not None else None for s in sig] if isinstance(sig, list) \
        else out_layout(sig)
    return Strategy(tuple(splits), algorithm if is_attention(node) else None, tuple(inputs), output)


# ------------------------------------------------------------------------------ redistribution
@dataclass(frozen=True)
class Step:
    """One collective (or local slice) on one mesh axis."""

    kind: str        # "all_reduce" | "reduce_scatter" | "all_to_all" | "all_gather" | "slice"
    axis: int
    src: int | None  # atom gathered (all_gather, all_to_all)
    dst: int | None  # atom scattered (reduce_scatter, all_to_all, slice)


def redistribution(cur: Layout, req: Layout) -> list[Step]:
    """Steps from layout `cur` to layout `req`: reductions first, then all-to-alls, gathers from
    the innermost axis out, slices from the outermost axis in (so a factor split over several
    axes is always split outer-axis-first)."""
    red, a2a, gather, sl = [], [], [], []
    for i, (c, r) in enumerate(zip(cur, req)):
        if c == r:
            continue
        if r == P:
            raise PlanError(f"cannot make a partial sum from layout {c!r} on axis {i}")
        if c == P:
            red.append(Step("all_reduce" if r == R else "reduce_scatter", i, None, None if r == R else r))
        elif c == R:
            sl.append(Step("slice", i, None, r))
        elif r == R:
            gather.append(Step("all_gather", i, c, None))
        else:
            a2a.append(Step("all_to_all", i, c, r))
    return red + a2a + gather[::-1] + sl
