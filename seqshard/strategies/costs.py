"""What a strategy costs: a node's compute and own communication, the redistribution on an edge,
and the activation bytes a choice keeps. Everything in seconds and bytes, from
`seqshard.costmodel` (roofline compute, alpha-beta collectives, the attention algorithms).

Sizes come from `size_of(atom)`, which returns a number for the solver and may return a sympy
symbol to show how a cost grows with a factor (`Costs(..., symbolic={"s"})`).

The program priced is eager PyTorch, op by op, unless the plan is made for what
`parallelize(compile=..., kernels=...)` builds:

    compiled    each layer compiled by Inductor (`codegen/compiled.py`): its pointwise ops and
                norms fuse into chains between the ops Inductor leaves to libraries (GEMMs,
                attention, embeddings); a chain reads each tensor from outside it once and
                writes what is read outside it once, its FLOPs unchanged (`_fused_work`); the
                bytes move at `GPU.fused_bandwidth_efficiency` × hbm_bandwidth
    fused_loss  an LM head + cross-entropy as the fused kernel (`codegen/kernels/linear_ce.py`):
                its three GEMMs, and one Triton pass over the logits that reads them twice and
                writes the gradient over them, in the activation dtype; no fp32 logits, no
                cast, no separate backward (`_fused_loss_work`); the time over
                `GPU.fused_loss_efficiency`

Both GPU fields are 1.0 in the presets and measured by `seqshard calibrate` (costmodel/calibrate.py).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field, replace
from math import prod

import sympy
import torch
import torch.fx as fx

from seqshard.capture import masked_attention, sdpa_options
from seqshard.costmodel import attention as att_cost
from seqshard.costmodel import collectives as coll
from seqshard.costmodel import compute as comp
from seqshard.costmodel.cluster import Cluster
from seqshard.dims import DimAnalysis
from seqshard.dims.ops.matrix_ops import spell_out

from .algorithms import ALGORITHMS
from .layout import Shard, redistribution, split_axes
from .plan import Cost
from .strategy import Strategy, is_attention

aten = torch.ops.aten

VIEWS = {aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.t,
         aten.numpy_T, aten.unsqueeze, aten.squeeze, aten.flatten, aten.unflatten, aten.expand,
         aten.alias, aten.detach, aten.slice, aten.select, aten.unbind, aten.chunk, aten.split,
         aten.split_with_sizes, aten.mT, aten.broadcast_to, aten.view_as, aten.expand_as}

ADD_CONTRACTIONS = {aten.addmm, aten.baddbmm, aten.addbmm, aten.addmv}
"""`self + mat1 @ mat2` and its batched forms: the contraction's first operand is argument 1."""

# which inputs autograd keeps for backward, per op family (index into the tensor inputs)
SAVES_ALL = {aten.mul, aten.div, aten.matmul, aten.mm, aten.bmm, aten.einsum, aten.mse_loss,
             aten.addmm, aten.baddbmm, aten.addbmm, aten.addmv,
             aten.scaled_dot_product_attention, masked_attention, aten.outer}
SAVES_FIRST = {aten.linear, aten.rms_norm, aten.layer_norm, aten.silu, aten.gelu, aten.exp,
               aten.sin, aten.cos, aten.rsqrt, aten.tanh, aten.sigmoid, aten.pow, aten.softmax,
               aten._softmax, aten.log_softmax, aten.cross_entropy_loss, aten.relu, aten.sqrt}


CASTS = {aten.to, aten._to_copy}
"""Dtype conversions: priced by the element sizes they read and write (`compute.cast`)."""


def _item(node: fx.Node, default: int) -> int:
    """Bytes an element of `node`'s output (its traced value), else `default`."""
    val = node.meta.get("val")
    return val.element_size() if isinstance(val, torch.Tensor) else default


def op_packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


