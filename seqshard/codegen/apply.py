"""`apply_plan`: the steps of codegen in order (seqshard/codegen/__init__.py's docstring)."""

from __future__ import annotations

from seqshard.dims import DimAnalysis
from seqshard.strategies import Plan, PlanError, Shard, orders_of, resolve_plan
from seqshard.strategies.from_plan import match_plan

from .compiled import compile_layers
from .mesh import MeshInfo
from .rope import fuse_rope
from .recompute import (ChunkedModule, chunk_losses, chunk_modules, fusable_losses,
                        recompute_layers)
from .sharder import Program, Sharder

__all__ = ["apply_plan"]


def apply_plan(dims: DimAnalysis, plan: Plan, mesh: MeshInfo, *, kernels: bool = False,
               compile: bool | str = False, backend: str = "inductor",
               local_attention: str = "captured") -> Program:
    """This rank's program. kernels: seqshard's own kernels where they apply (an LM head + plain
    cross-entropy through `kernels/linear_ce.py`, in the plan's chunks or, where the plan keeps
    it whole, the kernel's; q's and k's rotary embedding before a Ulysses attention in its
    pack, `rope.py`); compile: True or "layers" compiles each distinct layer template once
    with torch.compile(backend=backend) (`compiled.py`), False runs op by op;
    local_attention: "captured" runs an attention the plan keeps local as the model's own op,
    "runtime" through `seqshard.runtime.local_attention` (its backend choice, e.g. FA4)."""
    if tuple(plan.axis_names) != tuple(mesh.names):
        raise PlanError(f"the plan was made for mesh axes {plan.axis_names}, this mesh has "
                        f"{mesh.names}: pass mesh=init_device_mesh(device, sizes, "
                        f"mesh_dim_names={plan.axis_names})")
    strategies = resolve_plan(dims, plan, mesh.sizes)
    program = Sharder(dims, strategies, mesh, orders_of(dims, plan), local_attention).run()
    if plan.chunked_modules:
        chunk_modules(program.gm, _chunked_modules(dims, plan, program))
    if kernels:  # q, k rotated just before a Ulysses attention: rotated in its pack
        fuse_rope(program)
    if plan.recompute:
        recompute_layers(program.gm, plan.recompute, plan.offload, tuple(dims.cap.inputs),
                         plan.keep_attention, plan.recompute_groups)
        if plan.chunked_modules:  # chunk loops moved into recomputed layers' submodules
            program.gm.delete_all_unused_submodules()
    chunks = ()
    if plan.chunks:  # the plan names its losses as they were named where it was made
        names = {np_.node: n.name for n, np_ in match_plan(dims, plan).items()}
        chunks = tuple((names.get(loss, loss), k) for loss, k in plan.chunks)
    if kernels:  # the losses the plan keeps whole: the fused kernel too, in its own chunks
        chunks += _whole_losses(program.gm, chunks)
    if chunks:
        chunk_losses(program.gm, chunks, fused=kernels)
    if compile:
        compile_layers(program.gm, backend)
    return program


def _whole_losses(gm, chunks: tuple) -> tuple[tuple[str, int], ...]:
    """(loss, 0) for each loss the fused kernel computes that `chunks` does not name."""
    named = {loss for loss, _ in chunks}
    return tuple((name, 0) for name in fusable_losses(gm)
                 if name not in named and name.removesuffix("_share") not in named)


def _chunked_modules(dims: DimAnalysis, plan: Plan, program: Program) -> list[ChunkedModule]:
    """The plan's chunked modules located in this rank's program (the values of their inputs
    as their ops read them and of their outputs, and the dims that hold the tokens). An input
    its ops read redistributed (DSP's residual stream: frames split → patches split at a block's
    input) enters as the redistributed value: the collective runs once, on the whole tensor,
    before the chunk loop, and the loop cuts the tokens of the layout the region runs in."""
    from seqshard.solver import token_chains, token_regions

    regions = {r.path: r for r in token_regions(dims) + token_chains(dims)}
    sh = program._sharder
    env = sh.env

    def read(r, x, d):  # x as r's ops read it (itself, or redistributed) and how its tokens split
        lays = dict.fromkeys(lay for v in r.nodes if v in sh.strategies
                             for u, lay in sh.strategies[v].inputs if u is x) or [sh.layout[x]]
        atoms = sh.sig_atoms(x)[d]
        split = lambda lay: tuple((i, p.atom) for i, p in enumerate(lay)  # noqa: E731
                                  if isinstance(p, Shard) and p.atom in atoms)
        return [(env[x] if lay == sh.layout[x] else sh.cache[(x, lay)], d, split(lay))
                for lay in lays]

    out = []
    for path, k in plan.chunked_modules:
        r = regions.get(path)
        if r is None:
            raise PlanError(f"the plan runs {path!r} in chunks of tokens, but this model has no "
                            "module there that treats tokens one by one; such modules here: "
                            f"{', '.join(list(regions)[:4]) or 'none'}")
        ins = [v for x, d in r.inputs for v in read(r, x, d)]
        # each piece holds the same tokens of every input: their token dims split alike (the
        # solver keeps redistributions out of the region, so its ops read one layout of them)
        assert len({split for *_, split in ins}) == 1, f"{path}: inputs split unlike {ins}"
        out.append(ChunkedModule(path, k, tuple((v, d) for v, d, _ in ins),
                                 tuple((env[y], d) for y, d in r.outputs)))
    return out
