"""The problem the CP-SAT model is built from: template nodes with their candidate strategies and
costs, clustered tensors with the layouts their consumers need, the redistribution prices, and
the layer classes with what recomputing one costs (forward seconds) and keeps (its inputs), and
the token-wise regions inside layers that may run in chunks of tokens (`token_regions`: modules;
`token_chains`: chains of ops across modules, between attention and the views to heads).
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
from seqshard.strategies.costs import SAVES_ALL, SAVES_FIRST, VIEWS, components, op_packet
from seqshard.strategies.strategy import is_attention

from .clusters import cluster_layers, layer_classes, layer_of

__all__ = ["Problem", "Tensor", "LayerClass", "Region", "TokenRegion", "StateComm", "build_problem",
           "loss_regions", "token_regions", "token_chains", "CHUNK_BYTES"]

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
    offload: bool = False          # an override says `offload`: recomputed, inputs on the host
    selective: bool = False        # an override says `recompute:selective`: recomputed, every
    #                                layer keeping its attention's outputs
    group: int | None = None       # an override says `group:G`: recomputed in nested groups of G
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
    state_comm: "StateComm | None" = None            # model_state "sharded": FSDP2's collectives
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
    offload_allowed: bool = True                     # False: only forced classes offload
    # token-wise regions inside layers, run in chunks (training only; `_add_regions`)
    regions: dict = field(default_factory=dict)      # region name → Region
    node_region: dict = field(default_factory=dict)  # template → the innermost region it lies in
    node_regions: dict = field(default_factory=dict)  # template → every region it lies in (a
    #                module's and the chain around it, `token_chains`), innermost first; at
    #                most one of them runs in chunks
    region_kept: dict = field(default_factory=dict)  # template → {region: members kept by its
    #                consumers alone}: dropped when the region runs in chunks
    kept_in: dict = field(default_factory=dict)      # template → {(regions, innermost first):
    #                members kept by the consumers of each of those alone}: region_kept grouped
    saving_region: dict = field(default_factory=dict)  # node → the regions keeping its output
    #                (their ops alone), innermost first
    # what autograd keeps and makes (training; `_autograd`)
    needs_grad: set = field(default_factory=set)     # nodes whose output needs a gradient
    kept_pos: set = field(default_factory=set)       # (consumer, position among its tensor
    #                inputs) that autograd keeps for backward
    backward: dict = field(default_factory=dict)     # (template, i) → (bytes, bytes in chunks):
    #                what its backward makes beyond the kept activations (`_backward_bytes`)
    grad_bytes: float = 0.0                          # parameter gradients per GPU (in static_bytes)
    head_grad_bytes: float = 0.0                     # of those, the LM head's (made first)
    tail_kept: dict = field(default_factory=dict)    # template → {class | None: members kept
    #                only by ops after the last layer}: freed before the layers' backward


def _needs_grad(dims: DimAnalysis) -> set[fx.Node]:
    """Nodes whose output needs a gradient: made (through floating-point ops) from a parameter.
    Rotary tables, masks and token ids do not."""
    params = set(dims.cap.params)
    out = set()
    for n in dims.cap.graph.nodes:
        if n.op == "placeholder":
            if n.name in params or n.target in params:
                out.add(n)
        elif n.op == "call_function":
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
                continue
            if any(x in out for x in n.all_input_nodes):
                out.add(n)
    return out


def _base(x: fx.Node) -> fx.Node:
    """The tensor whose storage a view shares: saving a view (v through a transpose, o_proj's
    input through a reshape of attention's output) keeps its base alive."""
    while x.op == "call_function":
        y = x.args[0] if x.args and isinstance(x.args[0], fx.Node) else None
        if y is None:
            break
        if x.target is operator.getitem and y.op == "call_function" and op_packet(y) in VIEWS \
                and y.args and isinstance(y.args[0], fx.Node):
            x = y.args[0]
        elif op_packet(x) in VIEWS:
            x = y
        else:
            break
    return x


def _kept_positions(v: fx.Node, tensors: list, needs: set) -> list[int]:
    """Which of `v`'s tensor inputs autograd keeps for backward: an operand of a product (mul,
    matmul) only when the other needs a gradient (`q * cos` keeps the table, not q); the first
    input of SAVES_FIRST ops and every input of the others in SAVES_ALL, when some input needs
    a gradient."""
    packet = op_packet(v)
    if not any(x in needs for x in tensors):
        return []
    if packet in _PRODUCTS:
        return [k for k in range(len(tensors))
                if any(x in needs for j, x in enumerate(tensors) if j != k)]
    if packet is aten.div and len(tensors) == 2:
        return ([0] if tensors[1] in needs else []) + [1]
    if packet in SAVES_ALL:
        return list(range(len(tensors)))
    if packet in SAVES_FIRST and tensors:
        return [0]
    return []


_PRODUCTS = {aten.mul, aten.mm, aten.bmm, aten.matmul, aten.outer, aten.einsum}


def _autograd(dims: DimAnalysis) -> tuple[set, set, set]:
    """(needs_grad, kept (consumer, position) pairs, saved tensors): the tensors some consumer
    keeps for backward, a view's base for a view, and attention's own output (with its lse,
    `Costs._attention`), which its backward reads."""
    needs = _needs_grad(dims)
    kept_pos, saved = set(), set()
    for v in dims.cap.nodes():
        if v.op != "call_function":
            continue
        tensors = [x for x in v.all_input_nodes if isinstance(dims.sigs.get(x), tuple)]
        for k in _kept_positions(v, tensors, needs):
            kept_pos.add((v, k))
            saved.add(_base(tensors[k]))
        if is_attention(v) and v in needs:
            saved.add(v)
    return needs, kept_pos, saved


def _keepers(pb: "Problem", nodes, owner) -> dict:
    """tensor → {owner(v) of every consumer v that keeps it} (a view's base for a view;
    attention keeps its own output)."""
    dims, out = pb.dims, {}
    for v in nodes:
        tensors = [x for x in v.all_input_nodes if isinstance(dims.sigs.get(x), tuple)]
        for k, x in enumerate(tensors):
            if (v, k) in pb.kept_pos:
                out.setdefault(_base(x), set()).add(owner(v))
        if is_attention(v) and v in pb.needs_grad:
            out.setdefault(v, set()).add(owner(v))
    return out


def _backward_bytes(pb: "Problem", n: fx.Node, st, kept: float) -> tuple[float, float]:
    """What n's backward makes, beyond the kept activations: the gradient of its output and of
    its inputs that need one (not parameters': those are the gradients of the model state), less
    its own kept output, freed by then (its consumers' backward ran first; attention keeps its
    own). Cross-entropy: log_softmax's backward, two fp32 [tokens, classes] temporaries.
    (whole, one chunk's: each tensor at most CHUNK_BYTES)."""
    costs = pb.costs
    if n.op != "call_function" or n not in pb.needs_grad or op_packet(n) in VIEWS or \
            isinstance(st.output, list):
        return 0.0, 0.0
    if n.target is aten.cross_entropy_loss.default:
        logits = n.args[0]
        b = costs.bytes(logits, dict(st.inputs)[logits])
        return 2.0 * b, 2.0 * min(b, CHUNK_BYTES)
    sizes = [costs.bytes(n, st.output)]
    sizes += [costs.bytes(x, lay) for x, lay in st.inputs
              if x in pb.needs_grad and x.op == "call_function"]
    freed = 0.0 if is_attention(n) else kept
    whole = max(0.0, sum(sizes) - freed)
    chunk = max(0.0, sum(min(b, CHUNK_BYTES) for b in sizes) - min(freed, CHUNK_BYTES))
    return float(whole), float(chunk)


def build_problem(dims: DimAnalysis, costs: Costs, mesh, overrides: dict | None,
                  model_state: str, progress=None, *, recompute: bool = True, offload: bool = True,
                  optimizer: str = "adamw") -> Problem:
    """The sets and prices of the CP-SAT model. recompute: whether the solver may recompute
    layers (False: only those an override forces, as before memory plans existed); offload:
    whether it may keep a recomputed layer's inputs in host memory. optimizer:
    one of `costmodel.compute.OPTIMIZERS`, what the model state's bytes and the optimizer's step
    on the GPU (or the host, "offload") are priced as."""
    pb = Problem(dims, costs, tuple(mesh), recompute_allowed=recompute, offload_allowed=offload)
    nodes = plan_nodes(dims)
    pb.template = cluster_layers(dims, nodes, lambda m: spec_for(overrides, m) if overrides else None)
    pb.needs_grad, pb.kept_pos, saved = _autograd(dims)
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
            if costs.training and not costs.symbolic:
                pb.backward[(n, i)] = _backward_bytes(pb, n, st, c.memory_bytes)
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
        t.keeps = costs.training and any((v, k) in pb.kept_pos for v, k in t.consumers)
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
        _add_regions(pb, nodes, overrides)
    n_params = sum(p.numel() for p in dims.cap.model.parameters())
    world = prod(n for _, n in mesh)
    opt = comp.optimizer_bytes(optimizer, costs.dtype_bytes)  # master and state bytes
    state = comp.model_state(n_params, training=costs.training, param_bytes=costs.dtype_bytes, **opt)
    if model_state == "replicated":
        pb.static_bytes = state.total
        if costs.training:  # AdamW's step on the GPU
            pb.static_s = comp.optimizer_step(n_params, costs.gpu, param_bytes=costs.dtype_bytes, **opt)
        if costs.training and world > 1:  # gradients summed over every rank
            flat_link = costs.cluster.axis_link((world,), 0)
            pb.static_s += coll.all_reduce(n_params * costs.dtype_bytes, world, flat_link)
    elif model_state == "sharded":
        pb.state_comm = sc = _sharded_state(pb, world)
        pb.static_bytes = state.total / world + sc.gathered_bytes
        pb.static_s = sc.exposed_s
        if costs.training:  # each rank steps its shard
            pb.static_s += comp.optimizer_step(n_params / world, costs.gpu,
                                               param_bytes=costs.dtype_bytes, **opt)
    elif model_state == "offload":  # replicated, but AdamW's state and master weights on the host
        pb.static_bytes = state.params + state.grads
        pb.host_bytes = state.optimizer + state.grads  # the gradients land in host memory too
        if costs.training:
            pb.static_s = comp.offload_step(n_params, costs.gpu, param_bytes=costs.dtype_bytes, **opt)
            if world > 1:
                flat_link = costs.cluster.axis_link((world,), 0)
                pb.static_s += coll.all_reduce(n_params * costs.dtype_bytes, world, flat_link)
    else:
        raise ValueError(f"model_state must be 'replicated', 'sharded' or 'offload', got "
                         f"{model_state!r}")
    if costs.training:  # made in backward, layer by layer (`model.py`: the peak's phases)
        pb.grad_bytes = state.grads / (world if model_state == "sharded" else 1)
        head = {x.name for ce, region in loss_regions(dims) for n in region for x in n.all_input_nodes
                if x.op == "placeholder" and x.name in dims.cap.params}
        head_numel = sum(dims.cap.model.get_parameter(dims.cap.params[x]).numel() for x in head)
        pb.head_grad_bytes = pb.grad_bytes * head_numel / max(n_params, 1)
    return pb


@dataclass
class StateComm:
    """What sharded model state (FSDP2 over the flattened mesh, `planner/state.py`) costs a step
    beyond its 1/world share of the state: per GPU."""

    gathered_bytes: float   # parameters held unsharded at once: the root's + two layers'
    comm_bytes: float       # bytes one GPU sends in the gathers and reduce-scatters of a step
    comm_s: float           # seconds of those collectives, back to back
    exposed_s: float        # of them, not hidden behind compute (priced as static time)
    overlap_s: float        # the compute they may hide behind (a lower bound: cheapest strategies)
    layers: int             # FSDP units below the root (the model's layers)


def _sharded_state(pb: Problem, world: int) -> StateComm:
    """FSDP2 as `planner/state.py` runs it: each layer (a module path ending in an index) is one
    `fully_shard` unit with reshard_after_forward=True, the rest of the model (embedding, final
    norm, LM head) the root, kept unsharded from its forward to the end of backward. A step runs,
    over the flattened mesh (the slowest link on the way, as the replicated all-reduce sees it):

        forward   all-gather of the root's parameters, then of each layer's
        backward  all-gather of each layer's parameters again (freed after its forward), and a
                  reduce-scatter of each layer's gradients, then of the root's
        (inference: the forward's all-gathers alone)

    each of the whole unit's bytes in the parameter dtype (gradients reduced in it too: the
    default MixedPrecisionPolicy). Overlap: FSDP2 prefetches the next layer's gather while this
    one computes and reduce-scatters a layer's gradients while the previous one runs backward,
    so only the first gathers (the root's and the first layer's, before any compute) and the last
    reduce-scatters (the first layer's and the root's, after all of it) are surely exposed; the
    rest hides behind the step's compute, as far as that lasts:

        exposed = first + last + max(0, rest − compute)

    with compute the cheapest any plan could have (each node's fastest strategy): a lower bound
    on the overlap, so an upper bound on the exposed time when communication dominates. Not
    modelled: the plan's own collectives sharing the link (optimistic), a layer whose gather
    outlasts its own compute while the total does not (per-layer stalls; optimistic), and
    compute running slower beside the communication. Memory: the root's parameters, gathered
    for the whole step, and two layers' (the one computing and the one prefetched)."""
    dims, costs = pb.dims, pb.costs
    units: dict = {}  # layer path (None: root) → parameter count, in the order of first use
    for name, p in dims.cap.model.named_parameters():
        unit = layer_of(name.rpartition(".")[0])
        units[unit] = units.get(unit, 0) + p.numel()
    b = costs.dtype_bytes
    root = units.pop(None, 0) * b
    layers = [n * b for n in units.values()]
    gathered = root + sum(sorted(layers)[-2:])
    if world == 1:
        return StateComm(gathered, 0.0, 0.0, 0.0, 0.0, len(layers))
    link = costs.cluster.axis_link((world,), 0)
    ag = lambda size: coll.all_gather(size, world, link)  # noqa: E731
    rs = lambda size: coll.reduce_scatter(size, world, link)  # noqa: E731
    sizes = [root] + layers if root else layers
    if costs.training:
        gathers = [*sizes, *layers]  # forward, and the layers' again in backward
        scatters = sizes
    else:
        gathers, scatters = sizes, []
    comm_s = sum(ag(x) for x in gathers) + sum(rs(x) for x in scatters)
    sent = sum(coll.bytes_sent("all_gather", x, world) for x in gathers) + \
        sum(coll.bytes_sent("reduce_scatter", x, world) for x in scatters)
    first = (ag(root) if root else 0.0) + (ag(layers[0]) if layers else 0.0)
    last = ((rs(root) if root else 0.0) + (rs(layers[0]) if layers else 0.0)) if scatters else 0.0
    if costs.symbolic:  # no overlap priced: the whole communication, an upper bound
        return StateComm(gathered, sent, comm_s, comm_s, 0.0, len(layers))
    overlap = sum(pb.mult[t] * min(pb.node_cost[(t, i)].compute_s for i in range(len(sts)))
                  for t, sts in pb.strategies.items() if sts)
    exposed = min(comm_s, first + last + max(0.0, comm_s - first - last - overlap))
    return StateComm(gathered, sent, comm_s, exposed, overlap, len(layers))


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
                                      forced=bool(spec and spec.recompute),
                                      offload=bool(spec and spec.offload),
                                      selective=bool(spec and spec.selective),
                                      group=spec.group if spec else None)
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
    tiles = [r.path for r in token_regions(dims) + token_chains(dims)] if overrides else []
    for pattern, text in (overrides or {}).items():
        if parse_spec(text).chunk is not None and not any(fnmatch.fnmatchcase(m, pattern)
                                                          for m in heads + tiles):
            raise ValueError(f"override {pattern!r}: {text!r} asks to chunk, but the pattern "
                             "matches no LM head whose logits feed a cross-entropy through "
                             f"casts and reshapes alone (here: {heads or 'none'}) and no "
                             "token-wise module inside a layer (here: "
                             f"{', '.join(tiles[:4]) + (', ...' if len(tiles) > 4 else '') or 'none'})")
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
    keepers = _keepers(pb, nodes, cls_of)
    for x in nodes:
        owners = keepers.get(x, {None})
        c = next(iter(owners)) if len(owners) == 1 and x in saved else None
        pb.saving_class[x] = c
        counts = pb.kept_by.setdefault(pb.template[x], {})
        counts[c] = counts.get(c, 0) + 1
    # kept only by ops after the last layer (the final norm, the LM head + loss): freed before
    # the layers' backward begins
    order = {n: k for k, n in enumerate(dims.cap.nodes())}
    in_layer = lambda v: cls_of(v) is not None and pb.classes[cls_of(v)].kind == "layer"  # noqa: E731
    last = max((order[n] for n in nodes if in_layer(n)), default=None)
    if last is not None:
        after = _keepers(pb, nodes, lambda v: order[v] > last and not in_layer(v))
        for x in nodes:
            if after.get(x) == {True} and x in saved:
                tail = pb.tail_kept.setdefault(pb.template[x], {})
                tail[pb.saving_class[x]] = tail.get(pb.saving_class[x], 0) + 1
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


