"""Attention masks as blocks: which rows of a query shard attend which rows of a key shard.

Every distributed algorithm reduces its mask to a short list of `Block`s, each either *full* or
*causal on a square* (query i sees key j <= i), with padding already cut away: the query rows and
key rows of a block are all valid tokens. Local kernels then never see any other mask, fully
masked blocks are never computed, and padded query rows are never touched (their output stays 0,
their lse -inf, their gradient 0), which is how an odd global length stays exact.

Two shapes of problem occur:

* `pair_blocks` — a query shard against another rank's key shard, both in the same layout
  (ring, token ring, the ring axis of the hybrid). With a causal mask (C = L/2 for zigzag):

      layout   q rank vs kv rank   blocks
      contig   equal               causal square over the valid rows
               kv < q              full
               kv > q              none
      zigzag   equal               causal square (positions increase along a shard)
               kv < q              all queries × first key chunk (chunk kv), full
               kv > q              second query chunk (2N-1-q) × all keys, full

  so under zigzag every pair of distinct ranks costs the same half block (ring-flash-attn's
  zigzag ring; Brandon et al., Striped Attention, 2023).

* `gathered_blocks` — a query shard against the whole key sequence in natural order (all-gather
  K/V): each query run at global offset g gets a full block over keys [0, g) and a causal square
  over [g, g + n).

(Ulysses and local attention hold the whole sequence: theirs is the single block of a one-rank
`pair_blocks`, straight to the kernel; local.py.)

`run_forward` / `run_backward` evaluate a block list with a local backend, merging into fp32
accumulators (forward) or summing into fp32 gradient buffers (backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqshard.runtime import backends, fused
from seqshard.runtime.layout import local_runs, valid_count
from seqshard.runtime.merge import merge_

__all__ = ["Block", "pair_blocks", "gathered_blocks", "run_forward", "run_backward", "block_grads",
           "add_rows"]


@dataclass(frozen=True)
class Block:
    """Query rows [q0, q1) attend key rows [k0, k1), full or causal (then square)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    def __post_init__(self):
        assert self.q1 > self.q0 and self.k1 > self.k0, self
        assert not self.causal or self.q1 - self.q0 == self.k1 - self.k0, self

    def __str__(self) -> str:
        return f"q[{self.q0}:{self.q1}]×k[{self.k0}:{self.k1}]{' causal' if self.causal else ''}"


def pair_blocks(order: str, causal: bool, q_rank: int, kv_rank: int, world: int, local_len: int,
                seq_len: int | None) -> list[Block]:
    """Blocks of q_rank's query shard against kv_rank's key shard (at most one block)."""
    q_valid = valid_count(order, q_rank, world, local_len, seq_len)
    kv_valid = valid_count(order, kv_rank, world, local_len, seq_len)
    if q_valid == 0 or kv_valid == 0:
        return []
    if not causal:
        return [Block(0, q_valid, 0, kv_valid, False)]
    if q_rank == kv_rank:
        return [Block(0, q_valid, 0, q_valid, True)]
    if order == "contig":
        return [Block(0, q_valid, 0, kv_valid, False)] if kv_rank < q_rank else []
    half = local_len // 2
    if kv_rank < q_rank:
        return [Block(0, q_valid, 0, min(kv_valid, half), False)]
    return [Block(half, q_valid, 0, kv_valid, False)] if q_valid > half else []


def gathered_blocks(order: str, causal: bool, rank: int, world: int, local_len: int,
                    seq_len: int | None) -> list[Block]:
    """Blocks of a rank's query shard against all keys in natural (global position) order."""
    seq = world * local_len if seq_len is None else seq_len
    if not causal:
        q_valid = valid_count(order, rank, world, local_len, seq_len)
        return [Block(0, q_valid, 0, seq, False)] if q_valid else []
    blocks = []
    for start, g, n in local_runs(order, rank, world, local_len):
        n_valid = min(max(seq - g, 0), n)
        if n_valid == 0:
            continue
        if g > 0:
            blocks.append(Block(start, start + n_valid, 0, g, False))
        blocks.append(Block(start, start + n_valid, g, g + n_valid, True))
    return blocks


def _rows(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x[:, :, a:b]  # the sequence dim of [b, h, s, e] and of lse [b, h, s]


def run_forward(q, k, v, blocks, out_acc, lse_acc, *, scale: float, backend: str) -> None:
    """Attend q to (k, v) over `blocks`, merging each result into the accumulators in place."""
    for b in blocks:
        out, lse = backends.attention_forward(
            _rows(q, b.q0, b.q1), _rows(k, b.k0, b.k1), _rows(v, b.k0, b.k1),
            causal=b.causal, scale=scale, backend=backend)
        merge_(_rows(out_acc, b.q0, b.q1), _rows(lse_acc, b.q0, b.q1), out, lse)


def block_grads(dout, q, k, v, out, lse, blocks, *, scale: float, backend: str):
    """[(block, dq, dk, dv)]: each block's gradients (given the merged out and lse), in the
    kernel's dtype, for the caller to add where they belong."""
    return [(b, *backends.attention_backward(
        _rows(dout, b.q0, b.q1), _rows(q, b.q0, b.q1), _rows(k, b.k0, b.k1),
        _rows(v, b.k0, b.k1), _rows(out, b.q0, b.q1), _rows(lse, b.q0, b.q1),
        causal=b.causal, scale=scale, backend=backend)) for b in blocks]


def add_rows(acc: torch.Tensor, grads, which: str) -> None:
    """Add the query ('q') or key ('k') rows of `block_grads`' dq (which='q') or dk/dv into acc
    (dq [b, h, s, e]; or packed dK/dV [2, b, hk, s, e] for which='k')."""
    for b, dq, dk, dv in grads:
        if which == "q":
            _add(_rows(acc, b.q0, b.q1), dq)
        else:
            _add(_rows(acc[0], b.k0, b.k1), dk)
            _add(_rows(acc[1], b.k0, b.k1), dv)


def _add(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x; fp32 += bf16 on CUDA as one vectorized Triton kernel (torch's mixed-dtype add
    is not vectorized)."""
    if fused.usable(acc, x):
        fused.add_rows_(acc, x)
    else:
        acc.add_(x)


def run_backward(dout, q, k, v, out, lse, blocks, dq_acc, dk_acc, dv_acc, *, scale: float,
                 backend: str) -> None:
    """Add the gradients of every block (given the merged out and lse) into the buffers."""
    for b, dq, dk, dv in block_grads(dout, q, k, v, out, lse, blocks, scale=scale,
                                     backend=backend):
        _rows(dq_acc, b.q0, b.q1).add_(dq)
        _rows(dk_acc, b.k0, b.k1).add_(dk)
        _rows(dv_acc, b.k0, b.k1).add_(dv)
