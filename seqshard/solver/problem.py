"""The problem the CP-SAT model is built from: template nodes with their candidate strategies and
costs, clustered tensors with the layouts their consumers need, the redistribution prices, and
the layer classes with what recomputing one costs (forward seconds) and keeps (its inputs).
`model.py` states the formulation over these sets."""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
from dataclasses import dataclass, field
from math import prod

import torch
import torch.fx as fx

from seqshard.costmodel import collectives as coll
from seqshard.costmodel import compute as comp
from seqshard.dims import DimAnalysis
from seqshard.strategies import (Cost, Costs, R, candidates, parse_spec, plan_nodes, spec_for,
                                 whole_somewhere)
from seqshard.strategies.costs import SAVES_ALL, SAVES_FIRST, op_packet

from .clusters import cluster_layers, layer_classes, layer_of

__all__ = ["Problem", "Tensor", "LayerClass", "build_problem", "loss_regions", "CHUNK_BYTES"]

aten = torch.ops.aten

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
    cls: str | None = None         # the layer class of its consumers (all in one), else None


@dataclass
class LayerClass:
    """Identical layers, solved once (`clusters.layer_classes`), and what recomputing them means:
    each keeps only its inputs, and runs its forward again in backward."""

    name: str                      # the template layer's module path ("layers.0")
    layers: tuple[str, ...]        # every layer it stands for, in graph order (itself first)
    nodes: list                    # its template nodes
    forced: bool = False           # an override says `recompute` (`chunk` for a region)
    kind: str = "layer"            # "layer": recomputed whole; "chunk": a region (the LM head
    #                                and its loss) run in chunks of tokens, each recomputed
    label: str = ""                # for people: "lm_head + cross_entropy_loss"
    chunks: int | None = None      # a chunk count an override forces (else from CHUNK_BYTES)
    inputs: dict = field(default_factory=dict)
    """(template producer, output index) → (count, representative tensor): the distinct tensors
    made outside a layer and read inside it, over every layer of the class (a tensor read by
    several layers counts once). Parameters and user inputs are held anyway and not counted."""


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
    host_bytes: float = 0.0                          # per GPU, in host memory (model_state offload)
    # recompute (training only; empty otherwise)
    classes: dict = field(default_factory=dict)      # class name → LayerClass
    node_class: dict = field(default_factory=dict)   # template → the class it lies in
    kept_by: dict = field(default_factory=dict)      # template → {class | None: members}: the
    #                class whose consumers keep a member's output (None: kept whatever recomputes)
    saving_class: dict = field(default_factory=dict)  # node → class keeping its output, or None
    forward: dict = field(default_factory=dict)      # (template, i) → Cost of its forward alone
    move_forward: dict = field(default_factory=dict)  # (key, i, l) → forward seconds of the move
    layer_inputs: dict = field(default_factory=dict)  # unit → [(template, index, tensor)]
    unit: dict = field(default_factory=dict)         # node → its layer path or region name
    recompute_allowed: bool = True                   # False: only forced classes recompute


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
                  model_state: str, progress=None, *, recompute: bool = True) -> Problem:
    """The sets and prices of the CP-SAT model. recompute: whether the solver may recompute
    layers (False: only those an override forces, as before memory plans existed)."""
    pb = Problem(dims, costs, tuple(mesh), recompute_allowed=recompute)
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
    if costs.training:
        _add_layer_classes(pb, nodes, templates, saved, overrides)
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
    elif model_state == "offload":  # replicated, but AdamW's state and master weights on the host
        state = comp.model_state(n_params, training=costs.training, param_bytes=costs.dtype_bytes)
        pb.static_bytes = state.params + state.grads
        pb.host_bytes = state.optimizer + state.grads  # the gradients land in host memory too
        if costs.training:
            pb.static_s = comp.offload_step(n_params, costs.gpu, param_bytes=costs.dtype_bytes)
            if world > 1:
                flat_link = costs.cluster.axis_link((world,), 0)
                pb.static_s += coll.all_reduce(n_params * costs.dtype_bytes, world, flat_link)
    else:
        raise ValueError(f"model_state must be 'replicated', 'sharded' or 'offload', got "
                         f"{model_state!r}")
    return pb


CHUNK_BYTES = 2**30
"""A chunked region runs in chunks whose largest kept tensor is at most this many bytes (1 GiB of
fp32 logits: 2K tokens of a 128K vocabulary); its working set is a few such tensors."""

_CHAIN = {aten.to.dtype, aten._to_copy.default, aten.flatten.using_ints, aten.reshape.default,
          aten.view.default, aten._unsafe_view.default}


def loss_regions(dims: DimAnalysis) -> list[tuple[fx.Node, list[fx.Node]]]:
    """LM head + loss regions that can run in chunks of tokens: a `linear` outside any layer
    whose output reaches a `cross_entropy_loss` (mean or sum; no class weights, no label
    smoothing) through casts and reshapes alone, each read once, with logits [tokens, classes]
    and labels [tokens]. Returns (loss node, the region's nodes in order)."""
    out = []
    for ce in dims.cap.nodes():
        if ce.op != "call_function" or ce.target is not aten.cross_entropy_loss.default:
            continue
        args = list(ce.args) + [None, 1, -100, 0.0][len(ce.args) - 2:]
        weight, reduction, _, smoothing = (ce.kwargs.get(k, a) for k, a in zip(
            ("weight", "reduction", "ignore_index", "label_smoothing"), args[2:6]))
        logits, labels = ce.args[0], ce.args[1]
        if weight is not None or smoothing or reduction not in (1, 2) or \
                logits.meta["val"].dim() != 2 or labels.meta["val"].dim() != 1:
            continue
        chain, x = [], logits
        while x.op == "call_function" and x.target in _CHAIN and len(x.users) == 1:
            chain.append(x)
            x = x.args[0]
        if x.op == "call_function" and x.target is aten.linear.default and len(x.users) == 1 \
                and layer_of(dims.cap.module_path(x)) is None:
            out.append((ce, [x] + chain[::-1] + [ce]))
    return out