# ------------------------------------------------------------------ token-wise regions in layers
@dataclass(frozen=True)
class TokenRegion:
    """Ops inside a layer that treat the sequence token by token (`token_regions`: a module;
    `token_chains`: a chain of ops across modules): run on any piece of the tokens of its
    inputs, they make that piece of each output."""

    path: str                      # "layers.3.mlp"; a chain: "layers.3.attn.o_proj+add+mlp_norm+mlp"
    nodes: tuple                   # its ops (tuple indexing too), in graph order
    inputs: tuple                  # ((tensor read from outside, its token dim), ...): the pieces
    outputs: tuple                 # ((tensor read after it, its token dim), ...): concatenated

    @property
    def input(self) -> fx.Node:
        return self.inputs[0][0]

    @property
    def dim(self) -> int:
        return self.inputs[0][1]

    @property
    def output(self) -> fx.Node:
        return self.outputs[0][0]

    @property
    def out_dim(self) -> int:
        return self.outputs[0][1]


def token_regions(dims: DimAnalysis) -> list[TokenRegion]:
    """The largest modules inside layers (below `layers.3`, like `layers.3.mlp`) that treat the
    tokens one by one, so running them in chunks of tokens is exact:

    - the chunk dim is the dim of the module's one sequence-carrying input (one that holds an
      attention sequence factor, `s`, a video's `t` or `p`; the largest when several) whose
      every factor each op treats locally (`dims.roles`: splitting it needs no communication
      and no reduction over it: linear, pointwise ops, norms over the hidden dim; not
      attention, cumsum, diff or a sum over tokens);
    - every tensor inside that holds those factors holds them as that same dim at the same
      place (broadcast operands without them, like a bias, are fine), and no op takes a shape
      (a view's sizes would be the whole region's);
    - one tensor leaves it (holding the chunk dim), other inputs are parameters, constants or
      tensors without the chunk dim, and it makes at least one intermediate tensor (a module
      of one op, like a projection, saves nothing when chunked)."""
    seq = set()
    for n in dims.cap.nodes():
        if dims.attention(n) is not None:
            seq |= dims.seq_atoms(n)
    if not seq:
        return []
    module = dims.cap.module_path
    under: dict[str, list[fx.Node]] = {}
    for n in dims.cap.nodes():
        m = module(n) if n.op == "call_function" else ""
        layer = layer_of(m)
        if layer is None or m == layer:
            continue
        parts = m[len(layer) + 1:].split(".")
        for j in range(1, len(parts) + 1):
            under.setdefault(".".join([layer] + parts[:j]), []).append(n)
    out, taken = [], []
    for path in sorted(under, key=lambda p: p.count(".")):  # outermost first: the largest
        if any(path.startswith(t + ".") for t in taken):
            continue
        region = _token_region(dims, path, under[path], seq)
        if region is not None:
            out.append(region)
            taken.append(path)
    order = {n: i for i, n in enumerate(dims.cap.nodes())}
    return sorted(out, key=lambda r: order[r.nodes[0]])


