"""Compiled layers: each distinct layer template of this rank's program compiled once
(torch.compile → Inductor → Triton on GPU), and reused by every identical layer.

    program.gm                                   after `compile_layers(gm)`
        rms_norm = aten.rms_norm(embedding, ...)     layers_0 = self.compiled_layers_0(
        ...               (layers.0's ops)               embedding, p_layers_0_attn_..., to_1, ...)
        add_3 = aten.add(add_2, linear_6)            getitem = layers_0[0]
        rms_norm_2 = ...  (layers.1's ops)           layers_1 = self.compiled_layers_0(
        ...                                              getitem, p_layers_1_attn_..., to_1, ...)

A layer is a module path ending in an index (`layers.3`, `blocks.0`: `solver.clusters.layer_of`
of each node's `meta["module"]`). Its nodes move into a GraphModule whose inputs are what the
layer reads - its parameters too: they are inputs of the program - with canonical names
(`in_0`, ..., nodes named after their ops), so identical layers have identical code. One
`CompiledLayer` per distinct code (nested submodules compared by their code too) holds
`torch.compile(template)`; every layer of that template calls the same module. Dynamo guards
on shapes, dtypes and strides, not on which tensors arrive: the second identical layer runs the
first one's compiled code, and a model of 16 identical layers compiles one layer.

A parameter's `sum_grad` stays where it was (bucketed later, `planner.state`). A recomputed
layer (`recompute_layers` ran first) keeps its eager `checkpoint(recompute_layers_3, ...)` (or
`offloaded_checkpoint`: Dynamo does not trace saved-tensor hooks) and the checkpointed
submodule becomes the template: the compiled code runs inside the checkpoint, again in
backward, its saved tensors going through the offload hooks. A nested group's submodule
(`recompute_group_layers_0`: its layers' checkpoint calls) is one template likewise, the inner
checkpoints traced by Dynamo. The rerun must run the graph the forward ran (the checkpoint
compares what the two saved, pytorch#166926): a checkpoint whose inputs went through the
offload hooks gets them back as new plain tensors, so a template is called with parameters as
plain tensors in forward too (`_plain`). Chunk loops (`run_in_chunks`) unroll inside a template.

No graph breaks at attention: each algorithm's runtime entry point (`strategies.algorithms`:
`ring_attention`, `ulysses_attention`, ...; and `local_attention`, which a program built with
local_attention="runtime" calls) is argument checks around one custom op, and Dynamo cannot
trace its `_resolve_process_group` (a pybind function) or the backend choice's logging, which
would split the template there. `compile_layers` marks those entry points
`torch.compiler.allow_in_graph`: Dynamo puts the call in the graph whole and AOTAutograd traces
it down to the custom op. (A process-wide mark; it helps torch.compile of a whole program too.)

Opaque to the compiler: seqshard's collectives and distributed attention are `torch.library`
custom ops with fake implementations (`runtime/collectives.py`, `runtime/opsupport.py`), so
Dynamo and Inductor keep each as one call and place nothing across it.

Cache: Inductor's FX graph cache and AOTAutograd's cache (on by default; on disk under
TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) key every compiled graph by its code,
its inputs' shapes, dtypes and strides and the compiler's configuration - so by the plan (which
decides the code) and the shapes: another process with the same plan and shapes loads the
compiled kernels instead of compiling them again.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from seqshard.runtime import sharding as rt
from seqshard.runtime.offload import offloaded_checkpoint
from seqshard.runtime.selective import selective_checkpoint

from .recompute import fused_chunked
from .regions import boundary, gather, in_layer, splice
from .rope import rope_notes

__all__ = ["compile_layers", "CompiledLayer", "kernel_notes"]

_CHECKPOINTS = (checkpoint, offloaded_checkpoint, selective_checkpoint)
MIN_OPS = 4
"""A layer of fewer ops runs eagerly."""


class CompiledLayer(torch.nn.Module):
    """One layer template, compiled on its first call (`torch.compile(template)`), run for every
    layer in `layers`."""

    def __init__(self, template: fx.GraphModule, backend: str):
        super().__init__()
        self.template = template
        self.backend = backend
        self.layers: list[str] = []
        self._compiled = None

    def forward(self, *args):
        if self._compiled is None:  # a function, not a module: not registered as a submodule
            self._compiled = torch.compile(self.template.forward, backend=self.backend,
                                           dynamic=False)
        return self._compiled(*map(_plain, args))

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, layers={self.layers}"


def _plain(x):
    """A parameter as a plain tensor (a view of it: its gradient flows to the parameter), so
    that a template's compiled graph sees the same types in its checkpoint's rerun as in
    forward. A checkpoint whose saved inputs go through saved-tensor hooks (`offloaded_checkpoint`
    around a layer or a group) hands its rerun new `torch.Tensor`s (autograd unpacks a hooked
    saved tensor as a new tensor), not the `Parameter`s the forward was called with (where no
    `sum_grad` stands between: 1 rank). Dynamo guards on the type: the rerun compiled and ran a
    second graph, which saved other tensors than the forward's, and the checkpoint's check
    refused them (pytorch#166926; a selective layer's cache missed)."""
    return x.view_as(x) if isinstance(x, torch.nn.Parameter) else x


def compile_layers(gm: fx.GraphModule, backend: str = "inductor") -> dict[str, list[str]]:
    """Move each layer of `gm` into a submodule shared by identical layers and compiled once
    (in place). Returns {submodule name: the layers it runs}."""
    from seqshard.solver.clusters import layer_of  # not at import: the solver loads CP-SAT

    _allow_attention_in_graph()
    g = gm.graph
    layers = list(dict.fromkeys(layer_of(n.meta["module"]) for n in g.nodes
                                if n.meta.get("module") and layer_of(n.meta["module"])))
    templates: dict[str, str] = {}  # canonical code → submodule name
    replaced: set[str] = set()      # recomputed layers' submodules, now templates
    for layer in layers:
        members = [n for n in g.nodes if n.op in ("call_function", "call_method", "get_attr")
                   and in_layer(n.meta.get("module"), layer) and not _parameter_sum(n)]
        calls = [n for n in members if n.op == "call_function" and n.target in _CHECKPOINTS]
        if not calls and sum(n.op == "call_function" for n in members) < MIN_OPS:
            continue  # a lone linear (`t_embed.0` of a Sequential): a Dynamo frame buys nothing
        if calls:  # recomputed: the checkpointed submodule is the template, compiled inside
            for call in calls:
                fn = call.args[0]
                template, key = _canonical(_fetch(gm, fn.target))
                replaced.add(fn.target)
                fn.target = _shared(gm, templates, key, template, layer, backend)
            continue
        region = gather(g, members)
        inputs, outputs = boundary(region)
        template, key = _rebuild(gm, region, inputs, outputs)
        name = _shared(gm, templates, key, template, layer, backend)
        with g.inserting_before(region[0]):
            call = g.call_module(name, tuple(inputs))
            call.name = g._graph_namespace.create_name(re.sub(r"\W", "_", layer), None)
            call.meta["module"] = layer
        splice(g, region, call, outputs)
    # (not delete_all_unused_submodules: a template reached by get_attr would lose its children)
    for target in replaced - {n.target for n in g.nodes if n.op == "get_attr"}:
        gm.delete_submodule(target)
    g.lint()
    gm.recompile()
    return {name: gm.get_submodule(name).layers for name in templates.values()}


def _allow_attention_in_graph() -> None:
    """Every attention algorithm's runtime entry point whole in Dynamo's graph (see above)."""
    import seqshard.runtime
    from seqshard.strategies.algorithms import ALGORITHMS

    for algorithm in ALGORITHMS.values():
        if algorithm.runtime is not None:
            torch.compiler.allow_in_graph(getattr(seqshard.runtime, algorithm.runtime))
    # attention kept local through the runtime (local_attention="runtime": FA4): Dynamo would
    # trace into select_backend and break the template at its logging call, splitting the layer
    # into three graphs (before, the op alone, after) with the op's dout forced contiguous
    torch.compiler.allow_in_graph(seqshard.runtime.local_attention)


def _shared(gm, templates: dict, key: str, template: fx.GraphModule, layer: str,
            backend: str) -> str:
    """The name of the CompiledLayer for `key` (registered on `gm` on first sight), with
    `layer` added to the layers it runs."""
    name = templates.get(key)
    if name is None:
        name = templates[key] = "compiled_" + re.sub(r"\W", "_", layer)
        gm.add_submodule(name, CompiledLayer(template, backend))
    gm.get_submodule(name).layers.append(layer)
    return name


def _parameter_sum(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is rt.sum_grad and n.args[0].op == "placeholder"


def _rebuild(owner: torch.nn.Module, nodes, inputs, outputs,
             single: bool = False) -> tuple[fx.GraphModule, str]:
    """`nodes` copied into a new graph: placeholders in_0.., nodes named after their targets,
    get_attr targets as part_0.. (GraphModules rebuilt the same way); the output a tuple of
    `outputs`, or with `single` its one value. Returns the GraphModule (a layer's template) and
    its code with its parts' code: the key identical layers share."""
    root, sub = torch.nn.Module(), fx.Graph()
    env = {x: sub.placeholder(f"in_{i}") for i, x in enumerate(inputs)}
    parts: dict[str, str] = {}
    keys = []
    for n in nodes:
        if n.op == "get_attr":
            if n.target not in parts:
                parts[n.target] = part = f"part_{len(parts)}"
                obj = _fetch(owner, n.target)
                if isinstance(obj, fx.GraphModule):
                    obj, k = _canonical(obj)
                    keys.append(k)
                else:
                    keys.append(f"<{type(obj).__name__} {id(obj)}>")
                setattr(root, part, obj)
            env[n] = sub.get_attr(parts[n.target])
        else:
            assert n.op in ("call_function", "call_method"), n.format_node()
            env[n] = sub.create_node(n.op, n.target, fx.map_arg(n.args, env.__getitem__),
                                     fx.map_arg(n.kwargs, env.__getitem__))
        env[n].meta = dict(n.meta)
    sub.output(env[outputs[0]] if single else tuple(env[n] for n in outputs))
    module = fx.GraphModule(root, sub, class_name="layer")
    return module, "\n".join([module.code] + keys)


def _canonical(gm: fx.GraphModule) -> tuple[fx.GraphModule, str]:
    """A submodule (a recomputed layer's, a chunk loop's) rebuilt with canonical names."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    results = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if isinstance(results, (tuple, list)):
        return _rebuild(gm, nodes, inputs, list(results))
    return _rebuild(gm, nodes, inputs, [results], single=True)


def _fetch(owner: torch.nn.Module, target: str):
    obj = owner
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def kernel_notes(gm: fx.GraphModule, name: str | None = None) -> list[str]:
    """What of `gm` runs through generated code, one line each (`pm.code` prints them first):
    each compiled layer template and the layers that share it, each fused LM-head loss and the
    weight and chunks it takes. With `name` (`pm.explain`'s), only the lines about it: a layer
    or a module inside one (`layers.3`, `layers.3.attn`), a loss (`cross_entropy_loss`) or its
    LM head's module (`lm_head`).

        compiled_layers_0: compiled once (torch.compile, inductor), one template for
            layers.0-15 (16 layers)
        cross_entropy_loss_fused: fused LM head + cross-entropy (codegen/kernels/linear_ce.py,
            Triton on CUDA) over p_lm_head_weight, chunks of up to 1 GiB of logits"""
    from .kernels.linear_ce import CHUNK_BYTES

    out = []
    for sub, m in gm.named_children():
        if isinstance(m, CompiledLayer) and (name is None or any(in_layer(name, layer)
                                                                 for layer in m.layers)):
            out.append(f"{sub}: compiled once (torch.compile, {m.backend}), one template for "
                       f"{_ranges(m.layers)} ({len(m.layers)} layers)")
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not fused_chunked:
            continue
        weight = _parameter(n.args[1])
        if name is not None and name not in (n.name, n.name.removesuffix("_fused")) and \
                not weight.startswith("p_" + re.sub(r"\W", "_", name) + "_"):
            continue
        k = n.args[6]
        chunks = f"{k} chunks of tokens" if k else \
            f"chunks of up to {CHUNK_BYTES / 2**30:g} GiB of logits"
        out.append(f"{n.name}: fused LM head + cross-entropy (codegen/kernels/linear_ce.py, "
                   f"Triton on CUDA) over {weight}, {chunks}")
    templates = {m.template: m.layers for m in gm.modules() if isinstance(m, CompiledLayer)}
    return out + rope_notes(gm, name, templates)


def _parameter(x: fx.Node) -> str:
    """The placeholder behind a parameter's gradient sum (`sum_grad`, or its bucket's
    `sum_grads`), else `x`'s own name."""
    while x.op == "call_function":
        if x.target is rt.sum_grad:
            x = x.args[0]
        elif x.target is operator.getitem and getattr(x.args[0], "target", None) is rt.sum_grads:
            x = x.args[0].args[0][x.args[1]]
        else:
            break
    return x.name


def _ranges(layers: list[str]) -> str:
    """`layers.0, layers.1, layers.2, blocks.0` → `layers.0-2, blocks.0`."""
    runs: list[list] = []  # [prefix, first, last]
    for layer in layers:
        m = re.fullmatch(r"(.*)\.(\d+)", layer)
        prefix, i = (m.group(1), int(m.group(2))) if m else (layer, None)
        if runs and i is not None and runs[-1][0] == prefix and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([prefix, i, i])
    return ", ".join(p if a is None else f"{p}.{a}" + (f"-{b}" if b != a else "")
                     for p, a, b in runs)
