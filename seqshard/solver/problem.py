"""The problem the CP-SAT model is built from: template nodes with their candidate strategies and
costs, clustered tensors with the layouts their consumers need, and the redistribution prices.
`model.py` states the formulation over these sets."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from math import prod

import torch.fx as fx

from seqshard.costmodel import collectives as coll
from seqshard.costmodel import compute as comp
from seqshard.dims import DimAnalysis
from seqshard.strategies import Cost, Costs, R, candidates, plan_nodes, spec_for, whole_somewhere
from seqshard.strategies.costs import SAVES_ALL, SAVES_FIRST, op_packet

from .clusters import cluster_layers

__all__ = ["Problem", "Tensor", "build_problem"]

@dataclass
class Tensor:
    """A clustered tensor: an output of a template node and the consumers that read it."""

    node: fx.Node                  # a representative (for sizes)
    producer: fx.Node              # template producer
    index: int | None              # output index of a multi-output producer
    consumers: tuple               # ((template consumer, position among its tensor inputs), ...)
    mult: int = 0
    layouts: list = field(default_factory=list)   # distinct layouts consumers need
    keeps: bool = False            # some consumer keeps it for backward


@dataclass
class Problem:
    dims: DimAnalysis
    costs: Costs
    mesh: tuple[tuple[str, int], ...]
    strategies: dict = field(default_factory=dict)   # template node → [Strategy]
    node_cost: dict = field(default_factory=dict)    # (template, i) → Cost (incl. input placeholders)
    mult: dict = field(default_factory=dict)         # template → count
    tensors: dict = field(default_factory=dict)      # key → Tensor
    need: dict = field(default_factory=dict)         # (key, consumer, j) → layout index
    move: dict = field(default_factory=dict)         # (key, i, l) → (seconds, bytes sent, kept bytes)
    template: dict = field(default_factory=dict)     # node → template
    static_bytes: float = 0.0
    static_s: float = 0.0


def _saved(dims: DimAnalysis) -> set[fx.Node]:
    """Tensors some consumer keeps for backward."""
    out = set()
    for n in dims.cap.nodes():
        if n.op != "call_function":
            continue
        packet = op_packet(n)
        tensors = [x for x in n.all_input_nodes if isinstance(dims.sigs.get(x), tuple)]
        if packet in SAVES_ALL:
            out.update(tensors)
        elif packet in SAVES_FIRST and tensors:
            out.add(tensors[0])
    return out


def build_problem(dims: DimAnalysis, costs: Costs, mesh, overrides: dict | None,
                  model_state: str, progress=None) -> Problem:
    pb = Problem(dims, costs, tuple(mesh))
    nodes = plan_nodes(dims)
    pb.template = cluster_layers(dims, nodes, lambda m: spec_for(overrides, m) if overrides else None)
    saved = _saved(dims)
    for n in nodes:
        t = pb.template[n]
        pb.mult[t] = pb.mult.get(t, 0) + 1
    templates = [n for n in nodes if pb.template[n] is n]
    naxes = len(mesh)
    whole = whole_somewhere(dims)
    for k, n in enumerate(templates):
        spec = spec_for(overrides, dims.cap.module_path(n)) if overrides else None
        sts = candidates(dims, n, pb.mesh, spec, whole)
        pb.strategies[n] = sts
        for i, st in enumerate(sts):
            c = costs.node(n, st, saved=n in saved)
            # replicated producers (inputs, parameters, constants) cost only on this side
            for x, lay in st.inputs:
                if x.op in ("placeholder", "get_attr"):
                    t, sent = costs.edge(x, (R,) * naxes, lay)
                    c = Cost(c.compute_s, c.comm_s, c.redistribute_s + t, c.memory_bytes,
                             c.comm_bytes + sent, c.transient_bytes)
            pb.node_cost[(n, i)] = c
        if progress and k % 50 == 0:
            progress(f"strategies: {k + 1}/{len(templates)} nodes")
    # tensors between plan nodes, clustered by (producer template, output, consumers)
    readers: dict = {}
    for v in nodes:
        tensors = [x for x in v.all_input_nodes if isinstance(dims.sigs.get(x), tuple)]
        for k, x in enumerate(tensors):
            if x.op == "call_function":
                readers.setdefault(x, []).append((pb.template[v], k))
    for x, cons in readers.items():
        u, idx = (x.args[0], x.args[1]) if x.target is operator.getitem else (x, None)
        key = (pb.template[u], idx, tuple(sorted(set(cons), key=lambda c: (c[0].name, c[1]))))
        t = pb.tensors.setdefault(key, Tensor(x, pb.template[u], idx, key[2]))
        t.mult += 1
    for key, t in pb.tensors.items():
        t.keeps = costs.training and any(_keeps(v, k) for v, k in t.consumers)
        for v, k in t.consumers:
            for j, sv in enumerate(pb.strategies[v]):
                lay = sv.inputs[k][1]
                if lay not in t.layouts:
                    t.layouts.append(lay)
                pb.need[(key, v, j)] = t.layouts.index(lay)
        for i, su in enumerate(pb.strategies[t.producer]):
            src = su.output if t.index is None else su.output[t.index]
            for l, dst in enumerate(t.layouts):
                secs, sent = costs.edge(t.node, src, dst)
                kept = costs.bytes(t.node, dst) if (secs and t.keeps) else 0
                if secs or sent or kept:
                    pb.move[(key, i, l)] = (secs, sent, kept)
    n_params = sum(p.numel() for p in dims.cap.model.parameters())
    world = prod(n for _, n in mesh)
    if model_state == "replicated":
        state = comp.model_state(n_params, training=costs.training, param_bytes=costs.dtype_bytes)
        pb.static_bytes = state.total
        if costs.training and world > 1:  # gradients summed over every rank
            flat_link = costs.cluster.axis_link((world,), 0)
            pb.static_s = coll.all_reduce(n_params * costs.dtype_bytes, world, flat_link)
    elif model_state == "sharded":
        state = comp.model_state(n_params, training=costs.training, param_bytes=costs.dtype_bytes)
        pb.static_bytes = state.total / world
    else:
        raise ValueError(f"model_state must be 'replicated' or 'sharded', got {model_state!r}")
    return pb


def _keeps(v: fx.Node, k: int) -> bool:
    """Does consumer `v` keep its k-th tensor input for backward?"""
    packet = op_packet(v)
    return packet in SAVES_ALL or (packet in SAVES_FIRST and k == 0)
