"""Recompute: each layer the plan names runs under activation checkpointing, each chunked
LM head + loss runs in chunks of tokens, each chunk checkpointed, and so does each token-wise
module the plan chunks (`chunk_modules`: ALST's tiled MLP, nested in its layer's checkpoint
when the layer is recomputed too).

    program.gm                                   after `recompute_layers(gm, ("layers.0", ...))`
        add_1 = ...                                  add_1 = ...
        rms_norm = aten.rms_norm(add_1, ...)         recompute_layers_0 = self.recompute_layers_0
        ...              (layers.0's nodes)          checkpoint = torch.utils.checkpoint.checkpoint(
        add_3 = aten.add(add_2, linear_6)                recompute_layers_0, add_1, cos, sin, ..., use_reentrant=False)
                                                     add_3 = checkpoint[0]

The nodes of a layer (`meta["module"]` is the layer's path or below it; the sharder sets it on
every node it emits, redistributions included, from the captured node being rewritten) move
into a submodule `recompute_<layer>`, a GraphModule whose inputs are the values the layer reads
from outside and whose outputs are the values read after it. The call goes through
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: the forward keeps only the
submodule's inputs, and backward runs the submodule again to rebuild what its ops saved. A
layer the plan offloads calls `seqshard.runtime.offload.offloaded_checkpoint(fn, *inputs)`
instead: the same checkpoint, its kept inputs in host memory between forward and backward. A
layer the plan keeps the attention of (`plan.keep_attention`) calls
`seqshard.runtime.selective.selective_checkpoint(fn, *inputs)` (with `offload=` where offloaded
too): its attention ops keep their outputs in forward and return them in the rerun, so
attention runs once per step (selective activation checkpointing).

Collectives and seqshard's custom ops inside a layer run again in backward. That stays matched
across ranks because every rank runs the same program, and autograd reaches the same layer at
the same point of every rank's backward; the random state is restored for the rerun
(`preserve_rng_state`), so dropout draws the same masks.

A layer's nodes are normally consecutive in the emitted graph. Nodes of other modules between
them are moved before the layer when they do not depend on it, after it when the layer does
not read them, and otherwise (a value from outside computed from the layer and read by it
again) go into the recomputed region too, which is exact, only recomputed.
"""

from __future__ import annotations

import operator
import re
from typing import NamedTuple

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from seqshard.runtime import sharding as rt
from seqshard.runtime.offload import offloaded_checkpoint
from seqshard.runtime.selective import selective_checkpoint
from seqshard.strategies import PlanError

from .regions import boundary, extract, gather, in_layer, splice

__all__ = ["recompute_layers", "chunk_losses", "chunked", "fused_chunked",
           "fusable_losses", "masked_labels",
           "token_count", "ChunkedModule", "chunk_modules", "run_in_chunks"]

aten = torch.ops.aten


def recompute_layers(gm: fx.GraphModule, layers: tuple[str, ...],
                     offload: tuple[str, ...] = (), inputs: tuple[str, ...] = (),
                     keep_attention: tuple[str, ...] = (),
                     groups: tuple[tuple[str, ...], ...] = ()) -> fx.GraphModule:
    """`gm` with each of `layers` wrapped in a checkpointed submodule (in place; returned); those
    also in `offload` keep their activations (what they read that an op made from the model's
    `inputs`, placeholder names) in host memory (`offloaded_checkpoint`); those in
    `keep_attention` keep their attention's outputs (`selective_checkpoint`). Each of `groups`
    (consecutive layers of `layers`) is then wrapped once more, its layers' checkpoint calls in
    one checkpointed submodule `recompute_group_<first layer>`: it keeps the group's inputs
    alone (offloaded where its layers are in `offload`), and its rerun in backward makes its
    layers' inputs again (the layers inside are never offloaded: the rerun makes their inputs)::

        checkpoint_group_layers_0 = checkpoint(recompute_group_layers_0, embedding, cos, sin, ...)
            # recompute_group_layers_0: checkpoint(recompute_layers_0, ...); checkpoint(recompute_layers_1, ...)
    """
    g = gm.graph
    inner = {layer for group in groups for layer in group}
    for layer in layers:
        members = [n for n in g.nodes if in_layer(n.meta.get("module"), layer)]
        if not members:
            raise PlanError(f"the plan recomputes {layer!r}, but this model has no layer "
                            "there (the plan was made for a different model)")
        region = gather(g, members)
        moved = layer in offload and layer not in inner
        _checkpoint(gm, layer, region, _made_from(g, set(inputs)) if moved else None,
                    selective=layer in keep_attention)
    for group in groups:
        members = [n for n in g.nodes if any(in_layer(n.meta.get("module"), x) for x in group)]
        if not members or any(x not in layers for x in group):
            raise PlanError(f"the plan groups {list(group)}, which are not layers it recomputes "
                            "in this model (the plan was made for a different model)")
        region = gather(g, members)
        _checkpoint(gm, group[0], region,
                    _made_from(g, set(inputs)) if group[0] in offload else None,
                    prefix="recompute_group_")
    g.lint()
    gm.recompile()
    return gm


