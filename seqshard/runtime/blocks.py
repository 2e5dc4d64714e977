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

Structured masks (masks.py: documents, positions, sliding window, key padding). Given a
`TokenMask`, both functions first build the blocks above (by index causal only when the mask's
positions increase along every document, else full), then `refine` them: each block splits into
per-document blocks (varlen), and each of those is classified by its dense mask, built from the
per-token tensors at its rows' global indices (layout.local_positions):

      every key visible to every query     full block
      exactly the causal square            causal block
      nothing visible                      dropped (never computed, never sent)
      anything else                        masked block: the kernel gets the bool mask

A masked block longer than _TILE on a side whose tiles are mostly empty (a window much shorter
than the block, many short documents) is cut into tiles, classified the same way, so only the
tiles the mask's edges cross stay on the masked kernel. Packed
documents under a causal mask run on the full and causal kernels only. Without a mask the blocks
and kernels are exactly the ones above.

`run_forward` / `run_backward` evaluate a block list with a local backend, merging into fp32
accumulators (forward) or summing into fp32 gradient buffers (backward).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from seqshard.codegen.kernels import accumulate
from seqshard.runtime import backends
from seqshard.runtime.layout import local_runs, valid_count
from seqshard.runtime.masks import TokenMask, global_index
from seqshard.runtime.merge import merge_

__all__ = ["Block", "pair_blocks", "pair_span", "gathered_blocks", "refine", "run_forward",
           "run_backward", "block_grads", "add_rows"]

# More per-document blocks than this in one block (many short documents): keep the block whole,
# with its dense mask (its tiles then skip what lies between documents).
_MAX_DOCUMENT_BLOCKS = 128
# A masked block longer than _TILE on a side is cut into tiles of that size, each classified
# again, when at least _EMPTY_TILES of them are empty (a window much shorter than the block, a
# padded prefix): the skipped tiles are never computed, and most others are full or causal. A
# denser mask stays one masked kernel: on an H200 (bf16, 16 heads of 128, S = 8192) each tile
# cost ~0.4 ms of launches and merges, ~7× its attention; window 2048 took 16.5 ms in tiles of
# 1024 and 40 ms in tiles of 512 against 2.0 ms for causal.
_TILE = 1024
_EMPTY_TILES = 0.75


