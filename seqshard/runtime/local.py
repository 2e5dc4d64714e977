"""Local attention for layouts that split heads, not the sequence (Megatron-style, or after a
Ulysses switch the planner made explicit): every rank holds the whole sequence of its heads.

No communication, and no fp32 accumulation: the single block of a one-rank ring (the same block
mask and padding handling, `seq_len`, as the distributed algorithms) goes straight to the kernel,
and so does its backward; through accumulators it would run measurably under the bare kernel
(docs/runtime-measurements.md). `whole_forward` / `whole_backward` are also Ulysses' local step.

Structured masks (masks.py): the one-rank block is refined like any other (blocks.refine). When
one block remains that starts at row 0 it still goes straight to the kernel, masked or not. Blocks
that share no query row (and, for the backward, no key row: packed documents) write their rows of
the result straight from the kernel too; others (tiles of a window) merge in fp32 as in a ring.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from seqshard.runtime.backends import (as_seq_major, attention_backward, attention_forward,
                                       empty_seq_major)
from seqshard.runtime.blocks import Block, block_grads, pair_blocks, run_backward, run_forward
from seqshard.runtime.masks import TokenMask, token_mask
from seqshard.runtime.merge import accumulator
from seqshard.runtime.opsupport import (check_attention_inputs, check_mask_inputs, lse_like,
                                        register_attention_op, resolve_options)

__all__ = ["local_attention", "whole_forward", "whole_backward", "LAYOUT_LOG_ENV", "LAYOUTS",
           "layout_of"]

log = logging.getLogger(__name__)

LAYOUT_LOG_ENV = "SEQSHARD_ATTN_LAYOUT_LOG"
"""Set to 1: the local attention ops log the sizes and strides of the tensors entering and
leaving them, once per distinct layout (logger `seqshard.runtime.local`, warning level), and
keep each in `LAYOUTS`. Off by default (a debugging switch: what layouts eager and compiled
programs hand the kernel)."""

LAYOUTS: dict[tuple, dict] = {}
"""(op, shapes and strides) -> {tensor name: {"shape", "stride", "layout"}}: what was logged."""


def layout_of(x: torch.Tensor) -> str:
    """A tensor's dims from outermost to innermost in memory, named as [b, h, s, e] (4-D) or
    [b, h, s] (3-D): 'bhse' is head-major (dense [b, h, s, e]), 'bshe' seq-major (a transposed
    view of dense [b, s, h, e]); a dim of size 1 (any stride) goes before the first larger dim
    of greater index."""
    names = "bhse" if x.dim() == 4 else "bhs"[:x.dim()]
    order = sorted((d for d in range(x.dim()) if x.shape[d] > 1), key=lambda d: (-x.stride(d), d))
    for d in (d for d in range(x.dim()) if x.shape[d] == 1):
        order.insert(next((i for i, o in enumerate(order) if o > d), len(order)), d)
    return "".join(names[d] for d in order)


def _log_layouts(op: str, **tensors: torch.Tensor) -> None:
    if os.environ.get(LAYOUT_LOG_ENV) != "1":
        return
    key = (op, *((n, tuple(t.shape), t.stride()) for n, t in tensors.items()))
    if key in LAYOUTS:
        return
    LAYOUTS[key] = {n: dict(shape=tuple(t.shape), stride=t.stride(), layout=layout_of(t))
                    for n, t in tensors.items()}
    log.warning("%s: %s", op, "; ".join(f"{n} {tuple(t.shape)} stride {t.stride()} "
                                        f"({layout_of(t)})" for n, t in tensors.items()))


def _single(blocks: list[Block]) -> Block | None:
    """The block to run straight on the kernel: the only one, if it starts at query and key 0."""
    if len(blocks) == 1 and blocks[0].q0 == 0 and blocks[0].k0 == 0:
        return blocks[0]
    return None


def _disjoint(blocks: list[Block], side: str) -> bool:
    """Do the blocks share no query row (side 'q') / no key row ('k')?"""
    spans = sorted((b.q0, b.q1) if side == "q" else (b.k0, b.k1) for b in blocks)
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def whole_forward(q, k, v, *, causal: bool, seq_len: int | None, scale: float, backend: str,
                  mask: TokenMask | None = None, seq_major: bool = False):
    """(out, lse) of q [b, g, S, e] over the whole sequence held here, in position order: the
    single block of a one-rank ring (blocks.pair_blocks), straight from the kernel. `seq_major`:
    the kernel asked for a seq-major out (backends.attention_forward), where one block runs."""
    blocks = pair_blocks("contig", causal, 0, 0, 1, q.shape[2], seq_len, mask)
    block = _single(blocks)
    if block is None:
        if _disjoint(blocks, "q"):
            out, lse = torch.zeros_like(q), lse_like(q).fill_(float("-inf"))
            for b in blocks:
                out[:, :, b.q0:b.q1], lse[:, :, b.q0:b.q1] = attention_forward(
                    q[:, :, b.q0:b.q1], k[:, :, b.k0:b.k1], v[:, :, b.k0:b.k1], causal=b.causal,
                    scale=scale, backend=backend, mask=b.mask)
            return out, lse
        out, lse = accumulator(q)
        run_forward(q, k, v, blocks, out, lse, scale=scale, backend=backend)
        return out.to(q.dtype), lse
    out, lse = attention_forward(q[:, :, :block.q1], k[:, :, :block.k1], v[:, :, :block.k1],
                                 causal=block.causal, scale=scale, backend=backend,
                                 mask=block.mask, seq_major=seq_major)
    pad = q.shape[2] - block.q1  # padded query rows: out 0, lse -inf
    if pad:
        out, lse = F.pad(out, (0, 0, 0, pad)), F.pad(lse, (0, pad), value=float("-inf"))
    return out, lse


def whole_backward(dout, q, k, v, out, lse, *, causal: bool, seq_len: int | None, scale: float,
                   backend: str, mask: TokenMask | None = None, seq_major: bool = False):
    """dq, dk, dv of `whole_forward` (padded rows get 0; `seq_major` as there)."""
    blocks = pair_blocks("contig", causal, 0, 0, 1, q.shape[2], seq_len, mask)
    block = _single(blocks)
    if block is None and _disjoint(blocks, "q") and _disjoint(blocks, "k"):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, dq_b, dk_b, dv_b in block_grads(dout, q, k, v, out, lse, blocks, scale=scale,
                                               backend=backend):
            dq[:, :, b.q0:b.q1], dk[:, :, b.k0:b.k1], dv[:, :, b.k0:b.k1] = dq_b, dk_b, dv_b
        return dq, dk, dv
    if block is None:
        acc = torch.promote_types(q.dtype, torch.float32)
        dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
        run_backward(dout, q, k, v, out, lse, blocks, dq, dk, dv, scale=scale, backend=backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    n, m = block.q1, block.k1
    grads = attention_backward(dout[:, :, :n], q[:, :, :n], k[:, :, :m], v[:, :, :m],
                               out[:, :, :n], lse[:, :, :n], causal=block.causal, scale=scale,
                               backend=backend, mask=block.mask, seq_major=seq_major)
    if n == m == q.shape[2]:
        return grads
    dq, dk, dv = grads  # padded rows get 0
    return (F.pad(dq, (0, 0, 0, q.shape[2] - n)),
            *(F.pad(d, (0, 0, 0, k.shape[2] - m)) for d in (dk, dv)))


# ---------------------------------------------------------------------------------------------
# Custom ops
#
# Layout rule (what the fake implementations promise, and Inductor plans and asserts around):
# out, dq, dk, dv are seq-major - dense [b, s, h, e] seen as [b, h, s, e] (backends.as_seq_major)
# - and lse is dense [b, h, s]. Seq-major is FA4's own layout (it writes them so, no copy) and the
# layout of a projection's output [b, s, h·e] viewed as heads: `out.transpose(1, 2).reshape(b,
# s, h·e)` before o_proj, and dq, dk, dv on their way into the q/k/v projections' backward GEMMs,
# are views, not copies. Kernels that return another layout (CPU flash: dk, dv under GQA; math;
# padded or masked blocks) are copied into it. (Ulysses, which calls whole_forward itself, keeps
# FA4's head-major results: its all-to-all sends them without a copy.)
# ---------------------------------------------------------------------------------------------

def _local_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, seq_len: int | None,
              scale: float, backend: str, positions: torch.Tensor | None = None,
              segments: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
              window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = whole_forward(q, k, v, causal=causal, seq_len=seq_len, scale=scale, backend=backend,
                             mask=token_mask(causal, positions, segments, window, key_valid,
                                             q.device), seq_major=True)
    out, lse = as_seq_major(out), lse.contiguous()
    _log_layouts("local_attention", q=q, k=k, v=v, out=out, lse=lse)
    return out, lse


def _local_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool, seq_len: int | None,
                       scale: float, backend: str, positions: torch.Tensor | None = None,
                       segments: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                       window: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = whole_backward(dout, q, k, v, out, lse, causal=causal, seq_len=seq_len,
                                scale=scale, backend=backend,
                                mask=token_mask(causal, positions, segments, window, key_valid,
                                                q.device), seq_major=True)
    dq, dk, dv = as_seq_major(dq), as_seq_major(dk), as_seq_major(dv)
    _log_layouts("local_attention_backward", dout=dout, q=q, k=k, v=v, out=out, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


def _fake_out_lse(q, k, v, *options):
    return empty_seq_major(q.shape, q), lse_like(q)


def _fake_grads(dout, q, k, v, *options):
    return tuple(empty_seq_major(x.shape, x) for x in (q, k, v))


register_attention_op("seqshard::local_attention", _local_op, _local_backward_op,
                      fake=_fake_out_lse, backward_fake=_fake_grads)


def local_attention(q, k, v, *, causal: bool = True, seq_len: int | None = None,
                    scale: float | None = None, backend: str | None = None,
                    return_lse: bool = False, positions: torch.Tensor | None = None,
                    segments: torch.Tensor | None = None, window: int | None = None,
                    key_valid: torch.Tensor | None = None):
    """Attention of q [b, h, s, e] against k, v [b, hk, s, e] held whole on this rank.

    `seq_len`: positions >= seq_len are padding (their keys are masked, their outputs are 0).
    Structured masks (`positions`, `segments`, `window`, `key_valid`) as for `ring_attention`.
    """
    check_attention_inputs(q, k, v, world=1, order="contig", seq_len=seq_len,
                           algorithm="local_attention")
    positions, segments, window, key_valid = check_mask_inputs(
        q, world=1, seq_len=seq_len, positions=positions, segments=segments, window=window,
        key_valid=key_valid, algorithm="local_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse = torch.ops.seqshard.local_attention(q, k, v, causal, seq_len, scale, backend,
                                                  positions, segments, key_valid, window)
    return (out, lse) if return_lse else out
