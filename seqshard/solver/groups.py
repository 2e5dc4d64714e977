"""Kept-input units of a recomputed layer class: nested checkpoint groups, and offloading a count
of them (`model.Model` builds the variables through these functions; `figures.memory_of` and
`explain.to_plan` count the same).

A recomputed layer keeps its inputs. With groups of g consecutive layers of a class, an outer
checkpoint around each group keeps only the group's input, and each layer in it keeps its own
checkpoint (`codegen.recompute`): in backward the group's forward runs again, but for its last
layer (torch's non-reentrant checkpoint stops the rerun once the last saved tensor it needs, the
last layer's input, is made), which makes its inner layers' inputs again; then each layer's
backward runs as without groups (its own forward again first). So a unit, what one checkpoint
keeps, is a group's input; a class of K layers in groups of g has n_g = ⌈K/g⌉ units (the last
group shorter when g does not divide K), and pays K − n_g more layer forwards per step.

    units    unit 0 (the first layer's, or group's, input: it also holds what the layers share,
             the rotary tables, counted once) costs B0(x) bytes; every other unit the typical
             B(x), the last layer's inputs (`unit_split`: B0 + (K − 1)·B is every input the
             class keeps, exactly, or the class is one unit)
    offload  the earliest k of them live in host memory (k ≤ n_g). The earliest: their backward
             runs last, when the GPU has freed the kept inputs of every layer above them, so the
             IN_FLIGHT copies land in room made free, and their prefetches overlap the layers
             between (the first of them backward meets is copied back exposed; each next one is
             prefetched during the backward of the unit above)
    variables  o[c] = (k ≥ 1) as before, g[c] = r[c] − o[c] (unit 0 on the GPU); k'[c] = k − o[c]
             typical units on the host, m[c] typical units on the GPU, k' + m = Σ_g (n_g − 1)·h[c,g]
             with h[c,g] the one-hot group size (Σ_g h[c,g] = r[c]); products k'·x[u,i], m·x[u,i]
             linearized exactly as y = s·x (`_counted`)
    memory   GPU: B0·(x ∧ g[c]) + B·m;  host: B0·(x ∧ o[c]) + B·k'
             during a group's backward its g − 1 inner inputs are live again: W, Wb ≥ ... +
             (g − 1)·B(x) where h[c,g]
             offloaded units on the GPU while copied: IN_FLIGHT layers' worth in W where
             k ≥ 2 (the unit fetched back and the next one prefetched), one where k = 1 (no
             other unit to prefetch: `fetch`). Without groups the fetched unit is the layer's
             own input, which its working set counts too (left so: the GPU measured 8B at 256K,
             every layer offloaded, at 117.8 GiB, 118.7 predicted); in a group it is the group's
             input, the layer's own one of the g − 1 inner ones. bench/memsim.py, 8B slices at
             1M tokens, counted / predicted: 2 layers in one offloaded group 1.013 (0.927 when
             k = 1 counted a prefetch too), 2 layers offloaded alone 1.010, 4 layers in 2
             offloaded groups 1.011. With some units kept on the GPU the copies land after the
             kept inputs above were freed, so this over-counts by up to IN_FLIGHT units: the
             conservative side
    selective  a layer keeping attention's outputs inside a group keeps them through the
             group's checkpoint (the inner checkpoint's cache holds them, not a saved tensor:
             counted on CPU), and the group's rerun runs its attention again (a full forward,
             priced in E[c]); each layer's own rerun still does not
    time     group reruns: E[c] ≥ (K − n_g)/K · (the class's forward, again) where h[c,g]
             copies back (`fetch`): FIRST ≥ B0/bw where k = 1, ≥ B/bw where k ≥ 2 (e2[c]);
             each further unit prefetched during the backward of the one above (one layer's
             forward and backward, T), exposed past it: (k − 2)·P + P0 where k ≥ 2,
             P = max(0, B/bw − T), P0 = max(0, B0/bw − T) (P0 where e2 only)
"""

from __future__ import annotations