def _made_from(g: fx.Graph, inputs: set[str]) -> set[fx.Node]:
    """The values ops make from the placeholders named `inputs` (not the placeholders: the
    caller holds those anyway)."""
    out = {n for n in g.nodes if n.op == "placeholder" and n.name in inputs}
    for n in g.nodes:
        if n.op != "placeholder" and any(x in out for x in n.all_input_nodes):
            out.add(n)
    return {n for n in out if n.op != "placeholder"}


def _checkpoint(gm: fx.GraphModule, layer: str, region: list[fx.Node], offload: set | None = None,
                selective: bool = False, prefix: str = "recompute_") -> None:
    """Move `region` (consecutive nodes of gm.graph) into a submodule called through
    `checkpoint`, or `offloaded_checkpoint` moving its inputs in `offload` to the host;
    `selective_checkpoint` (the same, keeping attention's outputs) where `selective`. The
    submodule is `<prefix><layer>`, its call `checkpoint_<...>` (a group's: `checkpoint_group_`)."""
    g = gm.graph
    inputs, outputs = boundary(region)
    name = prefix + re.sub(r"\W", "_", layer)
    extract(gm, name, region, inputs, outputs)
    with g.inserting_before(region[0]):
        fn = g.get_attr(name)
        moved = () if offload is None else tuple(k for k, x in enumerate(inputs) if x in offload)
        if selective:
            call = g.call_function(selective_checkpoint, (fn, *inputs),
                                   {"offload": moved} if offload is not None else {})
        elif offload is None:
            call = g.call_function(checkpoint, (fn, *inputs), {"use_reentrant": False})
        else:
            call = g.call_function(offloaded_checkpoint, (fn, *inputs), {"offload": moved})
        call.name = g._graph_namespace.create_name(f"checkpoint_{name[len('recompute_'):]}", None)
        call.meta["module"] = layer
        fn.meta["module"] = layer
    splice(g, region, call, outputs)


# ------------------------------------------------------------------ chunked LM head + loss
_CHAIN = {aten.to.dtype, aten._to_copy.default, aten.flatten.using_ints, aten.reshape.default,
          aten.view.default, aten._unsafe_view.default}
_CASTS = {aten.to.dtype, aten._to_copy.default}


