"""`parallelize`: a model, example inputs and a mesh → a module that runs this rank's program.

    pm = parallelize(model, example_inputs, mesh=None, plan=None, overrides=None)
    out = pm(*inputs)            # same global inputs on every rank; returns this rank's shard
    full = pm.gather(out)        # the global tensor, padding removed, original order
    lab = pm.shard(labels, like="input_ids")
    pm.plan, pm.code

Gradients: the program is differentiated as a whole, each collective with its true adjoint, so a
rank's gradient of a replicated tensor is its share of the total. Parameters are summed over all
ranks in backward (`sum_grad`), and a replicated output's gradient is counted once
(`scale_grad`): after `loss.backward()` every rank holds the single-device gradients.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn as nn

from typing import TYPE_CHECKING

from seqshard.capture import capture
from seqshard.dims import analyze
from seqshard.strategies import Plan, R

from . import api

if TYPE_CHECKING:
    from seqshard.codegen import MeshInfo, Program

__all__ = ["parallelize", "ParallelModule"]


def default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("parallelize needs a process group: run under torchrun (or call "
                           "torch.distributed.init_process_group) - or use planner.plan() to plan "
                           "without one")
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("sp",))


def parallelize(model: nn.Module, example_inputs: tuple, *, mesh=None, plan: Plan | None = None,
                overrides: dict[str, str] | None = None, axes: dict[str, str] | None = None,
                cluster=None, memory_budget: float | None = None, training: bool = True,
                check_inputs: bool = True) -> "ParallelModule":
    """Capture `model`, plan it (or take `plan`), and build this rank's program.

    mesh: a DeviceMesh over all ranks (default: 1-D over the world, axis "sp").
    plan: a Plan (from `planner.plan`, JSON, or another size of the same model).
    overrides: {module pattern: spec} forced choices (see `planner.overrides`).
    axes: names for the factors of inputs, e.g. {"x": "b t p c"}."""
    # codegen brings the runtime (custom ops, torch.distributed): loaded here, so that
    # `planner.plan` stays free of it (tests/test_layering.py)
    from seqshard.codegen import MeshInfo, apply_plan

    mesh = mesh if mesh is not None else default_mesh()
    info = MeshInfo.from_device_mesh(mesh)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    cap = capture(model, example_inputs)
    dims = analyze(cap, axes)
    if plan is None:
        # rank 0 plans and sends the plan: CP-SAT's parallel search may pick a different plan of
        # equal cost on another rank. A planning error travels too: every rank raises it.
        message = [None, None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                message[0] = api.plan_captured(dims, mesh=tuple(zip(info.names, info.sizes)),
                                               overrides=overrides, cluster=cluster,
                                               memory_budget=memory_budget,
                                               training=training).to_json()
            except (ValueError, RuntimeError) as e:
                message[1] = (type(e), str(e))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(message, src=0)
        if message[1] is not None:
            kind, text = message[1]
            raise kind(text)
        plan = Plan.from_json(message[0])
    elif overrides:
        raise ValueError("pass either plan= or overrides=, not both (overrides shape a new plan)")
    program = apply_plan(dims, plan, info)
    return ParallelModule(model, example_inputs, plan, program, info, check_inputs)


class ParallelModule(nn.Module):
    def __init__(self, model: nn.Module, example_inputs: tuple, plan: Plan, program: Program,
                 mesh: MeshInfo, check_inputs: bool):
        super().__init__()
        self.model = model
        self.plan = plan
        self.program = program
        self.mesh = mesh
        self.check_inputs = check_inputs
        cap = program.cap
        self._cap = cap
        self._shapes = [tuple(t.shape) for t in example_inputs]
        self._outputs: list = []
        self._redistributors: dict = {}
        _same_on_all_ranks(f"plan {plan.hash()}", "the plan",
                           "build the plan once (or load the same JSON) on every rank")

    @property
    def code(self) -> str:
        """This rank's program as Python source."""
        return self.program.gm.code

    def forward(self, *inputs):
        if len(inputs) != len(self._shapes):
            raise ValueError(f"expected {len(self._shapes)} inputs "
                             f"({', '.join(self._cap.input_names)}), got {len(inputs)}")
        shapes = [tuple(t.shape) for t in inputs]
        if shapes != self._shapes:
            raise ValueError(f"this module was built for input shapes {self._shapes}, got {shapes}: "
                             "call parallelize again with these inputs; the plan carries over "
                             "unchanged (plan=pm.plan)")
        if self.check_inputs:
            _check_inputs_match(inputs, self._cap.input_names)
        args = [self._cap.placeholder_value(name, inputs) for name in self.program.placeholders]
        outs = self.program.gm(*args)
        self._outputs = [weakref.ref(o) if isinstance(o, torch.Tensor) else None for o in outs]
        return outs[0] if len(outs) == 1 else outs

    # ------------------------------------------------------------------ shards and wholes
    def _output_index(self, t: torch.Tensor) -> int:
        for i, ref in enumerate(self._outputs):
            if ref is not None and ref() is t:
                return i
        if len(self.program.output_layouts) == 1:
            return 0
        raise ValueError("gather() takes a tensor this module returned (from its last call)")

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The global tensor of an output: gathered over the ranks, padding cut, original order."""
        i = self._output_index(out)
        fn = self._redistributor("out", i)
        return fn(out)

    def shard(self, t: torch.Tensor, like: str) -> torch.Tensor:
        """Split a global tensor the way input `like` is split (e.g. labels like input_ids)."""
        if like not in self._cap.input_names:
            raise ValueError(f"like={like!r}: inputs are {self._cap.input_names}")
        if tuple(t.shape) != self._shapes[self._cap.input_names.index(like)]:
            raise ValueError(f"shard(like={like!r}) needs a tensor of {like}'s shape "
                             f"{self._shapes[self._cap.input_names.index(like)]}, got {tuple(t.shape)}")
        return self._redistributor("in", like)(t)

    def _redistributor(self, kind: str, key):
        if (kind, key) not in self._redistributors:
            sh = self.program
            if kind == "out":
                node = next(n for n in self._cap.nodes() if n.op == "output").args[0][key]
                src = self.program.output_layouts[key]
                gm = sh.redistributor(node, src, tuple(R for _ in src))
            else:
                name = self._cap.inputs[self._cap.input_names.index(key)]
                node = next(n for n in self._cap.nodes() if n.name == name)
                dst = self.program.input_layouts.get(key)
                if dst is None:
                    return lambda t: t  # replicated wherever it is used
                gm = sh.redistributor(node, tuple(R for _ in dst), dst)
            self._redistributors[(kind, key)] = gm
        return self._redistributors[(kind, key)]


def _same_on_all_ranks(value: str, what: str, fix: str) -> None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise ValueError(f"ranks disagree on {what}: rank 0 has {values[0]}, rank {bad[0]} has "
                         f"{values[bad[0]]}; {fix}")


def _check_inputs_match(inputs: tuple, names: list[str]) -> None:
    """Every rank must pass the same global inputs: compare shapes and a checksum."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rows = []
    for t in inputs:
        shape = list(t.shape) + [0] * (8 - t.dim())
        total = t.detach().double().sum() if t.is_floating_point() else t.detach().long().sum().double()
        rows.append(torch.tensor(shape[:8] + [float(t.dim())], dtype=torch.float64, device=t.device))
        rows.append(total.reshape(1).to(t.device))
    mine = torch.cat(rows)
    device = mine.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        mine = mine.cuda()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for r, other in enumerate(every):
        if not torch.equal(other, every[0]):
            diff = (other != every[0]).nonzero()[0].item()
            which = names[min(diff // 10, len(names) - 1)]
            raise ValueError(f"rank {r} passed a different {which!r} than rank 0 (shape or "
                             "values): every rank must pass the same global inputs - the module "
                             "shards them itself")
