"""Localizers: how each op family runs on local shards. One small function per family; an op
without one is copied as it is (its inputs already have the layout its strategy needs)."""

from __future__ import annotations

from itertools import product
from math import prod

import torch
import torch.fx as fx

import seqshard.runtime
from seqshard.capture import ATTENTION, mask_inputs, sdpa_options
from seqshard.dims import Role
from seqshard.runtime import rng
from seqshard.runtime import sharding as rt
from seqshard.strategies import ALGORITHMS, P, R, PlanError, Strategy

aten = torch.ops.aten
LOCALIZERS: dict = {}


def localizer(*packets):
    def deco(fn):
        for p in packets:
            LOCALIZERS[p] = fn
        return fn
    return deco


def emit(sh, n: fx.Node, st: Strategy) -> None:
    packet = getattr(n.target, "overloadpacket", n.target)
    fn = LOCALIZERS.get(n.target) or LOCALIZERS.get(packet) or copy
    out = fn(sh, n, st)
    if out is not None:
        sh.env[n] = out
        sh.layout[n] = st.output


# ------------------------------------------------------------------ helpers
def _inputs(sh, n: fx.Node, st: Strategy, zero_pads: bool = True):
    """Map the node's args to local values in the layouts its strategy needs. Inputs that feed a
    sum over a padded split factor get their padding zeroed (once, on the first such input)."""
    req = dict(st.inputs)
    vals = {x: sh.value(x, lay) for x, lay in st.inputs}
    if zero_pads:
        roles = sh.dims.roles.get(n, {})
        for i, a in enumerate(st.splits):
            if a is None or roles.get(a) != Role.SUM or (a not in sh.pads and sh.F.pieces(a) is None):
                continue
            for x, lay in st.inputs:
                sig = sh.sig_atoms(x)
                dim = next((k for k, d in enumerate(sig) if a in d), None)
                if dim is not None:
                    mask = sh.mask_atoms(sig[dim], lay)
                    if mask is not None:
                        vals[x] = sh.call(rt.zero_padding, vals[x], dim, mask, name=f"{x.name}_zero_pads")
                    break

    def m(a):
        if isinstance(a, fx.Node):
            return vals[a] if a in req else sh.env[a]
        return a

    return fx.node.map_aggregate(n.args, m), fx.node.map_aggregate(dict(n.kwargs), m)


def copy(sh, n: fx.Node, st: Strategy):
    args, kwargs = _inputs(sh, n, st)
    return sh.call(n.target, *args, name=n.name, **kwargs)


def _out_shape(sh, n, st):
    return sh.local_shape(sh.sig_atoms(n), st.output)


# ------------------------------------------------------------------ views: local sizes
@localizer(aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.broadcast_to)
def view(sh, n, st):
    """A `view` becomes a `reshape`: a local shard (a slice of a dim) need not be contiguous
    where the whole tensor was. The graph writes nothing in place, so a copy reads the same."""
    args, kwargs = _inputs(sh, n, st)
    target = aten.reshape.default if n.target in (aten.view.default, aten._unsafe_view.default) \
        else n.target
    return sh.call(target, args[0], _out_shape(sh, n, st), *args[2:], name=n.name, **kwargs)


@localizer(aten.unflatten)
def unflatten(sh, n, st):
    args, _ = _inputs(sh, n, st)
    x, dim, sizes = args[0], args[1], args[2]
    ndim = len(sh.dims.sigs[n])
    d = dim % (ndim - len(sizes) + 1)
    return sh.call(n.target, x, dim, _out_shape(sh, n, st)[d:d + len(sizes)], name=n.name)


@localizer(aten.repeat_interleave.self_int)
def repeat_interleave(sh, n, st):
    args, kwargs = _inputs(sh, n, st)
    x_node, dim = n.args[0], n.args[2] % len(sh.dims.sigs[n])
    (_, in_lay), = [(x, lay) for x, lay in st.inputs if x is x_node]
    reps = _out_shape(sh, n, st)[dim] // sh.local_shape(sh.sig_atoms(x_node), in_lay)[dim]
    if kwargs.get("output_size") is not None:  # the global size in the captured call
        kwargs = {**kwargs, "output_size": _out_shape(sh, n, st)[dim]}
    return sh.call(n.target, args[0], reps, *args[2:], name=n.name, **kwargs)


