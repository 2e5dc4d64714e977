"""Model state for `parallelize`: sharded over every rank (FSDP2 / ZeRO-3), or replicated with
gradients summed in buckets.

    parallelize(model, inputs, model_state="sharded", mixed_precision=None | MixedPrecisionPolicy)

**Sharded** (`shard_model`, `wrap_units`): each layer of the model (a module path ending in an
index, `layers.3`, as the planner's layer classes) and then the model itself get
`torch.distributed.fsdp.fully_shard` over the whole world (a multi-axis mesh flattened), with
gradients summed (divide factor 1: each rank's gradient of a parameter is its share of the
single-device gradient, as `sum_grad` assumes). Parameters become DTensors sharded on dim 0, so
an unchanged `torch.optim` optimizer steps the local shards and `torch.distributed.checkpoint`
saves them.

FSDP2 unshards a module's parameters in its forward pre-hook, and registers reduce-scatter
after backward and the unshard before backward on the forward's inputs and outputs. The
per-rank program does not call the layers' `forward`: it reads parameters as placeholders and
runs every layer's ops inline. `wrap_units` therefore moves each layer's nodes into a submodule
(`codegen.regions`, as for a recomputed layer) and calls it through a method of the layer
that `register_fsdp_forward_method` (public FSDP2 API) makes a forward method:

    program.gm (replicated)                         program.gm (sharded)
        q_proj_weight  (placeholder)                    fsdp_layers_0 = self.fsdp_layers_0
        q_proj_weight_grad_summed = sum_grad(...)       unit_layers_0 = self.unit_layers_0
        ... layers.0's ops ...                          run = fsdp_layers_0.seqshard_unit(
        add_3 = aten.add(add_2, linear_6)                   unit_layers_0, ('attn.q_proj.weight', ...),
                                                            add_1, cos, sin)
                                                        add_3 = run[0]

`seqshard_unit(fn, names, *acts)` runs `fn(*unsharded parameters, *acts)` between FSDP's pre- and
post-forward; the whole program runs inside the root's `seqshard_run` (root parameters: the
embedding, the final norm, the LM head; FSDP keeps the root unsharded from forward to the end of
backward). Everything FSDP2 schedules then holds: the all-gather of the next layer is prefetched
while this one computes (on CUDA, its own stream), parameters are freed after each layer's
forward and gathered again before its backward (prefetching the previous layer's), gradients are
reduce-scattered as each layer's backward finishes, and `MixedPrecisionPolicy` casts parameters
for compute and reduces gradients in its `reduce_dtype` while the optimizer steps fp32 shards.
A layer that the plan recomputes keeps its checkpointed submodule inside the unit: FSDP unshards
it before backward, so the rerun finds its parameters. With `compile="layers"` the layer's
compiled template (`codegen/compiled.py`) is the call inside the unit. With mixed precision the
program is captured in the parameters' dtype (fp32) and runs in `param_dtype`: FSDP casts each
unit's parameters and (cast_forward_inputs, its default) the unit's floating inputs, so a cast
the capture recorded outside the units (the rotary tables' `.to(float32)`) is undone at the
unit's entry.

Why `fully_shard` and not collectives emitted by codegen: it keeps the optimizer and
`torch.distributed.checkpoint` unchanged (DTensor parameters), and brings prefetch, freeing,
mixed precision and the CUDA stream handling that FSDP2 has; the program only has to call each
layer once, through a forward method. The cost is a region per layer, as recompute already makes.

**Replicated** (`bucket_grad_sums`): the parameters' `sum_grad` nodes (one all-reduce of each
parameter's gradient in backward) become one `sum_grads` per bucket of parameters, in the order
of their first use, each at most `BUCKET_BYTES`: one all-reduce of the bucket's flattened
gradients, run by autograd when every gradient of the bucket is ready.
"""

from __future__ import annotations

import operator
import re
import types

import torch
import torch.fx as fx
import torch.nn as nn

from seqshard.codegen.regions import boundary, extract, gather, in_layer, splice
from seqshard.runtime import sharding as rt
from seqshard.solver.clusters import layer_of

__all__ = ["shard_model", "wrap_units", "bucket_grad_sums", "unsharded", "BUCKET_BYTES",
           "MODEL_STATES"]

MODEL_STATES = ("replicated", "sharded")
"""What `parallelize` runs, and chooses between under model_state="auto" (the planner also
prices "offload", which it leaves to the user: `planner.api.MODEL_STATES`)."""

BUCKET_BYTES = 25 * 2**20
"""Largest bucket of replicated parameters' gradients summed by one all-reduce (DDP's default)."""