def _add_layer_classes(pb: Problem, nodes, templates, saved, overrides) -> None:
    """Layer classes and chunked regions, and for both: each template's forward cost (run again
    in backward), which class keeps each node's output and each tensor's redistributed copy,
    and the tensors entering each unit (a layer, or a region)."""
    dims, costs = pb.dims, pb.costs
    module = dims.cap.module_path
    for name, layers in layer_classes(dims, pb.template).items():
        spec = spec_for(overrides, name) if overrides else None
        pb.classes[name] = LayerClass(name, tuple(layers), [],
                                      forced=bool(spec and spec.recompute))
    for pattern, text in (overrides or {}).items():
        if parse_spec(text).recompute and not any(
                fnmatch.fnmatchcase(layer, pattern) for c in pb.classes.values() for layer in c.layers):
            raise ValueError(f"override {pattern!r}: {text!r} asks to recompute, but the pattern "
                             "matches no layer (a module path ending in an index, like 'layers.3'"
                             f"); the layers are {_some_layers(pb)}")
    unit = {}  # node (tuple indexing too) → the layer or region it lies in
    for n in dims.cap.nodes():
        layer = layer_of(module(n))
        if layer is not None:
            unit[n] = layer
    for ce, region in loss_regions(dims):
        spec = spec_for(overrides, module(region[0])) if overrides else None
        label = f"{module(region[0]) or region[0].name} + {ce.name}"
        pb.classes[ce.name] = LayerClass(ce.name, (ce.name,), [], forced=bool(spec and spec.chunk is not None),
                                         kind="chunk", label=label,
                                         chunks=spec.chunk if spec and spec.chunk else None)
        for n in region:
            unit[n] = ce.name
    heads = [dims.cap.module_path(region[0]) for _, region in loss_regions(dims)]
    for pattern, text in (overrides or {}).items():
        if parse_spec(text).chunk is not None and not any(fnmatch.fnmatchcase(m, pattern)
                                                          for m in heads):
            raise ValueError(f"override {pattern!r}: {text!r} asks to chunk, but the pattern "
                             "matches no LM head whose logits feed a cross-entropy through "
                             f"casts and reshapes alone; such heads here: {heads or 'none'}")
    if not pb.classes:
        return
    class_of_unit = {layer: c for c, lc in pb.classes.items() for layer in lc.layers}
    pb.unit = unit
    forward = dataclasses.replace(costs, training=False)
    naxes = len(pb.mesh)
    for n in templates:
        c = class_of_unit.get(unit.get(n))
        if c is None:
            continue
        pb.node_class[n] = c
        pb.classes[c].nodes.append(n)
        for i, st in enumerate(pb.strategies[n]):
            f = forward.node(n, st, saved=False)
            for x, lay in st.inputs:  # a parameter sliced to its shard is sliced again
                if x.op in ("placeholder", "get_attr"):
                    f = Cost(f.compute_s, f.comm_s, f.redistribute_s + forward.edge(x, (R,) * naxes, lay)[0])
            pb.forward[(n, i)] = f
    cls_of = lambda v: pb.node_class.get(pb.template[v])  # noqa: E731 - the class a node lies in
    for key, t in pb.tensors.items():
        owners = {pb.node_class.get(v) for v, _ in t.consumers}
        t.cls = owners.pop() if len(owners) == 1 else None
    for key, i, l in pb.move:  # a redistribution is emitted in its consumers' unit
        t = pb.tensors[key]
        if t.cls is not None:
            su = pb.strategies[key[0]][i]
            src = su.output if t.index is None else su.output[t.index]
            pb.move_forward[(key, i, l)] = forward.edge(t.node, src, t.layouts[l])[0]
    # which class's consumers keep each node's output
    keepers: dict = {}
    for v in nodes:
        for k, x in enumerate(x for x in v.all_input_nodes if isinstance(dims.sigs.get(x), tuple)):
            if _keeps(v, k):
                keepers.setdefault(x, set()).add(cls_of(v))
    for x in nodes:
        owners = keepers.get(x, {None})
        c = next(iter(owners)) if len(owners) == 1 and x in saved else None
        pb.saving_class[x] = c
        counts = pb.kept_by.setdefault(pb.template[x], {})
        counts[c] = counts.get(c, 0) + 1
    # the tensors entering each unit from outside it (made by an op, not a parameter or input)
    seen: dict = {}
    for v in nodes:
        here = unit.get(v)
        c = cls_of(v)
        if c is None:
            continue
        for x in v.all_input_nodes:
            if x.op != "call_function" or not isinstance(dims.sigs.get(x), tuple) or \
                    unit.get(x) == here:
                continue
            if (c, x) in seen:
                continue
            seen[(c, x)] = True
            u, idx = (x.args[0], x.args[1]) if x.target is operator.getitem else (x, None)
            pb.layer_inputs.setdefault(here, []).append((pb.template[u], idx, x))
            count, rep = pb.classes[c].inputs.get((pb.template[u], idx), (0, x))
            pb.classes[c].inputs[(pb.template[u], idx)] = (count + 1, rep)


def _some_layers(pb: Problem) -> str:
    layers = [layer for c in pb.classes.values() for layer in c.layers]
    return ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else "") if layers else "none"


def _keeps(v: fx.Node, k: int) -> bool:
    """Does consumer `v` keep its k-th tensor input for backward?"""
    packet = op_packet(v)
    return packet in SAVES_ALL or (packet in SAVES_FIRST and k == 0)
