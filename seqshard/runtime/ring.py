"""Ring attention: K/V blocks rotate around the ring while each rank attends its own queries.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(2023), with the zigzag layout for causal load balance (ring-flash-attn; Brandon et al., Striped
Attention, 2023; Llama-3 context parallelism) and the backward of ring-flash-attn /
DistFlashAttn (Li et al., 2023).

Forward, on rank r of N, for step s = 0 … N-1: r holds the K/V shard of rank (r - s) mod N (packed
into one buffer), posts its send to r+1 and the receive of the next shard from r-1, and while they
fly computes its blocks against the shard it holds (blocks.pair_blocks: masked-out blocks and
padding are never computed) and merges them into fp32 accumulators (merge.py).

Backward: the same rotation of K/V. Every block backward uses the merged global out and lse, so
its dq, dk, dv are exactly that block's share of the single-device gradients. dq stays home; the
fp32 dK/dV accumulator of each K/V shard travels with it: at step s rank r receives from r-1 the
accumulator of the shard it now holds (carrying the contributions of the ranks that shard visited
before), adds its own and sends it on; one more hop after the last step brings every accumulator
back to its owner.

The 2-D hybrid (ulysses.py) runs this over its ring axis on head-sharded super-shards.

Structured masks (documents, positions, window, key padding: masks.py): every step's blocks are
refined by the mask (blocks.refine), so blocks nothing sees are skipped and the rest run full,
causal or masked; the rotation itself does not change.
"""

from __future__ import annotations

import torch

from seqshard.runtime.blocks import add_rows, block_grads, pair_blocks, run_forward
from seqshard.runtime.collectives import resolve_group, start_shift
from seqshard.runtime.masks import TokenMask, token_mask
from seqshard.runtime.merge import accumulator
from seqshard.runtime.opsupport import (check_attention_inputs, check_mask_inputs,
                                        register_attention_op, resolve_options, unpack_pair)

__all__ = ["ring_attention", "ring_forward", "ring_backward"]

_TAG_KV, _TAG_DKV = 1, 2  # gloo matches sends to receives by tag; two streams are in flight


def ring_forward(q, k, v, group, *, causal: bool, order: str, seq_len: int | None, scale: float,
                 backend: str, mask: TokenMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of this rank's queries against the whole sequence; no checks, no autograd."""
    world, rank = group.size(), group.rank()
    out, lse = accumulator(q)
    kv = torch.stack([k, v])  # [2, b, hk, s/N, e]: one buffer travels
    for step in range(world):
        pending = start_shift([kv], 1, group, _TAG_KV) if step + 1 < world else None
        blocks = pair_blocks(order, causal, rank, (rank - step) % world, world, q.shape[2], seq_len,
                             mask)
        run_forward(q, kv[0], kv[1], blocks, out, lse, scale=scale, backend=backend)
        if pending is not None:
            (kv,) = pending.wait()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, group, *, causal: bool, order: str, seq_len: int | None,
                  scale: float, backend: str, mask: TokenMask | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's shards given the merged out and lse of `ring_forward`."""
    world, rank = group.size(), group.rank()
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv_pending = None
    for step in range(world):
        kv_pending = start_shift([kv], 1, group, _TAG_KV) if step + 1 < world else None
        blocks = pair_blocks(order, causal, rank, (rank - step) % world, world, q.shape[2], seq_len,
                             mask)
        grads = block_grads(dout, q, kv[0], kv[1], out, lse, blocks, scale=scale, backend=backend)
        add_rows(dq, grads, "q")
        # the accumulator of the shard held now: it arrives from rank - 1 while the kernels above
        # run, and this rank's share is added into it in place (no zero-fill, no second pass)
        if dkv_pending is None:
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        else:
            (dkv,) = dkv_pending.wait()
        add_rows(dkv, grads, "k")
        del grads
        dkv_pending = start_shift([dkv], 1, group, _TAG_DKV)
        if kv_pending is not None:
            (kv,) = kv_pending.wait()
    (dkv,) = dkv_pending.wait()  # the last hop brings each shard's accumulator home
    return (dq.to(q.dtype), *unpack_pair(dkv, k.dtype))


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

def _ring_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, causal: bool,
             order: str, seq_len: int | None, scale: float, backend: str,
             positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
             key_valid: torch.Tensor | None = None, window: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return ring_forward(q, k, v, resolve_group(group_name), causal=causal, order=order,
                        seq_len=seq_len, scale=scale, backend=backend,
                        mask=token_mask(causal, positions, segments, window, key_valid, q.device))


def _ring_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, group_name: str, causal: bool, order: str,
                      seq_len: int | None, scale: float, backend: str,
                      positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                      key_valid: torch.Tensor | None = None, window: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ring_backward(dout, q, k, v, out, lse, resolve_group(group_name), causal=causal,
                         order=order, seq_len=seq_len, scale=scale, backend=backend,
                         mask=token_mask(causal, positions, segments, window, key_valid, q.device))


register_attention_op("seqshard::ring_attention", _ring_op, _ring_backward_op)


def ring_attention(q, k, v, group=None, *, causal: bool = True, order: str = "contig",
                   seq_len: int | None = None, scale: float | None = None,
                   backend: str | None = None, return_lse: bool = False,
                   positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                   window: int | None = None, key_valid: torch.Tensor | None = None):
    """Exact attention of sequence-sharded q [b, h, s/N, e], k, v [b, hk, s/N, e] by a K/V ring.

    `order` is the layout of the shards ('contig' or 'zigzag'), `seq_len` the valid global length
    (padding is a suffix; padded rows come out 0). Returns out [b, h, s/N, e] (and lse [b, h, s/N]).

    Structured masks (MASKS.md; masks.py): `positions`, `segments` (document ids) and `key_valid`
    are [b or 1, seq_len] over the whole global sequence in natural order, the same on every rank;
    `window` an int. Query i sees key j iff same document, positions[j] <= positions[i] (if
    causal), positions[i] - positions[j] < window (if given) and key_valid[j]. A query that sees
    no key outputs 0.
    """
    pg = resolve_group(group)
    check_attention_inputs(q, k, v, world=pg.size(), order=order, seq_len=seq_len,
                           algorithm="ring_attention")
    positions, segments, window, key_valid = check_mask_inputs(
        q, world=pg.size(), seq_len=seq_len, positions=positions, segments=segments,
        window=window, key_valid=key_valid, algorithm="ring_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse = torch.ops.seqshard.ring_attention(q, k, v, pg.group_name, causal, order, seq_len,
                                                 scale, backend, positions, segments, key_valid,
                                                 window)
    return (out, lse) if return_lse else out