@dataclass
class Costs:
    """Cost functions for one captured model on one cluster and mesh."""

    dims: DimAnalysis
    cluster: Cluster
    mesh: tuple[tuple[str, int], ...]
    training: bool = True
    dtype_bytes: int = 2
    symbolic: frozenset = frozenset()
    orders: dict = field(default_factory=dict)   # atom → "zigzag" | "contig"
    compiled: bool = False
    """The layers run compiled (`parallelize(compile="layers")`): fused pointwise chains."""
    fused_loss: bool = False
    """An LM head + cross-entropy runs as the fused kernel (`parallelize(kernels=True)`)."""

    def __post_init__(self):
        self.F = self.dims.F
        self.shape = tuple(n for _, n in self.mesh)
        self.links = [self.cluster.axis_link(self.shape, i) for i in range(len(self.shape))]
        self.gpu = self.cluster.gpu
        self._edge_cache: dict = {}
        self._chains = fused_chains(self.dims) if self.compiled else {}
        # a fused chain moves its bytes at the bandwidth a compiled chain reaches (calibrated)
        eff = self.gpu.fused_bandwidth_efficiency
        self._fused_gpu = self.gpu if eff == 1 else \
            replace(self.gpu, hbm_bandwidth=self.gpu.hbm_bandwidth * eff)
        self._loss = fused_losses(self.dims) if self.fused_loss else {}

    # ------------------------------------------------------------------ sizes
    def size_of(self, a: int):
        label = self.F.label(a)
        if label in self.symbolic:
            return sympy.Symbol(label, positive=True, integer=True)
        return self.F.size(a)

    def local(self, a: int, layout) -> object:
        n = prod(self.shape[i] for i in split_axes(layout, a))
        if n == 1:
            return self.size_of(a)
        pieces = self.F.pieces(a)
        if pieces is not None:  # a joint factor, split piece by piece (`Factors.join`)
            out = 0
            for p in pieces:
                atom = self.F.piece_atom(p)
                lay = tuple(Shard(atom) if q == Shard(a) else q for q in layout)
                out += prod((self.local(self.F.find(b), lay) for b in self.F.atoms_of(p)), start=1)
            return out
        size = self.size_of(a)
        if isinstance(size, int):
            return -(-size // n)
        return size / n

    def numel(self, node: fx.Node, layout, index: int | None = None):
        sig = self.dims.sigs[node]
        if index is not None:
            sig = sig[index]
        return prod((self.local(self.F.find(a), layout) for d in sig for a in self.F.atoms_of(d)), start=1)

    def bytes(self, node: fx.Node, layout) -> object:
        val = node.meta.get("val")
        item = val.element_size() if isinstance(val, torch.Tensor) else self.dtype_bytes
        item = min(item, 4)
        return self.numel(node, layout) * item

    # ------------------------------------------------------------------ a node
    def node(self, n: fx.Node, st: Strategy, *, saved: bool) -> Cost:
        """Compute (forward, and backward when training), the node's own communication, and the
        bytes its output keeps for backward."""
        packet = op_packet(n)
        out = st.output if not isinstance(st.output, list) else None
        mem = self.bytes(n, out) if (saved and out is not None and self.training) else 0
        if packet in VIEWS:
            return Cost()
        if is_attention(n):
            return self._attention(n, st, mem)
        if n in self._loss:
            work = self._fused_loss_work(n, st)
            if work is None:
                return Cost(memory_bytes=mem)
            # the kernel computes the gradient in its forward pass: no backward of its own
            time, eff = work.time(self.gpu), self.gpu.fused_loss_efficiency
            return Cost(compute_s=time if eff == 1 else time / eff, memory_bytes=mem)
        if n in self._chains:  # one kernel per chain: the launch floor on its first op alone
            work = self._fused_work(n, st)
            floor = _at_least_a_kernel if self._chains[n][3] else (lambda t: t)
            gpu = self._fused_gpu
            time = floor(work.time(gpu)) + (floor(work.backward().time(gpu)) if self.training else 0)
            return Cost(compute_s=time, memory_bytes=mem)
        work = self._work(n, st)
        fwd = _at_least_a_kernel(work.time(self.gpu))
        time = fwd + (_at_least_a_kernel(work.backward().time(self.gpu)) if self.training else 0)
        return Cost(compute_s=time, memory_bytes=mem)

    def _fused_work(self, n: fx.Node, st: Strategy) -> comp.Work:
        """`_work`'s FLOPs with the traffic of a fused chain (`fused_chains`): the tensors from
        outside n's chain that n is the chain's first reader of, and n's output when some op
        outside the chain reads it."""
        eager = self._work(n, st)
        chain, first_reader, read_outside, _ = self._chains[n]
        moved = sum((self.bytes(x, lay) for x, lay in st.inputs if first_reader.get(x)), start=0)
        if read_outside:
            out = st.output if not isinstance(st.output, list) else st.output[0]
            moved = moved + self.bytes(n, out)
        return comp.Work(eager.flops, moved, eager.kind, eager.dtype_bytes, eager.backward_factor)

    def _fused_loss_work(self, n: fx.Node, st: Strategy) -> comp.Work | None:
        """A node of a fused LM head + loss (`fused_losses`): the head's linear keeps its GEMMs
        (forward, and dh, dW in the kernel's forward: `linear`'s 2× backward); the loss node
        costs the Triton pass over the logits (2 reads + 1 write in the logits' dtype); the
        casts and reshapes between them cost nothing (None)."""
        role = self._loss[n]
        if role == "head":
            eager = self._work(n, st)
            return comp.Work(eager.flops * (1 + comp.BACKWARD_FACTOR["matmul"]) if self.training
                             else eager.flops, eager.bytes * (3 if self.training else 1),
                             "matmul", eager.dtype_bytes)
        if role == "loss":
            x = n.args[0]
            (lay,) = [lay for y, lay in st.inputs if y is x]
            logits = self.numel(x, lay)
            head_bytes = _item(_head_of(x), self.dtype_bytes)
            return comp.Work(5 * logits, 3 * logits * head_bytes, "reduction", head_bytes)
        return None

    def _work(self, n: fx.Node, st: Strategy) -> comp.Work:
        packet = op_packet(n)
        ins = dict(st.inputs)
        out_layout = st.output if not isinstance(st.output, list) else st.output[0]
        out_numel = self.numel(n, out_layout) if not isinstance(st.output, list) else \
            self.numel(n, out_layout, 0)
        if packet is aten.einsum:
            return self._einsum(n, st)
        if packet in (aten.linear, aten.matmul, aten.mm, aten.bmm) or packet in ADD_CONTRACTIONS:
            x = n.args[1] if packet in ADD_CONTRACTIONS else n.args[0]
            k_dims = self.dims.sigs[x][-1]
            k = prod((self.local(self.F.find(a), ins[x]) for a in self.F.atoms_of(k_dims)), start=1)
            return comp.Work(2 * out_numel * k, self.dtype_bytes * (out_numel + self.numel(x, ins[x])),
                             "matmul", self.dtype_bytes)
        if packet in (aten.rms_norm, aten.layer_norm):
            return comp.norm(out_numel, 1, dtype_bytes=self.dtype_bytes)
        if packet is aten.cross_entropy_loss:
            x = n.args[0]
            return comp.cross_entropy(self.numel(x, ins[x]), dtype_bytes=_item(x, 4))
        if packet in (aten.softmax, aten._softmax, aten.log_softmax):
            x = n.args[0]
            return comp.softmax(self.numel(x, ins[x]), dtype_bytes=4)
        if packet in CASTS and n.args and isinstance(n.args[0], fx.Node):
            x = n.args[0]
            a, b = _item(x, self.dtype_bytes), _item(n, self.dtype_bytes)
            if a != b:
                return comp.cast(out_numel, in_bytes=a, out_bytes=b)
        if packet is aten.embedding:
            return comp.pointwise(out_numel, inputs=1, dtype_bytes=self.dtype_bytes)
        tensors = sum(1 for _ in st.inputs)
        return comp.pointwise(out_numel, inputs=max(tensors, 1), dtype_bytes=self.dtype_bytes)

    def _einsum(self, n: fx.Node, st: Strategy) -> comp.Work:
        """`compute.einsum` on the local shards: the equation spelled out ('...' and an implicit
        output made explicit), each letter the local size of its dim. A dim of size 1 that
        broadcasts against a larger one gets a letter of its own."""
        F = self.F
        equation, operands = n.args[0], n.args[1]
        sigs = [self.dims.sigs[x] for x in operands]
        lhs, out = spell_out(equation, [len(s) for s in sigs]).split("->")
        free = iter(c for c in string.ascii_letters if c not in equation)
        digits = {c: next(free) for c in set(lhs + out) if c.isdigit()}
        lhs, out = ("".join(digits.get(c, c) for c in t) for t in (lhs, out))
        ins = dict(st.inputs)

        def local_dims(sig, layout):
            return [prod((self.local(F.find(a), layout) for a in F.atoms_of(d)), start=1) for d in sig]

        shapes = [local_dims(sig, ins[x]) for x, sig in zip(operands, sigs)]
        size: dict[str, object] = {}
        for shape, letters in zip(shapes, lhs.split(",")):
            for c, k in zip(letters, shape):
                if k != 1:
                    size[c] = k
        terms = []
        for shape, letters in zip(shapes, lhs.split(",")):
            terms.append("".join(next(free) if k == 1 and size.get(c, 1) != 1 else c
                                 for c, k in zip(letters, shape)))
        return comp.einsum(",".join(terms) + "->" + out, *shapes, dtype_bytes=self.dtype_bytes)

    def _attention(self, n: fx.Node, st: Strategy, mem) -> Cost:
        att = self.dims.attention(n)
        q = n.args[0]
        (q_layout,) = [lay for x, lay in st.inputs if x is q]
        kv_layout = [lay for x, lay in st.inputs if x is n.args[1]][0]
        F = self.F

        def size(dims, layout):
            return prod((self.local(F.find(a), layout) for d in dims for a in F.atoms_of(d)), start=1)

        batch = size(att.batch, q_layout)
        heads = size([att.heads], q_layout)
        kv_heads = size([att.kv_heads], kv_layout)
        head_dim = size([att.head_dim], q_layout)
        seq_atoms = [F.find(a) for a in F.atoms_of(att.seq_k)]
        seq = prod((self.size_of(a) for a in seq_atoms), start=1)
        causal = bool(sdpa_options(n).get("is_causal"))
        if mem:  # its backward reads its output and the fp32 log-sum-exp of each query row
            mem += 4 * self.numel(q, q_layout) / head_dim
        shape = att_cost.AttentionShape(batch=batch, heads=heads, kv_heads=kv_heads, seq=seq,
                                        head_dim=head_dim, dtype_bytes=self.dtype_bytes, causal=causal)
        axes = [i for i, a in enumerate(st.splits) if a in seq_atoms]
        order = self.orders.get(seq_atoms[0], "zigzag" if causal else "contig")
        if not axes:
            c = att_cost.local(shape, training=self.training, group_size=1, gpu=self.gpu)
        else:  # hybrid: ring on the outer axis, Ulysses on the inner; its cost takes (inner, outer)
            group = tuple(self.shape[i] for i in reversed(axes))
            link = tuple(self.links[i] for i in reversed(axes))
            if len(axes) == 1:
                group, link = group[0], link[0]
            c = ALGORITHMS[st.algorithm].cost(shape, training=self.training, group_size=group,
                                              link=link, gpu=self.gpu, order=order)
        return Cost(compute_s=c.compute, comm_s=c.time - c.compute, memory_bytes=mem,
                    comm_bytes=c.comm_bytes, transient_bytes=c.extra_memory)

    # ------------------------------------------------------------------ an edge
    def edge(self, x: fx.Node, src, dst) -> tuple:
        """(seconds, bytes sent) to move tensor `x` from layout `src` to `dst`, forward and (when
        training) the adjoint collective in backward."""
        key = (x, src, dst)
        if key not in self._edge_cache:
            self._edge_cache[key] = self._edge(x, src, dst)
        return self._edge_cache[key]

    def _edge(self, x: fx.Node, src, dst):
        if src == dst:
            return 0.0, 0.0
        t, sent = 0.0, 0.0
        lay = src
        for step in redistribution(src, dst):
            size = self.bytes(x, lay)  # bytes of the local tensor before the step
            n, link = self.shape[step.axis], self.links[step.axis]
            kind = {"all_reduce": "all_reduce", "reduce_scatter": "reduce_scatter",
                    "all_gather": "all_gather", "all_to_all": "all_to_all", "slice": None}[step.kind]
            new = step.after(lay)
            if kind is None:  # a local slice: a copy of the piece, and its zero-filled adjoint
                t += 2 * self.bytes(x, new) / self.gpu.hbm_bandwidth
            else:
                # nccl-tests sizes: the gathered output of an all-gather, else the input buffer
                msg = size * n if kind == "all_gather" else size
                one = coll.COLLECTIVE_TIME[kind](msg, n, link)
                t += one * (2 if self.training else 1)
                sent += coll.bytes_sent(kind, msg, n) * (2 if self.training else 1)
            lay = new
        return t, sent


KERNEL_S = 4e-6
"""The least time a GPU kernel launched from eager PyTorch takes (launch and tail), seconds."""


def _at_least_a_kernel(t):
    return t if not isinstance(t, (int, float)) else max(t, KERNEL_S)


# ------------------------------------------------------------------ compiled programs
_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")
LIBRARY = {aten.linear, aten.matmul, aten.mm, aten.bmm, aten.einsum, aten.embedding,
           *ADD_CONTRACTIONS}
"""Ops Inductor leaves to a library kernel (cuBLAS, the attention kernels, embedding's gather):
never inside a fused chain. Attention too (`is_attention`)."""


def _layer(dims: DimAnalysis, n: fx.Node) -> str | None:
    """The layer of a node's module path (`layers.3.attn.q` → `layers.3`), as
    `solver.clusters.layer_of` and `codegen.compiled` cut layers; None outside any layer."""
    m = _LAYER.match(dims.cap.module_path(n))
    return m.group(1) if m else None


def _fusible(n: fx.Node) -> bool:
    return n.op == "call_function" and op_packet(n) not in LIBRARY and not is_attention(n) \
        and isinstance(n.meta.get("val"), torch.Tensor)


def components(nodes, joined=lambda x, v: True) -> dict:
    """Connected components of graph nodes (union-find): node → its component's root, for
    `nodes` joined along each edge x → v between two of them where `joined(x, v)`. In `nodes`'
    order; a component's members map to one root node (a chain id in `fused_chains`, the key
    that groups `solver.problem.token_chains`' components)."""
    parent = {n: n for n in nodes}

    def find(a):
        while parent[a] is not a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for v in parent:
        for x in v.all_input_nodes:
            if x in parent and joined(x, v):
                parent[find(x)] = find(v)
    return {v: find(v) for v in parent}


def fused_chains(dims: DimAnalysis) -> dict:
    """What Inductor makes of each layer's pointwise ops and norms (compile="layers" compiles
    each layer alone): node → (chain id, {input: is n the chain's first reader of it}, is n's
    output read outside its chain, is n the chain's first op). A chain is a connected set of fusible ops (not `LIBRARY`,
    not attention, not views) of one layer, joined directly or through views; a tensor made
    outside the chain (a GEMM's output, a parameter, the previous layer's) is read once, by its
    first reader in graph order; an output is written when an op outside the chain (or outside
    the layer, or the graph's output) reads it. The chain's first op in graph order is charged
    the launch floor of its one kernel (`KERNEL_S`), forward and backward.

    E.g. Llama's SwiGLU `silu(gate) * up`: one chain reading gate and up and writing the product
    (3 tensors, where eager's silu and mul move 5); RoPE's mul, neg, cat, mul, add on q: one
    chain reading q and writing q' (cos and sin are read too, [s, e], small)."""
    nodes = list(dims.cap.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    layer = {n: _layer(dims, n) for n in nodes if n.op == "call_function"}
    member = {n for n in nodes if layer.get(n) is not None
              and (_fusible(n) or op_packet(n) in VIEWS)}
    chain_of = components(member, lambda x, n: layer[x] == layer[n])

    def source(x):  # through views to the op that made the data
        while x in member and op_packet(x) in VIEWS and x.all_input_nodes:
            x = x.all_input_nodes[0]
        return x

    def readers(n):  # through views to the ops that read the data
        out = []
        for u in n.users:
            out.extend(readers(u) if u in member and op_packet(u) in VIEWS else [u])
        return out

    chains, seen, started = {}, set(), set()
    for n in sorted((m for m in member if op_packet(m) not in VIEWS), key=order.get):
        c = chain_of[n]
        first = {}
        for x in n.all_input_nodes:
            src = source(x)
            inside = src in member and chain_of[src] is c
            first[x] = not inside and (c, src) not in seen
            seen.add((c, src))
        outside = any(u not in member or chain_of[u] is not c for u in readers(n))
        chains[n] = (c, first, outside, c not in started)
        started.add(c)
    return chains


def _head_of(x: fx.Node) -> fx.Node:
    """The op that made the logits `x`, through casts and views."""
    while op_packet(x) in CASTS or op_packet(x) in VIEWS:
        x = x.args[0]
    return x


def fused_losses(dims: DimAnalysis) -> dict:
    """The nodes of LM heads + cross-entropy that `parallelize(kernels=True)` runs as the fused
    kernel (`codegen.recompute.fusable_losses`: a bias-free linear whose logits reach a
    cross_entropy_loss through casts and reshapes alone): node → "head" (the linear), "loss"
    (the cross-entropy) or "between"."""
    out = {}
    for ce in dims.cap.graph.nodes:
        if ce.op != "call_function" or op_packet(ce) is not aten.cross_entropy_loss:
            continue
        between, x = [], ce.args[0]
        while isinstance(x, fx.Node) and (op_packet(x) in CASTS or op_packet(x) in VIEWS) \
                and len(x.users) == 1:
            between.append(x)
            x = x.args[0]
        if not (isinstance(x, fx.Node) and op_packet(x) is aten.linear and len(x.users) == 1
                and (len(x.args) < 3 or x.args[2] is None)):
            continue
        out[x], out[ce] = "head", "loss"
        out.update({b: "between" for b in between})
    return out
