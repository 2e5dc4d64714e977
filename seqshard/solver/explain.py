"""From a solution to a `Plan`: each node's chosen strategy with its cost terms (a redistribution
charged to the first consumer that needs it; a recomputed layer's forward again on its nodes,
its kept inputs on its first node), the layers recomputed, the predicted step and peak (with
where it is reached, as notes), and for every attention node and layer class the alternatives
with their costs (`Plan.explain`)."""

from __future__ import annotations

from seqshard.strategies import (Cost, NodePlan, Plan, Predicted, Split, Strategy, is_attention,
                                 plan_nodes)
from seqshard.strategies.from_plan import node_keys

from . import groups as G
from .clusters import layer_of
from .figures import (IN_FLIGHT, attention_cache_bytes, chosen_moves, class_figures, fetch_time,
                      kept_attention, region_figures)
from .model import Solution
from .problem import CHUNK_BYTES, Problem

__all__ = ["to_plan", "explain_all"]

def to_plan(pb: Problem, sol: Solution, orders: dict[str, str], notes=()) -> Plan:
    dims, names = pb.dims, tuple(a for a, _ in pb.mesh)
    strategies = {t: pb.strategies[t][i] for t, i in sol.choice.items()}
    recomputed = {unit for c in sol.recompute for unit in pb.classes[c].layers}
    # each redistribution is charged to the first consumer (in graph order) that needs it; in a
    # recomputed layer its forward runs again and its copy is not kept
    redistribute: dict = {}
    for (key, i, l), (secs, sent, kept) in chosen_moves(pb, sol.choice):
        t = pb.tensors[key]
        v = next(v for v, k in t.consumers
                 if pb.need[(key, v, sol.choice[v])] == l)
        r = redistribute.setdefault(v, [0.0, 0.0, 0.0, 0.0])
        share = t.mult / pb.mult[v]
        again = t.cls in sol.recompute
        r[0] += (secs + (pb.move_forward.get((key, i, l), 0.0) if again else 0.0)) * share
        r[1] += sent * share
        r[2] += 0.0 if again else kept * share
        r[3] += pb.move_forward.get((key, i, l), 0.0) * share if again else 0.0
    # groups (`groups.py`): each layer of a group but its last runs its forward once more (the
    # group's rerun), charged evenly to the group's layers (alike layers keep one table row);
    # a group keeps its first layer's inputs alone; offloaded units are the earliest (groups or
    # layers) of their class: whole groups
    grouped = plan_groups(pb, sol)
    rerun = {layer: (len(group) - 1) / len(group) for group in grouped for layer in group}
    inner = {layer for group in grouped for layer in group[1:]}
    inputs = {}  # the first node of a recomputed layer is charged the tensors the layer keeps
    # ...or, offloaded, nothing; the last layer of a class is charged the seconds backward
    # waits for the class's inputs copied back (its own; the others' are prefetched)
    offloaded = set(offloaded_layers(pb, sol))
    fetch = {pb.classes[c].layers[-1]: fetch_time(pb, sol.choice, c, _offload_count(pb, sol, c))
             for c in sol.offload}
    selective = set(keeping_attention(pb, sol))  # attention runs once, its outputs kept
    attention = {n for ns in kept_attention(pb).values() for n, _ in ns}
    for layer in recomputed:
        inputs[layer] = sum(pb.costs.bytes(x, _out(strategies[u], idx))
                            for u, idx, x in pb.layer_inputs.get(layer, ()))
        if layer in offloaded or layer in inner:
            inputs[layer] = 0.0
    nodes, total_comm, compute_s, comm_s = [], 0.0, 0.0, 0.0
    keys = node_keys(dims)
    for n in plan_nodes(dims):
        t = pb.template[n]
        st = strategies[t]
        c = pb.node_cost[(t, sol.choice[t])]
        r = redistribute.get(t, [0.0, 0.0, 0.0, 0.0])
        module = dims.cap.module_path(n)
        mem = 0.0 if pb.saving_class.get(n) in sol.recompute or _chunked_away(pb, sol, n) \
            else c.memory_bytes
        unit = pb.unit.get(n)
        if unit in inputs:
            mem += inputs.pop(unit)
        f = pb.forward[(t, sol.choice[t])] if pb.node_class.get(t) in sol.recompute else Cost()
        if unit in selective and t in attention:  # kept, not run again
            f, mem = Cost(), mem + attention_cache_bytes(pb, t, sol.choice[t])
        if any(R in sol.chunked for R in pb.node_regions.get(t, ())):  # its forward again, by chunks
            g = pb.forward[(t, sol.choice[t])]
            f = Cost(f.compute_s + g.compute_s, f.comm_s + g.comm_s, f.redistribute_s + g.redistribute_s)
        if unit in rerun:  # the group's rerun: its forward once more, attention too
            g, share = pb.forward[(t, sol.choice[t])], rerun[unit]
            f = Cost(f.compute_s + share * g.compute_s, f.comm_s + share * g.comm_s,
                     f.redistribute_s + share * (g.redistribute_s + r[3]))
        cost = Cost(c.compute_s + f.compute_s, c.comm_s + f.comm_s + fetch.pop(unit, 0.0),
                    c.redistribute_s + f.redistribute_s + r[0], mem + r[2], c.comm_bytes + r[1],
                    c.transient_bytes)
        total_comm += cost.comm_bytes
        compute_s += cost.compute_s
        comm_s += cost.comm_s + cost.redistribute_s
        nodes.append(NodePlan(node=n.name, module=module, op=_op(n), key=keys[n],
                              splits=tuple(Split(a, dims.F.label(x)) for a, x in zip(names, st.splits)
                                           if x is not None),
                              algorithm=st.algorithm, cost=cost))
    step = compute_s + comm_s + pb.static_s
    predicted = Predicted(step_s=step, peak_memory_bytes=sol.memory_bytes, comm_bytes=total_comm,
                          compute_s=compute_s, comm_s=comm_s + pb.static_s)
    used = {s.factor for n in nodes for s in n.splits}
    layers = tuple(layer for layer in dict.fromkeys(layer_of(n.module) for n in nodes)
                   if layer in recomputed)
    chunks = tuple((c, chunk_count(pb, sol, c)) for c in pb.classes
                   if c in sol.recompute and pb.classes[c].kind == "chunk")
    notes = list(notes) + _memory_notes(pb, sol) + _region_notes(pb, sol) + _lone_groups(pb)
    plan = Plan(mesh=pb.mesh, nodes=tuple(nodes),
                orders=tuple(sorted((f, o) for f, o in orders.items() if f in used)),
                predicted=predicted, notes=tuple(notes), recompute=layers, chunks=chunks,
                offload=tuple(layer for layer in layers if layer in offloaded),
                keep_attention=tuple(layer for layer in layers if layer in selective),
                recompute_groups=tuple(grouped),
                chunked_modules=tuple((path, region_chunks(pb, sol, R)) for R in pb.regions
                                      if R in sol.chunked for path in pb.regions[R].paths))
    plan.explanations.update(explain_all(pb, sol))
    plan.explanations.update(explain_recompute(pb, sol))
    plan.explanations.update(explain_regions(pb, sol))
    return plan