def _token_region(dims: DimAnalysis, path: str, nodes: list, seq: set) -> TokenRegion | None:
    F = dims.F
    members = set(nodes)
    tensor = lambda x: isinstance(dims.sigs.get(x), tuple)  # noqa: E731 - one tensor output
    atoms = lambda sig: {F.find(a) for d in sig for a in F.atoms_of(d)}  # noqa: E731
    outside = list(dict.fromkeys(x for n in nodes for x in n.all_input_nodes if x not in members))
    carrying = [x for x in outside if tensor(x) and atoms(dims.sigs[x]) & seq]
    leaving = [n for n in nodes if any(u not in members for u in n.users)]
    if len(carrying) != 1 or len(leaving) != 1 or not tensor(leaving[0]):
        return None
    x, y = carrying[0], leaving[0]
    sig = dims.atoms(x)
    dims_with_seq = [i for i, d in enumerate(sig) if {F.find(a) for a in d} & seq]
    dim = max(dims_with_seq, key=lambda i: F.dim_size(dims.sigs[x][i]))
    chunk = tuple(F.find(a) for a in sig[dim])
    if len(nodes) < 2 or any(dims.sigs.get(v) is None for v in nodes if v is not y):
        return None

    def placed(s) -> bool:  # holds the chunk factors only as the chunk dim, at its place
        s = [tuple(F.find(a) for a in d) for d in s]
        have = {a for d in s for a in d} & set(chunk)
        return not have or (len(s) > dim and s[dim] == chunk and
                            sum(a in chunk for d in s for a in d) == len(chunk))

    for v in nodes:
        if v.target is operator.getitem:
            continue
        if v in dims.unsupported or dims.attention(v) is not None or \
                any(a in dims.roles.get(v, {}) for a in chunk):
            return None
        sigs = dims.sigs[v] if isinstance(dims.sigs[v], list) else [dims.sigs[v]]
        ins = [dims.sigs[u] for u in v.all_input_nodes if tensor(u)]
        if not all(placed(s) for s in sigs + ins if s is not None):
            return None
        val = v.meta.get("val")
        ndim = val.dim() if isinstance(val, torch.Tensor) else None
        if any(isinstance(a, (list, tuple)) and len(a) == ndim and
               all(isinstance(i, (int, torch.SymInt)) for i in a) for a in v.args):
            return None  # a shape: view, reshape, expand, new_*
    for u in outside:  # parameters, constants and tensors without the chunk dim
        if u is not x and tensor(u) and atoms(dims.sigs[u]) & set(chunk):
            return None
    out_sig = [tuple(F.find(a) for a in d) for d in dims.atoms(y)]
    if chunk not in out_sig:
        return None
    return TokenRegion(path, tuple(nodes), ((x, dim),), ((y, out_sig.index(chunk)),))