@localizer(aten.repeat)
def repeat(sh, n, st):
    args, _ = _inputs(sh, n, st)
    x_node = n.args[0]
    (_, in_lay), = [(x, lay) for x, lay in st.inputs if x is x_node]
    out, inp = _out_shape(sh, n, st), sh.local_shape(sh.sig_atoms(x_node), in_lay)
    lead = len(out) - len(inp)
    reps = out[:lead] + [o // i for o, i in zip(out[lead:], inp)]
    return sh.call(n.target, args[0], reps, name=n.name)


# ------------------------------------------------------------------ contractions: the bias once per sum
BIAS_ARG = {aten.linear: 2, aten.addmm: 0, aten.baddbmm: 0, aten.addbmm: 0, aten.addmv: 0}
"""Where each contraction takes the term it adds (`linear`'s bias, `addmm`'s `self`)."""


@localizer(*BIAS_ARG)
def contraction(sh, n, st):
    """With its contracted factor split, a contraction's output is a partial sum (P): every rank
    holds an addend, and the next redistribution adds them. The bias belongs to exactly one
    addend: ranks at coordinate 0 of every partial axis add it, the others add it times 0.
    Both are exact in floating point, and the bias' gradient is rank 0's share plus zeros once
    `sum_grad` adds the ranks' gradients; every rank keeps the bias in its graph, so that
    all-reduce runs on all of them."""
    args, kwargs = _inputs(sh, n, st)
    partial = [i for i, p in enumerate(st.output) if p == P]
    pos = BIAS_ARG[n.target.overloadpacket]
    name = "bias" if pos else "self"
    args, in_args = list(args), len(args) > pos
    bias = args[pos] if in_args else kwargs.get(name)
    if partial and bias is not None:
        keep = 1.0 if all(sh.mesh.coords[i] == 0 for i in partial) else 0.0
        bias = sh.call(aten.mul.Tensor, bias, keep, name=f"{n.name}_bias_once")
        if in_args:
            args[pos] = bias
        else:
            kwargs[name] = bias
    return sh.call(n.target, *args, name=n.name, **kwargs)


# ------------------------------------------------------------------ slices, splits, concatenation
def _settle(sh, n, st, value):
    """`value` is the op run on its local inputs. A factor that only the output has (the new
    factor of a slice, a concatenation or an uneven split: `dims.ops.index_ops`) comes out whole
    there; it reaches the strategy's output layout by a local slice, as in `create`. For an op
    with several outputs the layouts are recorded and each consumer slices what it needs."""
    joint = sh.dims.attrs.get(n, {}).get("joint")
    joint = sh.F.find(joint) if joint is not None else None
    cut = [i for i, a in enumerate(st.splits) if joint is not None and a == joint]

    def made(lay):  # the layout the op's local result has: what its inputs were split on (a
        if lay is None:  # joint factor split piece by piece is joined or cut locally)
            return None
        assert P not in lay, f"{n.name}: a slice, split or concatenation makes no partial sums"
        return tuple(p if i in cut or any(x_lay[i] == p for _, x_lay in st.inputs) else R
                     for i, p in enumerate(lay))

    if isinstance(st.output, list):
        sh.env[n], sh.layout[n] = value, [made(lay) for lay in st.output]
        return None
    if made(st.output) == st.output:
        return value
    sh.env[n], sh.layout[n] = value, made(st.output)
    return sh.value(n, st.output)


@localizer(aten.slice, aten.narrow)
def slice_(sh, n, st):
    """Global bounds → local ones. The dims rule (`index_ops.slice_`) leaves split only the inner
    factors of the rows a slice takes (`qkv[..., d:2d]` of `(3, h, e)` with `h` split): row r of
    I elements is row r of I_local elements here. A strided slice picks positions of whole inner
    factors; any other slice has its dim whole, and global bounds are local ones."""
    args, _ = _inputs(sh, n, st)
    x = args[0]
    info = sh.dims.attrs[n]["slice"]
    dim, start, end, step = info["dim"], info["start"], info["end"], info["step"]
    if (start, end, step) == (0, sh.F.dim_size(sh.dims.sigs[n.args[0]][dim]), 1):
        return x
    (x_lay,) = [lay for y, lay in st.inputs if y is n.args[0]]
    if "piece" in info and sh.split_axes(sh.F.find(sh.dims.attrs[n]["joint"]), x_lay):
        joint, k = sh.F.find(sh.dims.attrs[n]["joint"]), info["piece"]  # this rank's share of it
        start = sum(sh.piece_local(joint, j, x_lay) for j in range(k))
        end = start + sh.piece_local(joint, k, x_lay)
    elif info["inner"] is not None:
        (lay,) = [lay for y, lay in st.inputs if y is n.args[0]]
        inner = [sh.F.find(a) for a in sh.F.atoms_of(info["inner"])]
        size = prod(sh.F.size(a) for a in inner)
        local = prod(sh.local_size(a, lay) for a in inner)
        if step == 1:
            start, end = start // size * local, end // size * local
        else:  # every row: to the end of the local dim, which padding can make longer
            assert local == size, f"{n.name}: a strided slice's inner factors must be whole"
            end = sh.local_shape(sh.sig_atoms(n.args[0]), lay)[dim]
    return _settle(sh, n, st, sh.call(aten.slice.Tensor, x, dim, start, end, step, name=n.name))


@localizer(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)
def split(sh, n, st):
    """Equal pieces of a split dim are equal pieces of the local dim (`index_ops.split` keeps
    the pieces' factor); the pieces of a joint factor split piece by piece are this rank's
    shares of them; other uneven pieces have their dim whole and new factors."""
    args, kwargs = _inputs(sh, n, st)
    (lay,) = [lay for y, lay in st.inputs if y is n.args[0]]
    sig = sh.sig_atoms(n.args[0])
    dim, k = sh.dims.attrs[n]["split_dim"], len(sh.dims.sigs[n])
    joint = sh.dims.attrs[n].get("joint")
    if not any(sh.split_axes(a, lay) for a in sig[dim]):
        value = sh.call(n.target, *args, name=n.name, **kwargs)
    elif joint is not None:
        joint, shares = sh.F.find(joint), iter(range(len(sh.F.pieces(joint))))
        sizes = [sh.piece_local(joint, next(shares), lay) if sh.F.dim_size(s[dim]) else 0
                 for s in sh.dims.sigs[n]]
        value = sh.call(aten.split_with_sizes.default, args[0], sizes, dim, name=n.name)
    else:  # pieces of (k, rest) with rest split
        local = sh.local_shape(sig, lay)[dim]
        value = sh.call(aten.split.Tensor, args[0], local // k, dim, name=n.name)
    return _settle(sh, n, st, value)


@localizer(aten.cat)
def cat(sh, n, st):
    return _settle(sh, n, st, copy(sh, n, st))


# ------------------------------------------------------------------ dropout: a mask per shard
@localizer(aten.dropout, aten.native_dropout)
def dropout(sh, n, st):
    """Split, each shard draws its mask from a stream of its own (`runtime.rng`): ranks seeded
    alike would otherwise drop the same positions of every shard. Ranks that hold the same shard
    (replicated on an axis) share the stream. Unsplit, outside training or with p = 0: as is."""
    args, kwargs = _inputs(sh, n, st)
    p, train = n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
    axes = [i for i, a in enumerate(st.splits) if a is not None]
    if not axes or not p or train is False:
        return sh.call(n.target, *args, name=n.name, **kwargs)
    shard = 0
    for i in axes:
        shard = shard * sh.mesh.sizes[i] + sh.mesh.coords[i]
    fn = rng.native_dropout if n.target.overloadpacket is aten.native_dropout else rng.dropout
    return sh.call(fn, args[0], p, train, shard, name=n.name)


# ------------------------------------------------------------------ made from sizes: whole, then sliced
@localizer(aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor,
           aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty)
def create(sh, n, st):
    args, kwargs = _inputs(sh, n, st)
    whole = sh.call(n.target, *args, name=n.name, **kwargs)
    if all(a == R for a in st.output):
        return whole
    sh.env[n], sh.layout[n] = whole, (R,) * len(st.output)
    return sh.value(n, st.output)


# ------------------------------------------------------------------ reductions over split factors
@localizer(aten.mean)
def mean(sh, n, st):
    """A mean over split factors: the local mean times local/global count is this rank's share."""
    out = copy(sh, n, st)
    over = [a for d in sh.dims.attrs.get(n, {}).get("mean_over", []) for a in sh.F.atoms_of(d)]
    over = [sh.F.find(a) for a in over]
    (x_node, lay), = [(x, lay) for x, lay in st.inputs if x is n.args[0]]
    local = prod(sh.local_size(a, lay) for a in over)
    whole = prod(sh.F.size(a) for a in over)
    if local == whole:
        return out
    return sh.call(aten.mul.Tensor, out, local / whole, name=f"{n.name}_share")


@localizer(aten.cross_entropy_loss)
def cross_entropy(sh, n, st):
    if not _partial(st):
        return copy(sh, n, st)
    args, kwargs = _inputs(sh, n, st, zero_pads=False)
    logits, labels = args[0], args[1]
    ignore = kwargs.get("ignore_index", args[4] if len(args) > 4 else -100)
    reduction = kwargs.get("reduction", args[3] if len(args) > 3 else 1)
    (lab_node, lab_lay), = [(x, lay) for x, lay in st.inputs if x is n.args[1]]
    sig = sh.sig_atoms(lab_node)
    if len(sig) != 1:
        raise PlanError(f"{n.name}: split cross-entropy expects flattened labels [tokens]")
    padding = sh.mask_atoms(sig[0], lab_lay)
    groups = tuple(sh.mesh.groups[i] for i, a in enumerate(st.output) if a == P)
    return sh.call(rt.cross_entropy_partial, logits, labels, ignore, reduction, groups, padding,
                   name=f"{n.name}_share")


@localizer(aten.mse_loss)
def mse_loss(sh, n, st):
    if not _partial(st):
        return copy(sh, n, st)
    args, kwargs = _inputs(sh, n, st, zero_pads=False)
    a, b = args[0], args[1]
    reduction = kwargs.get("reduction", args[2] if len(args) > 2 else 1)
    for i, (x_node, val) in enumerate(((n.args[0], a), (n.args[1], b))):
        (_, lay), = [(x, lay) for x, lay in st.inputs if x is x_node]
        sig = sh.sig_atoms(x_node)
        for d, dim_atoms in enumerate(sig):
            mask = sh.mask_atoms(dim_atoms, lay)
            if mask:
                val = sh.call(rt.zero_padding, val, d, mask, name=f"{x_node.name}_zero_pads")
        if i == 0:
            a = val
        else:
            b = val
    total = sh.call(aten.mse_loss.default, a, b, 2, name=f"{n.name}_sum")
    if reduction != 1:
        return total
    count = prod(sh.F.size(x) for d in sh.sig_atoms(n.args[0]) for x in d)
    return sh.call(aten.div.Tensor, total, count, name=f"{n.name}_share")


def _partial(st: Strategy) -> bool:
    outs = st.output if isinstance(st.output, list) else [st.output]
    return any(lay is not None and P in lay for lay in outs)


# ------------------------------------------------------------------ attention
@localizer(*ATTENTION)
def attention(sh, n, st):
    """The plan's distributed algorithm: a call to its runtime function (`ALGORITHMS[...]`),
    with the sequence's process group(s), outer mesh axis first, and the mask's per-token
    tensors (whole on every rank). Local attention is the captured op (SDPA: the plain kernel),
    or the runtime's local attention under a per-token mask, or everywhere when the program is
    built with `local_attention="runtime"` (parallelize does, where the runtime's kernel is one
    SDPA does not have: FlashAttention-4 on an H200)."""
    algo = ALGORITHMS[st.algorithm]
    opts, masks = sdpa_options(n), mask_inputs(n)
    plain = algo.runtime is None and (not masks or opts.get("dropout_p"))
    if plain and (sh.local_attention == "captured" or opts.get("dropout_p")):
        return copy(sh, n, st)
    args, kwargs = _inputs(sh, n, st)
    q, k, v = args[:3]
    per_token = {key: kwargs[key] for key in masks}
    causal = bool(opts.get("is_causal", False))
    if opts.get("dropout_p"):
        raise PlanError(f"{n.name}: distributed attention does not take dropout")
    if algo.runtime is None:
        return sh.call(seqshard.runtime.local_attention, q, k, v, name=n.name, causal=causal,
                       scale=opts.get("scale"), **per_token)
    atoms = [sh.F.find(a) for a in sh.F.atoms_of(sh.dims.attention(n).seq_k)]  # outermost first
    (s,) = {a for a in atoms if a in st.splits}
    groups = [sh.mesh.groups[i] for i, a in enumerate(st.splits) if a == s]
    if sh.F.pieces(s) is not None:  # a concatenation split piece by piece (`strategies.resolve`
        (lay,) = [lay for x, lay in st.inputs if x is n.args[1]]  # refuses order-dependent masks)
        return sh.call(getattr(seqshard.runtime, algo.runtime), q, k, v, *groups, name=n.name,
                       causal=False, order="contig", seq_len=None, scale=opts.get("scale"),
                       key_valid=_joint_keys(sh, atoms, lay, st.splits.index(s)))
    seq_len = None
    if s in sh.pads:  # the runtime masks a padded suffix of the (flattened) sequence
        outer = [a for a in atoms[:atoms.index(s)] if sh.F.size(a) > 1]
        if outer:
            raise PlanError(
                f"{n.name} ({sh.cap.module_path(n)}): the sequence is "
                f"{' x '.join(sh.F.label(a) for a in atoms)} and the split factor "
                f"{sh.F.label(s)!r} ({sh.F.size(s)}) is padded to {sh.pads[s]} inside it, after "
                f"{sh.F.label(outer[0])!r}: padding there is not a suffix of the sequence. Split "
                f"{sh.F.label(outer[0])!r}, or a size of {sh.F.label(s)!r} the ranks divide")
        seq_len = prod(sh.F.size(a) for a in atoms)
    return sh.call(getattr(seqshard.runtime, algo.runtime), q, k, v, *groups, name=n.name,
                   causal=causal, order=sh.orders.get(s, "contig"), seq_len=seq_len,
                   scale=opts.get("scale"), **per_token)


def _joint_keys(sh, atoms, layout, first_axis: int):
    """Which keys are real, not padding, when the sequence holds a joint factor split piece by
    piece: the pieces' padding sits inside each rank's share. Full attention does not depend on
    the order of its keys, so the runtime sees the ranks' shares as one contiguous sequence
    (`order="contig"`, ranks in flattened order, outer mesh axis first) and gets a key_valid mask
    [1, world × local] of that sequence; None when nothing is padded."""
    if sh.mask_atoms(tuple(atoms), layout) is None:
        return None
    axes = sorted({i for a in atoms for i in sh.split_axes(a, layout)})
    masks = []
    for ranks in product(*(range(sh.mesh.sizes[i]) for i in axes)):
        coords = list(sh.mesh.coords)
        for i, r in zip(axes, ranks):
            coords[i] = r
        entries = sh.mask_atoms(tuple(atoms), layout, tuple(coords))
        masks.append(sh.call(rt.padding_mask, entries))
    keys = sh.call(torch.cat, masks, 0) if len(masks) > 1 else masks[0]
    return sh.call(torch.unsqueeze, keys, 0, name="joint_key_valid")