from math import ceil

from seqshard.strategies import PlanError

from .problem import Problem

__all__ = ["GROUP_SIZES", "group_sizes", "groups_of", "unit_split", "unit_bytes", "units",
           "kept_units", "fetch_ns", "layer_order"]

GROUP_SIZES = (1, 2, 4)
"""The group sizes the solver chooses from (an override `group:G` may name any)."""

NS = 1e9


def layer_order(pb: Problem) -> list[str]:
    """Every layer of the layer classes, in graph order."""
    cached = pb.__dict__.get("_layer_order")
    if cached is None:
        seen: dict = {}
        for n in pb.dims.cap.nodes():
            layer = pb.unit.get(n)
            c = next((c for c, lc in pb.classes.items() if layer in lc.layers and lc.kind == "layer"),
                     None) if layer is not None and layer not in seen else None
            if c is not None:
                seen[layer] = c
        cached = pb.__dict__["_layer_order"] = list(seen)
    return cached


def groups_of(layers, g: int) -> list[tuple[str, ...]]:
    """Consecutive groups of g layers, the last one shorter when g does not divide them."""
    layers = tuple(layers)
    return [layers[i:i + g] for i in range(0, len(layers), g)]


def group_sizes(pb: Problem, c: str) -> tuple[int, ...]:
    """The group sizes class c may take: an override's (`group:G`; `recompute` or `offload`
    alone: 1), else those of `GROUP_SIZES` up to its layer count whose groups are consecutive
    layers of the model; 1 only where its inputs are one unit (`unit_split`) and with sharded
    model state."""
    lc = pb.classes[c]
    if lc.kind != "layer":
        return (1,)
    order = {layer: i for i, layer in enumerate(layer_order(pb))}

    def consecutive(g):
        return all(order.get(grp[-1], -1) - order.get(grp[0], -10**9) == len(grp) - 1
                   for grp in groups_of(lc.layers, g))

    if getattr(lc, "group", None):
        g = min(lc.group, len(lc.layers))
        if not consecutive(g):
            bad = next(grp for grp in groups_of(lc.layers, g)
                       if order[grp[-1]] - order[grp[0]] != len(grp) - 1)
            raise PlanError(f"an override asks for groups of {lc.group} of the layers "
                            f"{', '.join(lc.layers[:4])}{', ...' if len(lc.layers) > 4 else ''}, "
                            f"but {bad[0]} and {bad[-1]} are not consecutive layers of the model "
                            "(another kind of layer lies between them): a group is consecutive "
                            "layers alike; use group:1 (or recompute) here")
        return (g,)
    if lc.forced or lc.offload or not unit_split(pb, c)[1] or pb.state_comm is not None:
        return (1,)  # sharded state: an FSDP unit is one layer (`planner/state.py`), not a group
    return tuple([1] + [g for g in GROUP_SIZES[1:] if g <= len(lc.layers) and consecutive(g)])


def units(pb: Problem, c: str, g: int) -> int:
    """How many kept-input units class c has in groups of g (one where its inputs are one)."""
    return ceil(len(pb.classes[c].layers) / g) if unit_split(pb, c)[1] else 1


def unit_split(pb: Problem, c: str) -> tuple[dict, dict]:
    """(first, typical): (template producer, output index) → how many of its tensors unit 0
    keeps, and each other unit (the last layer's inputs), so that first + (K − 1)·typical is
    every input the class keeps (`LayerClass.inputs`). Where the class's layers do not read
    alike (that would make a count negative), every input is unit 0's and there is no other."""
    cache = pb.__dict__.setdefault("_unit_split", {})
    if c not in cache:
        lc = pb.classes[c]
        k = len(lc.layers)
        typical: dict = {}
        if k > 1:
            for u, idx, _ in pb.layer_inputs.get(lc.layers[-1], ()):
                typical[(u, idx)] = typical.get((u, idx), 0) + 1
        first = {key: count - (k - 1) * typical.get(key, 0) for key, (count, _) in lc.inputs.items()}
        if any(v < 0 for v in first.values()) or any(key not in lc.inputs for key in typical):
            first, typical = {key: count for key, (count, _) in lc.inputs.items()}, {}
        cache[c] = ({key: v for key, v in first.items() if v}, typical)
    return cache[c]