def token_chains(dims: DimAnalysis) -> list[TokenRegion]:
    """Chains of token-wise ops across the modules of a layer, between the ops that mix tokens
    or take a shape (attention, the views to and from heads): the largest connected sets of ops
    of one layer that each treat every sequence atom locally, so that running them in chunks of
    tokens is exact. A Llama layer has two: `attn_norm+attn.q_proj+attn.k_proj+attn.v_proj`
    (the norm and the projections: three outputs) and `attn.o_proj+add+mlp_norm+mlp` (the
    output projection, the residual add, the norm, the MLP and the second add: its inputs the
    attention's output and the layer's input). Chunked, they drop what a module region keeps
    at its edge (the norms' outputs, the residual between attention and the MLP). Like
    `token_regions`' modules, but with several inputs and outputs, each holding the chunk
    factors as one dim wherever it is; and:

    - each op holds a sequence atom, none in a role (it mixes no tokens), takes no shape, has
      one output and reads a tensor (an arange made inside would be whole in every chunk);
    - every tensor read from outside with the chunk factors is split (the others pass whole),
      every tensor read after it holds them, and none of those leads back into it;
    - some tensor made inside is kept for backward by its ops alone (else chunking drops
      nothing), and it is not one module's region (`token_regions` has that one).

    A region's name lists the modules it covers whole, below the layer, and the op of each op
    outside those (`add`: a residual add in the layer itself). A module region lies inside at
    most one chain; the solver runs at most one of the two in chunks."""
    seq = set()
    for n in dims.cap.nodes():
        if dims.attention(n) is not None:
            seq |= dims.seq_atoms(n)
    if not seq:
        return []
    F, module = dims.F, dims.cap.module_path
    tensor = lambda x: isinstance(dims.sigs.get(x), tuple)  # noqa: E731 - one tensor output
    atoms = lambda x: {F.find(a) for d in dims.sigs[x] for a in F.atoms_of(d)}  # noqa: E731
    _, kept_pos, _ = _autograd(dims)
    modules = {r.path for r in token_regions(dims)}

    def tokenwise(v) -> bool:
        if v.op != "call_function" or v.target is operator.getitem or v in dims.unsupported \
                or dims.attention(v) is not None or not tensor(v) or not atoms(v) & seq:
            return False
        if {F.find(a) for a in dims.roles.get(v, {})} & seq:
            return False
        if not any(tensor(x) and atoms(x) & seq for x in v.all_input_nodes):
            return False
        val = v.meta.get("val")
        ndim = val.dim() if isinstance(val, torch.Tensor) else None
        return not any(isinstance(a, (list, tuple)) and len(a) == ndim and
                       all(isinstance(i, (int, torch.SymInt)) for i in a) for a in v.args)

    order = {n: i for i, n in enumerate(dims.cap.nodes())}
    layer = {n: layer_of(module(n)) for n in dims.cap.nodes() if n.op == "call_function"}
    under: dict[str, list] = {}  # a module below a layer → its ops
    for n, lay in layer.items():
        m = module(n)
        if lay is not None and m != lay:
            parts = m[len(lay) + 1:].split(".")
            for j in range(1, len(parts) + 1):
                under.setdefault(".".join([lay] + parts[:j]), []).append(n)
    # components of token-wise ops joined by their edges, within one layer
    ops = [v for v in dims.cap.nodes() if layer.get(v) is not None and tokenwise(v)]
    groups: dict = {}
    for v, root in components(ops, lambda x, v: layer[x] == layer[v]).items():
        groups.setdefault(root, []).append(v)
    out = []
    for group in groups.values():
        for nodes in _one_way(group, order):
            if len(nodes) < 2:
                continue
            r = _token_chain(dims, layer[nodes[0]], nodes, seq, under, kept_pos, order)
            if r is not None and r.path not in modules:
                out.append(r)
    return sorted(out, key=lambda r: order[r.nodes[0]])


