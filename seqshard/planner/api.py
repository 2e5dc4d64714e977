"""`planner.plan`: a model and a cluster → a Plan, with no GPU and no process group."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from fnmatch import fnmatchcase
from math import prod

import torch

from seqshard import solver
from seqshard.capture import capture, sdpa_options
from seqshard.costmodel import Cluster
from seqshard.costmodel import compute as comp
from seqshard.dims import DimAnalysis, analyze
from seqshard.strategies import Costs, Plan, parse_spec
from seqshard.strategies.overrides import SEQ

__all__ = ["plan", "plan_captured", "sequence_orders", "atom_orders", "activation_bytes",
           "MODEL_STATES"]

MODEL_STATES = ("replicated", "sharded", "offload")
"""What the planner prices: parameters, gradients and optimizer state replicated on every GPU,
sharded over all of them (FSDP2 / ZeRO-3), or replicated with the optimizer state (and fp32
master weights) in host memory. `parallelize` runs the first two (`planner.state.MODEL_STATES`);
"offload" is priced, not run by seqshard (ZeRO-Offload or a CPU AdamW would)."""


def plan(model, example_inputs, *, cluster=None, mesh: tuple[tuple[str, int], ...] | None = None,
         axes: dict[str, str] | None = None, overrides: dict[str, str] | None = None,
         memory_budget: float | None = None, training: bool = True, **options) -> Plan:
    """Capture `model` on `example_inputs` (the meta device works) and plan it.

    cluster: a `costmodel.Cluster` or its name ("h100x1024"; default: H200s, one per mesh rank);
    axes: names for the factors of inputs, e.g. {"x": "b t p c"}; the plan records them
        (`plan.axes`), and `parallelize(plan=...)` uses them;
    mesh: axis names and sizes (default: one axis "sp" over every GPU of the cluster);
    overrides: forced choices per module pattern (see `planner.overrides`);
    memory_budget: bytes per GPU (default 90% of its memory);
    options: model_state ("replicated", the default | "sharded" | "offload": replicated with
        the optimizer state on the host | "auto": each of those that applies planned, the
        feasible one of least predicted step time kept, the comparison in the plan's notes;
        a tuple of states: "auto" among those; see `plan_captured`), optimizer ("adamw": mixed precision, an fp32 master copy and fp32
        moments, 16 bytes a bf16 parameter, the default; "adamw-pure": moments in the parameter
        dtype and no master copy, what torch.optim.AdamW keeps for bf16 parameters, 8 bytes;
        see `costmodel.compute.OPTIMIZERS`), recompute (may the solver recompute layers;
        default True), offload (may it keep recomputed layers' inputs in host memory; default
        True), time_limit, verbose, compile and kernels (price the program that
        `parallelize(compile=..., kernels=...)` builds: layers compiled, fused pointwise chains;
        the fused LM-head loss; `strategies.costs`)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    dims = analyze(capture(model, example_inputs), axes)
    return plan_captured(dims, mesh=mesh, overrides=overrides, cluster=cluster,
                         memory_budget=memory_budget, training=training,
                         **options).with_axes(axes)


