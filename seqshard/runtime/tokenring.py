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

Both sides of every exchange derive it from the same schedule (blocks.pair_span), so a block that
the mask or the padding empties costs no message on either side.

Structured masks (masks.py): the exchanges keep the rows of the unrefined block (pair_span), which
both sides know without classifying the mask; the side that computes refines it
(blocks.pair_blocks) and returns the span's rows (a row no refined block reaches: out 0, lse -inf).
"""

from __future__ import annotations

import dataclasses

import torch

from seqshard.runtime.backends import attention_forward
from seqshard.runtime.blocks import Block, pair_blocks, pair_span, run_backward, run_forward
from seqshard.runtime.collectives import resolve_group, start_p2p, start_shift
from seqshard.runtime.masks import TokenMask, token_mask
from seqshard.runtime.merge import accumulator, merge_
from seqshard.runtime.opsupport import (check_attention_inputs, check_mask_inputs, lse_like,
                                        register_attention_op, resolve_options)

__all__ = ["tokenring_attention", "tokenring_forward", "tokenring_backward"]

_TAG_Q, _TAG_BACK = 3, 4


def _rows(x, b: Block):
    return x[:, :, b.q0:b.q1]


def _blocks_in(span: Block, mask: TokenMask | None, *where) -> list[Block]:
    """The blocks of the pair `where` = (order, causal, q_rank, kv_rank, world, local_len,
    seq_len) with query rows counted from span.q0."""
    if mask is None:
        return [dataclasses.replace(span, q0=0, q1=span.q1 - span.q0)]
    return [dataclasses.replace(b, q0=b.q0 - span.q0, q1=b.q1 - span.q0)
            for b in pair_blocks(*where, mask)]


def _partial(q_rows, k, v, blocks, *, scale, backend):
    """(out, lse) of q_rows over `blocks`: straight from the kernel when one block covers every
    row, else merged in fp32 (rows no block reaches: out 0, lse -inf)."""
    if len(blocks) == 1 and blocks[0].q0 == 0 and blocks[0].q1 == q_rows.shape[2]:
        b = blocks[0]
        return attention_forward(q_rows, k[:, :, b.k0:b.k1], v[:, :, b.k0:b.k1], causal=b.causal,
                                 scale=scale, backend=backend, mask=b.mask)
    out, lse = accumulator(q_rows)
    run_forward(q_rows, k, v, blocks, out, lse, scale=scale, backend=backend)
    return out.to(q_rows.dtype), lse


def tokenring_forward(q, k, v, group, *, causal: bool, order: str, seq_len: int | None, scale: float,
                      backend: str, mask: TokenMask | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    world, rank = group.size(), group.rank()
    n = q.shape[2]
    out, lse = accumulator(q)
    q_held = q.contiguous()
    arriving = None  # (pending partial of my queries, its block)
    for step in range(world):
        owner = (rank - step) % world  # whose queries this rank holds now
        q_next = start_shift([q_held], 1, group, _TAG_Q) if step + 1 < world else None
        where = (order, causal, owner, rank, world, n, seq_len)
        if step == 0:
            run_forward(q_held, k, v, pair_blocks(*where, mask), out, lse, scale=scale,
                        backend=backend)
        else:
            sends = []
            span = pair_span(*where, mask)
            if span is not None:
                part_out, part_lse = _partial(_rows(q_held, span), k, v,
                                              _blocks_in(span, mask, *where), scale=scale,
                                              backend=backend)
                sends = [(part_out.contiguous(), owner), (part_lse.contiguous(), owner)]
            source = (rank + step) % world  # holds my queries now, against its own K/V
            mine = pair_span(order, causal, rank, source, world, n, seq_len, mask)
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
                       seq_len: int | None, scale: float, backend: str,
                       mask: TokenMask | None = None):
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
        where = (order, causal, owner, rank, world, n, seq_len)
        if step == 0:
            run_backward(dout_h, q_h, k, v, out_h, lse_h, pair_blocks(*where, mask), dq, dk, dv,
                         scale=scale, backend=backend)
        else:
            sends = []
            span = pair_span(*where, mask)
            if span is not None:
                part_dq = torch.zeros(_rows(q, span).shape, dtype=acc, device=q.device)
                run_backward(_rows(dout_h, span), _rows(q_h, span), k, v, _rows(out_h, span),
                             _rows(lse_h, span), _blocks_in(span, mask, *where), part_dq, dk, dv,
                             scale=scale, backend=backend)
                sends = [(part_dq, owner)]
            source = (rank + step) % world
            mine = pair_span(order, causal, rank, source, world, n, seq_len, mask)
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
                  order: str, seq_len: int | None, scale: float, backend: str,
                  positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                  key_valid: torch.Tensor | None = None, window: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return tokenring_forward(q, k, v, resolve_group(group_name), causal=causal, order=order,
                             seq_len=seq_len, scale=scale, backend=backend,
                             mask=token_mask(causal, positions, segments, window, key_valid,
                                             q.device))


def _tokenring_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, group_name: str, causal: bool,
                           order: str, seq_len: int | None, scale: float, backend: str,
                           positions: torch.Tensor | None = None,
                           segments: torch.Tensor | None = None,
                           key_valid: torch.Tensor | None = None, window: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tokenring_backward(dout, q, k, v, out, lse, resolve_group(group_name), causal=causal,
                              order=order, seq_len=seq_len, scale=scale, backend=backend,
                              mask=token_mask(causal, positions, segments, window, key_valid,
                                              q.device))


register_attention_op("seqshard::tokenring_attention", _tokenring_op, _tokenring_backward_op)


def tokenring_attention(q, k, v, group=None, *, causal: bool = True, order: str = "contig",
                        seq_len: int | None = None, scale: float | None = None,
                        backend: str | None = None, return_lse: bool = False,
                        positions: torch.Tensor | None = None,
                        segments: torch.Tensor | None = None, window: int | None = None,
                        key_valid: torch.Tensor | None = None):
    """Exact attention of sequence-sharded q, k, v by passing queries (TokenRing); K/V stay put.

    Same arguments (structured masks included) and result as `ring_attention`.
    """
    pg = resolve_group(group)
    check_attention_inputs(q, k, v, world=pg.size(), order=order, seq_len=seq_len,
                           algorithm="tokenring_attention")
    positions, segments, window, key_valid = check_mask_inputs(
        q, world=pg.size(), seq_len=seq_len, positions=positions, segments=segments,
        window=window, key_valid=key_valid, algorithm="tokenring_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse = torch.ops.seqshard.tokenring_attention(q, k, v, pg.group_name, causal, order,
                                                      seq_len, scale, backend, positions,
                                                      segments, key_valid, window)
    return (out, lse) if return_lse else out
