"""Functionalization: a model's in-place writes become new values, before factor analysis.

`torch.export` in pre-dispatch mode keeps in-place ops: `x.add_(y)` stays `add_`, and diffusers
Wan's rotary embedding `out = empty_like(x); out[..., 0::2] = a` is `copy_(slice(out, -1, 0, ∞,
2), a)`. In the per-rank program a tensor may be redistributed between the write and the reads
(gathered for the slice, say), and the write lands in that copy: reads see stale values, and
nothing connects the written values to the loss (no gradients). So every write becomes a value
and every later read points at it, the way torch's functionalization does it:

    add_(x, y)                              x' = add(x, y)
    copy_(slice(select(B, 0, i), 2, a, b), v)
                                            B' = select_scatter(B, slice_scatter(select(B, 0, i),
                                                                                 v, 2, a, b), 0, i)
    fill_ / zero_ / masked_fill_ / index_put_ / any `op_` with a functional `op`: the same way

Reads after the write of B, or of a view of B taken before it, read B' (re-viewed). `linear`,
`rms_norm`, attention and the rest stay as export gave them.

A write this pass cannot follow (through `reshape` or `flatten`, which copy or not depending on
strides; `as_strided`; a random `normal_`) sends the whole program through torch's own
functionalization instead (`ExportedProgram.run_decompositions({})`), which also spells some
view ops differently (`reshape` → `view`, `dropout` → `native_dropout`). Writes into graph
inputs (a buffer's running statistic, a cache) become values too and are not written back.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.export.graph_signature import OutputKind

aten = torch.ops.aten

# view op → how to write `new` (the view's new value) back into the viewed tensor `base`
_SCATTER = {
    aten.slice.Tensor: lambda v, base, new: (aten.slice_scatter.default,
                                             (base, new) + tuple(v.args[1:])),
    aten.select.int: lambda v, base, new: (aten.select_scatter.default,
                                           (base, new) + tuple(v.args[1:])),
    aten.diagonal.default: lambda v, base, new: (aten.diagonal_scatter.default,
                                                 (base, new) + tuple(v.args[1:])),
    aten.narrow.default: lambda v, base, new: (aten.slice_scatter.default, (
        base, new, v.args[1], v.args[2], v.args[2] + v.args[3])),
    aten.transpose.int: lambda v, base, new: (aten.transpose.int, (new,) + tuple(v.args[1:])),
    aten.t.default: lambda v, base, new: (aten.t.default, (new,)),
    aten.permute.default: lambda v, base, new: (aten.permute.default, (new, _inverse(v.args[1]))),
    aten.alias.default: lambda v, base, new: (aten.alias.default, (new,)),
    aten.detach.default: lambda v, base, new: (aten.alias.default, (new,)),
}
for _op in (aten.view.default, aten._unsafe_view.default, aten.unflatten.int,
            aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims):
    _SCATTER[_op] = lambda v, base, new: (aten.reshape.default, (new, list(_val(base).shape)))

# pieces of a tensor: `getitem(split(base, …), i)` is a view of base
_PIECES = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
           aten.tensor_split.sections, aten.unbind.int)

# views that are read but never written through
_READ_ONLY_VIEWS = (aten.expand.default,)


def functionalize(ep: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram,
                                                             list[str]]:
    """The program with no in-place ops (`ep` itself, rewritten, or torch's functionalization of
    it), and what was done, for people."""
    graph = ep.graph_module.graph
    writes = [n for n in graph.nodes if _written(n) is not None]
    if not writes:
        return ep, []
    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    order = {n: i for i, n in enumerate(graph.nodes)}
    if all(_followable(m, order) for m in writes):
        notes = [f"functionalized {len(writes)} in-place op(s)"
                 f" ({', '.join(sorted({_name(m) for m in writes}))})"]
        bases = [_rewrite(graph, m) for m in writes]
        notes += [f"in-place update of input {b.name} is not written back to it"
                  for b in dict.fromkeys(bases) if b in placeholders]
        graph.lint()
        ep.graph_module.recompile()
        return ep, notes
    ep = ep.run_decompositions({})
    out = next(n for n in ep.graph.nodes if n.op == "output")
    specs = ep.graph_signature.output_specs
    kept = [a for a, spec in zip(out.args[0], specs) if spec.kind == OutputKind.USER_OUTPUT]
    notes = [f"functionalized {len(writes)} in-place op(s) with torch's functionalization"
             f" (one of {', '.join(sorted({_name(m) for m in writes}))} writes through a view"
             " this pass does not follow)"]
    notes += [f"in-place update of {spec.target} is not written back to it" for spec in specs
              if spec.kind != OutputKind.USER_OUTPUT]
    out.args = (tuple(kept),)
    for n in [n for n in ep.graph.nodes if n.target is aten.copy.default]:
        _copy_as_value(ep.graph, n)
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return ep, notes


# ------------------------------------------------------------------ what a node writes
def _written(n: fx.Node):
    """The functional op of an in-place op that writes its first argument; None for a node that
    writes nothing; False for a write this pass cannot express."""
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) \
            or not t._schema.is_mutable:
        return None
    args = t._schema.arguments
    writes = [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
    if writes != [0]:
        return False
    if t.overloadpacket is aten.copy_:
        return aten.copy.default if t._overloadname == "default" else False
    name = t.overloadpacket.__name__
    packet = getattr(aten, name[:-1], None) if name.endswith("_") else None
    fn = getattr(packet, t._overloadname, None) if packet is not None else None
    if fn is None or [a.name for a in fn._schema.arguments] != [a.name for a in args] \
            or fn._schema.is_mutable:
        return False
    return fn


def _chain(x: fx.Node) -> list[fx.Node] | None:
    """The views from `x` up to the tensor they view (x first, the base last); None when one of
    them is not a view this pass can write through."""
    out = [x]
    while True:
        v = out[-1]
        if _is_piece(v):
            out.append(v.args[0].args[0])
        elif v.op == "call_function" and v.target in _SCATTER:
            out.append(v.args[0])
        elif _aliases(v):
            return None
        else:
            return out


def _followable(m: fx.Node, order: dict) -> bool:
    """Can `_rewrite` express write `m`: a known functional op, through views it knows, and no
    possibly-aliasing reader (a `reshape` of the base, say) taken before the write and read
    after it?"""
    if _written(m) is False:
        return False
    chain = _chain(m.args[0])
    if chain is None:
        return False
    for v in _descendants(chain[-1]):
        if order[v] < order[m] and not _viewable(v) and any(order[u] > order[m] for u in v.users):
            return False
    return True


def _rewrite(graph: fx.Graph, m: fx.Node) -> fx.Node:
    """Replace write `m` by new values; returns the base tensor it wrote into."""
    t = m.args[0]
    m.replace_all_uses_with(t)         # an in-place op returns the tensor it wrote
    chain = _chain(t)
    base = chain[-1]
    order = {n: i for i, n in enumerate(graph.nodes)}
    made: list[fx.Node] = []
    where = m

    def emit(target, args, kwargs=None, like=m):
        nonlocal where
        with graph.inserting_after(where):
            node = graph.call_function(target, tuple(args), kwargs or {})
        node.meta.update({k: like.meta[k] for k in ("stack_trace", "nn_module_stack")
                          if k in like.meta})
        node.meta["val"] = _fake_run(target, node.args, node.kwargs)
        made.append(node)
        where = node
        return node

    if _written(m) is aten.copy.default:  # (aten.copy has no derivative: spell it out)
        new = m.args[1]
    else:
        new = emit(_written(m), m.args, m.kwargs)
    if tuple(_val(new).shape) != tuple(_val(t).shape):  # copy_ broadcasts its source
        new = emit(aten.expand.default, (new, list(_val(t).shape)))
    if _val(new).dtype != _val(t).dtype:  # an in-place op keeps its tensor's dtype
        new = emit(aten._to_copy.default, (new,), {"dtype": _val(t).dtype})
    for view, parent in zip(chain, chain[1:]):
        target, args = _scatter(view, parent, new)
        new = emit(target, args)
    # reads after the write: of the base, and of its views taken before the write
    fresh = {base: new}
    for v in _descendants(base):
        if order.get(v, -1) > order[m] or v in made:
            continue
        later = [u for u in v.users if u not in made and order.get(u, -1) > order[m]]
        if not later and not any(_descendants(v)):
            continue
        src = v.args[0].args[0] if _is_piece(v) else v.args[0]
        if src not in fresh:
            continue
        if _is_piece(v):
            pieces = emit(v.args[0].target, (fresh[src],) + tuple(v.args[0].args[1:]),
                          v.args[0].kwargs, like=v.args[0])
            fresh[v] = emit(operator.getitem, (pieces, v.args[1]), like=v)
        else:
            fresh[v] = emit(v.target, (fresh[src],) + tuple(v.args[1:]), v.kwargs, like=v)
    for old, new_value in fresh.items():
        for u in list(old.users):
            if u not in made and order.get(u, -1) > order[m]:
                u.replace_input_with(old, new_value)
    graph.erase_node(m)
    return base


def _copy_as_value(graph: fx.Graph, n: fx.Node) -> None:
    """`copy(t, src)` (t's shape and dtype, src's values) without `aten.copy`, which eager
    autograd cannot differentiate: src, expanded and cast as needed."""
    t, src = n.args[:2]
    new = src
    with graph.inserting_before(n):
        if tuple(_val(src).shape) != tuple(_val(t).shape):
            new = graph.call_function(aten.expand.default, (new, list(_val(t).shape)))
            new.meta.update(n.meta, val=_fake_run(new.target, new.args, new.kwargs))
        if _val(src).dtype != _val(t).dtype:
            new = graph.call_function(aten._to_copy.default, (new,), {"dtype": _val(t).dtype})
            new.meta.update(n.meta, val=_fake_run(new.target, new.args, new.kwargs))
    n.replace_all_uses_with(new)
    graph.erase_node(n)


def _scatter(view: fx.Node, parent: fx.Node, new: fx.Node):
    """(target, args) of the op that writes `new`, the view's new value, into `parent`."""
    if _is_piece(view):
        pieces = view.args[0]
        i = view.args[1]
        dim = _dim_of(pieces)
        if pieces.target is aten.unbind.int:
            return aten.select_scatter.default, (parent, new, dim, i)
        sizes = [int(p.shape[dim]) for p in _val(pieces)]
        start = sum(sizes[:i])
        return aten.slice_scatter.default, (parent, new, dim, start, start + sizes[i])
    return _SCATTER[view.target](view, parent, new)


