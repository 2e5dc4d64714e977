"""The rewrite: captured graph + strategies → this rank's graph.

One walk over the captured graph in order. For every node:

1. each tensor input is brought to the layout the node's strategy needs (`Sharder.value`):
   the redistribution steps of `strategies.redistribution`, emitted as calls into
   `seqshard.runtime.sharding` and cached, so two consumers that need the same layout share
   one collective;
2. the op is emitted on local shards by its family's localizer (`local_ops.py`): views get
   local sizes from factor sizes, attention becomes the plan's distributed algorithm, means and
   losses divide by global counts, tensors made from sizes are made whole and sliced;
3. the output gets the strategy's output layout.

At the outputs, partial sums are all-reduced, and the gradient of a replicated output is scaled
by 1/(number of copies): every rank seeds it, the program must see it once.

Sizes: a factor that is split anywhere and not divisible by its split is zero-padded to a
multiple while split (`pads`), and is cut back to its size whenever it is gathered whole.

A joint factor (`cat([text, video])`, `Factors.join`) split on an axis is split piece by piece:
each rank holds its share of every piece in piece order, a piece's share being that of its
`piece_atom` split on the same axes (with that atom's padding, now in the middle of the local
dim). Its local size is the sum of the pieces' (`local_size`), its redistributions run per
piece (`emit_step`), and its padding mask is the pieces' masks in order (`mask_atoms`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from math import lcm, prod

import torch
import torch.fx as fx

from seqshard.dims import DimAnalysis
from seqshard.runtime import sharding as rt
from seqshard.strategies import P, R, Shard, Step, Strategy, redistribution, split_axes

from .mesh import MeshInfo


def _code_of(gm: fx.GraphModule, prefix: str, indent: str) -> str:
    under = lambda m: m == prefix or m.startswith(prefix + ".")  # noqa: E731
    mine = {n.name for n in gm.graph.nodes if under(n.meta.get("module") or "")}
    lines = []
    for line in gm.code.splitlines():
        name = line.strip().split(" = ")[0]
        if name in mine:
            lines.append(indent + line.strip().split(";  ")[0])
    for name, sub in gm.named_children():
        if isinstance(sub, fx.GraphModule):
            inner = _code_of(sub, prefix, indent + "    ")
            if inner:
                lines += [f"{indent}# self.{name}:", inner]
    return "\n".join(lines)


@dataclass
class Program:
    """This rank's program and what is needed to feed it and read it."""

    gm: fx.GraphModule
    placeholders: list[str]                     # gm's inputs in order (captured placeholder names)
    input_layouts: dict[str, tuple]             # user input → layout its first split use needs
    output_layouts: list                        # layout of each output
    cap: object = field(repr=False)             # the captured model it was emitted from
    _sharder: "Sharder" = field(repr=False)

    def redistributor(self, node: fx.Node, src, dst) -> fx.GraphModule:
        """A small program that moves captured `node`'s values from layout `src` to `dst` (what
        `ParallelModule.gather` and `.shard` run)."""
        return self._sharder.redistributor(node, src, dst)

    def code_of(self, module_prefix: str) -> str:
        """The lines of the generated code that come from modules under `module_prefix`
        (`layers.1` holds `layers.1.attn`, not `layers.10`), also inside the submodules that
        recomputed and chunked regions move into."""
        return _code_of(self.gm, module_prefix, "")