def plan_groups(pb: Problem, sol: Solution) -> list[tuple[str, ...]]:
    """The nested checkpoint groups of the solution: each grouped class's layers in consecutive
    groups of its size (the last one shorter; a last group of one layer is no group)."""
    return [grp for c, g in (sol.groups or {}).items() if c in sol.recompute
            for grp in G.groups_of(pb.classes[c].layers, g) if len(grp) > 1]


def _offload_count(pb: Problem, sol: Solution, c: str) -> int:
    """How many kept-input units of class c the solution offloads (its earliest)."""
    k = sol.offload.get(c, 0) if isinstance(sol.offload, dict) else None
    return G.units(pb, c, (sol.groups or {}).get(c, 1)) if k is None else k


def offloaded_layers(pb: Problem, sol: Solution) -> list[str]:
    """The layers whose checkpoint's inputs live on the host: of each class, its earliest k units
    (their backward runs last: by then the GPU has freed the inputs kept above them, and their
    copies back are prefetched during the backward of the units above), every layer of an
    offloaded group (its outer checkpoint keeps the group's input)."""
    out = []
    for c in sol.offload:
        k = _offload_count(pb, sol, c)
        g = (sol.groups or {}).get(c, 1)
        units = G.groups_of(pb.classes[c].layers, g) if G.unit_split(pb, c)[1] else \
            [tuple(pb.classes[c].layers)]
        out += [layer for grp in units[:k] for layer in grp]
    return out


