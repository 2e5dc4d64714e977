"""Recompute: each layer the plan names runs under activation checkpointing.

    program.gm                                   after `recompute_layers(gm, ("layers.0", ...))`
        add_1 = ...                                  add_1 = ...
        rms_norm = aten.rms_norm(add_1, ...)         recompute_layers_0 = self.recompute_layers_0
        ...              (layers.0's nodes)          checkpoint = torch.utils.checkpoint.checkpoint(
        add_3 = aten.add(add_2, linear_6)                recompute_layers_0, add_1, cos, sin, ..., use_reentrant=False)
                                                     add_3 = checkpoint[0]

The nodes of a layer (`meta["module"]` is the layer's path or below it; the sharder sets it on
every node it emits, redistributions included, from the captured node being rewritten) move
into a submodule `recompute_<layer>`, a GraphModule whose inputs are the values the layer reads
from outside and whose outputs are the values read after it. The call goes through
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: the forward keeps only the
submodule's inputs, and backward runs the submodule again to rebuild what its ops saved.

Collectives and seqshard's custom ops inside a layer run again in backward. That stays matched
across ranks because every rank runs the same program, and autograd reaches the same layer at
the same point of every rank's backward; the random state is restored for the rerun
(`preserve_rng_state`), so dropout draws the same masks.

A layer's nodes are normally consecutive in the emitted graph. Nodes of other modules between
them are moved before the layer when they do not depend on it, after it when the layer does
not read them, and otherwise (a value from outside computed from the layer and read by it
again) go into the recomputed region too, which is exact, only recomputed.
"""

from __future__ import annotations

import operator
import re

import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from seqshard.strategies import PlanError

__all__ = ["recompute_layers", "in_layer"]


def in_layer(module: str | None, layer: str) -> bool:
    return module is not None and (module == layer or module.startswith(layer + "."))


def recompute_layers(gm: fx.GraphModule, layers: tuple[str, ...]) -> fx.GraphModule:
    """`gm` with each of `layers` wrapped in a checkpointed submodule (in place; returned)."""
    g = gm.graph
    for layer in layers:
        members = [n for n in g.nodes if in_layer(n.meta.get("module"), layer)]
        if not members:
            raise PlanError(f"the plan recomputes {layer!r}, but this model has no layer "
                            "there (the plan was made for a different model)")
        region = _gather(g, members)
        _checkpoint(gm, layer, region)
    g.lint()
    gm.recompile()
    return gm


def _gather(g: fx.Graph, members: list[fx.Node]) -> list[fx.Node]:
    """Make the layer's nodes consecutive in `g` (moving other nodes out of its span where that
    keeps the order valid, else taking them in) and return them in order."""
    order = {n: i for i, n in enumerate(g.nodes)}
    first, last = order[members[0]], order[members[-1]]
    span = [n for n in g.nodes if first <= order[n] <= last]
    region = set(members)
    # taken in: foreign nodes that depend on the region and that the region depends on later
    while True:
        after = _reaches_from(span, region)           # depend on the region
        before = _reaches_to(span, region)            # the region depends on them
        more = {n for n in span if n not in region and n in after and n in before}
        if not more:
            break
        region |= more
    outside = [n for n in span if n not in region]
    anchor = members[0]
    for n in outside:
        if n not in after:            # depends on nothing in the region: before it
            anchor.prepend(n)
    tail = [n for n in outside if n in after]  # the region does not read them: after it
    end = span[-1]
    for n in tail:
        end.append(n)
        end = n
    return [n for n in g.nodes if n in region]


def _reaches_from(span: list[fx.Node], region: set) -> set:
    out = set(region)
    for n in span:
        if any(x in out for x in n.all_input_nodes):
            out.add(n)
    return out - region


def _reaches_to(span: list[fx.Node], region: set) -> set:
    out = set(region)
    for n in reversed(span):
        if any(u in out for u in n.users):
            out.add(n)
    return out - region


def _checkpoint(gm: fx.GraphModule, layer: str, region: list[fx.Node]) -> None:
    """Move `region` (consecutive nodes of gm.graph) into a submodule called through
    `checkpoint`."""
    g = gm.graph
    inside = set(region)
    inputs = list(dict.fromkeys(x for n in region for x in n.all_input_nodes if x not in inside))
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {x: sub.placeholder(x.name) for x in inputs}
    for n in region:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[n] for n in outputs))
    name = "recompute_" + re.sub(r"\W", "_", layer)
    gm.add_submodule(name, fx.GraphModule(gm, sub, class_name=name))
    with g.inserting_before(region[0]):
        fn = g.get_attr(name)
        call = g.call_function(checkpoint, (fn, *inputs), {"use_reentrant": False})
        call.name = g._graph_namespace.create_name(f"checkpoint_{name[len('recompute_'):]}", None)
        call.meta["module"] = layer
        fn.meta["module"] = layer
        results = []
        for k, n in enumerate(outputs):
            r = g.call_function(operator.getitem, (call, k))
            r.meta.update(n.meta)
            results.append(r)
    for n, r in zip(outputs, results):
        n.replace_all_uses_with(r, delete_user_cb=lambda u: u not in inside)
    for n in reversed(region):
        g.erase_node(n)