def plan_captured(dims: DimAnalysis, *, mesh=None, overrides=None, cluster=None,
                  memory_budget=None, training=True,
                  model_state: str | tuple[str, ...] = "replicated",
                  recompute: bool = True, offload: bool = True, time_limit: float = 60.0,
                  verbose: bool = False,
                  optimizer: str = "adamw", compile: bool | str = False,
                  kernels: bool = False) -> Plan:
    """Plan a captured model: enumerate strategies, price them, solve (see `solver`).

    model_state "auto" (or a tuple of `MODEL_STATES`) plans each state that applies - sharded
    on more than one GPU, offload when training - except one whose state alone (parameters,
    gradients and what of the optimizer state stays on the GPU, `costmodel.compute.model_state`)
    exceeds the budget, and returns the feasible plan of least predicted step time (ties: the
    earlier state); its notes compare them. `plan.model_state` is the state a plan was priced
    for."""
    t0 = time.perf_counter()
    if cluster is None:
        gpus = prod(n for _, n in mesh) if mesh else 8
        cluster = Cluster.preset("h200", gpus=gpus)
    elif isinstance(cluster, str):
        cluster = Cluster.parse(cluster)
    if mesh is None:
        mesh = (("sp", cluster.gpus),)
    mesh = tuple((str(a), int(n)) for a, n in mesh)
    if prod(n for _, n in mesh) != cluster.gpus:
        raise ValueError(f"the mesh {mesh} has {prod(n for _, n in mesh)} ranks, the cluster "
                         f"{cluster.gpus} GPUs")
    if memory_budget is None:
        memory_budget = 0.9 * cluster.gpu.hbm_capacity
    if model_state == "auto" or isinstance(model_state, tuple):
        options = dict(mesh=mesh, overrides=overrides, cluster=cluster, memory_budget=memory_budget,
                       training=training, recompute=recompute, offload=offload,
                       time_limit=time_limit, verbose=verbose, optimizer=optimizer,
                       compile=compile, kernels=kernels)
        return _least_step_state(dims, MODEL_STATES if model_state == "auto" else model_state,
                                 options, t0)
    dtype_bytes = activation_bytes(dims)
    orders = sequence_orders(dims, overrides)
    costs = Costs(dims, cluster, mesh, training=training, dtype_bytes=dtype_bytes,
                  orders=atom_orders(dims, orders), compiled=bool(compile), fused_loss=kernels)
    say = (lambda msg: print(f"[plan {time.perf_counter() - t0:5.1f}s] {msg}", flush=True)) \
        if verbose else None
    pb = solver.build_problem(dims, costs, mesh, overrides, model_state, progress=say,
                              recompute=recompute, offload=offload, optimizer=optimizer)
    if say:
        say(f"{len(pb.strategies)} template nodes (of {sum(pb.mult.values())}), "
            f"{sum(len(s) for s in pb.strategies.values())} strategies, {len(pb.tensors)} "
            f"tensors, {len(pb.move)} redistribution terms")
    sol = solver.solve(pb, memory_budget, seconds=time_limit)
    if say:
        say(f"CP-SAT {sol.status} in {sol.seconds:.2f} s")
    opt = f", optimizer {optimizer}" if training else ""
    notes = [f"cluster {cluster}; {'training' if training else 'inference'}; model state "
             f"{model_state}{opt}; budget {memory_budget / 2**30:.1f} GiB per GPU; planned in "
             f"{time.perf_counter() - t0:.1f} s"]
    others = [k[0] for k in cluster.gpu.attention_kernels]
    if compile or kernels:
        notes.append("priced as " + " and ".join(
            (["compiled layers (fused pointwise chains)"] if compile else [])
            + (["the fused LM-head loss"] if kernels else [])) + " (strategies/costs.py)")
    notes.append(f"local attention priced at the {cluster.gpu.attention_backend} kernel's rates"
                 + (f" ({', '.join(others)} also known: Cluster.with_attention_backend)" if others else ""))
    if model_state == "sharded":
        sc, world = pb.state_comm, prod(n for _, n in mesh)
        share = pb.static_bytes - sc.gathered_bytes
        notes.append(f"model state sharded over all {world} ranks (ZeRO-3: parallelize(model_state="
                     f"'sharded') runs FSDP2, seqshard/planner/state.py): {share / 2**30:.2f} GiB "
                     f"per GPU of parameters, gradients and optimizer state (1/{world}), "
                     f"+ {sc.gathered_bytes / 2**30:.2f} GiB of parameters gathered at once (the "
                     f"root's and two of {sc.layers} layers'); per step "
                     f"{sc.comm_bytes / 2**30:.2f} GiB sent per GPU in "
                     f"{'all-gathers (forward, backward) and reduce-scatters' if training else 'all-gathers'}"
                     f", {sc.comm_s:.3f} s of collectives, {sc.exposed_s:.3f} s of it exposed "
                     f"(the first gathers, the last reduce-scatters, and what outlasts "
                     f"{sc.overlap_s:.3f} s of compute; solver/problem.py _sharded_state)")
    if model_state == "offload":
        notes.append(f"optimizer state{' and fp32 master weights' if optimizer == 'adamw' else ''} "
                     f"are assumed in host memory "
                     f"({pb.host_bytes / 2**30:.1f} GiB per GPU; ZeRO-Offload or a CPU AdamW, "
                     f"outside seqshard), {pb.static_s:.2f} s per step for the copies and the "
                     "CPU's step, not overlapped")
    if dims.unsupported:
        notes.append(f"{len(dims.unsupported)} op(s) without a rule run replicated: "
                     + ", ".join(n.name for n in dims.unsupported))
    made = solver.to_plan(pb, sol, orders, notes)
    return replace(made, model_state=model_state,
                   kernels=_kernels(dims, pb, compile, kernels) + _rope_rows(dims, made, kernels))


def _kernels(dims: DimAnalysis, pb, compile, kernels: bool) -> tuple[tuple[str, str], ...]:
    """What the program `parallelize(compile=..., kernels=...)` builds runs where, as the plan
    was priced (`Plan.kernels`): each layer by its class's compiled template, each LM head +
    cross-entropy `fused_losses` finds by the fused kernel."""
    from seqshard.solver.clusters import layer_of
    from seqshard.strategies.costs import fused_losses

    rows = []
    if compile:
        for c in pb.classes.values():
            if layer_of(c.name) == c.name:  # a layer class (not a loss region)
                rows += [(layer, f"compiled template of {c.name} (torch.compile once, run for "
                          f"each of its {len(c.layers)} layers)") for layer in c.layers]
    if kernels:
        roles = fused_losses(dims)
        heads = [n for n, r in roles.items() if r == "head"]
        losses = [n for n, r in roles.items() if r == "loss"]
        for head, loss in zip(heads, losses):
            rows.append((f"{dims.cap.module_path(head) or head.name} + {loss.name}",
                         "fused linear cross-entropy (codegen/kernels/linear_ce.py: the logits "
                         "in chunks, never whole)"))
    return tuple(rows)