def keeping_attention(pb: Problem, sol: Solution) -> list[str]:
    """The layers that keep their attention's outputs: of each class, its last s[c] (their
    backward runs first, so what they keep is freed soonest)."""
    return [layer for c, k in (sol.selective or {}).items() for layer in pb.classes[c].layers[-k:]]


def chunk_count(pb: Problem, sol: Solution, c: str) -> int:
    """How many chunks a chunked region runs in: what an override says, else enough that its
    largest kept tensor (the fp32 logits) is at most CHUNK_BYTES a chunk."""
    lc = pb.classes[c]
    if lc.chunks:
        return lc.chunks
    largest = max((pb.node_cost[(n, sol.choice[n])].memory_bytes for n in lc.nodes), default=0)
    return max(1, -(-int(largest) // CHUNK_BYTES))


def _out(st: Strategy, idx):
    return st.output if idx is None else st.output[idx]


def _memory_notes(pb: Problem, sol: Solution) -> list[str]:
    """Where the predicted peak is reached and what it is made of; what recompute saves."""
    m = sol.memory
    if m is None:
        return []
    bottom = m.phase == "bottom"
    parts = [f"{_gib(m.state)} parameters and optimizer state"]
    if m.grads:
        parts.append(f"{_gib(m.grads)} gradients")
    if not bottom:
        parts.append(f"{_gib(m.kept)} activations kept for backward")
    chunked = m.recompute_class and (m.recompute_class in pb.regions or
                                     pb.classes[m.recompute_class].kind == "chunk")
    if bottom:
        parts.append(f"{_gib(m.recompute)} of one layer's activations (kept, or made again)")
    elif m.recompute_class:
        parts.append(f"{_gib(m.recompute)} of one " + ("chunk's" if chunked else "recomputed "
                     "layer's") + " activations made again"
                     + (" (with offloaded inputs on the GPU)" if m.recompute_class in sol.offload else ""))
    if m.transient_node is not None:
        n = m.transient_node
        parts.append(f"{_gib(m.transient)} working set of {pb.dims.cap.module_path(n) or n.name} "
                     f"({n.name}{' and its twins in other layers' if pb.mult[n] > 1 else ''}) "
                     "while it runs")
    where = (f"in the backward of {pb.classes[m.recompute_class].layers[0]} (every gradient made)"
             if bottom and m.recompute_class else
             "at the end of the backward (every gradient made)" if bottom else
             "at the start of the backward (every kept activation alive)" if not m.recompute_class
             else f"in the backward of {_span(pb, m.recompute_class)} (a chunk made again)"
             if chunked else
             f"in the backward of {pb.classes[m.recompute_class].layers[-1]} (recomputing it)")
    notes = [f"peak memory {_gib(m.peak)} per GPU {where}: " + " + ".join(parts)
             + "; estimate: the larger of the backward's start (every kept activation, the LM "
               "head's gradient) and its end (every gradient, one layer's activations), plus the "
               "largest working set of one op (its buffers, and the gradients and temporaries its "
               "backward makes); allocated bytes, without the allocator's slack (reserved minus "
               "allocated) or kernel workspaces"]
    if sol.recompute:
        figures = class_figures(pb, sol.choice, sol.chunked)
        for c in sorted(sol.recompute, key=list(pb.classes).index):
            f, k = figures[c], len(pb.classes[c].layers)
            if pb.classes[c].kind == "chunk":
                notes.append(f"chunk {_span(pb, c)} into {chunk_count(pb, sol, c)} chunks of tokens: "
                             f"keeps its input ({_gib(f.inputs)}) instead of {_gib(f.kept)}, for "
                             f"{f.forward_s * 1e3:.1f} ms more per step (each chunk's forward "
                             "again in backward)")
                continue
            notes.append(f"recompute {_span(pb, c)}: each keeps its inputs ({_gib(f.inputs)}) "
                         f"instead of {_gib(f.kept)} of activations, saving "
                         f"{_gib((f.kept - f.inputs) * k)} in all, for {f.forward_s * k * 1e3:.1f} ms "
                         "more per step (the forward again in backward)")
            if (sol.groups or {}).get(c):
                notes.append(_group_note(pb, sol, c, f))
            if c in sol.offload:
                notes.append(_offload_note(pb, sol, c, f))
            kept = (sol.selective or {}).get(c, 0)
            if kept:
                notes.append(f"recompute {_layer_span(pb.classes[c].layers[-kept:])} keeping "
                             f"attention's outputs: each keeps {_gib(f.attention)} more (its "
                             f"attention's output and lse), {_gib(f.attention * kept)} in all, for "
                             f"{f.attention_s * kept * 1e3:.1f} ms less per step (attention not run "
                             "again in backward)")
    return notes


def _chunked_away(pb: Problem, sol: Solution, n) -> bool:
    """Is node n's output kept only by a region's ops, made inside that region, and the region
    chunked? (Its input stays: the chunks' checkpoints keep it.)"""
    return any(R in sol.chunked and R in pb.node_regions.get(pb.template[n], ())
               for R in pb.saving_region.get(n, ()))


def region_chunks(pb: Problem, sol: Solution, R: str) -> int:
    """How many chunks a token-wise region runs in: what an override says, else enough that
    its largest kept tensor is at most CHUNK_BYTES a chunk (1: checkpointed whole)."""
    if pb.regions[R].chunks:
        return pb.regions[R].chunks
    largest = region_figures(pb, sol.choice, {R})[R].largest
    return max(1, -(-int(largest) // CHUNK_BYTES))


def _region_notes(pb: Problem, sol: Solution) -> list[str]:
    figures = region_figures(pb, sol.choice, sol.chunked)
    notes = []
    for R in (R for R in pb.regions if R in sol.chunked):
        f, reg = figures[R], pb.regions[R]
        if reg.cls not in sol.recompute:
            what = f"each keeps its input ({_gib(f.inputs)}) instead of {_gib(f.kept)}, "
        else:
            what = (f"{_gib(f.chunk)} live while one chunk is recomputed instead of "
                    f"{_gib(f.whole - f.working + f.chunk)} in its recomputed layer, ")
        k = region_chunks(pb, sol, R)
        how = (f"chunk {_region_span(pb, R)} into {k} chunks of tokens" if k > 1 else
               f"checkpoint {_region_span(pb, R)} whole (1 chunk)")
        notes.append(f"{how}: {what}for {f.forward_s * len(reg.paths) * 1e3:.1f} ms more per "
                     "step (each chunk's forward again in backward)")
    return notes


def _region_span(pb: Problem, R: str) -> str:
    """`layers.0-31.mlp` for a region in consecutive layers, else its modules listed."""
    paths = pb.regions[R].paths
    layers = [layer_of(p) for p in paths]
    prefix, suffix = layers[0].rsplit(".", 1)[0], paths[0][len(layers[0]):]
    idx = [int(layer.rsplit(".", 1)[1]) for layer in layers]
    if len(paths) > 1 and idx == list(range(idx[0], idx[0] + len(idx))) and all(
            layer.rsplit(".", 1)[0] == prefix and p == layer + suffix for p, layer in zip(paths, layers)):
        return f"{prefix}.{idx[0]}-{idx[-1]}{suffix}"
    return ", ".join(paths)


def explain_regions(pb: Problem, sol: Solution) -> dict[str, str]:
    """For every token-wise region: whole or in chunks, what each costs, why. Keyed by each
    module's first node, so `plan.explain("layers.3.mlp")` shows it."""
    if not pb.regions:
        return {}
    figures = region_figures(pb, sol.choice)
    paths = {p: R for R, reg in pb.regions.items() for p in reg.paths}
    firsts = {}
    for n in plan_nodes(pb.dims):
        m = pb.dims.cap.module_path(n)
        for p in (m[:i] for i in range(len(m), 0, -1) if i == len(m) or m[i] == "."):
            if p in paths:
                firsts.setdefault(p, n.name)
                break
    out = {}
    for R, reg in pb.regions.items():
        f, chosen = figures[R], R in sol.chunked
        k = region_chunks(pb, sol, R)
        lines = [f"{_region_span(pb, R)} ({len(reg.paths)} alike, token by token): "
                 + (f"in {k} chunk{'s' * (k > 1)} of tokens" if chosen else "whole"),
                 f"  whole:   {_gib(f.kept)} per layer kept for backward (unless the layer "
                 f"recomputes; then {_gib(f.whole)} made again)" + ("" if chosen else "  ← chosen"),
                 f"  chunked: {_gib(f.inputs)} per layer kept (its input), {_gib(f.chunk)} live "
                 f"in one chunk, +{f.forward_s * 1e3:.3f} ms per layer for the chunks' forward "
                 "again in backward" + ("  ← chosen" if chosen else "")]
        if reg.forced:
            why = "an override asks for it."
        elif chosen:
            why = (f"the memory budget ({_gib(sol.budget)}) needs it: the predicted peak is "
                   f"{_gib(sol.memory_bytes)} with it." if sol.budget else "it is in the plan.")
        elif not pb.recompute_allowed:
            why = "the planner was told not to recompute."
        else:
            why = "the plan fits without it, and one pass is faster."
        lines.append(f"  chosen: {'chunked' if chosen else 'whole'} - {why}")
        text = "\n".join(lines)
        for p, head in zip(reg.paths, reg.heads):  # a chain has no module: its first op
            key = firsts.get(p, head)
            out[key] = out[key] + "\n" + text if key in out else text
    return out


def _offload_note(pb: Problem, sol: Solution, c: str, f) -> str:
    k, g = _offload_count(pb, sol, c), (sol.groups or {}).get(c, 1)
    n = G.units(pb, c, g)
    _, host, _ = G.kept_units(pb, sol.choice, c, g, k)
    secs = fetch_time(pb, sol.choice, c, k)
    if k == n and g == 1:
        span, what = _span(pb, c), f"their inputs ({_gib(f.inputs)} each)"
    elif k == n:
        span, what = _span(pb, c), f"their groups' inputs ({_gib(f.unit)} each)"
    else:
        mine = set(pb.classes[c].layers)
        span = _layer_span([layer for layer in offloaded_layers(pb, sol) if layer in mine])
        what = (f"the inputs of the earliest {k} of its {n} {'groups' if g > 1 else 'layers'} (the "
                "earliest: their backward runs last, when the inputs kept above them are freed, "
                "and the units above them give their copies back time to land)")
    return (f"offload {span}: {what} live in host memory until their backward: {_gib(host)} less "
            f"on the GPU (but for {f'{IN_FLIGHT} layers' if k >= 2 else 'one layer'}"
            f"{chr(39) if k >= 2 else chr(39) + 's'} worth being copied), {_gib(host)} of host "
            f"memory, for {secs * 1e3:.1f} ms more per step (copied back in backward at "
            f"{pb.costs.gpu.host_bandwidth / 1e9:.0f} GB/s: the first one backward needs before "
            "its rerun, each other's prefetched on a side stream during the backward of the one "
            "above it, exposed only where the copy takes longer; the copy out in forward overlaps "
            "compute on a side stream)")


def _group_note(pb: Problem, sol: Solution, c: str, f) -> str:
    g = sol.groups[c]
    K, n = len(pb.classes[c].layers), G.units(pb, c, g)
    groups = [grp for grp in G.groups_of(pb.classes[c].layers, g)]
    return (f"recompute {_span(pb, c)} in {n} nested groups of {g} ("
            + ", ".join(_layer_span(list(grp)) for grp in groups[:3]) + (", ..." if n > 3 else "")
            + f"): each group keeps its first layer's inputs alone ({_gib(f.unit)} a group), "
            f"{_gib((K - n) * f.unit)} less kept, its {g - 1} inner layers' inputs made again "
            f"while it runs backward (+{_gib((g - 1) * f.unit)} then), for "
            f"{f.forward_s * (K - n) * 1e3:.1f} ms more per step (each group's forward again, "
            "but its last layer's, before each layer's own backward)")


def explain_recompute(pb: Problem, sol: Solution) -> dict[str, str]:
    """For every layer class: kept or recomputed, what each costs in bytes and seconds, why.
    Keyed by each layer's first node at the layer's own path (`layers.3` itself), else its
    first node, so `plan.explain("layers.3")` shows it beside the attention's alternatives."""
    if not pb.classes:
        return {}
    figures = class_figures(pb, sol.choice, sol.chunked)
    budget = sol.budget
    firsts = _layer_keys(pb)
    out = {}
    for c, lc in pb.classes.items():
        f, k = figures[c], len(lc.layers)
        chosen = c in sol.recompute
        if lc.kind == "chunk":
            out[lc.nodes[0].name] = _explain_chunk(pb, sol, c, f)
            continue
        g = (sol.groups or {}).get(c, 1) if chosen else 1
        count = _offload_count(pb, sol, c) if c in sol.offload else 0
        units = G.units(pb, c, g)
        lines = [f"{_span(pb, c)} ({k} layer(s) alike): "
                 + ("recomputed" if chosen else "activations kept")
                 + (f" in nested groups of {g}" if g > 1 else "")
                 + ((", inputs in host memory" if count == units else
                     f", the inputs of the earliest {count} of {units} {'groups' if g > 1 else 'layers'}"
                     " in host memory") if count else ""),
                 f"  keep activations: {_gib(f.kept)} per layer ({_gib(f.kept * k)} in all)"
                 + ("" if chosen else "  ← chosen"),
                 f"  recompute:        {_gib(f.inputs)} per layer kept (its inputs), "
                 f"+{f.forward_s * 1e3:.3f} ms per layer ({f.forward_s * k * 1e3:.1f} ms per step) "
                 f"for the forward again, {_gib(f.working)} live while one layer is recomputed"
                 + ("  ← chosen" if chosen and c not in sol.offload else ""),
                 f"  offload:          nothing kept on the GPU (its inputs in host memory), "
                 f"+{(f.forward_s + f.fetch_s) * 1e3:.3f} ms per layer (the forward again and "
                 f"{f.fetch_s * 1e3:.3f} ms waiting for its inputs copied back, on average), {_gib(f.working + IN_FLIGHT * f.inputs)} live"
                 + ("  ← chosen" if c in sol.offload else "")]
        kept = (sol.selective or {}).get(c, 0)
        if f.attention:
            lines.append(f"  selective:        recomputed (or offloaded) keeping attention's outputs "
                         f"too: +{_gib(f.attention)} per layer kept, -{f.attention_s * 1e3:.3f} ms "
                         "per layer (attention not run again); "
                         + (f"{kept} of {k} layers keep them ({_layer_span(lc.layers[-kept:])}, the "
                            "last: their backward runs first)  ← chosen" if kept else "none chosen"))
        sizes = G.group_sizes(pb, c)
        for size in sizes[1:] if len(sizes) > 1 or g > 1 else ():
            n = G.units(pb, c, size)
            lines.append(f"  groups of {size}:      nested checkpoints ({n} group{'s' * (n > 1)}): "
                         f"{_gib(f.first + (n - 1) * f.unit)} of inputs kept instead of "
                         f"{_gib(f.inputs * k)}, +{_gib((size - 1) * f.unit)} live in a group's "
                         f"backward, +{f.forward_s * (k - n) * 1e3:.1f} ms per step (each group's "
                         "forward again but its last layer's)" + ("  ← chosen" if size == g else ""))
        if count and count < units:
            lines.append(f"  offloaded:        the earliest {count} of {units} kept inputs (their "
                         "backward runs last: the GPU has freed the inputs kept above them, and "
                         "their copies back are prefetched meanwhile), within the host's room "
                         "beside the optimizer state  ← chosen")
        if lc.offload:
            why = "an override asks for it."
        elif c in sol.offload:
            why = (f"the memory budget ({_gib(budget)}) needs it: recomputing with the inputs on "
                   f"the GPU does not fit; the predicted peak is {_gib(sol.memory_bytes)} with it."
                   if budget else "it is in the plan.")
        elif lc.forced and g > 1 and not lc.group:
            why = "an override asks to recompute; the memory budget needs the groups."
        elif lc.forced:
            why = "an override asks for it."
        elif chosen:
            why = (f"the memory budget ({_gib(budget)}) needs it: the predicted peak is "
                   f"{_gib(sol.memory_bytes)} with it." if budget else "it is in the plan.")
        elif not pb.recompute_allowed:
            why = "the planner was told not to recompute."
        else:
            why = (f"the plan fits the budget ({_gib(budget)}; peak {_gib(sol.memory_bytes)}) "
                   "without it, and keeping is faster." if budget else "keeping is faster.")
        how = ("offload" if c in sol.offload else "recompute" if chosen else "keep") + \
            (f" in groups of {g}" if g > 1 else "")
        if g > 1 and not lc.group and (budget or c not in sol.offload):
            why += (f" Groups of {g}: layer by layer (its inputs on the GPU or in host memory) "
                    "does not fit, or fits only slower than a group's forward again.")
        lines.append(f"  chosen: {how} - {why}")
        text = "\n".join(lines)
        for layer in lc.layers:
            if layer in firsts:
                out[firsts[layer]] = text
    return out


def _lone_groups(pb: Problem) -> list[str]:
    """A note for each layer an override asks to group (`group:G`, G > 1) that is alone in its
    layer class (other overrides made the layers around it differ): it runs as a group of one,
    and the plan says so rather than narrowing the override silently."""
    lone = [(lc.layers[0], lc.group) for lc in pb.classes.values()
            if lc.kind == "layer" and (lc.group or 1) > 1 and len(lc.layers) == 1]
    return [f"group:{g} asked for {layer}, but it is alone in its layer class (another override "
            "makes the layers around it differ, e.g. offload on it alone): it is recomputed on "
            "its own, a group of 1; give a group's layers the same memory terms"
            for layer, g in lone]


def _explain_chunk(pb: Problem, sol: Solution, c: str, f) -> str:
    lc, chosen = pb.classes[c], c in sol.recompute
    lines = [f"{lc.label}: " + (f"in {chunk_count(pb, sol, c)} chunks of tokens" if chosen
                                else "whole"),
             f"  whole:     {_gib(f.kept)} kept for backward (mostly the logits, in float32)"
             + ("" if chosen else "  ← chosen"),
             f"  chunked:   {_gib(f.inputs)} kept (its input), +{f.forward_s * 1e3:.3f} ms for the "
             f"chunks' forward again in backward, {_gib(f.working)} live in one chunk"
             + ("  ← chosen" if chosen else "")]
    if lc.forced:
        why = "an override asks for it."
    elif chosen:
        why = f"the memory budget ({_gib(sol.budget)}) needs it." if sol.budget else "it is in the plan."
    elif not pb.recompute_allowed:
        why = "the planner was told not to recompute."
    else:
        why = "the plan fits without it, and one pass is faster."
    lines.append(f"  chosen: {'chunked' if chosen else 'whole'} - {why}")
    return "\n".join(lines)


def _layer_keys(pb: Problem) -> dict[str, str]:
    """layer → the node its explanation is filed under: the first node at the layer's own path
    (`layers.3`: the residual add), else its first node."""
    out, exact = {}, set()
    for n in plan_nodes(pb.dims):
        m = pb.dims.cap.module_path(n)
        layer = layer_of(m)
        if layer is None or layer in exact:
            continue
        if m == layer:
            out[layer] = n.name
            exact.add(layer)
        else:
            out.setdefault(layer, n.name)
    return out


def _span(pb: Problem, c: str) -> str:
    """`layers.0-15` for a class of consecutive layers, else its layers listed; a region's label."""
    if c in pb.regions:
        return _region_span(pb, c)
    if pb.classes[c].kind == "chunk":
        return pb.classes[c].label
    layers = pb.classes[c].layers
    if len(layers) == 1:
        return layers[0]
    prefix = layers[0].rsplit(".", 1)[0]
    idx = [int(layer.rsplit(".", 1)[1]) for layer in layers]
    if all(layer.rsplit(".", 1)[0] == prefix for layer in layers) and \
            idx == list(range(idx[0], idx[0] + len(idx))):
        return f"{prefix}.{idx[0]}-{idx[-1]}"
    return ", ".join(layers)


def _layer_span(layers) -> str:
    """`layers.4-7` for consecutive layers, else them listed."""
    prefix = layers[0].rsplit(".", 1)[0]
    idx = [int(layer.rsplit(".", 1)[1]) for layer in layers if layer.rsplit(".", 1)[-1].isdigit()]
    if len(layers) > 1 and len(idx) == len(layers) and idx == list(range(idx[0], idx[0] + len(idx))) \
            and all(layer.rsplit(".", 1)[0] == prefix for layer in layers):
        return f"{prefix}.{idx[0]}-{idx[-1]}"
    return ", ".join(layers)


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def explain_all(pb: Problem, sol: Solution) -> dict[str, str]:
    """For every attention node: each alternative's cost with the rest of the plan as chosen."""
    dims = pb.dims
    out = {}
    by_template: dict = {}
    for n in plan_nodes(dims):
        by_template.setdefault(pb.template[n], []).append(n)
    for t, sts in pb.strategies.items():
        if not is_attention(t):
            continue
        rows = []
        for i, st in enumerate(sts):
            c = pb.node_cost[(t, i)]
            edge_t, edge_mem = 0.0, 0.0
            for key, tensor in pb.tensors.items():
                share = tensor.mult / pb.mult[t]
                if any(v is t for v, _ in tensor.consumers):  # what t's inputs cost in strategy i
                    l = pb.need[(key, t, i)]
                    c_in = pb.move.get((key, sol.choice[tensor.producer], l))
                    if c_in:
                        edge_t += c_in[0] * share
                        edge_mem += c_in[2] * share
                if tensor.producer is t:  # what moving t's output to its readers costs
                    for l in {pb.need[(key, v, sol.choice[v])] for v, _ in tensor.consumers if v is not t}:
                        c_out = pb.move.get((key, i, l))
                        if c_out:
                            edge_t += c_out[0] * share
            rows.append((c.time_s + edge_t, i, c, edge_t, c.memory_bytes + edge_mem + c.transient_bytes))
        rows.sort(key=lambda r: r[0])
        chosen = sol.choice[t]
        lines = [f"{t.name} ({dims.cap.module_path(t)}), {pb.mult[t]} layer(s) alike; "
                 "alternatives with the rest of the plan as chosen:",
                 f"  {'strategy':34s} {'total':>10s} {'compute':>10s} {'comm':>10s} {'redist.':>10s} {'memory':>10s}"]
        for total, i, c, edge_t, mem in rows:
            st = sts[i]
            label = _strategy_label(dims, pb.mesh, st)
            mark = "  ← chosen" if i == chosen else ""
            lines.append(f"  {label:34s} {_ms(total):>10s} {_ms(c.compute_s):>10s} {_ms(c.comm_s):>10s} "
                         f"{_ms(edge_t):>10s} {mem / 2**20:>8.1f} MiB{mark}")
        best_i = rows[0][1]
        if best_i == chosen:
            why = "it has the lowest predicted time."
        else:
            why = (f"{_strategy_label(dims, pb.mesh, sts[best_i])} would be faster here but the "
                   "whole plan is cheaper (or fits memory) with this choice.")
        lines.append(f"  chosen: {_strategy_label(dims, pb.mesh, sts[chosen])} - {why}")
        text = "\n".join(lines)
        for n in by_template[t]:
            out[n.name] = text
    return out


def _strategy_label(dims, mesh, st: Strategy) -> str:
    splits = " ".join(f"{dims.F.label(a)}@{ax}" for (ax, _), a in zip(mesh, st.splits) if a is not None)
    return f"{st.algorithm or '-'} [{splits or 'replicated'}]"


def _ms(t: float) -> str:
    return f"{t * 1e3:.3f}ms"


def _op(n) -> str:
    t = n.target
    return getattr(getattr(t, "overloadpacket", t), "__name__", str(t))