def chunk_losses(gm: fx.GraphModule, chunks: tuple[tuple[str, int], ...],
                 fused: bool = False) -> fx.GraphModule:
    """`gm` with each (loss, k) of `chunks` rewritten so its LM head and cross-entropy run in k
    chunks of tokens (in place; returned):

        loss = cross_entropy(linear(h, W).flatten(0, 1).float(), labels)
    becomes
        chunk_loss = self.chunk_loss                   # linear → casts → cross-entropy, summed
        loss = chunked(chunk_loss, h.flatten(0, -2), W, None, labels, k) / token_count(...)

    Each chunk runs under `checkpoint`: its logits exist one chunk at a time, in the forward
    and again in backward. A loss over split tokens (`cross_entropy_partial`) keeps its
    semantics: padded tokens' labels are ignored first, and a mean divides by the tokens
    counted on every rank of its groups.

    fused: a plain cross-entropy (no class weights or smoothing, mean or sum) over a linear
    without bias runs instead as one call of the fused kernel (`kernels/linear_ce.py`, Triton on
    GPU), the same k chunks: loss = fused_chunked(h.flatten(0, -2), W, labels, ...); k = 0: the
    kernel's own chunk size (`fusable_losses` lists the losses it takes)."""
    g = gm.graph
    for loss, k in chunks:
        ce = next((n for n in g.nodes if n.op == "call_function" and n.name in (loss, f"{loss}_share")
                   and n.target in (aten.cross_entropy_loss.default, rt.cross_entropy_partial)), None)
        if ce is None:
            raise PlanError(f"the plan chunks the loss {loss!r}, but this program has no "
                            "cross-entropy of that name (the plan was made for a different model)")
        chain, x = [], ce.args[0]
        while x.op == "call_function" and x.target in _CHAIN and len(x.users) == 1:
            chain.append(x)
            x = x.args[0]
        if x.op != "call_function" or x.target is not aten.linear.default or len(x.users) != 1:
            raise PlanError(f"the plan chunks {loss!r}, but its logits are not a linear's output "
                            f"through casts and reshapes alone here (found {x.name}): a "
                            "redistribution between the LM head and the loss? Plan without "
                            "chunking it")
        linear = x
        hidden, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        labels = ce.args[1]
        if ce.target is rt.cross_entropy_partial:
            ignore, reduction, groups, padding = ce.args[2:6]
        else:
            args = list(ce.args) + [None, 1, -100][len(ce.args) - 2:]
            reduction = ce.kwargs.get("reduction", args[3])
            ignore = ce.kwargs.get("ignore_index", args[4])
            groups, padding = (), None
        if fused and _fusable(ce, linear, bias, reduction):
            with g.inserting_before(ce):
                flat = g.call_function(aten.flatten.using_ints, (hidden, 0, -2))
                if padding is not None:
                    labels = g.call_function(masked_labels, (labels, ignore, padding))
                dtype = getattr(ce.meta.get("val"), "dtype", torch.float32)
                out = g.call_function(fused_chunked, (flat, weight, labels, ignore, groups,
                                                      reduction == 1, k, dtype))
                flat.name = g._graph_namespace.create_name("lm_tokens", None)
                out.name = g._graph_namespace.create_name(f"{loss}_fused", None)
                for n in (flat, out) + ((labels,) if padding is not None else ()):
                    n.meta.update({k_: v for k_, v in ce.meta.items() if k_ in ("module", "stack_trace")})
            ce.replace_all_uses_with(out)
            for n in [ce] + chain + [linear]:
                g.erase_node(n)
            continue
        sub = fx.Graph()
        h, w = sub.placeholder("hidden"), sub.placeholder("weight")
        b, lab = sub.placeholder("bias"), sub.placeholder("labels")
        y = sub.call_function(aten.linear.default, (h, w, b))
        for c in reversed(chain):
            if c.target in _CASTS:
                y = sub.call_function(c.target, (y,) + tuple(c.args[1:]), dict(c.kwargs))
        sub.output(sub.call_function(aten.cross_entropy_loss.default, (y, lab, None, 2, ignore)))
        name = "chunk_" + re.sub(r"\W", "_", loss)
        gm.add_submodule(name, fx.GraphModule(torch.nn.Module(), sub, class_name=name))
        with g.inserting_before(ce):
            flat = g.call_function(aten.flatten.using_ints, (hidden, 0, -2))
            if padding is not None:
                labels = g.call_function(masked_labels, (labels, ignore, padding))
            fn = g.get_attr(name)
            total = g.call_function(chunked, (fn, flat, weight, bias, labels, k))
            out = total
            if reduction == 1:  # mean over the tokens counted
                count = g.call_function(token_count, (labels, ignore, groups, total))
                out = g.call_function(operator.truediv, (total, count))
            for n, label in ((flat, "lm_tokens"), (total, f"{name}_sum"), (out, f"{loss}_chunked")):
                n.name = g._graph_namespace.create_name(label, None)
            for n in (flat, fn, total, out) + ((labels,) if padding is not None else ()) + \
                    ((count,) if reduction == 1 else ()):
                n.meta.update({k_: v for k_, v in ce.meta.items() if k_ in ("module", "stack_trace")})
        ce.replace_all_uses_with(out)
        for n in [ce] + chain + [linear]:
            g.erase_node(n)
    g.lint()
    gm.recompile()
    return gm


def fusable_losses(gm: fx.GraphModule) -> list[str]:
    """The cross-entropies of `gm` the fused kernel computes: a bias-free linear's logits through
    casts and reshapes alone, a plain mean or sum (`_fusable`)."""
    out = []
    for ce in gm.graph.nodes:
        if ce.op != "call_function" or ce.target not in (aten.cross_entropy_loss.default,
                                                         rt.cross_entropy_partial):
            continue
        x = ce.args[0]
        while x.op == "call_function" and x.target in _CHAIN and len(x.users) == 1:
            x = x.args[0]
        if x.op != "call_function" or x.target is not aten.linear.default or len(x.users) != 1:
            continue
        if ce.target is rt.cross_entropy_partial:
            reduction = ce.args[3]
        else:
            reduction = ce.kwargs.get("reduction", (list(ce.args) + [None, 1][len(ce.args) - 2:])[3])
        if _fusable(ce, x, x.args[2] if len(x.args) > 2 else None, reduction):
            out.append(ce.name)
    return out


