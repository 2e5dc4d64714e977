"""All-gather-KV attention: every rank gathers the whole K/V and attends its own queries to it.

The context parallelism of Llama 3 (Dubey et al., "The Llama 3 Herd of Models", 2024, §3.3.2) and
of the LSS Transformer (Wang et al., 2023). K and V (packed into one buffer) are all-gathered
along the sequence, put into natural order (a local permutation under zigzag), and the local
queries attend to them with blocks.gathered_blocks: under a causal mask a query run at global
offset g needs keys [0, g) in full and [g, g + n) causally; padding is cut away.

`head_stride` bounds memory: K/V are gathered `head_stride` kv heads at a time (with their query
heads), the next group's all-gather in flight while the current one computes, so at most two
groups of gathered K/V are alive.

Backward: per head group, gather K/V again (recompute rather than keep S·hk·e per layer), compute
every block's gradients against the merged out and lse, put the dK/dV of the whole sequence back in
rank order and reduce-scatter it (the adjoint of the all-gather) in fp32.

Structured masks (masks.py): the blocks are refined once per call (blocks.refine), for every
head group.
"""

from __future__ import annotations

import torch

from seqshard.runtime.blocks import gathered_blocks, run_backward, run_forward
from seqshard.runtime.collectives import resolve_group, start_all_gather, start_reduce_scatter
from seqshard.runtime.layout import sorting_permutations
from seqshard.runtime.masks import TokenMask, token_mask
from seqshard.runtime.merge import accumulator
from seqshard.runtime.opsupport import (check_attention_inputs, check_mask_inputs,
                                        register_attention_op, resolve_options, unpack_pair)

__all__ = ["allgather_attention", "allgather_forward", "allgather_backward"]

_SEQ = 3  # the sequence dim of a packed [2, b, hk, s, e] K/V buffer


def _head_groups(kv_heads: int, head_stride: int | None) -> list[tuple[int, int]]:
    stride = kv_heads if head_stride is None else head_stride
    return [(h, min(h + stride, kv_heads)) for h in range(0, kv_heads, stride)]


def _gather(k, v, heads, group):
    h0, h1 = heads
    return start_all_gather(torch.stack([k[:, h0:h1], v[:, h0:h1]]), _SEQ, group)


