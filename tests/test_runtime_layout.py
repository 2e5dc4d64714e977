"""Sequence layouts and block masks, checked against brute force over positions.

The block lists of blocks.py are compared element by element with the mask they stand for: query
at global position i attends key j iff both are valid (< seq_len) and (j <= i or not causal). A
mismatch names the layout, ranks and lengths; it means a missed or double-counted block (wrong
zigzag half, padding not cut) and would show up as wrong attention in every algorithm.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from seqshard.runtime import layout
from seqshard.runtime.blocks import gathered_blocks, pair_blocks


@pytest.mark.parametrize("order,world", itertools.product(layout.ORDERS, (1, 2, 3, 4, 8)))
def test_shards_partition_the_sequence(order, world):
    local_len = 2 * 3
    positions = layout.gathered_positions(order, range(world), world, local_len)
    assert sorted(positions.tolist()) == list(range(world * local_len))
    for rank in range(world):
        pos = layout.local_positions(order, rank, world, local_len)
        assert (pos[1:] > pos[:-1]).all(), "local positions must increase (valid tokens = a prefix)"
        for seq_len in range(world * local_len + 1):
            assert layout.valid_count(order, rank, world, local_len, seq_len) == int((pos < seq_len).sum())


def test_zigzag_balances_causal_work():
    world, local_len = 4, 8
    work = [int(sum(p + 1 for p in layout.local_positions("zigzag", r, world, local_len).tolist()))
            for r in range(world)]
    assert len(set(work)) == 1, work
    contig = [int(sum(p + 1 for p in layout.local_positions("contig", r, world, local_len).tolist()))
              for r in range(world)]
    assert len(set(contig)) == world


@pytest.mark.parametrize("order", layout.ORDERS)
def test_shard_unshard_and_permutation_round_trip(order):
    world = 4
    x = torch.arange(2 * 16 * 3).reshape(2, 16, 3)
    shards = [layout.shard(x, 1, order, r, world) for r in range(world)]
    assert torch.equal(layout.unshard(torch.cat(shards, 1), 1, order, world), x)
    perm = layout.chunk_permutation(order, world, 4)
    assert torch.equal(layout.gathered_positions(order, range(world), world, 4)[perm], torch.arange(16))
    # a subset of ranks in gather order (a Ulysses group inside a 2-D mesh) sorts by position
    sub = layout.chunk_permutation(order, world, 4, ranks=[2, 3])
    assert (layout.gathered_positions(order, [2, 3], world, 4)[sub].diff() > 0).all()


def test_layout_errors_name_the_fix():
    with pytest.raises(ValueError, match="sequence order must be one of"):
        layout.local_positions("striped", 0, 2, 4)
    with pytest.raises(ValueError, match=r"multiple of 2·N = 4.*padded_length"):
        layout.check_local_len("zigzag", 2, 3)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        layout.shard(torch.zeros(2, 12), 1, "zigzag", 0, 4)
    assert layout.padded_length(13, "zigzag", 4) == 16
    assert layout.padded_length(16, "contig", 4) == 16


def _mask_from_blocks(blocks, n_q, n_k):
    mask = torch.zeros(n_q, n_k, dtype=torch.int64)
    for b in blocks:
        sub = torch.ones(b.q1 - b.q0, b.k1 - b.k0, dtype=torch.int64)
        mask[b.q0:b.q1, b.k0:b.k1] += sub.tril() if b.causal else sub
    return mask


def _true_mask(q_pos, k_pos, causal, seq_len):
    qp, kp = q_pos.unsqueeze(1), k_pos.unsqueeze(0)
    mask = (qp < seq_len) & (kp < seq_len)
    if causal:
        mask &= kp <= qp
    return mask.to(torch.int64)


@pytest.mark.parametrize("order,world,causal", itertools.product(layout.ORDERS, (1, 2, 3, 4), (True, False)))
def test_pair_blocks_equal_the_mask(order, world, causal):
    local_len = 4
    ranks = range(world)
    for seq_len, q_rank, kv_rank in itertools.product(range(1, world * local_len + 1), ranks, ranks):
        blocks = pair_blocks(order, causal, q_rank, kv_rank, world, local_len, seq_len)
        got = _mask_from_blocks(blocks, local_len, local_len)
        want = _true_mask(layout.local_positions(order, q_rank, world, local_len),
                          layout.local_positions(order, kv_rank, world, local_len), causal, seq_len)
        assert torch.equal(got, want), (order, world, causal, seq_len, q_rank, kv_rank,
                                        [str(b) for b in blocks])
        assert len(blocks) <= 1


@pytest.mark.parametrize("order,world,causal", itertools.product(layout.ORDERS, (1, 2, 4), (True, False)))
def test_gathered_blocks_equal_the_mask(order, world, causal):
    local_len = 4
    for seq_len, rank in itertools.product(range(1, world * local_len + 1), range(world)):
        blocks = gathered_blocks(order, causal, rank, world, local_len, seq_len)
        got = _mask_from_blocks(blocks, local_len, world * local_len)
        want = _true_mask(layout.local_positions(order, rank, world, local_len),
                          torch.arange(world * local_len), causal, seq_len)
        assert torch.equal(got, want), (order, world, causal, seq_len, rank, [str(b) for b in blocks])
