"""The CP-SAT planner: one strategy per node, minimizing predicted step time under a memory budget.

Sets
    n ∈ N      plan nodes; identical layers are clustered and solved once: N holds one template
               node per position in a layer class (`cluster_layers`), m_n = how many nodes it
               stands for
    i ∈ S_n    the legal strategies of n (`strategies.candidates`): per mesh axis the factor it splits,
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

Objective (integer nanoseconds; every cost from `strategies.Costs` is in seconds)
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
    forced   overrides remove strategies before the model is built (`strategies.candidates`).

An infeasible model can only come from the memory family (every node has a strategy and
edges only link); the planner then minimizes memory instead and reports the least it needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from seqshard.strategies import PlanError

from .problem import Problem

__all__ = ["Model", "Solution", "solve", "Infeasible", "NS"]

NS = 1e9


class Infeasible(ValueError):
    pass


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