def allgather_forward(q, k, v, group, *, causal: bool, order: str, seq_len: int | None, scale: float,
                      backend: str, head_stride: int | None, mask: TokenMask | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    world, rank = group.size(), group.rank()
    rep = q.shape[1] // k.shape[1]
    perm, _ = sorting_permutations(order, world, q.shape[2], tuple(range(world)), q.device)
    blocks = gathered_blocks(order, causal, rank, world, q.shape[2], seq_len, mask)
    out, lse = accumulator(q)
    groups = _head_groups(k.shape[1], head_stride)
    pending = _gather(k, v, groups[0], group)
    for i, (h0, h1) in enumerate(groups):
        kv = pending.wait()  # [2, b, h1-h0, s, e]
        if i + 1 < len(groups):
            pending = _gather(k, v, groups[i + 1], group)
        if perm is not None:
            kv = kv.index_select(_SEQ, perm)
        heads = slice(h0 * rep, h1 * rep)
        run_forward(q[:, heads], kv[0], kv[1], blocks, out[:, heads], lse[:, heads], scale=scale,
                    backend=backend)
    return out.to(q.dtype), lse


def allgather_backward(dout, q, k, v, out, lse, group, *, causal: bool, order: str,
                       seq_len: int | None, scale: float, backend: str, head_stride: int | None,
                       mask: TokenMask | None = None):
    world, rank = group.size(), group.rank()
    rep = q.shape[1] // k.shape[1]
    perm, back = sorting_permutations(order, world, q.shape[2], tuple(range(world)), q.device)
    blocks = gathered_blocks(order, causal, rank, world, q.shape[2], seq_len, mask)
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.empty((2, *k.shape), dtype=acc, device=k.device)
    groups = _head_groups(k.shape[1], head_stride)
    pending = _gather(k, v, groups[0], group)
    scattering = None  # (reduce-scatter in flight, its head group)
    for i, (h0, h1) in enumerate(groups):
        kv = pending.wait()
        if i + 1 < len(groups):
            pending = _gather(k, v, groups[i + 1], group)
        if perm is not None:
            kv = kv.index_select(_SEQ, perm)
        heads = slice(h0 * rep, h1 * rep)
        dkv_full = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        run_backward(dout[:, heads], q[:, heads], kv[0], kv[1], out[:, heads], lse[:, heads], blocks,
                     dq[:, heads], dkv_full[0], dkv_full[1], scale=scale, backend=backend)
        if back is not None:
            dkv_full = dkv_full.index_select(_SEQ, back)  # rank-major again, as gathered
        if scattering is not None:
            _store(dkv, *scattering)
        scattering = (start_reduce_scatter(dkv_full, _SEQ, group), (h0, h1))
    _store(dkv, *scattering)
    return (dq.to(q.dtype), *unpack_pair(dkv, k.dtype))


def _store(dkv, pending, heads):
    dkv[:, :, heads[0]:heads[1]] = pending.wait()


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

def _allgather_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, causal: bool,
                  order: str, seq_len: int | None, scale: float, backend: str,
                  head_stride: int | None, positions: torch.Tensor | None = None,
                  segments: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                  window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return allgather_forward(q, k, v, resolve_group(group_name), causal=causal, order=order,
                             seq_len=seq_len, scale=scale, backend=backend, head_stride=head_stride,
                             mask=token_mask(causal, positions, segments, window, key_valid,
                                             q.device))


def _allgather_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, group_name: str, causal: bool,
                           order: str, seq_len: int | None, scale: float, backend: str,
                           head_stride: int | None, positions: torch.Tensor | None = None,
                           segments: torch.Tensor | None = None,
                           key_valid: torch.Tensor | None = None, window: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return allgather_backward(dout, q, k, v, out, lse, resolve_group(group_name), causal=causal,
                              order=order, seq_len=seq_len, scale=scale, backend=backend,
                              head_stride=head_stride,
                              mask=token_mask(causal, positions, segments, window, key_valid,
                                              q.device))


register_attention_op("seqshard::allgather_attention", _allgather_op, _allgather_backward_op)


def allgather_attention(q, k, v, group=None, *, causal: bool = True, order: str = "contig",
                        seq_len: int | None = None, scale: float | None = None,
                        backend: str | None = None, head_stride: int | None = None,
                        return_lse: bool = False, positions: torch.Tensor | None = None,
                        segments: torch.Tensor | None = None, window: int | None = None,
                        key_valid: torch.Tensor | None = None):
    """Exact attention of sequence-sharded q, k, v by all-gathering K/V (Llama-3 / LSS style).

    `head_stride` gathers that many kv heads at a time to bound memory (None: all at once).
    Otherwise the same arguments (structured masks included) and result as `ring_attention`.
    """
    pg = resolve_group(group)
    check_attention_inputs(q, k, v, world=pg.size(), order=order, seq_len=seq_len,
                           algorithm="allgather_attention")
    if head_stride is not None and head_stride < 1:
        raise ValueError(f"allgather_attention: head_stride must be >= 1 kv heads, got {head_stride}")
    positions, segments, window, key_valid = check_mask_inputs(
        q, world=pg.size(), seq_len=seq_len, positions=positions, segments=segments,
        window=window, key_valid=key_valid, algorithm="allgather_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse = torch.ops.seqshard.allgather_attention(q, k, v, pg.group_name, causal, order, seq_len,
                                                      scale, backend, head_stride, positions,
                                                      segments, key_valid, window)
    return (out, lse) if return_lse else out