def _one_way(nodes: list, order: dict) -> list[list]:
    """`nodes` (connected) in parts that no path leaves and enters again: the ops that a path
    from the part's outputs through other ops reaches (past attention) split from the others,
    each part again in connected pieces, until none is reached. (A transformers RMSNorm's
    no-op cast of the layer's input feeds the residual add after attention: one component,
    two chains.)"""
    members = set(nodes)
    last = max(order[n] for n in nodes)
    after, seen = set(), set()
    todo = [u for y in nodes for u in y.users if u not in members]
    while todo:
        u = todo.pop()
        if u in seen or order.get(u, last + 1) > last:
            continue
        seen.add(u)
        if u in members:
            after.add(u)
        todo += list(u.users)
    if not after:
        return [sorted(nodes, key=order.get)]
    out = []
    for part in (members - after, after):
        pieces: dict = {}
        for v, root in components(part).items():
            pieces.setdefault(root, []).append(v)
        for piece in pieces.values():
            out += _one_way(piece, order)
    return out


def _token_chain(dims: DimAnalysis, lay: str, nodes: list, seq: set, under: dict, kept_pos: set,
                 order: dict) -> TokenRegion | None:
    """`token_chains`' checks on one component, and its region (None where one fails)."""
    F, module = dims.F, dims.cap.module_path
    members = set(nodes)
    tensor = lambda x: isinstance(dims.sigs.get(x), tuple)  # noqa: E731
    outside = list(dict.fromkeys(x for n in nodes for x in n.all_input_nodes if x not in members))
    carrying = [x for x in outside if tensor(x) and
                {F.find(a) for d in dims.sigs[x] for a in F.atoms_of(d)} & seq]
    leaving = [n for n in nodes if any(u not in members for u in n.users)]
    if not carrying or not leaving:
        return None
    sig = dims.atoms(carrying[0])
    with_seq = [i for i, d in enumerate(sig) if {F.find(a) for a in d} & seq]
    chunk = tuple(F.find(a) for a in sig[max(with_seq, key=lambda i: F.dim_size(dims.sigs[carrying[0]][i]))])

    def place(x) -> int | None:  # the one dim holding the chunk factors; -1: none; None: split up
        s = [tuple(F.find(a) for a in d) for d in dims.atoms(x)]
        at = [i for i, d in enumerate(s) if d == chunk]
        if sum(a in chunk for d in s for a in d) == 0:
            return -1
        return at[0] if len(at) == 1 and sum(a in chunk for d in s for a in d) == len(chunk) else None

    for v in nodes:
        if any(place(x) is None for x in [v] + [u for u in v.all_input_nodes if tensor(u)]):
            return None
        if {F.find(a) for a in dims.roles.get(v, {})} & set(chunk):
            return None
    ins = [(x, place(x)) for x in outside if tensor(x) and place(x) >= 0]
    outs = [(y, place(y)) for y in leaving]
    if any(d < 0 for _, d in outs):
        return None
    reached = {x for x, _ in ins}  # every op holding the chunk factors is made from the pieces
    for v in nodes:
        if any(x in reached for x in v.all_input_nodes):
            reached.add(v)
        elif place(v) >= 0:
            return None
    last, seen = order[nodes[-1]], set()  # no tensor read after it leads back into it
    todo = [u for y in leaving for u in y.users if u not in members]
    while todo:
        u = todo.pop()
        if u in seen or order.get(u, last + 1) > last:
            continue
        seen.add(u)
        if u in members or any(u is x for x, _ in ins):
            return None
        todo += list(u.users)
    saved = {_base(u) for v in nodes for k, u in enumerate(
        x for x in v.all_input_nodes if isinstance(dims.sigs.get(x), tuple)) if (v, k) in kept_pos}
    if not any(x in members and x not in leaving for x in saved):
        return None
    parts = []
    for v in nodes:
        m = module(v)
        rel = m[len(lay) + 1:] if m != lay else ""
        covered = next((p for p in (".".join(rel.split(".")[:j]) for j in range(1, rel.count(".") + 2))
                        if rel and all(n in members or n.target is operator.getitem
                                       for n in under[f"{lay}.{p}"])), None)
        op = getattr(v.target, "__name__", str(v.target)).split(".")[0]
        parts.append(covered if covered is not None else f"{rel}.{op}" if rel else op)
    path = f"{lay}." + "+".join(dict.fromkeys(parts))
    return TokenRegion(path, tuple(nodes), tuple(ins), tuple(outs))


