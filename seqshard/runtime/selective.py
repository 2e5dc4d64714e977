"""Selective recompute: a recomputed layer that keeps its attention's outputs, so attention runs
once per step (LightSeq's rematerialization-aware checkpointing).

A recomputed layer (`checkpoint(fn, *inputs, use_reentrant=False)`) runs its forward again in
backward; at long sequences attention is most of that forward (Llama-3-8B at 256K tokens: about
0.9 s of a layer's 1.2 s). `selective_checkpoint` runs the same checkpoint with torch's selective
activation checkpointing (`create_selective_checkpoint_contexts`): in forward the attention ops
(`ATTENTION_OPS`) keep their outputs (`CheckpointPolicy.MUST_SAVE`), every other op is
recomputed; in the rerun the attention ops return those outputs instead of running, and the
rest of the layer (norms, projections, MLP, rotary) runs again to rebuild what its ops save.

    forward   the layer runs once; attention's outputs (out, lse, and what its backward reads:
              Ulysses' head-layout tensors) stay on the device, beside the layer's inputs
    backward  the layer runs again but for attention, which returns the kept outputs; they are
              freed as the layer's backward consumes them

The attention ops are every algorithm's forward custom op (`opsupport.FORWARD_OPS`: ring,
Ulysses, hybrid, all-gather, token ring, local) and, where a layer's attention is the captured
SDPA (local attention, world size 1, DSP), the fused kernels aten's SDPA dispatches to (flash,
cuDNN, memory-efficient; CPU flash). aten's math fallback is ordinary ops and is recomputed.

With `offload` (positions of inputs to keep in host memory), the checkpoint runs under the
offload hooks (`offload.offloaded_checkpoint`): they move the checkpoint's inputs; the kept
attention outputs are cached by the dispatch mode, not saved tensors, so they stay on the device.

Versions: the policy reads only the op (torch 2.13 also passes the op's output in the context;
torch 2.11 calls the policy again in the rerun, with `is_recompute=True`): the same answer in
both.
"""

from __future__ import annotations

from functools import cache

import torch
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from seqshard.runtime.offload import offloaded_checkpoint
from seqshard.runtime.opsupport import FORWARD_OPS

__all__ = ["selective_checkpoint", "keep_attention", "attention_ops"]

_SDPA_KERNELS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_fused_attention_overrideable")


@cache
def attention_ops() -> frozenset:
    """The ops whose outputs a selective layer keeps: seqshard's attention forward ops and aten's
    fused SDPA kernels (those this torch has)."""
    import seqshard.runtime  # noqa: F401 - every algorithm registered

    aten = [getattr(torch.ops.aten, name).default for name in _SDPA_KERNELS
            if hasattr(torch.ops.aten, name)]
    return frozenset(FORWARD_OPS) | frozenset(aten)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention():
    """The `context_fn` of a selective checkpoint (fresh contexts per call)."""
    return create_selective_checkpoint_contexts(_policy)


def selective_checkpoint(fn, *args, offload: tuple[int, ...] = ()):
    """`checkpoint(fn, *args, use_reentrant=False)` that keeps the outputs of fn's attention ops
    for backward instead of running them again; inputs at positions `offload` in host memory."""
    if offload:
        return offloaded_checkpoint(fn, *args, offload=offload, context_fn=keep_attention)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=keep_attention)

