"""The CP-SAT planner: one strategy per node, minimizing predicted step time under a memory budget.

Sets
    n ∈ N      plan nodes; identical layers are clustered and solved once: N holds one template
               node per position in a layer class (`cluster_layers`), m_n = how many nodes it
               stands for
    i ∈ S_n    the legal strategies of n (`candidates`): per mesh axis the factor it splits,
               and for attention the algorithm
    e ∈ E      tensor edges u → v between plan nodes, also clustered (m_e copies)

Variables
    x[n,i] ∈ {0,1}         n uses strategy i
    z[t,l] ∈ {0,1}         tensor t is made in layout l (some consumer's strategy needs it)
    w[t,i,l] ∈ {0,1}       t's producer uses strategy i and t is made in layout l: the
                           redistribution from i's output layout to l runs (and costs)

    Tensors t are clustered like nodes: the same output of the same template node with the
    same consumers, m_t copies. A redistribution is shared by every consumer that needs the same
    layout (the passes emit it once), so it is priced on (t, l), not per consumer.

Objective (integer nanoseconds; every cost from `costs.Costs` is in seconds)
    min  Σ_n m_n Σ_i t(n,i)·x[n,i]  +  Σ_t m_t Σ_il r(t,i,l)·w[t,i,l]
    t: compute (+ backward when training) and the node's own communication (attention
    algorithms, with their overlap); r: the redistribution (and its adjoint in backward).
    Inputs and parameters are replicated and enter as a cost on their consumer's strategies.

Constraints
    choice   Σ_i x[n,i] = 1                                       → `_add_choice`
    need     x[v,j] → z[t, layout v's strategy j needs for t]     → `_add_tensors`
    moves    x[u,i] ∧ z[t,l] → w[t,i,l]                           → `_add_tensors`
    memory   state + Σ_n m_n Σ_i a(n,i)·x[n,i] + Σ_t m_t Σ_il a(t,i,l)·w[t,i,l]
             + max transient ≤ budget                             → `_add_memory`
             a: activation bytes kept for backward (training), by the node's output or by the
             redistributed copy a consumer keeps; state: parameters, gradients, optimizer state.
    forced   overrides remove strategies before the model is built (`candidates`).

An infeasible model can only come from the memory family (every node has a strategy and
edges only link); the planner then minimizes memory instead and reports the least it needs.
"""

from __future__ import annotations

import operator
import re
import time
from dataclasses import dataclass, field
from itertools import product
from math import prod

import torch.fx as fx
from ortools.sat.python import cp_model

from seqshard.costmodel import compute as comp
from seqshard.dims import DimAnalysis, Role
from seqshard.passes import plan_nodes

from .costs import SAVES_ALL, SAVES_FIRST, Costs, _packet
from .overrides import Spec, forced, spec_for
from .plan import Cost, NodePlan, Plan, Predicted, Split
from .strategy import PlanError, R, Strategy, is_attention, resolve

NS = 1e9


class Infeasible(ValueError):
    pass


