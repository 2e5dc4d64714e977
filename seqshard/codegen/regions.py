"""Regions: a run of consecutive nodes of this rank's program moved into a submodule, and a call
of it put where they were. A recomputed layer (`recompute.py`: called through `checkpoint`), a
chunked module (`run_in_chunks`), a compiled layer (`compiled.py`: its shared template) and an
FSDP unit (`planner/state.py`: the layer's `seqshard_unit`) are each one region:

    program.gm                                   after extract, the caller's call, splice
        add_1 = ...                                  add_1 = ...
        rms_norm = aten.rms_norm(add_1, ...)         recompute_layers_0 = self.recompute_layers_0
        ...              (layers.0's nodes)          checkpoint_layers_0 = checkpoint(
        add_3 = aten.add(add_2, linear_6)                recompute_layers_0, add_1, cos, sin, ...)
        rms_norm_2 = aten.rms_norm(add_3, ...)       getitem = checkpoint_layers_0[0]
                                                     rms_norm_2 = aten.rms_norm(getitem, ...)

    region = gather(g, members)          # the members consecutive (others moved out, or taken in)
    inputs, outputs = boundary(region)   # the outer values it reads; its values read after it
    extract(gm, name, region, inputs, outputs)      # gm.<name>: inputs → (outputs...)
    with g.inserting_before(region[0]):
        call = ...                       # the caller's: how the submodule runs
    splice(g, region, call, outputs)     # outputs read as call[k]; the region erased

A compiled layer copies its region with canonical names instead of `extract` (identical layers
then have identical code: `compiled._rebuild`). A chunked loss (`recompute.chunk_losses`) is no
region: its submodule is written new (linear → casts → a summed cross-entropy of one chunk),
not copied from the program.
"""

from __future__ import annotations

import operator

import torch.fx as fx

__all__ = ["in_layer", "gather", "boundary", "extract", "splice"]


def in_layer(module: str | None, layer: str) -> bool:
    return module is not None and (module == layer or module.startswith(layer + "."))


def gather(g: fx.Graph, members: list[fx.Node]) -> list[fx.Node]:
    """Make `members` (in graph order) consecutive in `g` and return the region, in order: the
    other nodes of their span move before them when they depend on none of them, after them
    when none of them reads them, and otherwise (computed from the region and read by it again)
    join the region, which is exact, only recomputed."""
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


def boundary(region: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(inputs, outputs) of `region`: the values from outside it that it reads, in the order
    first read, and its values read after it."""
    inside = set(region)
    inputs = list(dict.fromkeys(x for n in region for x in n.all_input_nodes if x not in inside))
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    return inputs, outputs


def extract(gm: fx.GraphModule, name: str, region: list[fx.Node], inputs: list[fx.Node],
            outputs: list[fx.Node], single: bool = False) -> None:
    """Register `region`'s nodes, copied, as the GraphModule `gm.<name>`: its placeholders
    `inputs` (their names, in that order), its result the tuple of `outputs`, or with `single`
    the one output itself. Its get_attr nodes keep reaching `gm`'s submodules."""
    sub = fx.Graph()
    env = {x: sub.placeholder(x.name) for x in inputs}
    for n in region:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[outputs[0]] if single else tuple(env[n] for n in outputs))
    gm.add_submodule(name, fx.GraphModule(gm, sub, class_name=name))


def splice(g: fx.Graph, region: list[fx.Node], call: fx.Node, outputs: list[fx.Node],
           single: bool = False) -> list[fx.Node]:
    """Replace `region` by `call` (the caller's node before it, which computes it): each of
    `outputs` read after the region becomes call[k] (a getitem after `call`, with the output's
    meta), or with `single` the one output becomes `call`; the region's nodes are erased.
    Returns what stands for each output now."""
    inside = set(region)
    if single:
        results = [call]
    else:
        with g.inserting_before(call.next):  # in order, after `call`
            results = []
            for k, n in enumerate(outputs):
                r = g.call_function(operator.getitem, (call, k))
                r.meta.update(n.meta)
                results.append(r)
    for n, r in zip(outputs, results):
        n.replace_all_uses_with(r, delete_user_cb=lambda u: u not in inside)
    for n in reversed(region):
        g.erase_node(n)
    return results