# ------------------------------------------------------------------ helpers
def _descendants(x: fx.Node):
    """Every tensor that views `x` (transitively), in graph order of discovery."""
    out, stack = [], [x]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target in _PIECES:
                for g in u.users:
                    if g.target is operator.getitem:
                        out.append(g)
                        stack.append(g)
            elif _aliases(u) and u.args and u.args[0] is n:
                out.append(u)
                stack.append(u)
    return out


def _aliases(n: fx.Node) -> bool:
    """Can `n`'s output share memory with its first input (a view, or an op that returns its
    input when nothing needs doing: `reshape`, `contiguous`, `to`)?"""
    if n.op != "call_function":
        return False
    t = n.target
    if t in _SCATTER or t in _READ_ONLY_VIEWS or _is_piece(n):
        return True
    if not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable:
        return False
    if t.overloadpacket in (aten.reshape, aten.flatten, aten.contiguous, aten.to, aten.type_as,
                            aten.view_as, aten.reshape_as, aten.expand_as, aten.as_strided,
                            aten.unfold, aten.movedim, aten.swapaxes, aten.swapdims, aten.mT,
                            aten.numpy_T, aten.view_as_real, aten.view_as_complex, aten.real,
                            aten.imag, aten.broadcast_to, aten.matrix_H, aten.adjoint):
        return True
    returns = t._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def _viewable(n: fx.Node) -> bool:
    """A view `_rewrite` can take again of a new base."""
    return n.target in _SCATTER or n.target in _READ_ONLY_VIEWS or _is_piece(n)