class Sharder:
    def __init__(self, dims: DimAnalysis, strategies: dict, mesh: MeshInfo, orders: dict[int, str],
                 local_attention: str = "captured"):
        if local_attention not in ("captured", "runtime"):
            raise ValueError(f"local_attention= is 'captured' or 'runtime', not {local_attention!r}")
        self.local_attention = local_attention  # plain local attention: the captured op, or runtime's
        self.dims, self.F, self.cap = dims, dims.F, dims.cap
        self.strategies, self.mesh, self.orders = strategies, mesh, orders
        self.g = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.layout: dict[fx.Node, object] = {}
        self.cache: dict[tuple, fx.Node] = {}
        self.pads = self._padding()
        self.input_layouts: dict[str, tuple] = {}
        self.source: fx.Node | None = None      # the captured node being rewritten

    # ------------------------------------------------------------------ sizes and padding
    def _padding(self) -> dict[int, int]:
        """atom → padded size, for every atom whose splits do not divide it."""
        multiple: dict[int, int] = {}

        def visit(layout):
            by_atom: dict[int, int] = {}
            for ax, p in enumerate(layout):
                if isinstance(p, Shard):
                    if self.F.pieces(p.atom) is not None:  # split piece by piece: the pieces pad
                        for k in range(len(self.F.pieces(p.atom))):
                            visit(self.piece_layout(p.atom, k, layout))
                        return
                    by_atom[p.atom] = by_atom.get(p.atom, 1) * self.mesh.sizes[ax]
            for a, n in by_atom.items():
                n *= 2 if self.orders.get(a) == "zigzag" else 1
                multiple[a] = lcm(multiple.get(a, 1), n)

        for st in self.strategies.values():
            for _, lay in st.inputs:
                visit(lay)
            for lay in (st.output if isinstance(st.output, list) else [st.output]):
                if lay is not None:
                    visit(lay)
        pads = {}
        for a, m in multiple.items():
            size = self.F.size(a)
            padded = -(-size // m) * m
            if padded != size:
                pads[a] = padded
        return pads

    def split_axes(self, a: int, layout) -> list[int]:
        return split_axes(layout, a)

    def local_size(self, a: int, layout) -> int:
        axes = self.split_axes(a, layout)
        if not axes:
            return self.F.size(a)
        if self.F.pieces(a) is not None:
            return sum(self.piece_local(a, k, layout) for k in range(len(self.F.pieces(a))))
        return self.pads.get(a, self.F.size(a)) // prod(self.mesh.sizes[i] for i in axes)

    # ------------------------------------------------------------------ joint factors
    def piece_atoms(self, joint: int, k: int) -> tuple:
        return tuple(self.F.find(a) for a in self.F.atoms_of(self.F.pieces(joint)[k]))

    def piece_layout(self, joint: int, k: int, layout):
        """`layout` with the joint factor's splits moved onto piece k's `piece_atom`."""
        atom = self.F.piece_atom(self.F.pieces(joint)[k])
        return tuple(Shard(atom) if isinstance(p, Shard) and p.atom == joint else p for p in layout)

    def piece_local(self, joint: int, k: int, layout) -> int:
        """The local length of piece k of a joint factor in `layout`."""
        lay = self.piece_layout(joint, k, layout)
        return prod(self.local_size(a, lay) for a in self.piece_atoms(joint, k))

    def sig_atoms(self, node: fx.Node, index: int | None = None) -> tuple:
        sig = self.dims.sigs[node]
        if index is not None:
            sig = sig[index]
        return tuple(tuple(self.F.find(a) for a in self.F.atoms_of(d)) for d in sig)

    def local_shape(self, atoms_sig: tuple, layout) -> list[int]:
        return [prod(self.local_size(a, layout) for a in d) for d in atoms_sig]

    def levels(self, a: int, layout) -> tuple:
        """(rank, world, order) of each mesh axis splitting `a`, outermost first."""
        order = self.orders.get(a, "contig")
        return tuple((self.mesh.coords[i], self.mesh.sizes[i], order) for i in self.split_axes(a, layout))

    def levels_at(self, a: int, layout, coords: tuple) -> tuple:
        """`levels` of the rank at mesh coordinates `coords`."""
        order = self.orders.get(a, "contig")
        return tuple((coords[i], self.mesh.sizes[i], order) for i in self.split_axes(a, layout))

    def mask_atoms(self, dim_atoms: tuple, layout, coords: tuple | None = None) -> tuple | None:
        """`padding_mask` description of a dim, or None when nothing in it is padded; of the
        rank at mesh coordinates `coords` (default: this rank). A split joint factor is the
        `("pieces", ...)` entry of its pieces' descriptions."""
        coords = self.mesh.coords if coords is None else coords
        entries, padded = [], False
        for a in dim_atoms:
            if self.F.pieces(a) is not None and self.split_axes(a, layout):
                parts = [self.mask_atoms(self.piece_atoms(a, k), self.piece_layout(a, k, layout), coords)
                         for k in range(len(self.F.pieces(a)))]
                if any(parts):
                    entries.append(("pieces", tuple(
                        p or tuple((self.local_size(b, self.piece_layout(a, k, layout)), None, None, ())
                                   for b in self.piece_atoms(a, k))
                        for k, p in enumerate(parts))))
                    padded = True
                else:
                    entries.append((self.local_size(a, layout), None, None, ()))
            elif a in self.pads and self.split_axes(a, layout):
                entries.append((self.local_size(a, layout), self.F.size(a), self.pads[a],
                                self.levels_at(a, layout, coords)))
                padded = True
            else:
                entries.append((self.local_size(a, layout), None, None, ()))
        return tuple(entries) if padded else None

    def padded(self, a: int, layout) -> bool:
        """Is atom `a` padded where `layout` splits it (a joint factor: any of its pieces)?"""
        return bool(self.split_axes(a, layout)) and self.mask_atoms((a,), layout) is not None

    # ------------------------------------------------------------------ emitting
    def call(self, fn, *args, name: str | None = None, **kwargs) -> fx.Node:
        node = self.g.call_function(fn, args, kwargs)
        if name:
            node.name = self.g._graph_namespace.create_name(name, None)
        if self.source is not None:  # the user's line, printed as a comment in the code
            node.meta["stack_trace"] = self.source.meta.get("stack_trace")
            node.meta["module"] = self.cap.module_path(self.source)
        return node

    def value(self, x: fx.Node, req) -> fx.Node:
        """`x`'s local value in layout `req` (redistributing if needed)."""
        cur = self.layout[x]
        if cur == req:
            return self.env[x]
        key = (x, req)
        if key not in self.cache:
            v, lay = self.env[x], cur
            for step in self.route(cur, req):
                v, lay = self.emit_step(x, v, lay, step)
            self.cache[key] = v
        return self.cache[key]

    def route(self, cur, req) -> list[Step]:
        """`redistribution(cur, req)`; where one of its steps would move a factor on an axis
        while an inner axis splits it too (`_nested`: a factor over several axes is split outer
        axis first, `(S(a), S(b)) → (S(b), S(a))` swaps two), the route through the whole
        factors: partial sums reduced, the axes involved gathered innermost first, then every
        axis sliced outermost first."""
        steps, lay = redistribution(cur, req), cur
        for step in steps:
            if self._nested(step, lay):
                break
            lay = step.after(lay)
        else:
            return steps
        route, lay = [], cur
        for i, p in enumerate(cur):
            if p == P:
                route.append(Step("all_reduce", i, None, None))
                lay = route[-1].after(lay)
        moved = {i for i, (c, r) in enumerate(zip(lay, req)) if c != r}
        gather = {i for i in moved if isinstance(lay[i], Shard)}
        grown = True
        while grown:  # an axis inside a gathered or sliced one that splits its factor: gathered
            atoms = {(i, p.atom) for i in gather | moved for p in (lay[i], req[i]) if isinstance(p, Shard)}
            more = {j for j, p in enumerate(lay) if isinstance(p, Shard)
                    and any(i < j and a == p.atom for i, a in atoms)} - gather
            gather |= more
            grown = bool(more)
        for i in sorted(gather, reverse=True):
            route.append(Step("all_gather", i, lay[i].atom, None))
            lay = route[-1].after(lay)
        for i, r in enumerate(req):
            if lay[i] != r:
                route.append(Step("slice", i, None, r.atom))
                lay = route[-1].after(lay)
        return route

    def _nested(self, step: Step, layout) -> bool:
        """Would `step` move a factor that an axis inside its own splits (before or after)?"""
        new = step.after(layout)
        return any(a is not None and any(j > step.axis for j in split_axes(layout, a) + split_axes(new, a))
                   for a in (step.src, step.dst))

    def emit_step(self, x: fx.Node, v: fx.Node, layout, step: Step, sig: tuple | None = None):
        sig = self.sig_atoms(x) if sig is None else sig
        i = step.axis
        new = step.after(layout)
        joint = next((a for a in (step.src, step.dst) if a is not None and self.F.pieces(a)), None)
        if joint is not None:
            return self._joint_step(x, v, layout, step, sig, joint), new
        group, world, rank = self.mesh.groups[i], self.mesh.sizes[i], self.mesh.coords[i]
        label = self.F.label
        if step.kind == "all_reduce":
            return self.call(rt.all_reduce_sum, v, group, name=f"all_reduce_{self.mesh.names[i]}"), new
        assert not self._nested(step, layout), f"{x.name}: {step} moves a nested split (`route`)"
        u, dims_of, regroup = self._open(v, sig, layout, [a for a in (step.src, step.dst) if a is not None])
        if step.kind == "slice":
            a = step.dst
            pad = self.pads.get(a) if not self.split_axes(a, layout) else None
            out = self.call(rt.slice_shard, u, dims_of[a], rank, world, self.orders.get(a, "contig"), pad,
                            name=f"shard_{label(a)}")
        elif step.kind == "all_gather":
            a = step.src
            size = self.F.size(a) if not self.split_axes(a, new) else None
            out = self.call(rt.gather_shard, u, dims_of[a], group, world, self.orders.get(a, "contig"), size,
                            name=f"all_gather_{label(a)}")
        elif step.kind == "reduce_scatter":
            a = step.dst
            pad = self.pads.get(a) if not self.split_axes(a, layout) else None
            out = self.call(rt.reduce_scatter_shard, u, dims_of[a], group, world,
                            self.orders.get(a, "contig"), pad, name=f"reduce_scatter_{label(a)}")
        else:  # all_to_all
            a, b = step.src, step.dst
            size = self.F.size(a) if not self.split_axes(a, new) else None
            pad = self.pads.get(b) if not self.split_axes(b, layout) else None
            out = self.call(rt.all_to_all_shard, u, dims_of[a], dims_of[b], group, world,
                            self.orders.get(a, "contig"), self.orders.get(b, "contig"), size, pad,
                            name=f"all_to_all_{label(a)}_{label(b)}")
        return regroup(out), new

    def _joint_step(self, x: fx.Node, v: fx.Node, layout, step: Step, sig: tuple, joint: int):
        """A step that moves a joint factor, piece by piece: cut the local dim into the pieces'
        local lengths, move each piece's `piece_atom` the same way, concatenate."""
        u, dims_of, regroup = self._open(v, sig, layout, [joint])
        d = dims_of[joint]
        opened = tuple(t for dim in sig  # the sig of `u`: the joint factor's dim opened
                       for t in ([(a,) for a in dim] if joint in dim and len(dim) > 1 else [dim]))
        pieces = self.F.pieces(joint)
        sizes = [self.piece_local(joint, k, layout) for k in range(len(pieces))]
        parts = self.call(torch.split, u, sizes, d)
        outs = []
        for k in range(len(pieces)):
            atom = self.F.piece_atom(pieces[k])
            lay = self.piece_layout(joint, k, layout)
            sub = Step(step.kind, step.axis, atom if step.src == joint else step.src,
                       atom if step.dst == joint else step.dst)
            part = self.call(operator.getitem, parts, k)
            out, _ = self.emit_step(x, part, lay, sub, opened[:d] + (self.piece_atoms(joint, k),) + opened[d + 1:])
            outs.append(out)
        return regroup(self.call(torch.cat, outs, d, name=f"joined_{self.F.label(joint)}"))

    def _open(self, v: fx.Node, sig: tuple, layout, atoms: list[int]):
        """Unflatten the dims holding `atoms` into their factors so each atom has its own dim.
        Returns (value, atom → dim, function that flattens a result back)."""
        for a in atoms:  # one dim per moved atom (`strategies.repeated_atoms` refuses others)
            assert sum(d.count(a) for d in sig) == 1, f"factor {self.F.label(a)} moves in {sig}"
        opened, dims_of, spans, k = [], {}, [], 0
        for pos, d in enumerate(sig):
            wanted = any(a in d for a in atoms)
            if wanted and len(d) > 1:
                opened.append((pos, d))
                for j, a in enumerate(d):
                    dims_of[a] = k + j
                spans.append((k, k + len(d) - 1))
                k += len(d)
            else:
                for a in d:
                    dims_of[a] = k
                k += 1
        u = v
        for pos, d in reversed(opened):
            u = self.call(torch.Tensor.unflatten, u, pos, [self.local_size(a, layout) for a in d])

        def regroup(out):
            for start, end in reversed(spans):
                out = self.call(torch.Tensor.flatten, out, start, end)
            return out

        return u, dims_of, regroup

    # ------------------------------------------------------------------ the walk
    def run(self) -> Program:
        from . import local_ops

        cap = self.cap
        naxes = len(self.mesh.sizes)
        placeholders = []
        for n in cap.nodes():
            if n.op == "placeholder":
                self.env[n] = self.g.placeholder(n.name)
                self.layout[n] = (R,) * naxes
                placeholders.append(n.name)
                # parameters, and inputs captured with requires_grad: each rank holds a share
                if self.mesh.world_group and self.mesh.world > 1 and (
                        cap.model.get_parameter(cap.params[n.name]).requires_grad
                        if n.name in cap.params else
                        n.name in cap.inputs and getattr(n.meta.get("val"), "requires_grad", False)):
                    self.env[n] = self.call(rt.sum_grad, self.env[n], self.mesh.world_group,
                                            name=f"{n.name}_grad_summed")
            elif n.op == "get_attr":
                self.env[n] = self.g.get_attr(n.target)
                self.layout[n] = (R,) * naxes
            elif n.op == "call_function":
                self.source = n
                if n not in self.strategies:  # getitem of a multi-output node
                    src, idx = n.args
                    self.env[n] = self.call(n.target, self.env[src], idx)
                    self.layout[n] = self.layout[src][idx]
                    continue
                st: Strategy = self.strategies[n]
                local_ops.emit(self, n, st)
                for x, lay in st.inputs:
                    if x.name in cap.inputs and any(isinstance(p, Shard) for p in lay):
                        self.input_layouts.setdefault(cap.input_names[cap.inputs.index(x.name)], lay)
            elif n.op == "output":
                outs = [self._output(x) for x in n.args[0]]
                self.g.output(tuple(outs))
        self.g.lint()
        gm = fx.GraphModule(cap.gm, self.g)
        return Program(gm, placeholders, self.input_layouts, [self.layout[x] for x in
                       next(n for n in cap.nodes() if n.op == "output").args[0]], cap, self)

    def redistributor(self, node: fx.Node, src, dst) -> fx.GraphModule:
        """A small program that moves `node`'s values from layout `src` to `dst` (for
        `ParallelModule.gather` and `.shard`)."""
        saved = self.g, self.env, self.layout, self.cache
        self.g, self.cache = fx.Graph(), {}
        self.env, self.layout = {node: self.g.placeholder(node.name)}, {node: src}
        try:
            self.g.output(self.value(node, dst))
            return fx.GraphModule(torch.nn.Module(), self.g)
        finally:
            self.g, self.env, self.layout, self.cache = saved

    def _output(self, x: fx.Node) -> fx.Node:
        lay = self.layout[x]
        if P in lay:
            lay = tuple(R if a == P else a for a in lay)
            v = self.value(x, lay)
            self.layout[x] = lay  # what the caller gets
            self.env[x] = v
        v = self.env[x]
        copies = prod(self.mesh.sizes[i] for i, a in enumerate(lay) if a == R)
        if copies > 1 and self.dims.sigs.get(x) is not None:
            v = self.call(rt.scale_grad, v, 1.0 / copies, name=f"{x.name}_seeded_once")
        return v
