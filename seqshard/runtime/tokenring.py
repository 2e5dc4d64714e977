"""Token-ring attention: queries travel one way round the ring, partial results come straight back.

TokenRing (Wang et al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs
via Bidirectional Communication", 2024): K/V never move. On rank r of N, at step s = 1 … N-1, r holds
the query shard of rank (r - s) mod N (it arrived from r-1 and is forwarded to r+1 while r
computes), attends it to its own K/V, and sends the partial (out, lse) directly back to its owner
(r - s), while it receives from r + s the partial of its own queries against that rank's K/V.
Queries flow forward and results backward at the same time, using both directions of each link;
the owner merges the partials in fp32 (merge.py). The partial of a step is merged one step later,
so its transfer overlaps the next block's compute.

Backward: the bundle (q, dout, out) and the merged lse travel forward the same way; each rank
computes the block backward against its own K/V (dk, dv stay home: K/V never moved), and the dq of
the block goes straight back to its owner.

Both sides of every exchange derive it from the same schedule (blocks.pair_blocks), so a block that
the mask or the padding empties costs no message on either side.
"""

from __future__ import annotations

import torch

from seqshard.runtime.backends import attention_forward
from seqshard.runtime.blocks import Block, pair_blocks, run_backward, run_forward
from seqshard.runtime.collectives import resolve_group, start_p2p, start_shift
from seqshard.runtime.merge import accumulator, merge_
from seqshard.runtime.opsupport import (check_attention_inputs, lse_like, register_attention_op,
                                        resolve_options)

__all__ = ["tokenring_attention", "tokenring_forward", "tokenring_backward"]

_TAG_Q, _TAG_BACK = 3, 4


def _block(order, causal, q_rank, kv_rank, world, local_len, seq_len) -> Block | None:
    blocks = pair_blocks(order, causal, q_rank, kv_rank, world, local_len, seq_len)
    assert len(blocks) <= 1, blocks
    return blocks[0] if blocks else None


def _rows(x, b: Block):
    return x[:, :, b.q0:b.q1]


def tokenring_forward(q, k, v, group, *, causal: bool, order: str, seq_len: int | None, scale: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    world, rank = group.size(), group.rank()
    n = q.shape[2]
    out, lse = accumulator(q)
    q_held = q.contiguous()
    arriving = None  # (pending partial of my queries, its block)
    for step in range(world):
        owner = (rank - step) % world  # whose queries this rank holds now
        q_next = start_shift([q_held], 1, group, _TAG_Q) if step + 1 < world else None
        block = _block(order, causal, owner, rank, world, n, seq_len)
        if step == 0:
            run_forward(q_held, k, v, [block] if block else [], out, lse, scale=scale, backend=backend)
        else:
            sends = []
            if block is not None:
                part_out, part_lse = attention_forward(
                    _rows(q_held, block), k[:, :, block.k0:block.k1], v[:, :, block.k0:block.k1],
                    causal=block.causal, scale=scale, backend=backend)
                sends = [(part_out.contiguous(), owner), (part_lse.contiguous(), owner)]
            source = (rank + step) % world  # holds my queries now, against its own K/V
            mine = _block(order, causal, rank, source, world, n, seq_len)
            recvs = []
            if mine is not None:
                rows = _rows(q, mine)
                recvs = [(torch.empty(rows.shape, dtype=q.dtype, device=q.device), source),
                         (lse_like(rows), source)]
            if arriving is not None:
                _merge_arrived(out, lse, *arriving)
            arriving = (start_p2p(sends, recvs, group, _TAG_BACK), mine)
        if q_next is not None:
            (q_held,) = q_next.wait()
    if arriving is not None:
        _merge_arrived(out, lse, *arriving)
    return out.to(q.dtype), lse


def _merge_arrived(out, lse, pending, block):
    parts = pending.wait()
    if block is not None:
        merge_(_rows(out, block), _rows(lse, block), *parts)


def tokenring_backward(dout, q, k, v, out, lse, group, *, causal: bool, order: str,
                       seq_len: int | None, scale: float, backend: str):
    world, rank = group.size(), group.rank()
    n = q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    bundle = (torch.stack([q, dout.to(q.dtype), out]), lse.contiguous())  # travels forward
    arriving = None
    for step in range(world):
        owner = (rank - step) % world
        nxt = start_shift(bundle, 1, group, _TAG_Q) if step + 1 < world else None
        (q_h, dout_h, out_h), lse_h = bundle[0], bundle[1]
        block = _block(order, causal, owner, rank, world, n, seq_len)
        if step == 0:
            run_backward(dout_h, q_h, k, v, out_h, lse_h, [block] if block else [], dq, dk, dv,
                         scale=scale, backend=backend)
        else:
            sends = []
            if block is not None:
                part_dq = torch.zeros(_rows(q, block).shape, dtype=acc, device=q.device)
                local = Block(0, block.q1 - block.q0, block.k0, block.k1, block.causal)
                run_backward(_rows(dout_h, block), _rows(q_h, block), k, v, _rows(out_h, block),
                             _rows(lse_h, block), [local], part_dq, dk, dv, scale=scale,
                             backend=backend)
                sends = [(part_dq, owner)]
            source = (rank + step) % world
            mine = _block(order, causal, rank, source, world, n, seq_len)
            recvs = []
            if mine is not None:
                recvs = [(torch.empty(_rows(q, mine).shape, dtype=acc, device=q.device), source)]
            if arriving is not None:
                _add_arrived(dq, *arriving)
            arriving = (start_p2p(sends, recvs, group, _TAG_BACK), mine)
        if nxt is not None:
            bundle = tuple(nxt.wait())
    if arriving is not None:
        _add_arrived(dq, *arriving)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _add_arrived(dq, pending, block):
    parts = pending.wait()
    if block is not None:
        _rows(dq, block).add_(parts[0])


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

def _tokenring_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, causal: bool,
                  order: str, seq_len: int | None, scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return tokenring_forward(q, k, v, resolve_group(group_name), causal=causal, order=order,
                             seq_len=seq_len, scale=scale, backend=backend)


def _tokenring_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, group_name: str, causal: bool,
                           order: str, seq_len: int | None, scale: float, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tokenring_backward(dout, q, k, v, out, lse, resolve_group(group_name), causal=causal,
                              order=order, seq_len=seq_len, scale=scale, backend=backend)


register_attention_op("seqshard::tokenring_attention", _tokenring_op, _tokenring_backward_op)


def tokenring_attention(q, k, v, group=None, *, causal: bool = True, order: str = "contig",
                        seq_len: int | None = None, scale: float | None = None,
                        backend: str | None = None, return_lse: bool = False):
    """Exact attention of sequence-sharded q, k, v by passing queries (TokenRing); K/V stay put.

    Same arguments and result as `ring_attention`.
    """
    pg = resolve_group(group)
    check_attention_inputs(q, k, v, world=pg.size(), order=order, seq_len=seq_len,
                           algorithm="tokenring_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse = torch.ops.seqshard.tokenring_attention(q, k, v, pg.group_name, causal, order,
                                                      seq_len, scale, backend)
    return (out, lse) if return_lse else out