# ------------------------------------------------------------------------------ strategies
def candidates(dims: DimAnalysis, node: fx.Node, mesh: tuple[tuple[str, int], ...],
               spec: Spec | None = None, whole: frozenset = frozenset()) -> list[Strategy]:
    """Every legal strategy of `node` (restricted by an override spec when given); factors in
    `whole` are not offered (see `whole_somewhere`)."""
    names = tuple(a for a, _ in mesh)
    sizes = [n for _, n in mesh]
    roles = dims.roles.get(node, {})
    atoms = [a for a in dims.iteration_atoms(node)
             if dims.F.size(a) > 1 and roles.get(a, Role.LOCAL) != Role.WHOLE
             and a not in whole]
    if spec is not None and spec.splits is not None:
        forced_splits, _ = forced(dims, node, spec, names)
        choices = [[a] for a in forced_splits]
    else:
        choices = [[None] + [a for a in atoms if dims.F.size(a) >= n] for n in sizes]
    out, why = [], []
    for splits in product(*choices):
        algos = [None]
        if is_attention(node):
            att = dims.attrs[node]["attention"]
            seq = {dims.F.find(a) for a in dims.F.atoms_of(att["seq_k"])}
            seq_axes = [i for i, a in enumerate(splits) if a in seq]
            if len(seq_axes) == 1:
                algos = ["ring", "allgather", "tokenring", "ulysses"]
            elif len(seq_axes) == 2:
                algos = ["hybrid"]
            elif seq_axes:
                continue
            else:
                algos = ["local"]
            if spec is not None and spec.algorithm is not None and seq_axes:
                algos = [a for a in algos if a == spec.algorithm]  # only where s is split
            heads = dims.F.dim_size(att["heads"])
            split_heads = prod(sizes[i] for i, a in enumerate(splits)
                               if a is not None and a not in seq and a in dims.F.atoms_of(att["heads"]))
            local_heads = heads // split_heads
            for algo, axis in (("ulysses", 0), ("hybrid", 1)):
                if algo in algos and local_heads % sizes[seq_axes[axis]]:
                    algos.remove(algo)
                    why.append(f"{local_heads} heads cannot be split {sizes[seq_axes[axis]]} ways "
                               f"by {algo.capitalize()}; use ring/allgather/tokenring, or a "
                               f"degree that divides {local_heads}")
        for algo in algos:
            try:
                out.append(resolve(node, dims, tuple(splits), algo, names))
            except PlanError as e:
                why.append(str(e))
    if not out:
        where = f"{node.name} ({dims.cap.module_path(node)}: {dims.cap.source(node)})"
        raise PlanError(f"no legal strategy for {where}" + (" under its override" if spec else "")
                        + (": " + "; ".join(dict.fromkeys(why)) if why else ""))
    return out


def whole_somewhere(dims: DimAnalysis) -> frozenset:
    """Factors some op needs whole (a norm's hidden dim, attention's head dim, a vocabulary).
    They are not offered as splits anywhere: splitting one elsewhere only adds a gather in
    front of that op, and leaving them out keeps 2-D meshes fast to solve. (Ops without a rule
    mark everything whole; they say nothing about how a factor is used, so they don't count.)"""
    return frozenset(a for n, roles in dims.roles.items() if n not in dims.unsupported
                     for a, r in roles.items() if r == Role.WHOLE)


# ------------------------------------------------------------------------------ repeated layers
_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")


