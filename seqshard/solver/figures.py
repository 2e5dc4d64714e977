"""The memory and time of one chosen plan, counted directly from a choice of strategies (template
node → strategy index) and the recompute, offload, chunk, selective and group decisions: what the
CP-SAT model (`model.py`) states as linear terms, here as plain sums.

Used by the solver's own check (`Model.solve` asserts that the model's kept bytes bound
`memory_of`'s), by `explain.py` (the plan's predicted figures and its notes: what recompute,
offload, chunks and selective recompute save and cost) and by the brute-force tests of the
formulation (tests/test_memory_plans.py, test_offload.py, test_groups.py, test_chunk_regions.py).

    memory_of       the predicted peak per GPU and where it is reached (`Memory`)
    class_figures   per layer class: kept bytes with and without recompute, the working set of
                    its rerun, the forward run again (`ClassFigures`)
    region_figures  per token-wise region: the same, whole and in chunks (`RegionFigures`)
    fetch_time      the wait for a class's offloaded inputs copied back in backward
    chosen_moves    the redistributions a choice runs
    kept_attention  the attention nodes whose outputs a selective layer keeps, and
                    `attention_cache_bytes` what it keeps of them
    live_again, extra_bytes   per tensor, per node: the terms `Model` builds from too
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from seqshard.costmodel import attention as att_cost
from seqshard.strategies.strategy import is_attention

from . import groups as G
from .problem import CHUNK_BYTES, Problem

__all__ = ["IN_FLIGHT", "Memory", "memory_of", "ClassFigures", "class_figures", "RegionFigures",
           "region_figures", "fetch_time", "chosen_moves", "kept_attention",
           "attention_cache_bytes", "live_again", "extra_bytes"]

IN_FLIGHT = 2
"""Layers' worth of offloaded inputs on the GPU at once: the one fetched back for the layer being
recomputed, and one more being copied (out in forward, back in backward)."""


@dataclass
class Memory:
    """The predicted peak per GPU and what it is made of (bytes; `model.py`'s docstring, "memory")."""

    state: float                # parameters, gradients, optimizer state
    kept: float                 # activations kept for backward (inputs only, in recomputed layers)
    recompute: float = 0.0      # one recomputed layer's activations, live again in its backward
    transient: float = 0.0      # the largest working set of one node
    recompute_class: str | None = None   # the class whose layer that is
    transient_node: object = None        # the template node with that working set
    host: float = 0.0           # offloaded layer inputs, in host memory (not in the peak)
    grads: float = 0.0          # parameter gradients made by then
    phase: str = "top"          # "top": the start of the backward, every kept activation alive
    #                             (the LM head's gradient made); "bottom": the first layer's
    #                             backward, every gradient made, one layer's activations alive

    @property
    def peak(self) -> float:
        return self.state + self.grads + self.kept + self.recompute + self.transient


def live_again(pb: Problem, c: str, kept: float) -> float:
    """What of a tensor is live again while a class is recomputed: all of it for a layer, one
    chunk (at most CHUNK_BYTES) for a chunked region."""
    return min(kept, CHUNK_BYTES) if pb.classes[c].kind == "chunk" else kept


def chosen_moves(pb: Problem, choice: dict):
    """The redistributions a choice runs: ((tensor, producer strategy, layout), costs)."""
    needed = {(key, l) for (key, v, j), l in pb.need.items() if choice[v] == j}
    for (key, i, l), c in pb.move.items():
        if choice[pb.tensors[key].producer] == i and (key, l) in needed:
            yield (key, i, l), c


def kept_attention(pb: Problem) -> dict[str, list]:
    """class → [(attention template n, members per layer)]: the attention nodes of each layer
    class whose outputs autograd keeps (they need a gradient), what a selective layer keeps."""
    out: dict = {}
    for c, lc in pb.classes.items():
        if lc.kind != "layer":
            continue
        for n in lc.nodes:
            members = pb.kept_by.get(n, {}).get(c)
            if members and is_attention(n) and any(
                    pb.node_cost[(n, i)].memory_bytes for i in range(len(pb.strategies[n]))):
                out.setdefault(c, []).append((n, members / len(lc.layers)))
    return out


def attention_cache_bytes(pb: Problem, n, i: int) -> float:
    """What a selective layer keeps of attention node n under strategy i: every output of its op
    (selective checkpointing keeps them all, `runtime.selective`): out and the fp32 lse (the
    node's kept bytes), and for Ulysses and the hybrid the head-layout q, k/v, out and lse
    their backward reads (`runtime.ulysses`: q_h and out_h like q, lse_h like lse, kv_h
    2·b·m·S·e with m the kv heads each rank holds after the exchange)."""
    a = pb.node_cost[(n, i)].memory_bytes
    st = pb.strategies[n][i]
    if not a or st.algorithm not in ("ulysses", "hybrid"):
        return a
    costs, F = pb.costs, pb.dims.F
    att = pb.dims.attention(n)
    ins = dict(st.inputs)
    q_lay, kv_lay = ins[n.args[0]], ins[n.args[1]]
    q, k = costs.bytes(n.args[0], q_lay), costs.bytes(n.args[1], kv_lay)

    def local(dim, layout):
        return prod(costs.local(F.find(x), layout) for x in F.atoms_of(dim))

    heads, kv_heads = local(att.heads, q_lay), local(att.kv_heads, kv_lay)
    seq = {F.find(x) for x in F.atoms_of(att.seq_k)}
    inner = costs.shape[[j for j, x in enumerate(st.splits) if x in seq][-1]]
    shape = att_cost.AttentionShape(batch=1, heads=heads, kv_heads=kv_heads, seq=1, head_dim=1,
                                    dtype_bytes=costs.dtype_bytes, causal=False)
    kv_h = 2 * k * inner * att_cost.ulysses_kv_heads(shape, inner) / kv_heads
    return a + 2 * q + kv_h + (a - q)


@dataclass
class ClassFigures:
    """A layer class under a choice of strategies, per layer (bytes, seconds)."""

    kept: float         # activations it keeps when not recomputed
    inputs: float       # what it keeps when recomputed: the tensors entering it
    working: float      # one layer's activations, live again while it is recomputed
    forward_s: float    # the forward run again in backward (compute, communication)
    fetch_s: float = 0.0  # waiting for its inputs copied back from the host in backward, when
    #                       offloaded (`fetch_time`, a step's wait over its layers)
    attention: float = 0.0       # what a selective layer keeps beside its inputs: its attention's
    #                              outputs (`attention_cache_bytes`)
    attention_live: float = 0.0  # of `working`, attention's out and lse: not made again there
    attention_s: float = 0.0     # attention's forward (communication included), not run again
    first: float = 0.0  # of the inputs (all layers'), what the first layer's checkpoint keeps
    unit: float = 0.0   # ...and each other's (`groups.unit_split`): what a group keeps, and
    #                     each of its inner layers makes again in the group's backward


def fetch_time(pb: Problem, choice: dict, c: str, units: int | None = None) -> float:
    """Seconds a step waits for class c's offloaded inputs copied back in backward, with its
    earliest `units` kept-input units offloaded (default: all of them, layer by layer): the
    first one backward needs, exposed; each next one prefetched while the unit above runs its
    backward (one layer's forward and backward), exposed for what its copy takes longer
    (`groups.fetch_ns`; `Model._fetch_time`, the same terms)."""
    k = G.units(pb, c, 1) if units is None else units
    return G.fetch_ns(pb, choice, c, k) / G.NS


def class_figures(pb: Problem, choice: dict, chunked=frozenset()) -> dict[str, ClassFigures]:
    """For every layer class: kept bytes without and with recompute, the working set, and the
    forward time that recomputing adds, all per layer (class totals / its layer count), with
    the regions in `chunked` run in chunks."""
    out = {}
    moves = list(chosen_moves(pb, choice))
    for c, lc in pb.classes.items():
        kept = working = fwd = 0.0
        for n, counts in pb.kept_by.items():
            if counts.get(c):
                a = pb.node_cost[(n, choice[n])].memory_bytes
                kept += counts[c] * a
                working += live_again(pb, c, a)
        for (key, i, l), (_, _, b) in moves:
            t = pb.tensors[key]
            if t.cls == c:
                kept += t.mult * b
                working += live_again(pb, c, b)
                fwd += t.mult * pb.move_forward.get((key, i, l), 0.0)
        for n in lc.nodes:
            fwd += pb.mult[n] * pb.forward[(n, choice[n])].time_s
        inputs = 0.0
        for (u, idx), (count, x) in lc.inputs.items():
            st = pb.strategies[u][choice[u]]
            inputs += count * pb.costs.bytes(x, st.output if idx is None else st.output[idx])
        k = len(lc.layers)
        out[c] = ClassFigures(kept / k, inputs / k, working, fwd / k, fetch_time(pb, choice, c) / k)
        if lc.kind == "layer":
            first, typical = G.unit_bytes(pb, c)
            out[c].first = sum(b for (u, i), b in first.items() if choice[u] == i)
            out[c].unit = sum(b for (u, i), b in typical.items() if choice[u] == i)
        for n, m in kept_attention(pb).get(c, ()):
            out[c].attention += m * attention_cache_bytes(pb, n, choice[n])
            out[c].attention_live += pb.node_cost[(n, choice[n])].memory_bytes
            out[c].attention_s += m * pb.forward[(n, choice[n])].time_s
    for R, f in region_figures(pb, choice, chunked).items():  # their chunks' checkpoints keep
        c = out[pb.regions[R].cls]                            # only their inputs
        c.kept += f.inputs - f.kept
        c.working -= f.whole - f.working
    return out


@dataclass
class RegionFigures:
    """A token-wise region under a choice of strategies, per layer (bytes, seconds)."""

    kept: float         # what only its ops keep, whole
    inputs: float       # what its chunks' checkpoints keep instead: its input
    chunk: float        # one chunk's activations (at most CHUNK_BYTES a tensor)
    working: float      # that and its input: what a recomputed layer makes again of it
    whole: float        # the same, not chunked
    forward_s: float    # its forward, again in backward
    largest: float      # its largest kept tensor, whole: the chunk count's measure


def region_figures(pb: Problem, choice: dict, regions=None) -> dict[str, RegionFigures]:
    """For every region (or those named in `regions`), per layer."""
    out = {}
    for R, reg in pb.regions.items():
        if regions is not None and R not in regions:
            continue
        kept = chunk = outer = whole = fwd = largest = 0.0
        for n, counts in pb.region_kept.items():
            if R in counts:
                a = pb.node_cost[(n, choice[n])].memory_bytes
                kept += counts[R] * a
                whole += a
                if R in pb.node_regions.get(n, ()):
                    chunk += min(a, CHUNK_BYTES)
                else:
                    outer += a
        for n in reg.nodes:
            fwd += pb.mult[n] * pb.forward[(n, choice[n])].time_s
            largest = max(largest, pb.node_cost[(n, choice[n])].memory_bytes)
        inputs = 0.0
        for (u, idx), (count, x) in reg.inputs.items():
            st = pb.strategies[u][choice[u]]
            inputs += count * pb.costs.bytes(x, st.output if idx is None else st.output[idx])
        k = len(reg.paths)
        out[R] = RegionFigures(kept / k, inputs / k, chunk, chunk + outer, whole, fwd / k, largest)
    return out


def memory_of(pb: Problem, choice: dict, recompute=frozenset(), offload=frozenset(),
              chunked=frozenset(), selective=None, groups=None) -> Memory:
    """The peak the memory constraint sees, counted directly from a choice (the CP-SAT model
    must agree; `Model.solve` asserts it), and where it is reached. `offload` ⊆ `recompute`:
    classes whose inputs are in host memory (IN_FLIGHT layers' worth on the GPU), all of their
    kept-input units, or {class: how many, its earliest}; `chunked`: token-wise regions run in
    chunks; `groups`: {class: g} recomputed in nested groups of g (`groups.py`)."""
    groups = groups or {}
    if not isinstance(offload, dict):
        offload = {c: G.units(pb, c, groups.get(c, 1)) for c in offload}
    kept = sum(pb.mult[n] * pb.node_cost[(n, i)].memory_bytes for n, i in choice.items())
    kept += sum(pb.tensors[key].mult * b for (key, _, _), (_, _, b) in chosen_moves(pb, choice))
    figures = class_figures(pb, choice, chunked) if pb.classes else {}
    # made again in backward: in a layer (W: a recomputed layer, a chunk of a token-wise
    # region) and in the LM head + loss (Wh: one chunk)
    working, where, head, head_where, host = 0.0, None, 0.0, None, 0.0
    for R, f in region_figures(pb, choice, chunked).items():  # its chunks' checkpoints keep
        kept += (f.inputs - f.kept) * len(pb.regions[R].paths)  # its input (a recomputed
        #                                                          layer's figures count it)
        if f.chunk > working or where is None:  # one chunk made again (its input is kept)
            working, where = f.chunk, R
    for c in recompute:
        f, k = figures[c], len(pb.classes[c].layers)
        live = f.working
        if pb.classes[c].kind == "layer":  # unit 0 and the typical units, some on the host
            g = groups.get(c, 1)
            gpu, on_host, unit = G.kept_units(pb, choice, c, g, offload.get(c, 0))
            kept += gpu - f.kept * k
            host += on_host
            live += (g - 1) * unit  # a group's inner inputs, made again in its backward
        else:
            kept += (f.inputs - f.kept) * k
        if (selective or {}).get(c):  # its last layers keep attention's outputs: not made again
            kept += selective[c] * f.attention
            live -= f.attention_live
        if offload.get(c):  # the unit fetched back, and the next one where another is offloaded
            live += (IN_FLIGHT if offload[c] >= 2 else IN_FLIGHT - 1) * f.inputs
        if pb.classes[c].kind == "chunk":
            if live > head or head_where is None:
                head, head_where = live, c
        elif live > working or where is None:
            working, where = live, c
    extra = {n: extra_bytes(pb, n, i)[1 if _in_chunks(pb, n, recompute, chunked) else 0]
             for n, i in choice.items()}
    in_layer = lambda n: pb.classes.get(pb.node_class.get(n)) is not None and \
        pb.classes[pb.node_class[n]].kind == "layer"  # noqa: E731
    x_layer = max(((b, n) for n, b in extra.items() if in_layer(n)), default=(0.0, None),
                  key=lambda p: p[0])
    x_head = max(((b, n) for n, b in extra.items() if not in_layer(n)), default=(0.0, None),
                 key=lambda p: p[0])
    state = pb.static_bytes - pb.grad_bytes
    tail = 0.0  # kept only by the final norm, LM head and loss: freed before the layers' backward
    for n, counts in pb.tail_kept.items():
        for cls, t in counts.items():
            if cls is None or cls not in recompute:
                tail += t * pb.node_cost[(n, choice[n])].memory_bytes
    for c in recompute:
        if pb.classes[c].kind == "chunk":
            tail += figures[c].inputs * len(pb.classes[c].layers)
    phases = [  # the backward's start: the LM head + loss, the last layer; its end
        Memory(state, kept, head, x_head[0], head_where, x_head[1] if x_head[0] else None, host,
               grads=pb.head_grad_bytes, phase="top"),
        Memory(state, kept - tail, working, x_layer[0], where, x_layer[1] if x_layer[0] else None,
               host, grads=pb.head_grad_bytes, phase="top")]
    layers = [c for c, lc in pb.classes.items() if lc.kind == "layer"]
    if not layers:
        phases.append(Memory(state, 0.0, 0.0, 0.0, None, None, host, grads=pb.grad_bytes,
                             phase="bottom"))
    else:  # the first layer's backward: every gradient made, one layer's activations live
        live, first = max(((figures[c].working + (groups.get(c, 1) - 1) * figures[c].unit
                            if c in recompute else figures[c].working, c) for c in layers),
                          key=lambda p: p[0])
        phases.append(Memory(state, 0.0, live, x_layer[0], first,
                             x_layer[1] if x_layer[0] else None, host, grads=pb.grad_bytes,
                             phase="bottom"))
    return max(phases, key=lambda m: m.peak)


def extra_bytes(pb: Problem, n, i) -> tuple[float, float]:
    """What node n needs beyond the kept activations while it runs, under strategy i: its
    working set (gathered K/V, `Cost.transient_bytes`) and what its backward makes (the
    gradients of its output and inputs, temporaries; `problem._backward_bytes`); whole, and
    when it runs in chunks."""
    t = pb.node_cost[(n, i)].transient_bytes
    whole, chunk = pb.backward.get((n, i), (0.0, 0.0))
    return t + whole, t + chunk


def _in_chunks(pb: Problem, n, recompute, chunked) -> bool:
    """Does n run in chunks: in a chunked LM head + loss, or a chunked token-wise region."""
    c = pb.node_class.get(n)
    if c is not None and pb.classes[c].kind == "chunk":
        return c in recompute
    return any(R in chunked for R in pb.node_regions.get(n, ()))
