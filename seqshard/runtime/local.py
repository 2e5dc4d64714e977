"""Local attention for layouts that split heads, not the sequence (Megatron-style, or after a
Ulysses switch the planner made explicit): every rank holds the whole sequence of its heads.

No communication: the ring code on a one-rank ring (ring.py with group=None), which gives the same
block masks, padding handling (`seq_len`) and fp32 merge as the distributed algorithms.
"""

from __future__ import annotations

import torch

from seqshard.runtime.opsupport import (check_attention_inputs, fresh_like, lse_like,
                                        register_autograd_saving_inputs, resolve_options)
from seqshard.runtime.ring import ring_backward, ring_forward

__all__ = ["local_attention"]


@torch.library.custom_op("seqshard::local_attention", mutates_args=())
def _local_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, seq_len: int | None,
              scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ring_forward(q, k, v, None, causal=causal, order="contig", seq_len=seq_len, scale=scale,
                        backend=backend)


@_local_op.register_fake
def _(q, k, v, *options):
    return fresh_like(q), lse_like(q)


@torch.library.custom_op("seqshard::local_attention_backward", mutates_args=())
def _local_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool, seq_len: int | None,
                       scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ring_backward(dout, q, k, v, out, lse, None, causal=causal, order="contig",
                         seq_len=seq_len, scale=scale, backend=backend)


@_local_backward_op.register_fake
def _(dout, q, k, v, *rest):
    return fresh_like(q), fresh_like(k), fresh_like(v)


register_autograd_saving_inputs(_local_op, torch.ops.seqshard.local_attention_backward)


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