# ------------------------------------------------------------------ sharded (FSDP2)
def shard_model(model: nn.Module, mesh, mixed_precision=None) -> list[str]:
    """`fully_shard` every layer of `model`, then `model` itself, over the flattened `mesh`
    (a DeviceMesh); gradients summed, not averaged. Returns the layers' module paths."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, \
        register_fsdp_forward_method

    flat = mesh if mesh.ndim == 1 else mesh._flatten()
    policy = mixed_precision or MixedPrecisionPolicy()
    layers = list(dict.fromkeys(layer for name, _ in model.named_parameters()
                                if (layer := layer_of(name.rpartition(".")[0])) is not None))
    for path in layers:
        unit = model.get_submodule(path)
        fully_shard(unit, mesh=flat, mp_policy=policy, reshard_after_forward=True)
        unit.seqshard_unit = types.MethodType(_run_unit, unit)
        register_fsdp_forward_method(unit, "seqshard_unit")
    fully_shard(model, mesh=flat, mp_policy=policy)
    model.seqshard_run = types.MethodType(_run_root, model)
    register_fsdp_forward_method(model, "seqshard_run")
    for m in [model] + [model.get_submodule(p) for p in layers]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return layers


def _run_unit(self, fn, names, *acts):
    """A layer's region, between FSDP's pre-forward (its parameters unsharded: `get_parameter`
    returns them) and post-forward."""
    return fn(*[self.get_parameter(n) for n in names], *acts)


def _run_root(self, run, *inputs):
    return run(*inputs)


def unsharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return not isinstance(model, FSDPModule)


def wrap_units(gm: fx.GraphModule, cap, model: nn.Module, layers: list[str]) -> list[str]:
    """Rewrite `gm` in place for sharded state: parameters' `sum_grad` nodes removed (FSDP's
    reduce-scatter sums), each layer's nodes moved into a submodule `unit_<layer>` called
    through the FSDP layer's `seqshard_unit`. Returns the placeholders left (the root's
    parameters, buffers, constants and inputs; in order)."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is rt.sum_grad and n.args[0].op == "placeholder" \
                and n.args[0].name in cap.params:
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    owner = {}  # parameter placeholder → its layer
    for n in g.nodes:
        if n.op == "placeholder" and n.name in cap.params:
            owner[n] = next((layer for layer in layers if cap.params[n.name].startswith(layer + ".")),
                            None)
    for layer in layers:
        members = [n for n in g.nodes if in_layer(n.meta.get("module"), layer)]
        if not members:
            raise ValueError(f"model_state='sharded': the layer {layer!r} has parameters but no "
                             "op of the program lies in it")
        _unit(gm, layer, gather(g, members), owner, cap, model)
    left = []
    for n in list(g.nodes):
        if n.op == "placeholder":
            if owner.get(n) is not None:
                assert not n.users, f"{n.name} of {owner[n]} is read outside its layer"
                g.erase_node(n)
            else:
                left.append(n.name)
    g.lint()
    gm.recompile()
    return left


def _unit(gm: fx.GraphModule, layer: str, region: list[fx.Node], owner: dict, cap,
          model: nn.Module) -> None:
    g = gm.graph
    inputs, outputs = boundary(region)
    foreign = [x for x in inputs if owner.get(x) not in (None, layer)]
    if foreign:
        raise ValueError(f"model_state='sharded': layer {layer!r} reads parameters of another "
                         f"layer ({', '.join(cap.params[x.name] for x in foreign)}); shared "
                         "weights must belong to the model, outside its layers")
    params = [x for x in inputs if owner.get(x) == layer]
    acts = [x for x in inputs if owner.get(x) != layer]
    key = re.sub(r"\W", "_", layer)
    extract(gm, f"unit_{key}", region, params + acts, outputs)
    gm.add_submodule(f"fsdp_{key}", model.get_submodule(layer))
    names = tuple(cap.params[x.name][len(layer) + 1:] for x in params)
    with g.inserting_before(region[0]):
        module = g.get_attr(f"fsdp_{key}")
        fn = g.get_attr(f"unit_{key}")
        call = g.call_method("seqshard_unit", (module, fn, names, *acts))
        call.name = g._graph_namespace.create_name(f"run_{key}", None)
        for n in (module, fn, call):
            n.meta["module"] = layer
    splice(g, region, call, outputs)


# ------------------------------------------------------------------ replicated: buckets
def bucket_grad_sums(gm: fx.GraphModule, cap, bucket_bytes: int | None = None) -> int:
    """Replace the parameters' `sum_grad` nodes of `gm` by one `sum_grads` per bucket of at
    most `bucket_bytes` (default `BUCKET_BYTES`), in place. Returns the number of buckets."""
    bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    g = gm.graph
    sums = [n for n in g.nodes if n.op == "call_function" and n.target is rt.sum_grad
            and n.args[0].op == "placeholder" and n.args[0].name in cap.params]
    if not sums:
        return 0
    order = {n: i for i, n in enumerate(g.nodes)}
    first_use = {s: min(order[u] for u in s.users) if s.users else len(order) for s in sums}
    sums.sort(key=first_use.get)
    buckets, size = [[]], 0
    param = {s: cap.model.get_parameter(cap.params[s.args[0].name]) for s in sums}
    for s in sums:
        nbytes = param[s].numel() * param[s].element_size()
        if buckets[-1] and (size + nbytes > bucket_bytes
                            or param[buckets[-1][0]].dtype != param[s].dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(s)
        size += nbytes
    for k, bucket in enumerate(buckets):
        first = min((u for s in bucket for u in s.users), key=order.get, default=None)
        with g.inserting_before(first) if first is not None else g.inserting_after(bucket[-1]):
            call = g.call_function(rt.sum_grads, (tuple(s.args[0] for s in bucket), bucket[0].args[1]))
            call.name = g._graph_namespace.create_name(f"grads_summed_{k}", None)
            for j, s in enumerate(bucket):
                s.replace_all_uses_with(g.call_function(operator.getitem, (call, j)))
        for s in bucket:
            g.erase_node(s)
    g.lint()
    gm.recompile()
    return len(buckets)