def unit_bytes(pb: Problem, c: str) -> tuple[dict, dict]:
    """(first, typical): (u, i) → bytes of unit 0 and of every other unit that template u's
    outputs make up with strategy i (in u's output layout: what a checkpoint keeps)."""
    cache = pb.__dict__.setdefault("_unit_bytes", {})
    if c not in cache:
        lc = pb.classes[c]
        out = []
        for counts in unit_split(pb, c):
            b: dict = {}
            for (u, idx), count in counts.items():
                x = lc.inputs[(u, idx)][1]
                for i, st in enumerate(pb.strategies[u]):
                    b[(u, i)] = b.get((u, i), 0.0) + count * pb.costs.bytes(
                        x, st.output if idx is None else st.output[idx])
            out.append(b)
        cache[c] = tuple(out)
    return cache[c]


def kept_units(pb: Problem, choice: dict, c: str, g: int, k: int) -> tuple[float, float, float]:
    """(on the GPU, on the host, one typical unit) bytes of class c's kept inputs in groups of g
    with its earliest k units offloaded."""
    first, typical = unit_bytes(pb, c)
    b0 = sum(b for (u, i), b in first.items() if choice[u] == i)
    bt = sum(b for (u, i), b in typical.items() if choice[u] == i)
    n = units(pb, c, g)
    if k == 0:
        return b0 + (n - 1) * bt, 0.0, bt
    return (n - k) * bt, b0 + (k - 1) * bt, bt


def layer_ns(pb: Problem, c: str) -> dict:
    """(n, i) → integer ns of one layer of c's forward and backward that node n with strategy i
    takes (T: what a prefetch overlaps)."""
    lc = pb.classes[c]
    return {(n, i): int(round(pb.mult[n] / len(lc.layers) * pb.node_cost[(n, i)].time_s * NS))
            for n in lc.nodes for i in range(len(pb.strategies[n]))}


def copy_ns(pb: Problem, c: str) -> tuple[dict, dict]:
    """(first, typical): (u, i) → integer ns of copying back unit 0's and a typical unit's bytes
    that u makes with strategy i."""
    bw = pb.costs.gpu.host_bandwidth
    return tuple({k: int(round(b / bw * NS)) for k, b in part.items()} for part in unit_bytes(pb, c))


def fetch_ns(pb: Problem, choice: dict, c: str, k: int) -> int:
    """Integer ns a step waits for class c's earliest k units copied back in backward (the
    module docstring's "time": the CP-SAT terms, counted directly)."""
    if k <= 0:
        return 0
    first, typical = copy_ns(pb, c)
    c0 = sum(t for (u, i), t in first.items() if choice[u] == i)
    ct = sum(t for (u, i), t in typical.items() if choice[u] == i)
    if k == 1:
        return c0
    T = sum(t for (n, i), t in layer_ns(pb, c).items() if choice[n] == i)
    return ct + (k - 2) * max(0, ct - T) + max(0, c0 - T)


def group_forward_ns(pb: Problem, choice: dict, c: str, g: int, moves) -> int:
    """Integer ns of the forwards groups of g add to class c (K − n_g layers' forward; `moves`:
    the chosen redistributions, `figures.chosen_moves`)."""
    lc = pb.classes[c]
    K, n = len(lc.layers), units(pb, c, g)
    if g <= 1 or n == K:
        return 0
    share = (K - n) / K
    t = sum(int(round(share * pb.mult[v] * pb.forward[(v, choice[v])].time_s * NS)) for v in lc.nodes)
    t += sum(int(round(share * pb.tensors[key].mult * pb.move_forward.get((key, i, l), 0.0) * NS))
             for (key, i, l), _ in moves if pb.tensors[key].cls == c)
    return t