def _rope_rows(dims: DimAnalysis, plan: Plan, kernels: bool) -> tuple[tuple[str, str], ...]:
    """(attention module, "rope fused into ulysses pack ...") for each attention the plan runs
    with Ulysses whose q and k the model rotates just before (`codegen/rope.py`; not priced)."""
    if not kernels:
        return ()
    from seqshard.codegen.rope import NOTE, rotated_before

    nodes = {n.name: n for n in dims.cap.nodes()}
    return tuple((n.module or n.node, f"{NOTE} (codegen/rope.py, codegen/kernels/a2a_layout.py; "
                  "not priced)") for n in plan.attention()
                 if n.algorithm == "ulysses" and n.node in nodes
                 and rotated_before(dims, nodes[n.node]))


def _least_step_state(dims: DimAnalysis, states: tuple[str, ...], options: dict, t0: float) -> Plan:
    """`plan_captured` for each state of `states` that applies and whose state alone fits the
    budget; the feasible plan of least predicted step time, with a note comparing them (or
    `Infeasible` naming why each failed)."""
    bad = [s for s in states if s not in MODEL_STATES]
    if bad or not states:
        raise ValueError(f"model_state must be 'auto', one of {MODEL_STATES} or a tuple of them, "
                         f"got {bad[0] if bad else states!r}")
    mesh, budget = options["mesh"], options["memory_budget"]
    world, training = prod(n for _, n in mesh), options["training"]
    n = sum(p.numel() for p in dims.cap.model.parameters())
    opt = comp.optimizer_bytes(options["optimizer"], activation_bytes(dims))
    state = comp.model_state(n, training=training, param_bytes=activation_bytes(dims), **opt)
    on_gpu = {"replicated": state.total, "sharded": state.total / world,
              "offload": state.params + state.grads}
    plans, why = {}, {}
    for s in dict.fromkeys(states):
        if s == "sharded" and world == 1:
            why[s] = "not tried, one GPU"
        elif s == "offload" and not training:
            why[s] = "not tried, no optimizer state in inference"
        elif on_gpu[s] > budget:
            why[s] = (f"skipped, its state alone needs {_size(on_gpu[s])} per GPU (budget "
                      f"{_size(budget)})")
        else:
            try:
                plans[s] = plan_captured(dims, model_state=s, **options)
            except solver.Infeasible as e:
                least = re.search(r"the least memory any plan needs is ([\d.]+ GiB)", str(e))
                why[s] = (f"infeasible, needs {least[1]} per GPU (budget {_size(budget)})"
                          if least else "infeasible: " + re.split(r"[.;] [Tt]ry\b", str(e))[0])
    for s, p in plans.items():
        why[s] = f"{p.predicted.step_s:.3g} s/step, peak {_size(p.predicted.peak_memory_bytes)}"
    tried = "; ".join(f"{s}: {why[s]}" for s in dict.fromkeys(states))
    if not plans:
        more = "" if "offload" in states else \
            " ('offload', optimizer state in host memory, is priced by planner.plan, not run)"
        raise solver.Infeasible(f"no model state fits: {tried}. Try: more GPUs, a shorter "
                                f"sequence or a larger memory_budget{more}")
    best = min(plans, key=lambda s: plans[s].predicted.step_s)  # ties: the earlier state
    p = plans[best]
    note = (f"model state {best} (auto: the feasible option of least predicted step time, of "
            f"{', '.join(dict.fromkeys(states))}; compared in {time.perf_counter() - t0:.1f} s): "
            f"{tried}")
    return replace(p, notes=(p.notes[0], note, *p.notes[1:]))


def _size(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def activation_bytes(dims: DimAnalysis) -> int:
    for n in dims.cap.nodes():
        if dims.attention(n) is not None:
            return n.meta["val"].element_size()
    return 2


def sequence_orders(dims: DimAnalysis, overrides) -> dict[str, str]:
    """Sequence orders: forced by overrides, else zigzag for the sequence of causal attention."""
    orders = {}
    for pattern, text in (overrides or {}).items():
        spec = parse_spec(text)
        if spec.order:
            for _, f in spec.splits or ():
                if f == SEQ:  # the own sequence of each attention the pattern covers
                    for n in dims.attrs:
                        if dims.attention(n) is not None and fnmatchcase(dims.cap.module_path(n), pattern):
                            for a in dims.F.atoms_of(dims.attention(n).seq_q):
                                orders[dims.F.label(a)] = spec.order
                else:
                    orders[f] = spec.order
    for n in dims.cap.nodes():
        if dims.attention(n) is not None and sdpa_options(n).get("is_causal"):
            for a in dims.seq_atoms(n):
                orders.setdefault(dims.F.label(a), "zigzag")
    return orders


def atom_orders(dims: DimAnalysis, orders: dict[str, str]) -> dict[int, str]:
    out = {}
    for sig in dims.sigs.values():
        for s in (sig if isinstance(sig, list) else [sig]) if sig is not None else []:
            if s is None:
                continue
            for d in s:
                for a in dims.F.atoms_of(d):
                    if dims.F.label(a) in orders:
                        out[dims.F.find(a)] = orders[dims.F.label(a)]
    return out