def _fusable(ce: fx.Node, linear: fx.Node, bias, reduction) -> bool:
    """The fused kernel computes this loss: no bias, a mean or a sum, no class weights or label
    smoothing, and the logits it reads in fp32 or in the linear's own dtype."""
    if bias is not None or reduction not in (1, 2):
        return False
    if ce.target is aten.cross_entropy_loss.default:
        args = list(ce.args) + [None, 1, -100, 0.0][len(ce.args) - 2:]
        if ce.kwargs.get("weight", args[2]) is not None or ce.kwargs.get("label_smoothing", args[5]):
            return False
    logits = getattr(ce.args[0].meta.get("val"), "dtype", None)
    return logits in (torch.float32, getattr(linear.meta.get("val"), "dtype", None))


def fused_chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore: int,
                  groups: tuple, mean: bool, chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) in `chunks` pieces of tokens (0: pieces of up
    to `linear_ce.CHUNK_BYTES` of logits) through the fused kernel (`kernels.linear_ce`): the
    sum, or the mean over the tokens counted on every rank of `groups` (`token_count`), in
    `dtype`."""
    from .kernels.linear_ce import default_chunk, linear_cross_entropy

    count = token_count(labels, ignore, groups, hidden.new_empty((), dtype=torch.float32)) \
        if mean else None
    # 0: the plan keeps the logits whole, so chunks of up to CHUNK_BYTES of them (no dim: not
    # Liger's smaller T·d rule): fewer, larger GEMMs
    chunk = max(1, -(-hidden.shape[0] // chunks)) if chunks else \
        default_chunk(hidden.shape[0], weight.shape[0], hidden.element_size())
    return linear_cross_entropy(hidden, weight, labels, ignore_index=ignore,
                                reduction="mean" if mean else "sum", divisor=count,
                                chunk=chunk, out_dtype=dtype)


def chunked(fn, hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor,
            chunks: int) -> torch.Tensor:
    """Σ_j fn(hidden_j, weight, bias, labels_j) over `chunks` pieces of the token dim (the first
    ones one token larger where it does not divide; empty ones where there are fewer tokens),
    each under `checkpoint`: one chunk's logits live at a time."""
    total = None
    for h, lab in zip(hidden.tensor_split(chunks), labels.tensor_split(chunks)):
        part = checkpoint(fn, h, weight, bias, lab, use_reentrant=False)
        total = part if total is None else total + part
    return total


def masked_labels(labels: torch.Tensor, ignore: int, padding) -> torch.Tensor:
    """Labels with padded tokens set to `ignore` (as `cross_entropy_partial` does)."""
    valid = rt.padding_mask(padding, labels.device)
    return torch.where(valid, labels, torch.full_like(labels, ignore))


def token_count(labels: torch.Tensor, ignore: int, groups: tuple, like: torch.Tensor) -> torch.Tensor:
    """The tokens a mean divides by: those not ignored, summed over `groups` (split tokens), in
    `like`'s dtype."""
    count = (labels != ignore).sum().to(like.dtype).detach()
    for group in groups:
        count = torch.ops.seqshard.all_reduce(count, group).detach()
    return count


# ------------------------------------------------------------------ token-wise modules in chunks
class ChunkedModule(NamedTuple):
    """A token-wise region (a module, `solver.token_regions`, or a chain of ops across modules,
    `solver.token_chains`) to run in chunks, located in this rank's program: the values it
    reads with the tokens and the values read after it, each with the dim holding the tokens."""

    path: str                      # "layers.3.mlp", "layers.3.attn.o_proj+add+mlp_norm+mlp"
    chunks: int
    inputs: tuple                  # ((value, token dim), ...): split into the chunks
    outputs: tuple                 # ((value, token dim), ...): the chunks' pieces concatenated