@dataclass
class Region:
    """A token-wise region (`token_regions`, `token_chains`) in every layer of a layer class,
    decided once: whole, or in chunks of tokens, each chunk recomputed in backward."""

    name: str                      # its path in the class's template layer ("layers.0.mlp")
    cls: str                       # the layer class
    paths: tuple[str, ...]         # the same module in every layer of the class
    nodes: list = field(default_factory=list)   # its template nodes
    forced: bool = False           # an override says `chunk`
    chunks: int | None = None      # a chunk count an override forces (else from CHUNK_BYTES)
    inputs: dict = field(default_factory=dict)
    """(template producer, output index) → (count, representative tensor): the tensors entering
    it that only its ops keep; chunked, the checkpoints keep them instead."""
    chain: bool = False            # a chain of ops across modules (`token_chains`): chunked
    #                                only in a recomputed layer, unless an override says so
    heads: tuple[str, ...] = ()    # its first op in every layer (where `explain` finds it)
    excludes: tuple[str, ...] = ()  # the regions sharing ops with it (a module and the chain
    #                                 around it): at most one of them runs in chunks
    inner: set = field(default_factory=set)
    """(template producer, output index, template consumer) of each tensor one of its ops makes
    and another reads in the same layer: a redistribution there would see one chunk (refused,
    `model._add_regions`). Its other reads are its inputs: a redistribution of one runs once,
    on the whole tensor, before the chunk loop."""


