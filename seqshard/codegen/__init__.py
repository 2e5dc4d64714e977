"""Codegen: captured graph + plan → this rank's program, a `torch.fx.GraphModule` with readable
Python source (`pm.code`), made by `apply_plan` (apply.py):

    strategies = resolve_plan(dims, plan, sizes)      # names → factors; every node's choice checked
    program = Sharder(dims, strategies, mesh, orders).run()
        shard inputs and positions   (local slices of the global inputs; arange → local positions)
        localize views               (sizes from factor sizes: local_ops.view)
        insert redistributions       (all-to-all / all-gather / reduce-scatter / all-reduce)
        replace attention            (the plan's distributed algorithm, from its registry entry)
        seed replicated outputs once (scale_grad) and sum parameter gradients (sum_grad)
    chunk_modules(program.gm, ...)                    # token-wise modules (MLPs) in checkpointed token chunks
    fuse_rope(program)                                # kernels=True: q's, k's RoPE into Ulysses' pack (rope.py)
    recompute_layers(program.gm, plan.recompute)      # each recomputed layer: a checkpointed submodule
                                                      # (inputs on the host where offloaded,
                                                      # attention kept where selective)
    chunk_losses(program.gm, plan.chunks)             # LM head + loss in checkpointed token chunks
                                                      # (kernels=True: one fused kernel call,
                                                      # unchunked plain losses too)
    compile_layers(program.gm)                        # compile=True: each layer template compiled once

This is emission, not a sequence of graph passes: one walk over the captured graph writes a new
graph, op by op, into calls of `seqshard.runtime` and local ATen ops (see docs/design.md). The
graph-to-graph rewrites run earlier, at capture (`capture.canonicalize`).

`kernels/` holds seqshard's own Triton kernels (the fused LM-head loss, the ring's merge and
add, the layout copies around all-to-alls). The generated program and the runtime both call
them, so that subpackage is a leaf the runtime may import (tests/test_layering.py): importing it
loads nothing else of codegen, which is why the names below load on first use.
"""

import importlib

__all__ = ["apply_plan", "MeshInfo", "Program", "PlanError"]

_EXPORTS = {"apply_plan": "seqshard.codegen.apply", "MeshInfo": "seqshard.codegen.mesh",
            "Program": "seqshard.codegen.sharder", "PlanError": "seqshard.strategies"}
"""Where each public name lives. Loaded on first use, not when the package is imported, so
that `seqshard.codegen.kernels` (generated kernels the runtime calls: a leaf) loads nothing
else of codegen or of the compiler stages before it."""


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seqshard.codegen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