def chunk_modules(gm: fx.GraphModule, modules: list[ChunkedModule]) -> fx.GraphModule:
    """`gm` with each token-wise region run in chunks of tokens (in place; returned):

        linear_4 = aten.linear(rms_norm_1, w_gate)       chunk_layers_0_mlp = self.chunk_layers_0_mlp
        silu = aten.silu(linear_4)                  →    linear_6 = run_in_chunks(chunk_layers_0_mlp,
        ...                                                  rms_norm_1, 1, 4, 1, w_gate, w_up, w_down)
        linear_6 = aten.linear(mul_4, w_down)

    The region's ops are those made from its inputs that its outputs are made from; they move
    into a submodule `chunk_<region>` run by `run_in_chunks` on each piece of the inputs' token
    dims under `checkpoint`, the pieces of each output concatenated (several inputs and outputs:
    tuples of them, `run_in_chunks(fn, (reshape, add_1), (1, 1), 4, 1, ...)`); the other ops its
    ops read (a parameter's shard) run once, before, and so does a redistribution of an input
    (DSP's all-to-all at a block's input: the loop reads the redistributed value, `apply.py`),
    on the whole tensor, its backward after the loop's. Runs before `recompute_layers`: in a
    recomputed layer the loop lands inside the layer's checkpointed submodule (nested
    checkpoints)."""
    g = gm.graph
    now: dict = {}  # an earlier region's output → what stands for it after its splice
    for m in modules:
        ins, outs = [now.get(x, x) for x, _ in m.inputs], [y for y, _ in m.outputs]
        order = {n: i for i, n in enumerate(g.nodes)}
        where = f"the plan runs {m.path!r} in chunks of tokens"
        above, todo = set(), list(outs)  # what the outputs are made from, up to the inputs
        while todo:
            n = todo.pop()
            if n in above or n in ins or n.op != "call_function":
                continue
            above.add(n)
            todo += n.all_input_nodes
        body = []
        for n in sorted(above, key=order.get):
            if any(x in ins or x in body for x in n.all_input_nodes):
                body.append(n)
        inside = set(body)
        if any(y not in inside for y in outs) or any(
                u not in inside for n in body if n not in outs for u in n.users):
            raise PlanError(f"{where}, but here its ops are not its inputs → its outputs (the "
                            "plan was made for a different model?)")
        for n in body:
            module = getattr(n.target, "__module__", "") or ""
            if module.startswith("seqshard.runtime") or str(n.target).startswith("seqshard."):
                raise PlanError(f"{where}, but {n.name} ({n.target}) communicates inside it, "
                                "between two of its ops: a redistribution there would see one "
                                "chunk (a redistribution of one of its inputs runs before the loop). Plan without "
                                "chunking it, or with one split for all of its ops")
        # made without the tokens (a parameter's shard), and what its inputs are made from
        # after its first op (a redistribution of an input, emitted at the op reading it): before it
        early, todo = set(above - inside), list(ins)
        while todo:
            n = todo.pop()
            if n not in early and n.op == "call_function" and order[n] > order[body[0]]:
                early.add(n)
                todo += n.all_input_nodes
        assert not early & inside, f"{where}: an input is made from the region's own ops"
        for n in sorted(early, key=order.get):
            if order[n] > order[body[0]]:
                body[0].prepend(n)
        consts = list(dict.fromkeys(x for n in body for x in n.all_input_nodes
                                    if x not in inside and x not in ins))
        name = "chunk_" + re.sub(r"\W", "_", m.path)
        single = len(outs) == 1
        extract(gm, name, body, [*ins, *consts], outs, single=single)
        one = len(ins) == 1
        with g.inserting_before(body[0]):
            fn = g.get_attr(name)
            call = g.call_function(run_in_chunks, (
                fn, ins[0] if one else tuple(ins), m.inputs[0][1] if one else tuple(d for _, d in m.inputs),
                m.chunks, m.outputs[0][1] if single else tuple(d for _, d in m.outputs), *consts))
            call.name = g._graph_namespace.create_name(
                f"{outs[0].name}_chunked" if single else f"{name}_pieces", None)
            for n in (fn, call):
                n.meta.update({k: v for k, v in outs[0].meta.items() if k in ("module", "stack_trace")})
        now.update(zip(outs, splice(g, body, call, outs, single=single)))
    g.lint()
    gm.recompile()
    return gm


def run_in_chunks(fn, x, dim, chunks: int, out_dim, *consts):
    """fn(x, *consts) made `chunks` pieces at a time along x's `dim` (the first ones one token
    larger where it does not divide; empty ones where there are fewer tokens), each under
    `checkpoint`, and the pieces concatenated along the output's `out_dim`: one piece's
    intermediates live at a time, in the forward and again in backward. Several inputs: x and
    dim are tuples, each input split along its own dim (the same tokens in each piece);
    several outputs: out_dim is a tuple, and so is the result."""
    xs, dims = (x, dim) if isinstance(x, tuple) else ((x,), (dim,))
    parts = [checkpoint(fn, *piece, *consts, use_reentrant=False)
             for piece in zip(*(t.tensor_split(chunks, d) for t, d in zip(xs, dims)))]
    if isinstance(out_dim, int):
        return torch.cat(parts, out_dim)
    return tuple(torch.cat([p[j] for p in parts], d) for j, d in enumerate(out_dim))