def _is_piece(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is operator.getitem
            and isinstance(n.args[0], fx.Node) and n.args[0].target in _PIECES)


def _dim_of(pieces: fx.Node) -> int:
    schema = pieces.target._schema
    names = [a.name for a in schema.arguments]
    i = names.index("dim")
    dim = pieces.kwargs.get("dim", pieces.args[i] if i < len(pieces.args)
                            else schema.arguments[i].default_value)
    return dim % _val(pieces.args[0]).dim()


def _inverse(perm) -> list[int]:
    nd = len(perm)
    inv = [0] * nd
    for i, p in enumerate(perm):
        inv[p % nd] = i
    return inv


def _val(n):
    return n.meta["val"] if isinstance(n, fx.Node) else n


def _fake_run(target, args, kwargs):
    """The op's output on the fake tensors export recorded (shapes and dtypes, no data)."""
    args, kwargs = fx.node.map_aggregate(args, _val), fx.node.map_aggregate(dict(kwargs), _val)
    flat: list = []
    fx.node.map_aggregate((args, kwargs), flat.append)
    mode = detect_fake_mode([x for x in flat if isinstance(x, torch.Tensor)])
    with mode if mode is not None else contextlib.nullcontext():
        return target(*args, **kwargs)


def _name(n: fx.Node) -> str:
    t = n.target
    return t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else str(t)

