"""The CP-SAT planner: one strategy per node, and per layer class whether to recompute it (and
whether to run its token-wise modules in chunks), minimizing predicted step time under a memory
budget.

Sets
    n ∈ N      plan nodes; identical layers are clustered and solved once: N holds one template
               node per position in a layer class (`cluster_layers`), m_n = how many nodes it
               stands for
    i ∈ S_n    the legal strategies of n (`strategies.candidates`): per mesh axis the factor it splits,
               and for attention the algorithm
    e ∈ E      tensor edges u → v between plan nodes, also clustered (m_e copies)
    c ∈ C      layer classes (training only): a layer is a module path ending in an index
               (`layers.3`); identical layers form a class (`clusters.layer_classes`) whose
               template nodes are N_c ⊂ N. Chunk regions are classes too: an LM head and its
               cross-entropy (`problem.loss_regions`), one unit; for them r[c] means "run in
               chunks of tokens, each chunk recomputed in backward"
    κ          for each node, the class whose consumers keep its output for backward when they
               all lie in one class, else none; k(n,c) = how many of n's members have κ = c
               (Σ_c k(n,c) + k(n,none) = m_n). For a tensor t: κ(t) = its consumers' class.
    I_c        the distinct tensors made outside a layer of c and read inside it (the residual
               stream, rotary tables; not parameters or user inputs, which live anyway),
               grouped by template producer u: k_in(u,c) of them
    R ∈ 𝓡      token-wise regions (`problem.token_regions`: a module inside a layer whose ops
               treat the sequence token by token, like `layers.3.mlp`; `problem.token_chains`:
               a chain of such ops across modules, like `layers.3.attn.o_proj+add+mlp_norm+mlp`),
               one per layer class c(R) and position, N_R ⊂ N_c(R) its template nodes. K_R: the
               nodes whose output only R's ops keep, k_R(n) of n's members (counted in
               k(n,c(R)) too); I_R ⊂ K_R: those made outside R (its input), k_in(u,R) of them.
               A module's region lies inside the chain around it (they share ops: R ~ R'); a
               node kept by the ops of both is in K_R and K_R' (S(n): the regions keeping it,
               grouped in `Problem.kept_in`); the module's input is made inside the chain

Variables
    x[n,i] ∈ {0,1}         n uses strategy i
    z[t,l] ∈ {0,1}         tensor t is made in layout l (some consumer's strategy needs it)
    w[t,i,l] ∈ {0,1}       t's producer uses strategy i and t is made in layout l: the
                           redistribution from i's output layout to l runs (and costs)
    r[c] ∈ {0,1}           the layers of class c are recomputed: each keeps only its inputs I_c
                           and runs its forward again in backward (activation checkpointing)
    o[c] ∈ {0,1}           ...and keep those inputs in host memory until their backward (offload;
                           layer classes only, o[c] ≤ r[c]); g[c] = r[c] − o[c] ∈ {0,1}: recomputed
                           with its inputs kept on the GPU (a variable of its own, so that every
                           memory coefficient stays positive)
    h[c,g], k'[c], m[c]    recomputed in nested checkpoint groups of g (one-hot, Σ_g h = r[c]),
                           and how many of its kept-input units (layers, or groups) live on the
                           host, its earliest: o[c] = (any does), k'[c] typical units on the host,
                           m[c] on the GPU; exact products with x; their memory and time terms
                           (W, Wb ≥ ... + (g − 1) inner inputs, E[c] the groups' reruns, the
                           copies back) in `groups.py`'s docstring, which supersedes o[c] as
                           all-or-nothing below
    s[c] ∈ [0, |c|]        how many layers of c (its last ones in graph order: their backward
                           runs first) are recomputed keeping their attention's outputs (selective
                           recompute: attention runs once; `runtime.selective`); σ[c] = (s[c] ≥ 1)
    y[n,i] ∈ [0, |c|]      s[c]·x[n,i] for an attention template n of c (A_c: those whose output
                           autograd keeps, k_n of them a layer; `kept_attention`)
    ρ[n,i,c] ∈ {0,1}       x[n,i] ∧ r[c], made only where a term needs it (time, kept inputs)
    ν[n,i,c] ∈ {0,1}       x[n,i] ∧ ¬r[c]: n's output still kept by c's consumers (memory)
    ρw, νw [t,i,l]         the same for w[t,i,l] and r[κ(t)]
    γ[u,i,c], ω[u,i,c]     x[u,i] ∧ g[c], x[u,i] ∧ o[c]: an input of c kept on the GPU, on the host
    q[R] ∈ {0,1}           R runs in chunks of tokens, each chunk under its own checkpoint (in a
                           recomputed layer, nested in the layer's): its intermediates exist one
                           chunk at a time, in forward and again in backward
    d[S] = r[c] ∨ ⋁_{R∈S} q[R]   what the regions S keep alone is not kept (exact: a clause
                           each way; `_drop`), q[S] = ⋁_{R∈S} q[R] (`_chunked`)
    e[R] = q[R] ∧ ¬r[c(R)] chunked in a layer that keeps its activations: the chunks'
                           checkpoints keep R's input
    x∧q, x∧¬q, x∧¬d, x∧e   products with x[n,i], exact, made where a term needs them (`_lit_and`)
    W, Wh ∈ ℕ              bytes: the working set of recomputing one layer (or a chunk of a
                           token-wise region), of one chunk of the LM head + loss
    Wb ∈ ℕ                 bytes: one layer's activations, live in the first layer's backward
    X_L, X_H ∈ ℕ           bytes: the largest extra(n) of the chosen strategies, over nodes in
                           layers and the others

    Tensors t are clustered like nodes: the same output of the same template node with the
    same consumers, m_t copies. A redistribution is shared by every consumer that needs the same
    layout (the passes emit it once), so it is priced on (t, l), not per consumer. The variables
    of recompute are per class, not per layer: a 70B model's 80 layers add one r.

Objective (integer nanoseconds; every cost from `strategies.Costs` is in seconds)
    min  Σ_n m_n Σ_i t(n,i)·x[n,i]  +  Σ_t m_t Σ_il r(t,i,l)·w[t,i,l]
       + Σ_c Σ_{n∈N_c} m_n Σ_i f(n,i)·ρ[n,i,c]  +  Σ_{t: κ(t)≠none} m_t Σ_il f(t,i,l)·ρw[t,i,l]
       + Σ_c Σ_{u∈I_c} k_in(u,c) Σ_i b(u,i)/host_bandwidth·ω[u,i,c]
       + Σ_R Σ_{n∈N_R} m_n Σ_i f(n,i)·(x[n,i] ∧ q[R])
       − Σ_c Σ_{n∈A_c} k_n Σ_i f(n,i)·y[n,i]                     → `_selective_time`
    t: compute (+ backward when training) and the node's own communication (attention
    algorithms, with their overlap); r: the redistribution (and its adjoint in backward).
    f: the forward alone, run again in backward: compute, the node's own communication (a
    ring's passes, Ulysses' all-to-alls) and the forward collective of a redistribution emitted
    inside the layer (`Costs` with training=False). An offloaded input costs its copy back in
    backward (b / host_bandwidth), exposed for the first layer backward needs; the others are
    prefetched while the layer above runs its backward, exposed only where the copy is longer
    (`_fetch_time`: F[c] ≥ 0, F[c] ≥ Σ (k_in − 1)·b/host_bandwidth·ω − (K_c − 1)·T[c], T[c] one
    layer's forward and backward, what its rerun and backward take); its copy out in
    forward runs on a side stream beside the compute and is not priced (it takes PCIe bandwidth,
    not compute: a layer's forward at long sequences takes longer than copying its input).
    A chunked region's forward runs again in backward, chunk by chunk (in a recomputed layer
    on top of the layer's rerun, which runs the chunk loop too).
    Inputs and parameters are replicated and enter as a cost on their consumer's strategies.

Constraints
    choice   Σ_i x[n,i] = 1                                       → `_add_choice`
    need     x[v,j] → z[t, layout v's strategy j needs for t]     → `_add_tensors`
    moves    x[u,i] ∧ z[t,l] → w[t,i,l]                           → `_add_tensors`
    and      ρ ≤ x,  ρ ≤ r[c],  ρ ≥ x + r[c] − 1;  ν ≤ x,  ν ≤ 1 − r[c],  ν ≥ x − r[c]
             (exact both ways; memory has only positive coefficients)
                                                                  → `_and`, `_and_not`, `_both`
    offload  o[c] + g[c] = r[c]; o[c] = 1 where an override says `offload`, 0 for chunk regions
             and where the planner may not offload               → `_add_offload` ("offload[c]")
    host     Σ_c Σ_{u∈I_c} k_in(u,c) Σ_i b(u,i)·ω[u,i,c] ≤ host capacity − optimizer state there
                                                                  → `_add_offload` ("host")
    forced   r[c] = 1 where an override says `recompute`; r[c] = 0 for the others when the
             planner may not recompute                            → `_add_recompute`
    select   s[c] ≤ |c|·r[c]; σ[c] ≤ s[c] ≤ |c|·σ[c]; s[c] = |c| where an override says
             `recompute:selective`, 0 where it says `recompute` or `offload` alone, for classes
             without kept attention, or where r[c] is 0        → `_selective_choice` ("selective[c]")
             y[n,i] ≤ |c|·x[n,i], Σ_i y[n,i] = s[c] (exact: y = s·x)   → `_add_selective`
    chunks   r[c] → no redistribution between two nodes of a chunk region c (one program runs
             per chunk): ¬(x[u,i] ∧ z[t,l] ∧ r[c]) for every move of such a tensor
                                                                  → `_add_recompute` ("whole_chunks[c]")
    working  r[c] → W ≥ Σ_{n: k(n,c)>0} Σ_i a(n,i)·x[n,i] + Σ_{t: κ(t)=c} Σ_il a(t,i,l)·w[t,i,l]
             (one layer's activations, live again while it is recomputed; for a chunk region
             each term is at most CHUNK_BYTES: one chunk's, `live_again`; for n ∈ K_R − I_R of a
             region R of c the term is a(n,i)·(x∧¬q[S]) + Σ_{R∈S} min(a(n,i), CHUNK_BYTES)·(x∧q[R])
             with S the regions keeping n and making it: one chunk's when one of them runs in
             chunks, `_layer_live`)
                                                                  → `_add_recompute` ("working[c]")
             q[R] → W ≥ Σ_{n ∈ K_R − I_R} Σ_i min(a(n,i), CHUNK_BYTES)·x[n,i]
             (one chunk's activations, made again in its backward; its input is kept)
                                                                  → `_add_regions` ("working[R]")
    one loop q[R] + q[R'] ≤ 1 for regions sharing ops (a module and its chain)
                                                                  → `_region_choice` ("one_loop[R]")
             q[R] ≤ r[c(R)] for a chain no override chunks: chains run in chunks only in
             recomputed layers (measured on GPU so far: modules alone)
                                                                  → `_region_choice` ("chain_in_recompute[R]")
    whole    q[R] → no redistribution inside R (one program runs per chunk):
             ¬(x[v,j] ∧ x[u,i] ∧ q[R]) for v ∈ N_R whose strategy j reads moved what u, an op
             of R in the same layer, makes (`Region.inner`)
                                                                  → `_add_regions` ("whole_chunks[R]")
             A redistribution into R (its input's: DSP's residual stream, frames split →
             patches split at a block's input) runs once, on the whole tensor, before the chunk
             loop (its backward after the loop's), priced as at any edge (w[t,i,l], in the
             consumers' class; its kept copy in A as any move's); the loop cuts the chunk
             factor of the layout R runs in, which its ops treat token by token whatever
             splits it. Overrides that leave only such moves: `inner_moves` names them
    chunk k  not a variable: the smallest k whose largest kept tensor of R is ≤ CHUNK_BYTES (or
             an override's `chunk:K`; `explain.region_chunks`). Time does not depend on k (the
             forward runs again once in all) and memory only falls with it, so the rule states
             the only trade-off left, kernel efficiency on small chunks, as a
             size floor
             o[c] → W ≥ the same + (IN_FLIGHT − 1 + e2[c]) · Σ_{u∈I_c} k_in(u,c)/|c| Σ_i b(u,i)·x[u,i]
             (offloaded inputs on the GPU while copied: the unit fetched back, and the next one
             prefetched where another is offloaded, e2[c]; with groups, + the g − 1 inner inputs)
                                                                  → `_add_recompute` ("in_flight[c]")
    memory   the peak is the largest of three phases of the backward, each ≤ budget:
               P + O + G_head + A − A_tail + W  + X_L    its start, in the last layer
               P + O + G_head + A + Wh + X_H             its start, in the LM head + loss
               P + O + G      + Wb + X_L        its end, in the first layer
             P + O: parameters and optimizer state; G: parameter gradients, made layer by layer
             from the top (G_head: the LM head's, made first: `Problem.head_grad_bytes`);
             A_tail: A's terms kept only by ops after the last layer (the final norm, the LM
             head + loss: `Problem.tail_kept`, a chunked head's input), freed by then;
             Wb ≥ Σ one layer's terms of "working" for every layer class c, recomputed or not
             (its input among them; no other layer's is in flight)  → `_add_recompute` ("bottom[c]")
             X ≥ e(n,i)·x[n,i] for every n, i (X_L over nodes in layers, X_H the others) where
             e(n,i) = transient(n,i) + g(n,i): the node's own working set (gathered K/V) and
             what its backward makes (`problem._backward_bytes`): the gradients of its output
             and of its inputs that need one, less its own kept output (freed by then, its
             consumers' backward ran first); cross-entropy: log_softmax's backward, two fp32
             [tokens, classes] temporaries. In a chunked region or LM head + loss, each tensor at
             most CHUNK_BYTES: X ≥ e_chunk·x + (e − e_chunk)·(x ∧ ¬q)
                                                                  → `peak_bounds`, `_extras_var`
             A = Σ_n Σ_i a(n,i)·(k(n,none)·x[n,i] + Σ_c k(n,c)·ν[n,i,c])
               + Σ_t m_t Σ_il a(t,i,l)·(w[t,i,l] if κ(t) = none else νw[t,i,l])
               + Σ_c Σ_{u∈I_c} k_in(u,c) Σ_i b(u,i)·γ[u,i,c]      → `_add_memory` ("memory")
               + Σ_n Σ_S k_S(n) Σ_i a(n,i)·(x[n,i] ∧ ¬d[S]) − (the same k_S(n) taken
                 out of n's class term above) + Σ_R Σ_{u∈I_R} k_in(u,R) Σ_i b(u,i)·(x[u,i] ∧ e[R])
                                                                  → `_region_terms`
               + Σ_c Σ_{n∈A_c} k_n Σ_i κ(n,i)·y[n,i]             → `_selective_terms`
             κ(n,i): what a selective layer keeps of attention n, every output of its op
             (`attention_cache_bytes`: out and lse, a(n,i); Ulysses and the hybrid also their
             head-layout q, k/v, out and lse). They are in A at the backward's start and freed as
             their layers' backward runs: the last layers' first, so A still falls over the
             backward and its ends bound the peak. In "working" (W, the last layer's rerun) an
             attention template's term is a(n,i)·(x[n,i] ∧ ¬σ[c]): a selective layer's rerun
             does not make its output again (it is in A); Wb is unchanged (the first layer's
             output is kept, or made again: once either way)
             a: activation bytes kept for backward (training), by the node's output or by the
             redistributed copy a consumer keeps (what autograd keeps, `problem._autograd`: a
             view's base for a view, e.g. v through its transpose; attention's output and fp32
             lse; a product's operand only when the other needs a gradient, so q·cos keeps the
             rotary table, not q); b: the bytes of a tensor entering a layer in
             its producer's layout, what a recomputed layer keeps instead; state: parameters,
             gradients, optimizer state (model_state "offload": parameters and gradients; the
             optimizer state and fp32 master weights live in host memory, and the copies and
             the CPU's AdamW step are a constant in the step time, `compute.offload_step`).
    forced   overrides remove strategies before the model is built (`strategies.candidates`).

The memory estimate takes the backward's start (everything kept for backward alive, the LM
head's gradient made) and its end (every parameter gradient made, one layer's activations
alive), each with the largest working set: what one node needs while it runs (gathered K/V,
buffers; the gradients and temporaries its backward makes) and one layer's activations made
again (with its inputs, and the next one's, when they come from the host; `figures.memory_of`
counts the same from a chosen plan, and `Model.solve` asserts that they agree). Activations fall
and gradients grow linearly over the layers in between, so these ends bound the peak.
bench/memsim.py checks it against a counted step on the meta device (within 1% on the
production configurations it covers; tests/test_memory_model.py). It counts allocated bytes:
the caching allocator's slack (reserved − allocated) and kernel workspaces are not in it, and
the budget is on allocated bytes.

Solving (`solve`): first the fastest plan with memory left out and r[c] = 0 where no override
forces it (the model without any recompute term). When that plan fits the budget it is optimal,
since recompute only adds time; only when it does not is the full model solved. So plans with
memory to spare cost what they did before recompute existed (70B on 1024 GPUs: 0.3 s of CP-SAT).

An infeasible model can only come from the memory family (every node has a strategy and
edges only link); the planner then minimizes memory instead and reports the least it needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from math import ceil

from ortools.sat.python import cp_model

from seqshard.strategies import PlanError

from . import groups as G
from .figures import (IN_FLIGHT, Memory, attention_cache_bytes, extra_bytes, kept_attention,
                      live_again, memory_of)
from .problem import CHUNK_BYTES, Problem

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
    recompute: frozenset = frozenset()   # names of the layer classes recomputed
    memory: Memory | None = None
    budget: float | None = None
    offload: dict | frozenset = frozenset()  # of those, class → how many of its kept-input
    #                                      units (layers, or groups) live on the host, its earliest
    chunked: frozenset = frozenset()     # names of the token-wise regions run in chunks
    selective: dict | None = None        # recomputed class → how many of its layers (its last
    #                                      ones) keep their attention's outputs
    groups: dict | None = None           # recomputed class → its group size, where more than 1
    #                                      (nested checkpoint groups, `groups.py`)


class Model:
    def __init__(self, pb: Problem, budget: float | None, *, recompute: bool | None = None):
        """recompute: may classes that no override forces recompute (default:
        `pb.recompute_allowed`); where not, r[c] is the constant 0 and its terms vanish."""
        self.pb = pb
        self.budget = budget
        self.allow = pb.recompute_allowed if recompute is None else recompute
        self.m = cp_model.CpModel()
        self.x: dict = {}
        self.w: dict = {}
        self.r: dict = {}
        self.o: dict = {}
        self.s: dict = {}       # class → s[c], its layers keeping attention's outputs
        self.sigma: dict = {}   # class → σ[c] = (s[c] ≥ 1)
        self.y: dict = {}       # (attention template, i) → y = s[c]·x[n,i]
        self.h: dict = {}       # class → {group size g: h[c,g]} (one-hot; Σ = r[c])
        self.kt: dict = {}      # class → k'[c]: typical units on the host (`groups.py`)
        self.km: dict = {}      # class → m[c]: typical units on the GPU
        self.e2: dict = {}      # class → (k' ≥ 1): two units or more offloaded
        self.counted: dict = {}  # (class, "kt" | "km") → {(u, i): count·x[u,i]}
        self.q: dict = {}
        self.drop: dict = {}
        self.alone: dict = {}
        self.lits: dict = {}
        self.g: dict = {}
        self.rho: dict = {}
        self.keep: dict = {}
        self.z: dict = {}
        self.W = None
        self.Wb = self.Wh = None
        self.ub: dict = {}  # the upper ends of W and Wb
        self._add_choice()
        self._add_tensors()
        self._add_recompute()
        self._add_selective()
        self._add_regions()
        self._add_offload()
        self.memory_terms = self._memory_terms()
        if budget is not None:
            self._add_memory(budget)

    def _add_choice(self):
        for n, sts in self.pb.strategies.items():
            vs = [self.m.NewBoolVar(f"x[{n.name},{i}]") for i in range(len(sts))]
            self.m.AddExactlyOne(vs).with_name(f"choice[{n.name}]")
            for i, v in enumerate(vs):
                self.x[(n, i)] = v

    def _add_tensors(self):
        pb, z = self.pb, self.z
        for (key, v, j), l in pb.need.items():
            if (key, l) not in z:
                z[(key, l)] = self.m.NewBoolVar(f"z[{key[0].name}:{key[1]},{l}]")
            self.m.AddImplication(self.x[(v, j)], z[(key, l)]).with_name("need")
        for (key, i, l) in pb.move:
            w = self.m.NewBoolVar(f"w[{key[0].name}:{key[1]},{i},{l}]")
            self.m.AddBoolOr([self.x[(key[0], i)].Not(), z[(key, l)].Not(), w]).with_name("moves")
            self.w[(key, i, l)] = w

    def _and(self, a, c: str, name: str):
        """a ∧ r[c], exact (three clauses), made once per (a, c); a itself where r[c] is forced
        to 1, and 0 where r[c] is 0."""
        if isinstance(self.r[c], int):
            return a if self.r[c] else 0
        if (name, c) not in self.rho:
            r = self.r[c]
            v = self.m.NewBoolVar(f"and[{name},{c}]")
            self.m.AddImplication(v, a).with_name(f"and[{name},{c}]")
            self.m.AddImplication(v, r).with_name(f"and[{name},{c}]")
            self.m.AddBoolOr([a.Not(), r.Not(), v]).with_name(f"and[{name},{c}]")
            self.rho[(name, c)] = v
        return self.rho[(name, c)]

    def _and_not(self, a, c: str, name: str):
        """a ∧ ¬r[c], exact (three clauses): what stays kept unless c recomputes. Memory counts
        these, all with positive coefficients (a − a∧r with negative ones tripped CP-SAT 9.15's
        presolve into a wrong INFEASIBLE)."""
        if isinstance(self.r[c], int):
            return 0 if self.r[c] else a
        if (name, c) not in self.keep:
            r = self.r[c]
            v = self.m.NewBoolVar(f"keep[{name},{c}]")
            self.m.AddImplication(v, a).with_name(f"keep[{name},{c}]")
            self.m.AddImplication(v, r.Not()).with_name(f"keep[{name},{c}]")
            self.m.AddBoolOr([a.Not(), r, v]).with_name(f"keep[{name},{c}]")
            self.keep[(name, c)] = v
        return self.keep[(name, c)]

    def _both(self, a, b, name: str):
        """a ∧ b for a literal b (a variable, its negation, or the constant 0 or 1), exact, made
        once per (a, b)."""
        if isinstance(b, int):
            return a if b else 0
        key = (name, b.Name() if hasattr(b, "Name") else str(b))
        if key not in self.rho:
            v = self.m.NewBoolVar(f"and[{name},{key[1]}]")
            self.m.AddImplication(v, a).with_name(f"and[{name},{key[1]}]")
            self.m.AddImplication(v, b).with_name(f"and[{name},{key[1]}]")
            self.m.AddBoolOr([a.Not(), b.Not(), v]).with_name(f"and[{name},{key[1]}]")
            self.rho[key] = v
        return self.rho[key]

    def _offload_choice(self, c: str, lc):
        """o[c] (offload, forced by an override or free where allowed) and g[c] = r[c] − o[c]."""
        r = self.r[c]
        if lc.kind != "layer" or _off(r):
            self.o[c], self.g[c] = 0, r
        elif lc.offload:  # `offload` implies `recompute`: r[c] is the constant 1
            self.o[c], self.g[c] = 1, 0
        elif not (self.allow and self.pb.offload_allowed):
            self.o[c], self.g[c] = 0, r
        else:
            o = self.o[c] = self.m.NewBoolVar(f"o[{c}]")
            if isinstance(r, int):
                self.g[c] = o.Not()
            else:
                g = self.g[c] = self.m.NewBoolVar(f"g[{c}]")
                self.m.Add(g + o == r).with_name(f"offload[{c}]")

    def _in_flight(self, c: str, layers: int = IN_FLIGHT):
        """(x[u,i], bytes): `layers` layers' worth of c's inputs, on the GPU while copied (the
        unit fetched back, and the next one prefetched where another is offloaded: e2[c])."""
        pb, lc, out = self.pb, self.pb.classes[c], []
        for (u, idx), (count, x) in lc.inputs.items():
            for i, st in enumerate(pb.strategies[u]):
                b = int(layers * count / len(lc.layers) * pb.costs.bytes(x, st.output if idx is None else st.output[idx]))
                if b:
                    out.append((self.x[(u, i)], b))
        return out

    def _offloaded(self):
        """(literal or count, bytes): the kept inputs of every offloadable class held in host
        memory: unit 0's where o[c], k'[c] typical units (`groups.py`)."""
        pb, out = self.pb, []
        for c, lc in pb.classes.items():
            if _off(self.o[c]):
                continue
            first, typical = G.unit_bytes(pb, c)
            for (u, i), b in first.items():
                if int(b):
                    out.append((self._both(self.x[(u, i)], self.o[c], f"{u.name},{i}"), int(b)))
            for (u, i), v in self._counted(c, "kt").items():
                if int(typical[(u, i)]) and not _off(v):
                    out.append((v, int(typical[(u, i)])))
        return out

    # ------------------------------------------------------------------ kept-input units
    def _add_if(self, bound, name: str, *lits):
        """Add `bound` only where every literal holds (a constant 1 drops out; a constant 0
        never holds: nothing is added)."""
        if any(_off(v) for v in lits):
            return None
        ct = self.m.Add(bound).with_name(name)
        lits = [v for v in lits if not isinstance(v, int)]
        if lits:
            ct.only_enforce_if(lits)
        return ct

    def _units_choice(self, c: str, lc):
        """h[c,g] (the group size, one-hot, Σ_g h[c,g] = r[c]), k'[c] and m[c] (typical units on
        the host and on the GPU, k' + m = Σ_g (n_g − 1)·h[c,g], k' ≤ (n − 1)·o[c]: the earliest
        units go first) and e2[c] = (k' ≥ 1) (`groups.py`)."""
        pb, r = self.pb, self.r[c]
        self.kt[c] = self.km[c] = self.e2[c] = 0
        if lc.kind != "layer" or _off(r):
            self.h[c] = {1: r}
            return
        sizes = G.group_sizes(pb, c)
        if len(sizes) == 1:
            h = {sizes[0]: r}
        else:
            h = {g: self.m.NewBoolVar(f"h[{c},{g}]") for g in sizes}
            self.m.Add(sum(h.values()) == r).with_name(f"group[{c}]")
        self.h[c] = h
        most = max(G.units(pb, c, g) for g in sizes) - 1
        if not most:
            return
        total = sum((G.units(pb, c, g) - 1) * v for g, v in h.items())
        o = self.o[c]

        def count(name, expr):
            if isinstance(expr, int):
                return expr
            v = self.m.NewIntVar(0, most, f"{name}[{c}]")
            self.m.Add(v == expr).with_name(f"units[{c}]")
            return v

        if _off(o):
            self.km[c] = count("m", total)
        elif lc.offload:  # every unit offloaded
            self.kt[c] = count("k'", total)
        else:
            kt = self.kt[c] = self.m.NewIntVar(0, most, f"k'[{c}]")
            km = self.km[c] = self.m.NewIntVar(0, most, f"m[{c}]")
            self.m.Add(kt + km == total).with_name(f"units[{c}]")
            self.m.Add(kt <= most * o).with_name(f"units[{c}]")
        kt = self.kt[c]
        if isinstance(kt, int):
            self.e2[c] = int(kt >= 1)
        else:
            e2 = self.e2[c] = self.m.NewBoolVar(f"e2[{c}]")
            self.m.Add(kt >= e2).with_name(f"units[{c}]")
            self.m.Add(kt <= most * e2).with_name(f"units[{c}]")

    def _counted(self, c: str, which: str) -> dict:
        """(u, i) → count·x[u,i] for the typical units of c (which: "kt" on the host, "km" on
        the GPU), exact: y ≤ most·x[u,i], Σ_i y = count (as y = s·x); a constant count
        times x, or count·(x ∧ r[c]) where the count is (n − 1)·r[c] (one group size, no
        offload), without new variables."""
        key = (c, which)
        if key in self.counted:
            return self.counted[key]
        pb, count = self.pb, (self.kt if which == "kt" else self.km)[c]
        typical = G.unit_bytes(pb, c)[1]
        out: dict = {}
        h = self.h.get(c, {})
        plain = which == "km" and _off(self.kt[c]) and len(h) == 1
        by_u: dict = {}
        for (u, i) in typical:
            by_u.setdefault(u, []).append(i)
        for u, idx in by_u.items():
            if _off(count):
                out.update({(u, i): 0 for i in idx})
            elif isinstance(count, int):
                out.update({(u, i): count * self.x[(u, i)] for i in idx})
            elif plain and not isinstance(self.r[c], int):
                n = G.units(pb, c, next(iter(h))) - 1
                out.update({(u, i): n * self._and(self.x[(u, i)], c, f"{u.name},{i}") for i in idx})
            else:
                most = max(G.units(pb, c, g) for g in h) - 1
                ys = []
                for i in idx:
                    y = out[(u, i)] = self.m.NewIntVar(0, most, f"{which}·x[{c},{u.name},{i}]")
                    self.m.Add(y <= most * self.x[(u, i)]).with_name(f"units[{c}]")
                    ys.append(y)
                self.m.Add(sum(ys) == count).with_name(f"units[{c}]")
        self.counted[key] = out
        return out

    def _input_terms(self, c: str) -> list:
        """(literal or count, bytes): class c's kept inputs on the GPU: unit 0's where g[c],
        m[c] typical units (`groups.py`). A typical unit's bytes round up, so that the direct
        count (`figures.memory_of`) is never above this."""
        pb, out = self.pb, []
        first, typical = G.unit_bytes(pb, c)
        for (u, i), b in first.items():
            out.append((self._both(self.x[(u, i)], self.g[c], f"{u.name},{i}"), int(b)))
        most = max(G.units(pb, c, g) for g in self.h.get(c, {1: 0})) - 1
        for (u, i), v in self._counted(c, "km").items():
            if isinstance(v, int) and v == 0:
                continue
            out.append((v, ceil(typical[(u, i)])))
            self.ub["units"] = self.ub.get("units", 0) + ceil(typical[(u, i)]) * most  # v ≤ most
        return out

    def _group_terms(self, c: str) -> dict:
        """g → (x[u,i], bytes) of the g − 1 inner inputs live again in a group's backward."""
        typical = G.unit_bytes(self.pb, c)[1]
        return {g: [(self.x[(u, i)], int((g - 1) * b)) for (u, i), b in typical.items() if int(b)]
                for g in self.h.get(c, {1: 0}) if g > 1}

    def _group_time(self) -> list:
        """E[c] ≥ the K − n_g layer forwards that groups of g add, where h[c,g]."""
        pb, terms = self.pb, []
        for c, h in self.h.items():
            K = len(pb.classes[c].layers)
            E = None
            for g, v in h.items():
                n = G.units(pb, c, g)
                if g <= 1 or n == K or _off(v):
                    continue
                share = (K - n) / K
                expr = [(int(round(share * pb.mult[t] * pb.forward[(t, i)].time_s * NS)), self.x[(t, i)])
                        for t in pb.classes[c].nodes for i in range(len(pb.strategies[t]))]
                expr += [(int(round(share * pb.tensors[k[0]].mult * f * NS)), self.w[k])
                         for k, f in pb.move_forward.items() if pb.tensors[k[0]].cls == c]
                if E is None:  # at most every term (the largest share: g's n_g only falls)
                    E = self.m.NewIntVar(0, sum(t for t, _ in expr) * K + 1, f"E[{c}]")
                    terms.append(E)
                expr = sum(t * x for t, x in expr if t)
                bound = self.m.Add(E >= expr).with_name(f"group_time[{c}]")
                if not isinstance(v, int):
                    bound.only_enforce_if(v)
        return terms

    def _add_offload(self):
        """The host memory that offloaded inputs take, beside the optimizer state kept there."""
        terms = self._offloaded()
        if terms:
            room = int(self.pb.costs.gpu.host_capacity - self.pb.host_bytes)
            self.m.Add(sum(b * v for v, b in terms) <= room).with_name("host")

    def _add_recompute(self):
        """r[c] per layer class (forced by overrides, or off when not allowed), and the working
        set W of recomputing one layer: its activations, live again during its backward."""
        pb = self.pb
        if not pb.classes:
            return
        self._attention_of = kept_attention(pb)
        self._kept_attention = {(n, c) for c, ns in self._attention_of.items() for n, _ in ns}
        for c, lc in pb.classes.items():  # forced: the constant 1; not allowed: 0
            self.r[c] = 1 if lc.forced else self.m.NewBoolVar(f"r[{c}]") if self.allow else 0
            self._offload_choice(c, lc)
            self._selective_choice(c, lc)
            self._units_choice(c, lc)
        self._region_choice()
        one_layer = {c: [] for c in pb.classes}  # kept or made again (the first layer's backward)
        top_layer = {c: [] for c in pb.classes}  # made again (the last layer's: kept attention
        #                                          outputs are in A already where σ[c])
        for (n, i), cost in pb.node_cost.items():
            for c, k in pb.kept_by.get(n, {}).items():
                if c is not None and cost.memory_bytes:
                    live = self._layer_live(n, i, c, cost.memory_bytes)
                    one_layer[c] += live
                    if (n, c) in self._kept_attention and not _off(self.sigma[c]) and len(live) == 1:
                        x, a = live[0]
                        live = [(self._lit_and(x, _neg(self.sigma[c]), f"{n.name},{i}∧¬σ[{c}]"), a)]
                    top_layer[c] += live
        for (key, i, l), w in self.w.items():
            c, kept = pb.tensors[key].cls, pb.move[(key, i, l)][2]
            if c is not None and kept:
                one_layer[c].append((w, int(live_again(pb, c, kept))))
                top_layer[c].append((w, int(live_again(pb, c, kept))))
        # a chunked region runs one program per chunk: no redistribution inside it
        for (key, i, l) in pb.move:
            c = pb.tensors[key].cls
            if c is not None and pb.classes[c].kind == "chunk" and pb.node_class.get(key[0]) == c \
                    and not _off(self.r[c]):
                r = self.r[c]
                if isinstance(r, int):
                    self.m.AddBoolOr([self.x[(key[0], i)].Not(), self.z[(key, l)].Not()]) \
                        .with_name(f"whole_chunks[{c}]")
                else:
                    self.m.AddBoolOr([self.x[(key[0], i)].Not(), self.z[(key, l)].Not(), r.Not()]) \
                        .with_name(f"whole_chunks[{c}]")
        flight = {c: self._in_flight(c) for c in pb.classes if not _off(self.o[c])}
        flight1 = {c: self._in_flight(c, IN_FLIGHT - 1) for c in flight}
        inner = {c: self._group_terms(c) for c in pb.classes}  # g − 1 inner inputs, by g
        top = max((sum(k for _, k in terms) + sum(k for _, k in flight.get(c, ()))
                   + max((sum(k for _, k in t) for t in inner[c].values()), default=0)
                   for c, terms in top_layer.items()), default=0)
        self.W = self.m.NewIntVar(0, max(top, 0), "W")
        self.Wh = self.m.NewIntVar(0, max(top, 0), "Wh")
        self.ub["W"] = self.ub["Wh"] = max(top, 0)
        for c, terms in top_layer.items():
            if terms and not _off(self.r[c]):  # a chunked LM head + loss: Wh (before the layers')
                W = self.Wh if pb.classes[c].kind == "chunk" else self.W
                bound = self.m.Add(W >= sum(k * v for v, k in terms)).with_name(f"working[{c}]")
                if not isinstance(self.r[c], int):
                    bound.only_enforce_if(self.r[c])
            for g, more in inner[c].items():  # a group's backward: its inner inputs made again
                self._add_if(self.W >= sum(k * v for v, k in terms + more), f"working[{c},{g}]", self.h[c][g])
            if c in flight:  # the unit fetched back; the next one prefetched where e2[c]
                for fl, lits in ((flight1[c], ()), (flight[c], (self.e2[c],))):
                    self._add_if(self.W >= sum(k * v for v, k in terms + fl), f"in_flight[{c}]",
                                 self.o[c], *lits)
                    for g, more in inner[c].items():
                        self._add_if(self.W >= sum(k * v for v, k in terms + fl + more),
                                     f"in_flight[{c},{g}]", self.o[c], self.h[c][g], *lits)
        # the first layer's backward: one layer's activations live, kept or made again (its
        # input among them; offloaded, nothing more is in flight: no layer is left to fetch)
        layers = [c for c, lc in pb.classes.items() if lc.kind == "layer"]
        if layers:
            most = max(sum(k for _, k in one_layer[c])
                       + max((sum(k for _, k in t) for t in inner[c].values()), default=0) for c in layers)
            self.Wb = self.m.NewIntVar(0, max(most, 0), "Wb")
            self.ub["Wb"] = max(most, 0)
            for c in layers:
                if one_layer[c]:
                    self.m.Add(self.Wb >= sum(k * v for v, k in one_layer[c])).with_name(f"bottom[{c}]")
                for g, more in inner[c].items():  # the first group's inner inputs, again
                    self._add_if(self.Wb >= sum(k * v for v, k in one_layer[c] + more), f"bottom[{c},{g}]", self.h[c][g])

    # ------------------------------------------------------------------ selective recompute
    def _selective_choice(self, c: str, lc):
        """s[c] ∈ [0, |c|]: how many of c's layers (its last ones) keep their attention's
        outputs, s[c] ≤ |c|·r[c]; σ[c] = (s[c] ≥ 1). An override fixes it (`recompute:selective`:
        every layer; `recompute`, `offload`: none); 0 without attention to keep."""
        count, r = len(lc.layers), self.r[c]
        if lc.kind != "layer" or _off(r) or not self._attention_of.get(c):
            self.s[c] = self.sigma[c] = 0
        elif lc.forced or lc.offload:
            self.s[c], self.sigma[c] = (count, 1) if lc.selective else (0, 0)
        else:
            s = self.s[c] = self.m.NewIntVar(0, count, f"s[{c}]")
            sigma = self.sigma[c] = self.m.NewBoolVar(f"σ[{c}]")
            if not isinstance(r, int):
                self.m.Add(s <= count * r).with_name(f"selective[{c}]")
            self.m.Add(s >= sigma).with_name(f"selective[{c}]")
            self.m.Add(s <= count * sigma).with_name(f"selective[{c}]")

    def _add_selective(self):
        """y[n,i] = s[c]·x[n,i] for each attention template n of c (exact: y ≤ |c|·x[n,i],
        Σ_i y[n,i] = s[c]), so that kept bytes and saved seconds stay linear."""
        pb = self.pb
        for c, ns in getattr(self, "_attention_of", {}).items():
            s, count = self.s[c], len(pb.classes[c].layers)
            if _off(s):
                continue
            for n, _ in ns:
                if isinstance(s, int):
                    for i in range(len(pb.strategies[n])):
                        self.y[(n, i)] = s * self.x[(n, i)]
                    continue
                ys = []
                for i in range(len(pb.strategies[n])):
                    y = self.y[(n, i)] = self.m.NewIntVar(0, count, f"y[{n.name},{i}]")
                    self.m.Add(y <= count * self.x[(n, i)]).with_name(f"selective[{c}]")
                    ys.append(y)
                self.m.Add(sum(ys) == s).with_name(f"selective[{c}]")

    def _selective_terms(self) -> list:
        """(y, bytes): the attention outputs the selective layers keep, k_n·κ(n,i) a layer."""
        pb, terms, over = self.pb, [], 0
        for c, ns in getattr(self, "_attention_of", {}).items():
            most = self.s[c] if isinstance(self.s[c], int) else len(pb.classes[c].layers)
            for n, k in ns:
                for i in range(len(pb.strategies[n])):
                    b = int(k * attention_cache_bytes(pb, n, i))
                    if (n, i) in self.y and b:
                        terms.append((self.y[(n, i)], b))
                        over += b * (most - 1)  # y ≤ most, not 1: for `_peak_ub`
        self.ub["selective"] = over
        return terms

    def _selective_time(self) -> list:
        """Minus each selective layer's attention forward, not run again (k_n·f(n,i)·y[n,i])."""
        pb, terms = self.pb, []
        for c, ns in getattr(self, "_attention_of", {}).items():
            for n, k in ns:
                for i in range(len(pb.strategies[n])):
                    t = int(round(k * pb.forward[(n, i)].time_s * NS))
                    if (n, i) in self.y and t:
                        terms.append(-t * self.y[(n, i)])
        return terms

    # ------------------------------------------------------------------ token-wise regions
    def _lit_and(self, a, b, key: str):
        """a ∧ b for literals or the constants 0, 1 (exact: three clauses), made once per key."""
        if isinstance(a, int) or isinstance(b, int):
            return (b if a else 0) if isinstance(a, int) else (a if b else 0)
        if key not in self.lits:
            v = self.lits[key] = self.m.NewBoolVar(f"and[{key}]")
            self.m.AddImplication(v, a).with_name(f"and[{key}]")
            self.m.AddImplication(v, b).with_name(f"and[{key}]")
            self.m.AddBoolOr([a.Not(), b.Not(), v]).with_name(f"and[{key}]")
        return self.lits[key]

    def _region_choice(self):
        """q[R] per region (forced by an override, or off when the planner may not recompute;
        off too where a region sharing its ops is forced; a chain only in a recomputed layer,
        q[R] ≤ r[c], unless forced: "chain_in_recompute[R]"), at most one of the regions sharing
        ops in chunks (a module and the chain around it: "one_loop[R]"), and e[R] = q[R] ∧
        ¬r[L] (chunked in a layer that keeps its activations: the chunks' checkpoints keep its
        input). d[S] = r[L] ∨ q[R] for any R ∈ S (`_drop`) says what a region keeps is not."""
        pb = self.pb
        for name, reg in pb.regions.items():
            blocked = any(pb.regions[R].forced for R in reg.excludes)
            self.q[name] = 1 if reg.forced else self.m.NewBoolVar(f"q[{name}]") \
                if self.allow and not blocked else 0
        for name, reg in pb.regions.items():
            if reg.chain and not reg.forced and not _off(self.q[name]):  # in a recomputed layer
                r = self.r[reg.cls]
                if _off(r):
                    self.q[name] = 0
                elif not isinstance(r, int):
                    self.m.AddImplication(self.q[name], r).with_name(f"chain_in_recompute[{name}]")
        for name, reg in pb.regions.items():
            for R in reg.excludes:
                if name < R and not _off(self.q[name]) and not _off(self.q[R]):
                    self.m.Add(self.q[name] + self.q[R] <= 1).with_name(f"one_loop[{name}]")
            self.alone[name] = self._lit_and(self.q[name], _neg(self.r[reg.cls]), f"e[{name}]")

    def _any(self, lits: list, key: str):
        """The OR of literals or the constants 0, 1 (exact: one clause each way), made once per
        key."""
        lits = [v for v in lits if not _off(v)]
        if any(isinstance(v, int) for v in lits):
            return 1
        if len(lits) <= 1:
            return lits[0] if lits else 0
        if key not in self.lits:
            v = self.lits[key] = self.m.NewBoolVar(f"or[{key}]")
            self.m.AddBoolOr([*lits, v.Not()]).with_name(f"or[{key}]")
            for a in lits:
                self.m.AddImplication(a, v).with_name(f"or[{key}]")
        return self.lits[key]

    def _drop(self, S: tuple, cls: str):
        """d[S] = r[cls] ∨ q[R] for some R ∈ S: what the regions S keep alone is not kept."""
        return self._any([self.r[cls], *(self.q[R] for R in S)], f"d[{','.join(S)}]")

    def _chunked(self, S: tuple):
        """q[R] for some R ∈ S (regions sharing ops: at most one of them)."""
        return self._any([self.q[R] for R in S], f"q[{','.join(S)}]")

    def _layer_live(self, n, i, c: str, a: float) -> list:
        """(literal, bytes) of template n's kept output live again while a layer of class c is
        recomputed: all of it, or one chunk's (at most CHUNK_BYTES) when a region of c that
        keeps it runs in chunks (its input: all of it, the chunks' checkpoints keep it)."""
        pb, x = self.pb, self.x[(n, i)]
        inner = tuple(R for R in pb.region_kept.get(n, ()) if pb.regions[R].cls == c and
                      R in pb.node_regions.get(n, ()) and not _off(self.q[R]))  # made inside
        if not inner:
            return [(x, int(live_again(pb, c, a)))]
        q = self._chunked(inner)
        return [(self._lit_and(x, _neg(q), f"{n.name},{i}∧¬q[{','.join(inner)}]"), int(a))] + \
            [(self._lit_and(x, self.q[R], f"{n.name},{i}∧q[{R}]"), int(min(a, CHUNK_BYTES)))
             for R in inner]

    def _region_kept(self, n, cls) -> int:
        """How many of template n's members kept by class cls only a region that may run in
        chunks keeps (their terms are `_region_terms`')."""
        return sum(k for S, k in self.pb.kept_in.get(n, {}).items() if cls is not None and
                   self.pb.regions[S[0]].cls == cls and not all(_off(self.q[R]) for R in S))

    def _region_terms(self) -> list:
        """Kept bytes of regions that may run in chunks: what only their ops keep, unless the
        layer recomputes or they run in chunks (¬d[R]), and their input, kept by the chunks'
        checkpoints when the layer does not recompute (e[R])."""
        pb, terms = self.pb, []
        for n, groups in pb.kept_in.items():
            for S, k in groups.items():
                if all(_off(self.q[R]) for R in S):
                    continue
                d = self._drop(S, pb.regions[S[0]].cls)
                for i in range(len(pb.strategies[n])):
                    a = pb.node_cost[(n, i)].memory_bytes
                    if a:
                        v = self._lit_and(self.x[(n, i)], _neg(d), f"{n.name},{i}∧¬d[{','.join(S)}]")
                        terms.append((v, int(k * a)))
        for R, reg in pb.regions.items():
            for (u, idx), (count, x) in reg.inputs.items():
                for i, st in enumerate(pb.strategies[u]):
                    b = int(count * pb.costs.bytes(x, st.output if idx is None else st.output[idx]))
                    if b and not _off(self.alone[R]):
                        terms.append((self._lit_and(self.x[(u, i)], self.alone[R], f"{u.name},{i}∧e[{R}]"), b))
        return terms

    def _add_regions(self):
        """A chunked region runs one program per chunk: no redistribution between two of its ops
        ("whole_chunks"; one into it, of its input, runs once on the whole tensor before the
        chunk loop, priced as at any edge); while one chunk is recomputed in backward its
        activations are live again: W ≥ one chunk's ("working")."""
        pb = self.pb
        for (key, v, j), l in pb.need.items():
            for R in pb.node_regions.get(v, ()):
                if _off(self.q[R]) or (key[0], key[1], v) not in pb.regions[R].inner:
                    continue
                q = self.q[R]
                for i in range(len(pb.strategies[key[0]])):
                    if (key, i, l) in pb.move:
                        self.m.AddBoolOr([self.x[(v, j)].Not(), self.x[(key[0], i)].Not()]
                                         + ([] if isinstance(q, int) else [q.Not()])) \
                            .with_name(f"whole_chunks[{R}]")
        for R, reg in pb.regions.items():
            if _off(self.q[R]):
                continue
            terms = [(self.x[(n, i)], int(min(pb.node_cost[(n, i)].memory_bytes, CHUNK_BYTES)))
                     for n in reg.nodes if R in pb.region_kept.get(n, ())
                     for i in range(len(pb.strategies[n]))]
            terms = [(v, b) for v, b in terms if b]
            if terms:
                bound = self.m.Add(self.W >= sum(b * v for v, b in terms)).with_name(f"working[{R}]")
                if not isinstance(self.q[R], int):
                    bound.only_enforce_if(self.q[R])

    def _region_time(self) -> list:
        """A chunked region's forward, again in backward (one chunk at a time)."""
        pb, terms = self.pb, []
        for R, reg in pb.regions.items():
            if _off(self.q[R]):
                continue
            for n in reg.nodes:
                for i in range(len(pb.strategies[n])):
                    t = int(round(pb.mult[n] * pb.forward[(n, i)].time_s * NS))
                    if t:
                        terms.append(t * self._lit_and(self.x[(n, i)], self.q[R], f"{n.name},{i}∧q[{R}]"))
        return terms

    def _memory_terms(self):
        """(literal or variable, bytes) whose sum is the kept activations A; `self.tail_terms`:
        those of them kept only after the last layer (the final norm, the LM head + loss)."""
        pb, terms, tail = self.pb, [], []
        for (n, i), c in pb.node_cost.items():
            if not c.memory_bytes:
                continue
            for cls, k in pb.kept_by.get(n, {None: pb.mult[n]}).items():
                v = self.x[(n, i)] if cls is None else self._and_not(self.x[(n, i)], cls, f"{n.name},{i}")
                t = pb.tail_kept.get(n, {}).get(cls, 0)
                terms.append((v, int((k - t - self._region_kept(n, cls)) * c.memory_bytes)))
                tail.append((v, int(t * c.memory_bytes)))
        for (key, i, l), w in self.w.items():
            t, kept = pb.tensors[key], pb.move[(key, i, l)][2]
            if not kept:
                continue
            v = w if t.cls is None else self._and_not(w, t.cls, w.Name())
            terms.append((v, int(t.mult * kept)))
        for c, lc in pb.classes.items():
            if lc.kind == "layer":  # unit 0 and m[c] typical units (`groups.py`)
                terms += [(v, b) for v, b in self._input_terms(c) if b]
                continue
            for (u, idx), (count, x) in lc.inputs.items():
                for i, st in enumerate(pb.strategies[u]):
                    out = st.output if idx is None else st.output[idx]
                    b = int(count * pb.costs.bytes(x, out))
                    if b:
                        tail.append((self._and(self.x[(u, i)], c, f"{u.name},{i}"), b))
        terms += self._region_terms()
        terms += self._selective_terms()
        self.tail_terms = [(v, c) for v, c in tail if c and not _off(v)]
        return [(v, c) for v, c in terms if c and not _off(v)] + self.tail_terms

    def _extra(self, n, i):
        """(bytes whole, bytes in chunks, the literal "n runs in chunks" or None) of what n needs
        beyond the kept activations while it runs (`figures.extra_bytes`)."""
        whole, chunk = extra_bytes(self.pb, n, i)
        pb, q = self.pb, None
        c = pb.node_class.get(n)
        if c is not None and pb.classes[c].kind == "chunk":
            q = self.r.get(c, 0)
        elif pb.node_region.get(n) is not None:
            q = self._chunked(pb.node_regions[n])
        if q is None or whole == chunk or _off(q):
            return int(whole), int(whole), None
        if isinstance(q, int):  # always in chunks
            return int(chunk), int(chunk), None
        return int(whole), int(chunk), q

    def peak_bounds(self) -> list:
        """Linear expressions whose largest is the peak, less parameters and optimizer state
        (module docstring, "memory"): the backward's start, in the LM head + loss and in the last
        layer, and its end, in the first layer. Each node's extra bytes bound X_L (nodes in
        layers) or X_H (the others) from below, so that the peak takes three constraints."""
        pb = self.pb
        tail = len(self.tail_terms)
        rest = self.memory_terms[:len(self.memory_terms) - tail]
        A = sum(c * v for v, c in rest)  # + the tail: kept only by the final norm, LM head, loss
        T = sum(c * v for v, c in self.memory_terms[len(rest):])
        head = int(pb.head_grad_bytes)
        XL, XH = self._extras_var("X_L", True), self._extras_var("X_H", False)
        W = self.W if self.W is not None else 0
        Wh = self.Wh if self.Wh is not None else 0
        bounds = [A + head + W + XL, A + T + head + Wh + XH]
        bounds.append(int(pb.grad_bytes) + (self.Wb + XL if self.Wb is not None else 0))
        return bounds

    def _extras_var(self, name: str, layers: bool):
        """A variable at least each chosen node's extra bytes (`extra_bytes`), over the nodes in
        layer classes (layers=True) or the others: X ≥ chunk·x + (whole − chunk)·(x ∧ ¬q)."""
        pb, terms = self.pb, []
        for (n, i) in pb.node_cost:
            c = pb.node_class.get(n)
            if (c is not None and pb.classes[c].kind == "layer") != layers:
                continue
            whole, chunk, q = self._extra(n, i)
            x = self.x[(n, i)]
            if q is None:
                if whole:
                    terms.append([(x, whole)])
            else:
                terms.append([(x, chunk), (self._lit_and(x, q.Not(), f"{n.name},{i}∧¬q"), whole - chunk)])
        if not terms:
            return 0
        ub = max(sum(b for _, b in t) for t in terms)
        X = self.m.NewIntVar(0, ub, name)
        self.ub[name] = ub
        for t in terms:
            self.m.Add(X >= sum(b * v for v, b in t)).with_name(name)
        return X

    def _peak_ub(self) -> int:
        ub = int(self.pb.grad_bytes + self.pb.head_grad_bytes) + sum(c for _, c in self.memory_terms)
        return ub + sum(self.ub.values()) + 1

    def _add_memory(self, budget: float):
        pb = self.pb
        room = int(budget - (pb.static_bytes - pb.grad_bytes))
        for expr in self.peak_bounds():
            if isinstance(expr, int):
                expr = self.m.NewConstant(expr)
            self.m.Add(expr <= room).with_name("memory")

    def peak_var(self):
        """A variable at least the peak, less parameters and optimizer state (to minimize)."""
        bounds = self.peak_bounds()
        M = self.m.NewIntVar(0, self._peak_ub(), "peak")
        for expr in bounds:
            self.m.Add(M >= expr).with_name("peak")
        return M

    def time_objective(self):
        pb = self.pb
        terms = [int(round(pb.mult[n] * c.time_s * NS)) * self.x[(n, i)]
                 for (n, i), c in pb.node_cost.items()]
        terms += [int(round(pb.tensors[k[0]].mult * pb.move[k][0] * NS)) * w for k, w in self.w.items()]
        for (n, i), f in pb.forward.items():  # a recomputed layer's forward, again
            t = int(round(pb.mult[n] * f.time_s * NS))
            if t and not _off(self.r[pb.node_class[n]]):
                terms.append(t * self._and(self.x[(n, i)], pb.node_class[n], f"{n.name},{i}"))
        for k, f in pb.move_forward.items():
            t = int(round(pb.tensors[k[0]].mult * f * NS))
            if t and not _off(self.r[pb.tensors[k[0]].cls]):
                w = self.w[k]
                terms.append(t * self._and(w, pb.tensors[k[0]].cls, w.Name()))
        terms += self._fetch_time()
        terms += self._group_time()
        terms += self._region_time()
        terms += self._selective_time()
        return sum(terms)

    def _fetch_time(self):
        """Offloaded units copied back in backward (`groups.py`, "time"; `figures.fetch_time` counts the
        same): FIRST[c], the first one backward needs, exposed (unit 0's where it is the only
        one, else a typical unit's); each further one prefetched during the backward of the
        unit above (one layer's forward and backward, T), exposed for what its copy takes
        longer: (k − 2)·P[c] + P0[c], P = max(0, B/bw − T), P0 = max(0, B0/bw − T)."""
        pb, terms = self.pb, []
        for c in pb.classes:
            o, e2, kt = self.o[c], self.e2[c], self.kt[c]
            if _off(o):
                continue
            first, typical = G.copy_ns(pb, c)
            c0 = [(t, self.x[k]) for k, t in first.items() if t]
            ct = [(t, self.x[k]) for k, t in typical.items() if t]
            T = [(t, self.x[k]) for k, t in G.layer_ns(pb, c).items() if t]
            # FIRST as products x ∧ (o ∧ ¬e2), x ∧ e2, not a variable bounded where e2 holds
            # (CP-SAT 9.15's presolve dropped the optimum of that one here)
            one = self._lit_and(o, _neg(e2), f"o∧¬e2[{c}]")
            for (u, i), t in first.items():
                if t and not _off(one):
                    terms.append(t * self._lit_and(self.x[(u, i)], one, f"{u.name},{i}∧o∧¬e2[{c}]"))
            if _off(e2) or not ct:
                continue
            for (u, i), t in typical.items():
                if t:
                    terms.append(t * self._lit_and(self.x[(u, i)], e2, f"{u.name},{i}∧e2[{c}]"))
            lay = sum(t * x for t, x in T)
            P = self.m.NewIntVar(0, sum(t for t, _ in ct), f"P[{c}]")
            self.m.Add(P >= sum(t * x for t, x in ct) - lay).with_name(f"fetch[{c}]")
            if c0:  # P0 ≥ c0·e2 − T: max(0, B0/bw − T) where e2, else 0
                P0 = self.m.NewIntVar(0, sum(t for t, _ in c0), f"P0[{c}]")
                self.m.Add(P0 >= sum(t * self._lit_and(self.x[(u, i)], e2, f"{u.name},{i}∧e2[{c}]")
                                     for (u, i), t in first.items() if t) - lay).with_name(f"fetch[{c}]")
                terms.append(P0)
            most = max(G.units(pb, c, g) for g in self.h[c]) - 1
            if isinstance(kt, int):
                terms.append(max(kt - 1, 0) * P)
                continue
            # Q ≥ (k' − e2)·P, linear: one-hot b_j = (k' − e2 = j), Q ≥ j·P where b_j (CP-SAT
            # 9.15's presolve dropped the optimum of a multiplication equality here)
            b = [self.m.NewBoolVar(f"k'-1={j}[{c}]") for j in range(most)]
            self.m.AddExactlyOne(b).with_name(f"fetch[{c}]")
            self.m.Add(sum(j * v for j, v in enumerate(b)) == kt - e2).with_name(f"fetch[{c}]")
            Q = self.m.NewIntVar(0, most * sum(t for t, _ in ct), f"Q[{c}]")
            for j, v in enumerate(b[2:], start=2):  # j = 1: Q ≥ P below; j = 0: Q ≥ 0
                self.m.Add(Q >= j * P).only_enforce_if(v).with_name(f"fetch[{c}]")
            if most > 1:
                self.m.Add(Q >= P).only_enforce_if(b[1]).with_name(f"fetch[{c}]")
            terms.append(Q)
        return terms

    def solve(self, objective, seconds: float, workers: int, gap: float = 1e-4,
              seconds_of=None) -> Solution:
        """Minimize `objective`; the solution's `objective_s` is its value in seconds, or that
        of `seconds_of` (an expression in ns) where given."""
        self.m.Minimize(objective)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = seconds
        solver.parameters.num_workers = workers
        solver.parameters.relative_gap_limit = gap
        if any(not isinstance(v, int) for v in [*self.o.values(), *self.q.values()]):
            # CP-SAT 9.15's inclusion detection in presolve dropped the optimum of the offload
            # terms (tests/test_groups.py: a plan it proved optimal was 21 µs slower than one
            # it found with presolve off), and of the chunk terms (test_chunk_regions.py's brute
            # force, once a region's input may be redistributed: 7 µs); only where offload or
            # chunking is a decision, since without it the search stops elsewhere within the gap
            solver.parameters.presolve_inclusion_work_limit = 0
        t0 = time.perf_counter()
        status = solver.Solve(self.m)
        elapsed = time.perf_counter() - t0
        name = solver.StatusName(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return Solution({}, float("inf"), float("inf"), name, elapsed, budget=self.budget)
        choice = {n: next(i for i in range(len(sts)) if solver.Value(self.x[(n, i)]))
                  for n, sts in self.pb.strategies.items()}
        recompute = frozenset(c for c, r in self.r.items() if (r if isinstance(r, int) else solver.Value(r)))
        value = lambda v: v if isinstance(v, int) else solver.Value(v)  # noqa: E731
        offload = {c: 1 + value(self.kt.get(c, 0)) for c, o in self.o.items() if value(o)}
        groups = {c: g for c, h in self.h.items() for g, v in h.items() if g > 1 and value(v)}
        chunked = frozenset(R for R, q in self.q.items() if (q if isinstance(q, int) else solver.Value(q)))
        selective = {c: n for c, s in self.s.items()
                     if (n := s if isinstance(s, int) else solver.Value(s)) and c in recompute}
        memory = memory_of(self.pb, choice, recompute, offload, chunked, selective, groups)
        # the linearization bounds the direct count: equal, but for W (a bound) and moves
        # whose w is 1 where no consumer needs them (free when their time rounds to 0 ns)
        kept = sum(c * solver.Value(v) for v, c in self.memory_terms)
        assert memory.kept <= kept + len(self.memory_terms) + 1e-9 * kept, (kept, memory)
        value = solver.ObjectiveValue() if seconds_of is None else solver.Value(seconds_of)
        return Solution(choice, value / NS, memory.peak, name, elapsed,
                        recompute, memory, self.budget, offload, chunked, selective, groups)


def _refuse_overrides(pb: Problem):
    """Raise `Infeasible` for a model that no plan satisfies without a memory budget: what the
    overrides force (a redistribution inside a chunked region), or host memory."""
    chunked = sorted([R for R, reg in pb.regions.items() if reg.forced]
                     + [c for c, lc in pb.classes.items() if lc.kind == "chunk" and lc.forced])
    inner = inner_moves(pb)
    if inner:  # a chunked region runs one program per chunk: no redistribution inside
        raise Infeasible(
            "no plan satisfies the overrides: a region an override runs in chunks needs a "
            "redistribution between two of its ops under every split the overrides leave "
            f"({'; '.join(inner)}), and one program runs per chunk (a redistribution of its "
            "input runs once, before the loop, but not one inside): drop the chunk override "
            "there, or force the region's ops to one split")
    why = [f"the inputs of the layers an override offloads {'may not' if chunked else 'do not'} "
           f"fit in host memory beside the optimizer state kept there ({pb.host_bytes / 2**30:.1f} "
           f"GiB of {pb.costs.gpu.host_capacity / 2**30:.1f} GiB per GPU, GPU.host_capacity): "
           "offload fewer layers, or use more GPUs"]
    if chunked:
        why.insert(0, f"the regions an override runs in chunks ({', '.join(chunked)}) may need a "
                      "redistribution between two of their ops under the splits chosen (one "
                      "program runs per chunk; a redistribution of a region's input runs "
                      "before its loop): "
                      "drop the chunk override there, or force the region's ops to one split")
    raise Infeasible("no plan satisfies the overrides: " + "; or ".join(why))


def inner_moves(pb: Problem) -> list[str]:
    """For each region an override runs in chunks, the tensors made by one of its ops and read
    by another in a layout that no strategy the overrides leave makes: a redistribution inside
    it, which `whole_chunks` refuses ("region: producer → consumer (op names)")."""
    out = []
    for R, reg in pb.regions.items():
        if not reg.forced:
            continue
        for (key, v, j), l in pb.need.items():
            u = key[0]
            if j or (u, key[1], v) not in reg.inner:
                continue
            if all((key, i, pb.need[(key, v, jj)]) in pb.move
                   for i in range(len(pb.strategies[u])) for jj in range(len(pb.strategies[v]))):
                module = pb.dims.cap.module_path
                out.append(f"{reg.paths[0]}: {module(u) or u.name} → {module(v) or v.name} "
                           f"({u.name} → {v.name})")
    return list(dict.fromkeys(out))


def _neg(v):
    """¬v for a literal or the constants 0, 1."""
    return 1 - v if isinstance(v, int) else v.Not()


def _off(v) -> bool:
    """The constant 0 (a term that vanishes), not a CP-SAT variable."""
    return isinstance(v, int) and v == 0


def solve(pb: Problem, budget: float | None, *, seconds: float = 60.0, workers: int = 8,
          gap: float = 1e-4) -> Solution:
    """Minimize predicted time; stop within `gap` (relative) of the proven optimum: the costs
    are predictions, and proving the last 0.01% on near-ties can take minutes."""
    host = pb.costs.gpu.host_capacity
    if pb.host_bytes > host:
        raise Infeasible(f"the optimizer state offloaded to the host needs "
                         f"{pb.host_bytes / 2**30:.1f} GiB of host memory per GPU, the cluster has "
                         f"{host / 2**30:.1f} GiB (GPU.host_capacity); try model_state='sharded' "
                         "or more GPUs")
    # the fastest plan, memory aside, recomputing only what overrides force: when it fits, it is
    # optimal (recompute only adds time), and this model is as small as the one without recompute
    fast = Model(pb, None, recompute=False)
    sol = fast.solve(fast.time_objective(), seconds, workers, gap)
    if sol.choice and (budget is None or sol.memory_bytes <= budget):
        sol.budget = budget
        return sol
    model = Model(pb, budget)
    objective = model.time_objective()
    sol = model.solve(objective, seconds, workers, gap)
    if sol.choice:
        # of the plans as fast, the least memory: memory terms often tie in time (which layers'
        # inputs live on the host when their copies overlap anyway), and headroom under the
        # budget is what a prediction a few percent low needs
        model.m.Add(objective <= int(sol.objective_s * NS) + 1)
        least = model.solve(model.peak_var(), seconds, workers, gap, seconds_of=objective)
        if least.choice and least.memory_bytes < sol.memory_bytes:
            least.budget = budget
            return least
        return sol
    if sol.status == "INFEASIBLE":
        floor = None
        if budget is not None:
            least = Model(pb, None)
            floor = least.solve(least.peak_var(), seconds, workers)
        if floor is None or not floor.choice:  # without a budget: host memory, or overrides
            _refuse_overrides(pb)
        how = ("" if not pb.classes else ", recomputing the layers where that saves memory"
               + (" and keeping their inputs in host memory" if pb.offload_allowed else "")
               if pb.recompute_allowed else ", without recompute")
        raise Infeasible(
            f"no plan fits {budget / 2**30:.1f} GiB per GPU: the least memory any plan needs is "
            f"{floor.memory_bytes / 2**30:.1f} GiB ({pb.static_bytes / 2**30:.1f} GiB of it "
            f"parameters, gradients and optimizer state{how}). Try: more GPUs or a longer mesh "
            "axis, a shorter sequence, model_state='sharded' (FSDP2, parameters sharded over the mesh) or "
            "'offload' (optimizer state in host memory), or a larger memory_budget")
    raise PlanError(f"the solver stopped with status {sol.status} after {sol.seconds:.1f} s")
