"""Where each rank's tokens sit in the global sequence: the `contig` and `zigzag` layouts.

A global sequence padded to `S_pad` positions is split over the flattened rank index of a group
of N ranks (on a 2-D ring × ulysses mesh the flattened index is `ring_rank * N_ulysses +
ulysses_rank`, ring axis outer):

    contig   rank r holds [r·L, (r+1)·L),                        L = S_pad / N
    zigzag   the sequence is cut into 2N chunks of C = S_pad / (2N); rank r holds chunk r, then
             chunk 2N-1-r. Under a causal mask every rank then does the same work (the
             load-balanced layout of Striped/zigzag ring attention: Brandon et al. 2023,
             ring-flash-attn, Llama-3 context parallelism).

Padding: positions >= `seq_len` (the valid global length) are padding, always a suffix of the
global sequence. Local positions increase along the local shard, so the valid tokens of any shard
are a prefix of it (`valid_count` of them). `seq_len=None` means no padding.

These helpers are shared by the attention algorithms (block masks), code generation (RoPE
positions of local tokens) and redistributions (reordering a gathered sequence).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "ORDERS",
    "check_order",
    "layout_multiple",
    "padded_length",
    "check_local_len",
    "local_runs",
    "local_positions",
    "gathered_positions",
    "chunk_permutation",
    "sorting_permutations",
    "valid_count",
    "shard",
    "unshard",
]

ORDERS = ("contig", "zigzag")


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"sequence order must be one of {ORDERS}, got {order!r}")


def layout_multiple(order: str, world: int) -> int:
    """The global length must be a multiple of this: N for contig, 2N for zigzag."""
    check_order(order)
    return world if order == "contig" else 2 * world


def padded_length(seq_len: int, order: str, world: int) -> int:
    """The smallest padded global length >= seq_len that the layout accepts."""
    m = layout_multiple(order, world)
    return -(-seq_len // m) * m


def check_local_len(order: str, world: int, local_len: int) -> None:
    """Raise a ValueError naming the fix when a local shard length does not fit the layout."""
    check_order(order)
    if local_len < 1:
        raise ValueError(f"each rank needs at least one token, got a local length of {local_len}")
    if order == "zigzag" and local_len % 2:
        raise ValueError(
            f"zigzag needs the global length padded to a multiple of 2·N = {2 * world}; the local "
            f"length {local_len} is odd (pad with layout.padded_length(seq_len, 'zigzag', {world}) "
            "and pass seq_len)"
        )


def local_runs(order: str, rank: int, world: int, local_len: int) -> list[tuple[int, int, int]]:
    """The contiguous runs of a shard: (local start, global start, length), in local order."""
    check_local_len(order, world, local_len)
    if order == "contig":
        return [(0, rank * local_len, local_len)]
    c = local_len // 2
    return [(0, rank * c, c), (c, (2 * world - 1 - rank) * c, c)]


def local_positions(order: str, rank: int, world: int, local_len: int) -> torch.Tensor:
    """The global positions of the tokens a rank holds, in local order (a LongTensor on CPU)."""
    return torch.cat([torch.arange(g, g + n) for _, g, n in local_runs(order, rank, world, local_len)])


def gathered_positions(order: str, ranks, world: int, local_len: int) -> torch.Tensor:
    """Global positions of the shards of `ranks` (flattened indices) concatenated in that order."""
    return torch.cat([local_positions(order, r, world, local_len) for r in ranks])


def chunk_permutation(order: str, world: int, local_len: int, ranks=None) -> torch.Tensor:
    """Index that sorts a gathered sequence by global position: `gathered.index_select(dim, perm)`.

    `gathered` is the concatenation of the shards of `ranks` (default: all ranks, in rank order), as
    an all-gather or an all-to-all produces it. With all ranks the result is the natural order.
    """
    ranks = range(world) if ranks is None else ranks
    return torch.argsort(gathered_positions(order, ranks, world, local_len))


@functools.lru_cache(maxsize=256)
def sorting_permutations(order: str, world: int, local_len: int, ranks: tuple[int, ...],
                         device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(perm, inverse) on `device` that sort the concatenated shards of `ranks` by position and
    undo it; (None, None) when they are already sorted (contig). Cached: no host-to-device copy
    per call."""
    perm = chunk_permutation(order, world, local_len, ranks)
    if torch.equal(perm, torch.arange(len(perm))):
        return None, None
    return perm.to(device), torch.argsort(perm).to(device)


def valid_count(order: str, rank: int, world: int, local_len: int, seq_len: int | None) -> int:
    """How many of a rank's tokens are not padding (they are the first ones of the shard)."""
    if seq_len is None:
        return local_len
    return sum(min(max(seq_len - g, 0), n) for _, g, n in local_runs(order, rank, world, local_len))


def shard(x: torch.Tensor, dim: int, order: str, rank: int, world: int) -> torch.Tensor:
    """This rank's shard of a tensor whose `dim` holds the whole (padded) global sequence."""
    if x.shape[dim] % layout_multiple(order, world):
        raise ValueError(
            f"dim {dim} has length {x.shape[dim]}, not a multiple of {layout_multiple(order, world)} "
            f"for {order} over {world} ranks: pad it to layout.padded_length(...)"
        )
    positions = local_positions(order, rank, world, x.shape[dim] // world)
    return x.index_select(dim, positions.to(x.device))


def unshard(gathered: torch.Tensor, dim: int, order: str, world: int) -> torch.Tensor:
    """Natural order from the concatenation (rank order) of all shards along `dim`."""
    perm = chunk_permutation(order, world, gathered.shape[dim] // world)
    return gathered.index_select(dim, perm.to(gathered.device))
