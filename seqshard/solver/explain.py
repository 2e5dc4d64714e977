"""From a solution to a `Plan`: each node's chosen strategy with its cost terms (a redistribution
charged to the first consumer that needs it), the predicted step, and for every attention node
the alternatives with their costs (`Plan.explain`)."""

from __future__ import annotations

from seqshard.strategies import Cost, NodePlan, Plan, Predicted, Split, Strategy, is_attention, plan_nodes

from .model import Solution
from .problem import Problem

__all__ = ["to_plan", "explain_all"]

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