def cluster_layers(dims: DimAnalysis, nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Map every node of a repeated layer to the same node of the first identical layer.

    A layer is a module path ending in an index (`layers.7`, `blocks.3`); two layers are
    identical when their nodes have the same ops, factor signatures and wiring."""
    layers: dict[str, list[fx.Node]] = {}
    for n in nodes:
        m = _LAYER.match(dims.cap.module_path(n))
        if m:
            layers.setdefault(m.group(1), []).append(n)
    templates: dict[tuple, list[fx.Node]] = {}
    mapping = {n: n for n in nodes}
    for members in layers.values():
        pos = {n: i for i, n in enumerate(members)}
        key = tuple((str(n.target), _shape_key(dims, n),
                     tuple(("in", pos[x]) if x in pos else ("out", _shape_key(dims, x))
                           for x in n.all_input_nodes)) for n in members)
        if key in templates:
            for n, t in zip(members, templates[key]):
                mapping[n] = t
        else:
            templates[key] = members
    return mapping


_AUTO = re.compile(r"\bx\d+\b")


def _shape_key(dims: DimAnalysis, n: fx.Node) -> str:
    """A node's factor signature with auto-generated names (x12) blanked, plus its shape: equal
    for the same tensor of two identical layers."""
    val = n.meta.get("val")
    shape = tuple(val.shape) if hasattr(val, "shape") else None
    return f"{_AUTO.sub('x', dims.sig_str(n))}{shape}"


# ------------------------------------------------------------------------------ the model
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
        packet = _packet(n)
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
    pb.template = cluster_layers(dims, nodes)
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
            from seqshard.costmodel import collectives as coll
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
    packet = _packet(v)
    return packet in SAVES_ALL or (packet in SAVES_FIRST and k == 0)


# ------------------------------------------------------------------------------ CP-SAT
@dataclass
class Solution:
    choice: dict          # template node → strategy index
    objective_s: float
    memory_bytes: float
    status: str
    seconds: float


class Model:
    def __init__(self, pb: Problem, budget: float | None):
        self.pb = pb
        self.m = cp_model.CpModel()
        self.x: dict = {}
        self.w: dict = {}
        self._add_choice()
        self._add_tensors()
        self.memory_terms = self._memory_terms()
        if budget is not None:
            self._add_memory(budget)

    def _add_choice(self):
        for n, sts in self.pb.strategies.items():
            vs = [self.m.NewBoolVar(f"x[{n.name},{i}]") for i in range(len(sts))]
            self.m.AddExactlyOne(vs)
            for i, v in enumerate(vs):
                self.x[(n, i)] = v

    def _add_tensors(self):
        pb, z = self.pb, {}
        for (key, v, j), l in pb.need.items():
            if (key, l) not in z:
                z[(key, l)] = self.m.NewBoolVar(f"z[{key[0].name}:{key[1]},{l}]")
            self.m.AddImplication(self.x[(v, j)], z[(key, l)])
        for (key, i, l) in pb.move:
            w = self.m.NewBoolVar(f"w[{key[0].name}:{key[1]},{i},{l}]")
            self.m.AddBoolOr([self.x[(key[0], i)].Not(), z[(key, l)].Not(), w])
            self.w[(key, i, l)] = w

    def _memory_terms(self):
        pb, terms = self.pb, []
        for (n, i), c in pb.node_cost.items():
            terms.append((self.x[(n, i)], int(pb.mult[n] * c.memory_bytes)))
        for (key, i, l), w in self.w.items():
            terms.append((w, int(pb.tensors[key].mult * pb.move[(key, i, l)][2])))
        return [(v, c) for v, c in terms if c]

    def _add_memory(self, budget: float):
        pb = self.pb
        room = int(budget - pb.static_bytes)
        total = sum(c * v for v, c in self.memory_terms)
        for (n, i), c in pb.node_cost.items():  # the kept activations plus a node's working set
            if c.transient_bytes:
                self.m.Add(total + int(c.transient_bytes) <= room).with_name("memory") \
                    .only_enforce_if(self.x[(n, i)])
        self.m.Add(total <= room).with_name("memory")

    def time_objective(self):
        pb = self.pb
        terms = [int(round(pb.mult[n] * c.time_s * NS)) * self.x[(n, i)]
                 for (n, i), c in pb.node_cost.items()]
        terms += [int(round(pb.tensors[k[0]].mult * pb.move[k][0] * NS)) * w for k, w in self.w.items()]
        return sum(terms)

    def solve(self, objective, seconds: float, workers: int, gap: float = 1e-4) -> Solution:
        self.m.Minimize(objective)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = seconds
        solver.parameters.num_workers = workers
        solver.parameters.relative_gap_limit = gap
        t0 = time.perf_counter()
        status = solver.Solve(self.m)
        elapsed = time.perf_counter() - t0
        name = solver.StatusName(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return Solution({}, float("inf"), float("inf"), name, elapsed)
        choice = {n: next(i for i in range(len(sts)) if solver.Value(self.x[(n, i)]))
                  for n, sts in self.pb.strategies.items()}
        kept = sum(c * solver.Value(v) for v, c in self.memory_terms)
        working = max((self.pb.node_cost[(n, i)].transient_bytes for n, i in choice.items()), default=0)
        return Solution(choice, solver.ObjectiveValue() / NS, self.pb.static_bytes + kept + working,
                        name, elapsed)


def solve(pb: Problem, budget: float | None, *, seconds: float = 60.0, workers: int = 8,
          gap: float = 1e-4) -> Solution:
    """Minimize predicted time; stop within `gap` (relative) of the proven optimum: the costs
    are predictions, and proving the last 0.01% on near-ties can take minutes."""
    model = Model(pb, budget)
    sol = model.solve(model.time_objective(), seconds, workers, gap)
    if sol.choice:
        return sol
    if sol.status == "INFEASIBLE" and budget is not None:
        least = Model(pb, None)
        floor = least.solve(sum(c * v for v, c in least.memory_terms), seconds, workers)
        raise Infeasible(
            f"no plan fits {budget / 2**30:.1f} GiB per GPU: the least memory any plan needs is "
            f"{floor.memory_bytes / 2**30:.1f} GiB ({pb.static_bytes / 2**30:.1f} GiB of it "
            "parameters, gradients and optimizer state). Try: more GPUs or a longer mesh axis, "
            "a shorter sequence, model_state='sharded' (FSDP/ZeRO-3 outside seqshard), or a "
            "larger memory_budget")
    raise PlanError(f"the solver stopped with status {sol.status} after {sol.seconds:.1f} s")


# ------------------------------------------------------------------------------ the plan
def to_plan(pb: Problem, sol: Solution, orders: dict[str, str], notes=()) -> Plan:
    dims, names = pb.dims, tuple(a for a, _ in pb.mesh)
    strategies = {t: pb.strategies[t][i] for t, i in sol.choice.items()}
    # each redistribution is charged to the first consumer (in graph order) that needs it
    redistribute: dict = {}
    for (key, i, l), (secs, sent, kept) in _chosen_moves(pb, sol):
        t = pb.tensors[key]
        v = next(v for v, k in t.consumers
                 if pb.need[(key, v, sol.choice[v])] == l)
        r = redistribute.setdefault(v, [0.0, 0.0, 0.0])
        share = t.mult / pb.mult[v]
        r[0] += secs * share
        r[1] += sent * share
        r[2] += kept * share
    nodes, total_comm, compute_s, comm_s = [], 0.0, 0.0, 0.0
    for n in plan_nodes(dims):
        t = pb.template[n]
        st = strategies[t]
        c = pb.node_cost[(t, sol.choice[t])]
        r = redistribute.get(t, [0.0, 0.0, 0.0])
        cost = Cost(c.compute_s, c.comm_s, c.redistribute_s + r[0], c.memory_bytes + r[2],
                    c.comm_bytes + r[1], c.transient_bytes)
        total_comm += cost.comm_bytes
        compute_s += cost.compute_s
        comm_s += cost.comm_s + cost.redistribute_s
        nodes.append(NodePlan(node=n.name, module=dims.cap.module_path(n), op=_op(n),
                              splits=tuple(Split(a, dims.F.label(x)) for a, x in zip(names, st.splits)
                                           if x is not None),
                              algorithm=st.algorithm, cost=cost))
    step = compute_s + comm_s + pb.static_s
    predicted = Predicted(step_s=step, peak_memory_bytes=sol.memory_bytes, comm_bytes=total_comm,
                          compute_s=compute_s, comm_s=comm_s + pb.static_s)
    used = {s.factor for n in nodes for s in n.splits}
    plan = Plan(mesh=pb.mesh, nodes=tuple(nodes),
                orders=tuple(sorted((f, o) for f, o in orders.items() if f in used)),
                predicted=predicted, notes=tuple(notes))
    plan.explanations.update(explain_all(pb, sol))
    return plan


def _chosen_moves(pb: Problem, sol: Solution):
    """The redistributions the solution runs: ((tensor, producer strategy, layout), costs)."""
    needed = {(key, l) for (key, v, j), l in pb.need.items() if sol.choice[v] == j}
    for (key, i, l), c in pb.move.items():
        if sol.choice[pb.tensors[key].producer] == i and (key, l) in needed:
            yield (key, i, l), c


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