@dataclass(frozen=True)
class Block:
    """Query rows [q0, q1) attend key rows [k0, k1): full, causal (then square), or under `mask`
    (bool [B|1, 1, q1-q0, k1-k0], True = visible)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        assert self.q1 > self.q0 and self.k1 > self.k0, self
        assert not self.causal or self.q1 - self.q0 == self.k1 - self.k0, self
        assert self.mask is None or (not self.causal and self.mask.shape[-2:] == (
            self.q1 - self.q0, self.k1 - self.k0)), self

    def __str__(self) -> str:
        kind = " causal" if self.causal else " masked" if self.mask is not None else ""
        return f"q[{self.q0}:{self.q1}]×k[{self.k0}:{self.k1}]{kind}"


def _by_index(causal: bool, mask: TokenMask | None) -> bool:
    """Whether the block structure may take the causal mask by index (masks.py)."""
    return causal and (mask is None or mask.index_causal)


def pair_blocks(order: str, causal: bool, q_rank: int, kv_rank: int, world: int, local_len: int,
                seq_len: int | None, mask: TokenMask | None = None) -> list[Block]:
    """Blocks of q_rank's query shard against kv_rank's key shard: at most one block, or with a
    `mask` that block refined."""
    blocks = _pair_structure(order, _by_index(causal, mask), q_rank, kv_rank, world, local_len,
                             seq_len)
    if mask is None or not blocks:
        return blocks
    return refine(blocks, mask, global_index(order, q_rank, world, local_len, mask.device),
                  global_index(order, kv_rank, world, local_len, mask.device))


def pair_span(order: str, causal: bool, q_rank: int, kv_rank: int, world: int, local_len: int,
              seq_len: int | None, mask: TokenMask | None = None) -> Block | None:
    """The block that `pair_blocks` (with the same mask) stays inside, or None when it is empty:
    what both ends of a transfer agree on without classifying the mask."""
    blocks = _pair_structure(order, _by_index(causal, mask), q_rank, kv_rank, world, local_len,
                             seq_len)
    assert len(blocks) <= 1, blocks
    return blocks[0] if blocks else None


def _pair_structure(order, causal, q_rank, kv_rank, world, local_len, seq_len) -> list[Block]:
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
                    seq_len: int | None, mask: TokenMask | None = None) -> list[Block]:
    """Blocks of a rank's query shard against all keys in natural (global position) order; with
    a `mask`, refined."""
    blocks = _gathered_structure(order, _by_index(causal, mask), rank, world, local_len, seq_len)
    if mask is None or not blocks:
        return blocks
    return refine(blocks, mask, global_index(order, rank, world, local_len, mask.device),
                  global_index("contig", 0, 1, world * local_len, mask.device))


def _gathered_structure(order, causal, rank, world, local_len, seq_len) -> list[Block]:
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


def refine(blocks: list[Block], mask: TokenMask, q_index, k_index, *,
           tile: int | None = None) -> list[Block]:
    """Split `blocks` into per-document blocks and classify each by its dense mask (module
    docstring); a masked block larger than `tile` (default _TILE) on a side is cut into tiles,
    classified again. q_index, k_index: (on the CPU, on the mask's device) global index of every
    query and key row. Two device-to-host copies at most."""
    tile = _TILE if tile is None else tile
    (q_host, q_dev), (k_host, k_dev) = q_index, k_index
    candidates = [c for b in blocks for c in _document_blocks(b, mask, q_host, k_host)]
    refined = _classify(candidates, [mask.visible(q_dev[c.q0:c.q1], k_dev[c.k0:c.k1])
                                     for c in candidates])
    return [t for b in refined for t in (
        _tiles(b, tile) if b.mask is not None and max(b.q1 - b.q0, b.k1 - b.k0) > tile else [b])]


def _tiles(b: Block, tile: int) -> list[Block]:
    """Masked block b cut into tiles of `tile` rows and keys, each classified from counts taken
    over all tiles at once (one sync): visible pairs, and pairs that differ from the causal
    square; [b] when too few tiles are empty (_EMPTY_TILES)."""
    n, m = b.q1 - b.q0, b.k1 - b.k0
    rows, cols = -(-n // tile), -(-m // tile)
    seen = b.mask.new_zeros((b.mask.shape[0], rows * tile, cols * tile))
    seen[:, :n, :m] = b.mask[:, 0]
    inside = torch.zeros(rows * tile, cols * tile, dtype=torch.bool, device=seen.device)
    inside[:n, :m] = True
    causal = torch.ones(tile, tile, dtype=torch.bool, device=seen.device).tril().repeat(rows, cols)
    by_tile = (seen.shape[0], rows, tile, cols, tile)
    visible = seen.view(by_tile).sum((0, 2, 4))
    off_causal = ((seen != causal) & inside).view(by_tile).sum((0, 2, 4))
    counts, offs = visible.flatten().tolist(), off_causal.flatten().tolist()
    if sum(c == 0 for c in counts) < _EMPTY_TILES * len(counts):
        return [b]
    tiles = []
    for (i, j), count, off in zip(itertools.product(range(rows), range(cols)),
                                  counts, offs):
        q0, k0 = i * tile, j * tile
        h, w = min(tile, n - q0), min(tile, m - k0)
        if count == 0:
            continue
        every = count == seen.shape[0] * h * w
        is_causal = h == w and off == 0 and not every
        tiles.append(Block(b.q0 + q0, b.q0 + q0 + h, b.k0 + k0, b.k0 + k0 + w, is_causal,
                           None if every or is_causal else b.mask[..., q0:q0 + h, k0:k0 + w]))
    return tiles


def _classify(candidates, seen) -> list[Block]:
    """Each candidate block with its dense mask: full, causal, masked, or dropped (one sync)."""
    if not candidates:
        return []
    flags = torch.stack([torch.stack([s.any(), s.all(), _is_causal_square(s)]) for s in seen])
    classified = []
    for c, s, (some, every, causal) in zip(candidates, seen, flags.tolist()):
        if some:
            classified.append(Block(c.q0, c.q1, c.k0, c.k1, causal and not every,
                                    None if every or causal else s))
    return classified


def _document_blocks(b: Block, mask: TokenMask, q_host, k_host) -> list[Block]:
    """Block b cut into (query run × key run) blocks of the same document (in some batch row),
    none above the diagonal of a causal block; b itself (uncut) without documents or when there
    would be more than _MAX_DOCUMENT_BLOCKS."""
    whole = [Block(b.q0, b.q1, b.k0, b.k1, False)]
    q_idx, k_idx = q_host[b.q0:b.q1], k_host[b.k0:b.k1]
    q_runs, q_docs = mask.pieces(q_idx)
    if q_docs is None:
        return whole
    k_runs, k_docs = mask.pieces(k_idx)
    pairs = (q_docs[:, :, None] == k_docs[:, None, :]).any(0)  # [query runs, key runs]
    if b.causal:  # by index: a key run that starts after a query run's last token is invisible
        last_q = q_idx[torch.tensor([e - 1 for _, e in q_runs])]
        first_k = k_idx[torch.tensor([a for a, _ in k_runs])]
        pairs &= first_k[None, :] <= last_q[:, None]
    pairs = pairs.nonzero().tolist()
    if len(pairs) > _MAX_DOCUMENT_BLOCKS:
        return whole
    return [Block(b.q0 + q_runs[i][0], b.q0 + q_runs[i][1], b.k0 + k_runs[j][0],
                  b.k0 + k_runs[j][1], False) for i, j in pairs]


def _is_causal_square(seen: torch.Tensor) -> torch.Tensor:
    """Is a dense mask [B|1, 1, n, n] exactly the causal square (for every batch row)?"""
    n, m = seen.shape[-2:]
    if n != m:
        return torch.zeros((), dtype=torch.bool, device=seen.device)
    return (seen == torch.ones(n, n, dtype=torch.bool, device=seen.device).tril()).all()


def _rows(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x[:, :, a:b]  # the sequence dim of [b, h, s, e] and of lse [b, h, s]


def run_forward(q, k, v, blocks, out_acc, lse_acc, *, scale: float, backend: str) -> None:
    """Attend q to (k, v) over `blocks`, merging each result into the accumulators in place."""
    for b in blocks:
        out, lse = backends.attention_forward(
            _rows(q, b.q0, b.q1), _rows(k, b.k0, b.k1), _rows(v, b.k0, b.k1),
            causal=b.causal, scale=scale, backend=backend, mask=b.mask)
        merge_(_rows(out_acc, b.q0, b.q1), _rows(lse_acc, b.q0, b.q1), out, lse)


def block_grads(dout, q, k, v, out, lse, blocks, *, scale: float, backend: str):
    """[(block, dq, dk, dv)]: each block's gradients (given the merged out and lse), in the
    kernel's dtype, for the caller to add where they belong."""
    return [(b, *backends.attention_backward(
        _rows(dout, b.q0, b.q1), _rows(q, b.q0, b.q1), _rows(k, b.k0, b.k1),
        _rows(v, b.k0, b.k1), _rows(out, b.q0, b.q1), _rows(lse, b.q0, b.q1),
        causal=b.causal, scale=scale, backend=backend, mask=b.mask)) for b in blocks]


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
    if accumulate.usable(acc, x):
        accumulate.add_rows_(acc, x)
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