def _add_regions(pb: Problem, nodes, overrides) -> None:
    """The token-wise regions of every layer class (modules and chains), which template nodes
    lie in each, and which outputs only a region's ops keep (what chunking it drops, unless it
    is its input). A module's region and the chain around it overlap: the outputs kept by the
    module's ops alone are kept by the chain's alone too, and the module's input is made inside
    the chain (`kept_in` groups them)."""
    dims = pb.dims
    layer_cls = {layer: c for c, lc in pb.classes.items() if lc.kind == "layer" for layer in lc.layers}
    members: dict = {}  # region → its template nodes
    chains = token_chains(dims)
    for r in token_regions(dims) + chains:
        layer = layer_of(r.path)
        c = layer_cls.get(layer)
        if c is None:
            continue
        spec = spec_for(overrides, r.path) if overrides else None
        forced, k = bool(spec and spec.chunk is not None), (spec.chunk or None) if spec else None
        name = c + r.path[len(layer):]
        reg = pb.regions.setdefault(name, Region(name, c, (), forced=forced, chunks=k,
                                                 chain=r in chains))
        if (reg.forced, reg.chunks) != (forced, k):
            raise ValueError(f"overrides chunk {r.path!r} unlike {reg.paths[0]!r}, but their "
                             f"layers are planned alike (class {c}): override the module in "
                             "every layer alike, or an op inside it too")
        reg.paths += (r.path,)
        reg.heads += (r.nodes[0].name,)
        if layer == c:
            members[name] = {pb.template.get(n) for n in r.nodes}
        inside = set(r.nodes)
        for v in r.nodes:
            for x in v.all_input_nodes:
                u, idx = (x.args[0], x.args[1]) if x.target is operator.getitem else (x, None)
                if u in inside and u in pb.template and v in pb.template:
                    reg.inner.add((pb.template[u], idx, pb.template[v]))
    if not pb.regions:
        return
    for t in (t for lc in pb.classes.values() for t in lc.nodes):
        for name, reg in pb.regions.items():
            if t in members.get(name, ()):
                reg.nodes.append(t)
                pb.node_regions[t] = pb.node_regions.get(t, ()) + (name,)
    size = lambda R: len(pb.regions[R].nodes)  # noqa: E731 - innermost first
    for t, names in pb.node_regions.items():
        pb.node_regions[t] = tuple(sorted(names, key=size))
        pb.node_region[t] = pb.node_regions[t][0]
    for name, reg in pb.regions.items():
        reg.excludes = tuple(R for R in pb.regions if R != name and members.get(R, set()) & members.get(name, set()))
        both = [R for R in reg.excludes if reg.forced and pb.regions[R].forced]
        if both:
            raise ValueError(f"overrides chunk both {reg.paths[0]!r} and {pb.regions[both[0]].paths[0]!r}, "
                             "which share ops: one chunk loop runs them; chunk one of the two")
    keepers = _keepers(pb, nodes, lambda v: pb.template[v])
    for x in nodes:
        ks = keepers.get(x)
        if not ks:
            continue
        first, t = next(iter(ks)), pb.template[x]
        # (an output of a region its own ops keep is not dropped with it: the concatenated
        # copy lives on, in the checkpoints of a region reading it in chunks)
        S = tuple(R for R in pb.node_regions.get(first, ()) if pb.regions[R].cls == pb.saving_class.get(x)
                  and all(k in members[R] for k in ks) and not (
                      t in members[R] and any(pb.template.get(u) not in members[R] for u in x.users)))
        if not S:
            continue
        pb.saving_region[x] = S
        groups = pb.kept_in.setdefault(t, {})
        groups[S] = groups.get(S, 0) + 1
        counts = pb.region_kept.setdefault(t, {})
        for name in S:
            counts[name] = counts.get(name, 0) + 1
            if t not in members[name]:  # it enters the region: the checkpoints keep it
                reg = pb.regions[name]
                count, rep = reg.inputs.get((t, None), (0, x))
                reg.inputs[(t, None)] = (count + 1, rep)
