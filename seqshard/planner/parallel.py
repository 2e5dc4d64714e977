"""`parallelize`: a model, example inputs and a mesh → a module that runs this rank's program.

    pm = parallelize(model, example_inputs, mesh=None, plan=None, overrides=None)
    out = pm(*inputs)            # same global inputs on every rank; returns this rank's shard
    full = pm.gather(out)        # the global tensor, padding removed, original order
    lab = pm.shard(labels, like="input_ids")
    pm.plan, pm.code

Gradients: the program is differentiated as a whole, each collective with its true adjoint, so a
rank's gradient of a replicated tensor is its share of the total. Parameters, and inputs that
require grad, are summed over all ranks in backward (`sum_grad`), and a replicated output's
gradient is counted once (`scale_grad`): after `loss.backward()` every rank holds the
single-device gradients, `x.grad` included.

Modes: a captured program is one mode of the model (dropout on or off, and any other branch on
`self.training`). `pm.train()` / `pm.eval()` (or the same on any submodule) switch to the program
of that mode, built once from the same plan; so does a call after parameters were frozen or
unfrozen, or whose inputs differ in `requires_grad` from the example inputs.

Failing together (no hangs): every rank must make the same calls. `parallelize` first exchanges a
header (mesh, plan or not and its hash, overrides, axes, model and input shapes, train/eval
modes) and raises a `ValueError` on every rank if they differ; after capture and analysis, after
planning and after building the program, each rank reports ok or its error, and every rank
raises (the failing rank its own error, the others the same type naming that rank and its
message). Each call first exchanges a digest of every input (`_input_digest`) and checks token
ids against the embedding and loss they index, so different inputs, different modes or a bad
token id fail on every rank before the program runs.

What can still hang (the process group's timeout, 30 min by default, is then the only way out;
pass `timeout=` to `init_process_group` to shorten it): a rank that dies (killed, out of host
memory) or never makes the call; an error inside the program or its backward on some ranks only
(CUDA out of memory on one GPU, an error in a collective); `gather`/`shard` called on some ranks
only; and everything under `check_inputs=False`, which skips the per-call exchange.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
import weakref
from dataclasses import replace
from math import prod

import torch
import torch.distributed as dist
import torch.nn as nn

from typing import TYPE_CHECKING

from seqshard.capture import capture
from seqshard.dims import analyze
from seqshard.strategies import Plan, R, Shard

from . import api

if TYPE_CHECKING:
    from seqshard.codegen import MeshInfo, Program

__all__ = ["parallelize", "ParallelModule"]


def default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("sp",))


def parallelize(model: nn.Module, example_inputs: tuple, *, mesh=None, plan: Plan | None = None,
                overrides: dict[str, str] | None = None, axes: dict[str, str] | None = None,
                cluster=None, memory_budget: float | None = None, training: bool = True,
                check_inputs: bool = True, optimizer: str = "adamw",
                model_state: str = "replicated", mixed_precision=None,
                kernels: bool | str = "auto", compile: bool | str = "auto",
                compile_backend: str = "inductor") -> "ParallelModule":
    """Capture `model`, plan it (or take `plan`), and build this rank's program.

    mesh: a DeviceMesh over all ranks (default: 1-D over the world, axis "sp").
    plan: a Plan (from `planner.plan`, JSON, or another size of the same model).
    overrides: {module pattern: spec} forced choices (see `planner.overrides`).
    axes: names for the factors of inputs, e.g. {"x": "b t p c"}; default: the axes the plan
        was made with (`plan.axes`).
    check_inputs: exchange a digest of the inputs on every call (see `ParallelModule.forward`).
    optimizer: the optimizer the plan prices the model state of ("adamw" | "adamw-pure", see
        `planner.plan`); seqshard runs no optimizer itself.
    model_state: "replicated" (every rank holds every parameter; gradients summed in buckets)
        or "sharded" (FSDP2 over all ranks: parameters become DTensors, each rank holds 1/N;
        see `planner.state`). The planner prices the one chosen. "auto": the planner plans both
        (sharded only on more than one rank) and the faster feasible one runs (`planner.plan`'s
        "auto" without "offload", which seqshard does not run); with `plan=`, the state the
        plan was priced for (`plan.model_state`). A plan priced for sharded or offloaded state
        is refused under "replicated" (its memory would not hold).
    mixed_precision: with "sharded", a `torch.distributed.fsdp.MixedPrecisionPolicy`, e.g.
        `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`: bf16
        compute, fp32 parameters in the optimizer and fp32 gradient reduction.
    kernels: seqshard's own kernels where they apply: an LM head + plain cross-entropy runs
        as one fused kernel (`codegen/kernels/linear_ce.py`; Triton on GPU), in the plan's
        chunks or its own; its logits never exist whole. "auto" (default): on when the mesh is
        on CUDA, off elsewhere (see `resolve_auto`).
    compile: False (op by op), or True / "layers": each distinct layer template of the
        program compiled once with torch.compile(backend=compile_backend) and run for every
        identical layer (`codegen/compiled.py`; `pm.code` lists the templates). "auto"
        (default): "layers" when the mesh is on CUDA, False elsewhere.

    Every rank must call it with the same arguments; a difference, or an error on any rank,
    raises on every rank (see the module docstring)."""
    # codegen brings the runtime (custom ops, torch.distributed): loaded here, so that
    # `planner.plan` stays free of it (tests/test_layering.py)
    from seqshard.codegen import MeshInfo, apply_plan

    from . import state

    if not dist.is_initialized():
        raise RuntimeError("parallelize needs a process group: run under torchrun (or call "
                           "torch.distributed.init_process_group) - or use planner.plan() to plan "
                           "without one")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if axes is None and plan is not None and plan.axes:
        axes = dict(plan.axes)
    _check_same_call(model, example_inputs, mesh, plan, overrides, axes, check_inputs,
                     model_state)
    if model_state not in (*state.MODEL_STATES, "auto"):
        raise ValueError(f"model_state must be one of {state.MODEL_STATES}, got {model_state!r}"
                         " (the planner's 'offload' is priced, but left to the user to run)")
    if mixed_precision is not None and model_state not in ("sharded", "auto"):
        raise ValueError("mixed_precision= is FSDP2's MixedPrecisionPolicy: it needs "
                         "model_state='sharded'")
    if not state.unsharded(model):
        raise ValueError("the model is sharded already (fully_shard, or an earlier "
                         "parallelize(model_state='sharded')): build a new model, or load its "
                         "state into one with torch.distributed.checkpoint")
    if plan is not None and overrides:
        raise ValueError("pass either plan= or overrides=, not both (overrides shape a new plan)")
    if compile not in (False, True, "layers", "auto"):
        raise ValueError(f"compile= takes False, True, 'layers' or 'auto', got {compile!r}")
    if kernels not in (False, True, "auto"):
        raise ValueError(f"kernels= takes False, True or 'auto', got {kernels!r}")
    mesh = mesh if mesh is not None else default_mesh()
    compile, kernels = resolve_auto(compile, kernels, mesh.device_type)
    info = MeshInfo.from_device_mesh(mesh)

    dims = _together("capture", lambda: analyze(capture(model, example_inputs), axes))
    if plan is None:
        # rank 0 plans and sends the plan: CP-SAT's parallel search may pick a different plan of
        # equal cost on another rank. A planning error travels too: every rank raises it.
        message, error = [None, None], None
        if dist.get_rank() == 0:
            try:
                priced, note = runtime_attention_pricing(dims, cluster, prod(info.sizes),
                                                         _device(mesh.device_type))
                made = api.plan_captured(dims, mesh=tuple(zip(info.names, info.sizes)),
                                         overrides=overrides, cluster=priced,
                                         memory_budget=memory_budget,
                                         training=training, optimizer=optimizer,
                                         model_state=state.MODEL_STATES
                                         if model_state == "auto" else model_state,
                                         compile=compile,
                                         kernels=kernels)
                message[0] = (replace(made, notes=(*made.notes, note)) if note else made).to_json()
            except Exception as e:  # noqa: BLE001 - sent to every rank, raised there
                message[1], error = _describe(e), e
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if message[1] is not None:
            raise _rebuild(message[1], 0, "planning")
        plan = Plan.from_json(message[0]).with_axes(axes)
    if model_state == "replicated" and plan.model_state != "replicated":
        raise ValueError(f"the plan was priced with model_state={plan.model_state!r}: its memory "
                         "does not hold with every parameter, gradient and optimizer state on "
                         "every rank. Pass model_state='auto' to run the state the plan was "
                         "priced for, or plan again with model_state='replicated'")
    if model_state == "auto":
        model_state = plan.model_state
        if model_state not in state.MODEL_STATES:
            raise ValueError(f"the plan was priced with model_state={model_state!r}, which seqshard "
                             "does not run: plan with model_state='auto' here (replicated or "
                             "sharded), or pass model_state='replicated' or 'sharded'")
        if mixed_precision is not None and model_state != "sharded":
            raise ValueError(f"mixed_precision= needs sharded state; model_state='auto' chose "
                             f"{model_state!r} (see plan.notes): pass model_state='sharded'")
    build = dict(kernels=kernels, compile=compile, backend=compile_backend,
                 local_attention=local_attention_kernel(dims, _device(mesh.device_type)))
    program = _together("building the program", lambda: apply_plan(dims, plan, info, **build))
    layers = None
    if model_state == "sharded":
        layers = _together("sharding the model state",
                           lambda: state.shard_model(model, mesh, mixed_precision))
    pm = ParallelModule(model, plan, program, info, axes, check_inputs, layers)
    pm._build_options = build
    if mesh.device_type == "cuda":
        _warn_fragmentation(plan.predicted.peak_memory_bytes,
                            torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return pm


FRAGMENTATION_SHARE = 0.5
"""A plan whose predicted peak passes this share of the GPU warns without expandable segments."""


def _warn_fragmentation(peak: float, capacity: float) -> bool:
    """Warn (Python's default filter: once per call site) where the caching allocator's fragmentation may break a plan that
    fits: the plan prices allocated bytes, and a long-sequence plan frees and allocates blocks
    of many sizes. Measured: the 8B shape at 128K on one H200 (predicted 107.9 GiB, measured
    108.1 allocated) ran out of memory in its second step under the default allocator with 37.7
    GiB reserved but not allocated, and ran with `expandable_segments:True`
    (bench/results/memory-20261201-231356-8b128k-warm.md, -231649-...-expandable.md)."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if peak <= FRAGMENTATION_SHARE * capacity or "expandable_segments:true" in conf.lower():
        return False
    warnings.warn(f"the plan's predicted peak is {peak / 2**30:.1f} GiB of this GPU's "
                  f"{capacity / 2**30:.1f} GiB, priced as allocated bytes; the caching allocator's "
                  "fragmentation can add tens of GiB on long-sequence plans (measured: 37.7 GiB "
                  "reserved but not allocated at 8B, 128K tokens). Set PYTORCH_CUDA_ALLOC_CONF="
                  "expandable_segments:True before the first CUDA allocation.", stacklevel=3)
    return True


def resolve_auto(compile, kernels, device_type: str) -> tuple:
    """parallelize's "auto" compile= and kernels=: on for a CUDA mesh, off elsewhere.

    Why on for CUDA (one H200, bench/results/): the compiled program with the fused loss ran the
    Llama-3.2-1B shape at 16K 1.158x faster than eager, its first step (compiling included)
    12.5 s (codegen-20261202-002633), and the 8B shape at 32K at 52.7% MFU against eager's
    48.6% (codegen-20261201-211644); on every memory-plan path (recompute, selective, offload,
    nested groups, chunked loss and token chains; 4 layers of the 1B shape at 16K) 1.14-1.46x
    faster with 4.9-9.2 GiB peaks against eager's 6.7-32.1 and gradients as accurate against
    fp32 (compile_paths-20261202-015154). Why off elsewhere: on CPU Inductor compiles C++ for
    minutes, for no measured gain, and CPU (gloo) is where the tests check exactness."""
    on = device_type == "cuda"
    if compile == "auto":
        compile = "layers" if on else False
    if kernels == "auto":
        kernels = on
    return compile, kernels


def _device(device_type: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else \
        torch.device(device_type)


def _attention_inputs(dims) -> set[tuple[torch.dtype, int]]:
    """(dtype, head dim) of every attention's queries."""
    return {(n.args[0].meta["val"].dtype, int(n.args[0].meta["val"].shape[-1]))
            for n in dims.cap.nodes() if dims.attention(n) is not None}


def local_attention_kernel(dims, device: torch.device) -> str:
    """"runtime" where the runtime's kernel for every attention on `device` is FlashAttention-4,
    which the model's own SDPA call cannot run: attention the plan keeps local (world size 1,
    head splits) then goes through seqshard.runtime.local_attention too, so that what runs is
    what `runtime_attention_pricing` priced; "captured" (the model's own op) otherwise."""
    from seqshard.runtime import backends

    qs = _attention_inputs(dims)
    fa4 = qs and all(backends.select_backend(device, d, e) == "fa4" for d, e in qs)
    return "runtime" if fa4 else "captured"


def runtime_attention_pricing(dims, cluster, gpus: int, device: torch.device):
    """(cluster, note): with no cluster given, or a preset's name, attention priced at the kernel
    the runtime will run on `device` (runtime/backends.select_backend for each attention's dtype
    and head dim) when the cluster has its rates and it is not the one priced already: fa4 on an
    H200 with flash-attn-4 installed, a head dim it runs padded (72 -> 128) at the padded FLOPs.
    A Cluster object or a calibrated JSON is taken as given (note None)."""
    from seqshard.costmodel import Cluster
    from seqshard.costmodel.attention import padded_head_dims
    from seqshard.runtime import backends

    if not (cluster is None or (isinstance(cluster, str) and not cluster.endswith(".json"))):
        return cluster, None
    cluster = Cluster.preset("h200", gpus=gpus) if cluster is None else Cluster.parse(cluster)
    qs = _attention_inputs(dims)
    chosen = {backends.select_backend(device, dtype, e) for dtype, e in qs}
    known = {cluster.gpu.attention_backend, *(k[0] for k in cluster.gpu.attention_kernels)}
    if len(chosen) != 1 or not chosen <= known or chosen == {cluster.gpu.attention_backend}:
        return cluster, None
    (name,) = chosen
    cluster = cluster.with_attention_backend(name)
    heads = sorted({e for _, e in qs})
    if name == "fa4":
        cluster = replace(cluster, gpu=padded_head_dims(
            cluster.gpu, {e: backends.fa4_head_dim(e) for e in heads}))
    modes = ", ".join(dict.fromkeys(backends.describe(name, e) for e in heads))
    return cluster, (f"parallelize priced local attention at {modes}: the kernel the runtime runs "
                     f"here ({device}, runtime/backends.select_backend; a padded head dim at "
                     "its padded FLOPs); pass cluster= a Cluster to price another")


class ParallelModule(nn.Module):
    """This rank's program for `model`; call it with the global inputs (the same on every rank).

    `pm.program` is the program of the current mode; programs of other modes (train/eval, inputs
    or parameters with or without requires_grad) are built from the same plan when first
    needed, and kept. `pm.sharded_layers`: with sharded state, the layers FSDP2 shards one by
    one (the model itself holds the rest); None with replicated state."""

    def __init__(self, model: nn.Module, plan: Plan, program: Program, mesh: MeshInfo,
                 axes: dict[str, str] | None, check_inputs: bool,
                 sharded_layers: list[str] | None = None):
        super().__init__()
        self.model = model
        self.plan = plan
        self.mesh = mesh
        self.check_inputs = check_inputs
        self.sharded_layers = sharded_layers
        self.program = self._model_state(program)
        self._axes = axes
        self._submodules = list(model.modules())
        self._model_params = list(model.parameters())  # not _parameters: nn.Module owns that
        cap = program.cap
        self._names = list(cap.input_names)
        vals = {n.name: n.meta["val"] for n in cap.nodes() if n.op == "placeholder"}
        self._shapes = [tuple(vals[n].shape) for n in cap.inputs]
        self._programs = {self._mode_key(tuple(vals[n].requires_grad for n in cap.inputs)): program}
        self._index_limits = _index_limits(cap)
        self._outputs: list = []
        self._redistributors: dict = {}
        self._weights: dict = {}  # device → the digest's position weights (see _input_digest)
        self._build_options: dict = {}  # apply_plan's kernels=, compile=, backend=

    @property
    def code(self) -> str:
        """This rank's program (of the current mode) as Python source, after a comment naming
        the generated code that runs where (`codegen.compiled.kernel_notes`), then the code of
        each compiled layer template and the layers it runs."""
        from seqshard.codegen.compiled import CompiledLayer, kernel_notes

        notes = kernel_notes(self.program.gm)
        parts = ["\n".join(["# generated kernels:"] + [f"#   {n}" for n in notes])] if notes else []
        parts.append(self.program.gm.code)
        for name, m in self.program.gm.named_children():
            if isinstance(m, CompiledLayer):
                parts.append(f"# {name}: torch.compile(backend={m.backend!r}) once, run for "
                             f"{', '.join(m.layers)}{m.template.code}")
        return "\n".join(parts)

    def explain(self, name: str) -> str:
        """`plan.explain(name)`, then the generated code that runs `name` in this program (a
        compiled layer template, the fused LM-head loss: `codegen.compiled.kernel_notes`)."""
        from seqshard.codegen.compiled import kernel_notes

        notes = kernel_notes(self.program.gm, name)
        return self.plan.explain(name) + "".join(f"\nruns as {n}" for n in notes)

    def _model_state(self, program: Program) -> Program:
        """The program with the model state's gradient handling: FSDP units (sharded) or
        bucketed gradient sums (replicated); see `planner.state`."""
        from . import state

        if self.sharded_layers is None:
            state.bucket_grad_sums(program.gm, program.cap)
        else:
            program.placeholders = state.wrap_units(program.gm, program.cap, self.model,
                                                    self.sharded_layers)
        return program

    def _mode_key(self, inputs_requires_grad: tuple) -> tuple:
        """What a captured program depends on besides shapes: each submodule's train/eval flag,
        and which parameters and inputs require grad (their gradients are summed over ranks)."""
        return (tuple(m.training for m in self._submodules),
                tuple(p.requires_grad for p in self._model_params), inputs_requires_grad)

    def forward(self, *inputs):
        """Run this rank's program on the global inputs.

        With `check_inputs` (the default), the ranks first all-gather one row of int64: whether
        the call is well-formed here, the train/eval modes, which parameters and inputs require
        grad, and a digest of every input's bytes (`_input_digest`); any difference raises a
        `ValueError` on every rank naming the input and the ranks. Cost per call: one all-gather of a few
        int64, one pass over each input (the digest of 1×128K int64 tokens takes 0.09 ms and of
        a 1×16×64×1152 float32 tensor 0.35 ms on one CPU thread; 0.03 ms each on an H200), and
        on GPUs one device-to-host copy, which waits for the work queued before the call.
        Token ids and labels are then checked against the embedding or loss they index, on the
        whole input on every rank (`_check_indices`)."""
        problem = self._local_problem(inputs)
        key = None
        if problem is None:
            key = self._mode_key(tuple(bool(t.requires_grad) for t in inputs))
        if self.check_inputs and dist.get_world_size() > 1:
            self._agree(inputs, key, problem)
        elif problem is not None:
            raise ValueError(problem)
        self._check_indices(inputs)
        if key not in self._programs:
            self._programs[key] = self._model_state(self._build(key, inputs))
        self.program = program = self._programs[key]

        def run(*inputs):
            args = [program.cap.placeholder_value(name, inputs) for name in program.placeholders]
            return program.gm(*args)

        if self.sharded_layers is None:
            outs = run(*inputs)
        else:  # inside the FSDP root's forward, which unshards the root's parameters
            with warnings.catch_warnings():  # our outputs are views (scale_grad): not modified
                warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view")
                outs = self.model.seqshard_run(run, *inputs)
        self._outputs = [weakref.ref(o) if isinstance(o, torch.Tensor) else None for o in outs]
        return outs[0] if len(outs) == 1 else outs

    # ------------------------------------------------------------------ checks of a call
    def _local_problem(self, inputs) -> str | None:
        if len(inputs) != len(self._shapes):
            return (f"expected {len(self._shapes)} inputs ({', '.join(self._names)}), "
                    f"got {len(inputs)}")
        if not all(isinstance(t, torch.Tensor) for t in inputs):
            return f"inputs must be tensors, got {[type(t).__name__ for t in inputs]}"
        shapes = [tuple(t.shape) for t in inputs]
        if shapes != self._shapes:
            return (f"this module was built for input shapes {self._shapes}, got {shapes}: call "
                    "parallelize again with these inputs; the plan carries over unchanged "
                    "(plan=pm.plan)")
        return None

    def _agree(self, inputs, key, problem) -> None:
        """All-gather [ok, modes, parameters' and inputs' requires_grad, digest of each input]
        (flags as 56-bit hashes) and compare."""
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        head = [0, 0, 0, 0]
        digests = [torch.zeros((), dtype=torch.int64, device=device)] * len(self._shapes)
        if problem is None:
            head = [1] + [int.from_bytes(hashlib.blake2b(bytes(flags), digest_size=7).digest(),
                                         "little") for flags in key]
            digests = [_input_digest(t, self._weights).to(device) for t in inputs]
        row = torch.cat([torch.tensor(head, dtype=torch.int64).to(device), torch.stack(digests)])
        every = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(every, row)
        rows = torch.stack(every).cpu().tolist()
        bad = [r for r, x in enumerate(rows) if not x[0]]
        if bad:
            if problem is not None:
                raise ValueError(problem)
            raise ValueError(f"{_ranks(bad)} called with inputs that do not fit this module "
                             f"(count or shapes; see the error there); {_same}")
        if len({x[1] for x in rows}) > 1:
            raise ValueError(f"the ranks are in different train/eval modes ({_groups(rows, 1)}); "
                             "call pm.train() or pm.eval() on every rank")
        if len({x[2] for x in rows}) > 1:
            raise ValueError(f"the ranks differ in which parameters require grad "
                             f"({_groups(rows, 2)}); freeze and unfreeze alike on every rank")
        if len({x[3] for x in rows}) > 1:
            raise ValueError(f"the ranks differ in which inputs require grad ({_groups(rows, 3)})"
                             f"; {_same}")
        for i, name in enumerate(self._names):
            if len({x[4 + i] for x in rows}) > 1:
                values = [x[4 + i] for x in rows]
                common = max(values, key=lambda v: (values.count(v), v == values[0]))
                odd = [r for r, v in enumerate(values) if v != common]
                raise ValueError(f"{_ranks(odd)} passed a different {name!r} than "
                                 f"{_ranks([r for r in range(len(values)) if r not in odd])}"
                                 f" (its bytes differ: values, order or NaN payloads); {_same}")

    def _check_indices(self, inputs) -> None:
        """Token ids and labels within range, checked on the whole (identical) input on every
        rank: in the program only the rank holding a bad id would fail, and the rest hang."""
        for i, limit, ignore, what in self._index_limits:
            t = inputs[i]
            if t.numel() == 0:
                continue
            ok = (t >= 0) & (t < limit)
            if ignore is not None:
                ok |= t == ignore
            if not bool(ok.all()):
                bad = t[~ok].flatten()[0].item()
                raise IndexError(f"{self._names[i]!r} holds {bad}, outside [0, {limit}) of {what}")

    def _build(self, key, inputs) -> Program:
        """The program of another mode: the model captured again in that mode, the same plan.

        Plans key nodes by module, op and count within the module (`from_plan.node_keys`).
        Dropout stays one node in both modes (`dropout(x, p, train)`), so nothing is renumbered;
        a branch on `self.training` that adds or removes ops renumbers the later nodes of the
        same op in that module: the plan then still applies node by node, every choice checked,
        or fails naming the node."""
        from seqshard.codegen import apply_plan

        grads = key[2]
        mode = "training" if self.model.training else "eval"
        if self.sharded_layers is not None:
            raise ValueError(f"with model_state='sharded', the module runs the mode it was built "
                             f"in (capture needs whole parameters): this call is in {mode} mode "
                             "or freezes other parameters or inputs; keep the mode of "
                             "parallelize's call (torch.no_grad() is fine)")
        examples = tuple(t.detach().requires_grad_(g) for t, g in zip(inputs, grads))

        def build():
            try:
                return apply_plan(analyze(capture(self.model, examples), self._axes), self.plan,
                                  self.mesh, **self._build_options)
            except ValueError as e:
                raise ValueError(f"the plan does not apply to the model in {mode} mode: {e}; "
                                 f"call parallelize with the model in {mode} mode for a plan "
                                 "that fits it") from e

        return _together(f"building the {mode} program", build)

    # ------------------------------------------------------------------ shards and wholes
    def _output_index(self, t: torch.Tensor) -> int:
        for i, ref in enumerate(self._outputs):
            if ref is not None and ref() is t:
                return i
        if len(self.program.output_layouts) == 1:
            return 0
        raise ValueError("gather() takes a tensor this module returned (from its last call)")

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The global tensor of an output: gathered over the ranks, padding cut, original order.

        Differentiable: a loss computed from it on every rank and backpropagated counts once
        (the gradient is scaled by 1/copies, as a replicated output's is), so `loss_fn(
        pm.gather(out)).backward()` gives the single-device gradients."""
        from seqshard.runtime.sharding import scale_grad  # loaded by parallelize already

        i = self._output_index(out)
        full = self._redistributor("out", i)(out)
        copies = prod(n for n, p in zip(self.mesh.sizes, self.program.output_layouts[i])
                      if isinstance(p, Shard))
        return scale_grad(full, 1.0 / copies) if copies > 1 else full

    def shard(self, t: torch.Tensor, like: str) -> torch.Tensor:
        """Split a global tensor the way input `like` is split (e.g. labels like input_ids)."""
        if like not in self._names:
            raise ValueError(f"like={like!r}: inputs are {self._names}")
        if tuple(t.shape) != self._shapes[self._names.index(like)]:
            raise ValueError(f"shard(like={like!r}) needs a tensor of {like}'s shape "
                             f"{self._shapes[self._names.index(like)]}, got {tuple(t.shape)}")
        return self._redistributor("in", like)(t)

    def _redistributor(self, kind: str, key):
        program = self.program
        cache = (id(program), kind, key)
        if cache not in self._redistributors:
            cap = program.cap
            if kind == "out":
                node = next(n for n in cap.nodes() if n.op == "output").args[0][key]
                src = program.output_layouts[key]
                gm = program.redistributor(node, src, tuple(R for _ in src))
            else:
                name = cap.inputs[cap.input_names.index(key)]
                node = next(n for n in cap.nodes() if n.name == name)
                dst = program.input_layouts.get(key)
                if dst is None:
                    return lambda t: t  # replicated wherever it is used
                gm = program.redistributor(node, tuple(R for _ in dst), dst)
            self._redistributors[cache] = gm
        return self._redistributors[cache]


_same = "every rank must pass the same global inputs - the module shards them itself"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _groups(rows: list, col: int) -> str:
    """'rank 0 | ranks 1, 2': the ranks grouped by the value in column `col` of their rows."""
    groups: dict = {}
    for r, x in enumerate(rows):
        groups.setdefault(x[col], []).append(r)
    return " | ".join(_ranks(g) for g in groups.values())


# ------------------------------------------------------------------ input digest
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _input_digest(t: torch.Tensor, weights: dict) -> torch.Tensor:
    """A 64-bit digest of `t`'s bytes, on `t`'s device: Σ wᵢ·xᵢ mod 2⁶⁴ over the bytes read as
    int64 words xᵢ, with fixed pseudo-random odd weights wᵢ (the same on every rank).

    Bit patterns, not values: NaN equals the same NaN; order-sensitive: a permutation moves
    words to positions of other weights; a difference in any single word always shows (an odd
    wᵢ is invertible mod 2⁶⁴), several at once collide with probability about 2⁻⁶³. Integer
    arithmetic, so the result does not depend on the order of the summation (thread counts,
    devices). Costs one pass over the input (a dot product) and keeps one int64 weight per 8
    bytes of the largest input, per device."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    raw = flat.view(_INTS[flat.element_size()])
    if flat.numel() * flat.element_size() % 8 or flat.storage_offset() * flat.element_size() % 8:
        raw = raw.view(torch.uint8)
        raw = torch.cat([raw, raw.new_zeros(-raw.numel() % 8)])
    words = raw.view(torch.int64)
    w = weights.get(words.device)
    if w is None or w.numel() < words.numel():
        gen = torch.Generator().manual_seed(0x5E95A4D)
        w = torch.randint(-2**63, 2**63 - 1, (max(words.numel(), 1),), generator=gen,
                          dtype=torch.int64).bitwise_or_(1).to(words.device)
        weights[words.device] = w
    w = w[: words.numel()]
    if words.device.type == "cpu":
        return torch.dot(words, w)
    return (words * w).sum()


def _index_limits(cap) -> list[tuple[int, int, int | None, str]]:
    """(input index, bound, ignored value, what) for every user input that indexes an embedding
    or is a loss's target (through views): its values must lie in [0, bound)."""
    aten = torch.ops.aten
    views = {aten.view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.unsqueeze.default, aten.squeeze.dim, aten.contiguous.default, aten._to_copy.default,
             aten.to.dtype, aten.permute.default, aten.transpose.int}
    limits = []
    for i, name in enumerate(cap.inputs):
        start = next(n for n in cap.nodes() if n.name == name)
        if start.meta["val"].is_floating_point():
            continue
        todo = [start]
        while todo:
            x = todo.pop()
            for u in x.users:
                if u.target in views and u.args[0] is x:
                    todo.append(u)
                elif u.target == aten.embedding.default and u.args[1] is x:
                    limits.append((i, u.args[0].meta["val"].shape[0], None,
                                   f"the embedding {cap.module_path(u) or u.name}"))
                elif u.target in (aten.cross_entropy_loss.default, aten.nll_loss_nd.default,
                                  aten.nll_loss.default) and u.args[1] is x:
                    logits = u.args[0].meta["val"]
                    ignore = u.args[4] if len(u.args) > 4 else u.kwargs.get("ignore_index", -100)
                    limits.append((i, logits.shape[1 if logits.dim() > 1 else 0], ignore,
                                   f"the classes of {u.name}"))
    return limits


# ------------------------------------------------------------------ failing together
def _check_same_call(model, inputs, mesh, plan, overrides, axes, check_inputs,
                     model_state) -> None:
    """One all-gather of what each rank was called with; a difference raises on every rank."""
    if dist.get_world_size() == 1:
        return
    try:
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan= takes a Plan, got {type(plan).__name__} (Plan.from_json "
                            "reads a plan's JSON)")
        params = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype)) for n, p in
                                      model.state_dict(keep_vars=True).items()]).encode())
        header = {
            "mesh": None if mesh is None else (tuple(mesh.mesh_dim_names or ()), tuple(mesh.shape)),
            "plan": None if plan is None else plan.hash(),
            "overrides": None if not overrides else sorted(overrides.items()),
            "axes": None if not axes else sorted((k, str(v)) for k, v in axes.items()),
            "inputs": [(tuple(t.shape), str(t.dtype), bool(t.requires_grad)) if isinstance(
                t, torch.Tensor) else type(t).__name__ for t in inputs],
            "model": f"{type(model).__name__} {params.hexdigest()[:16]}",
            "mode": tuple(m.training for m in model.modules()),
            "check_inputs": bool(check_inputs),
            "model_state": str(model_state),
        }
        error = None
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
        header, error = {"error": _describe(e)}, e
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, header)
    failed = [(r, h["error"]) for r, h in enumerate(every) if "error" in h]
    if error is not None:
        raise error
    if failed:
        raise _rebuild(failed[0][1], failed[0][0], "parallelize")
    fixes = {
        "mesh": "pass the same mesh= on every rank (or none: one axis 'sp' over the world)",
        "plan": "pass the same plan= on every rank, or plan=None on every rank (rank 0 then "
                "plans for all)",
        "overrides": "pass the same overrides= on every rank",
        "axes": "pass the same axes= on every rank",
        "inputs": "pass the same example inputs on every rank (shapes, dtypes, requires_grad)",
        "model": "build the same model on every rank",
        "mode": "call model.train() or model.eval() alike on every rank",
        "check_inputs": "pass the same check_inputs= on every rank",
        "model_state": "pass the same model_state= on every rank",
    }
    problems = []
    for field, fix in fixes.items():
        values = [h[field] for h in every]
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            show = {"plan": lambda v: "plan=None" if v is None else f"plan {v}",
                    "mode": lambda v: f"{sum(v)} of {len(v)} modules training"}.get(field, repr)
            problems.append(f"{field}: rank 0 has {show(values[0])}, {_ranks(odd)} "
                            f"{show(values[odd[0]])}; {fix}")
    if problems:
        raise ValueError("parallelize was called differently on different ranks: "
                         + " | ".join(problems))


def _together(phase: str, fn):
    """Run `fn` on this rank, then learn whether any rank failed: every rank raises, the failing
    one its own error, the others the same type naming that rank and its message."""
    error = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
        error, result = e, None
    if dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, None if error is None else _describe(error))
        failed = [(r, e) for r, e in enumerate(every) if e is not None]
        if failed and error is None:
            raise _rebuild(failed[0][1], failed[0][0], phase)
    if error is not None:
        raise error
    return result


def _describe(e: Exception) -> tuple[str, str, str]:
    return type(e).__module__, type(e).__qualname__, str(e)


def _rebuild(described: tuple[str, str, str], rank: int, phase: str) -> Exception:
    """Another rank's error as an exception here: its type when it can be made from a message
    (ValueError, PlanError, ...), else RuntimeError."""
    module, name, text = described
    message = f"rank {rank} failed in {phase}: {text}"
    try:
        kind = sys.modules[module]
        for part in name.split("."):
            kind = getattr(kind, part)
        return kind(message)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments
        return RuntimeError(f"{name}: {message}")
