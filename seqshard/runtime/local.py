"""Local attention for layouts that split heads, not the sequence (Megatron-style, or after a
Ulysses switch the planner made explicit): every rank holds the whole sequence of its heads.

No communication, and no fp32 accumulation: the single block of a one-rank ring (the same block
mask and padding handling, `seq_len`, as the distributed algorithms) goes straight to the kernel,
and so does its backward; through accumulators it would run measurably under the bare kernel
(docs/runtime-measurements.md). `whole_forward` / `whole_backward` are also Ulysses' local step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqshard.runtime.backends import attention_backward, attention_forward
from seqshard.runtime.blocks import pair_blocks
from seqshard.runtime.opsupport import (check_attention_inputs, register_attention_op,
                                        resolve_options)

__all__ = ["local_attention", "whole_forward", "whole_backward"]


def whole_forward(q, k, v, *, causal: bool, seq_len: int | None, scale: float, backend: str):
    """(out, lse) of q [b, g, S, e] over the whole sequence held here, in position order: the
    single block of a one-rank ring (blocks.pair_blocks), straight from the kernel."""
    (block,) = pair_blocks("contig", causal, 0, 0, 1, q.shape[2], seq_len)
    assert block.q0 == 0 and block.k0 == 0, block
    out, lse = attention_forward(q[:, :, :block.q1], k[:, :, :block.k1], v[:, :, :block.k1],
                                 causal=block.causal, scale=scale, backend=backend)
    pad = q.shape[2] - block.q1  # padded query rows: out 0, lse -inf
    if pad:
        out, lse = F.pad(out, (0, 0, 0, pad)), F.pad(lse, (0, pad), value=float("-inf"))
    return out, lse


def whole_backward(dout, q, k, v, out, lse, *, causal: bool, seq_len: int | None, scale: float,
                   backend: str):
    """dq, dk, dv of `whole_forward` (padded rows get 0)."""
    (block,) = pair_blocks("contig", causal, 0, 0, 1, q.shape[2], seq_len)
    n, m = block.q1, block.k1
    grads = attention_backward(dout[:, :, :n], q[:, :, :n], k[:, :, :m], v[:, :, :m],
                               out[:, :, :n], lse[:, :, :n], causal=block.causal, scale=scale,
                               backend=backend)
    pad = q.shape[2] - n
    return tuple(F.pad(d, (0, 0, 0, pad)) for d in grads) if pad else grads


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

def _local_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, seq_len: int | None,
              scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return whole_forward(q, k, v, causal=causal, seq_len=seq_len, scale=scale, backend=backend)


def _local_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool, seq_len: int | None,
                       scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return whole_backward(dout, q, k, v, out, lse, causal=causal, seq_len=seq_len, scale=scale,
                          backend=backend)


register_attention_op("seqshard::local_attention", _local_op, _local_backward_op)


def local_attention(q, k, v, *, causal: bool = True, seq_len: int | None = None,
                    scale: float | None = None, backend: str | None = None,
                    return_lse: bool = False):
    """Attention of q [b, h, s, e] against k, v [b, hk, s, e] held whole on this rank.

    `seq_len`: positions >= seq_len are padding (their keys are masked, their outputs are 0).
    """
    check_attention_inputs(q, k, v, world=1, order="contig", seq_len=seq_len,
                           algorithm="local_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse = torch.ops.seqshard.local_attention(q, k, v, causal, seq_len, scale, backend)
    return (out, lse) if return_lse else out
