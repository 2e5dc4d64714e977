"""Ulysses attention (sequence → heads all-to-all) and the 2-D hybrid (Ulysses × ring).

Ulysses: DeepSpeed-Ulysses (Jacobs et al., 2023). Over a group of N ranks, one all-to-all turns
sequence-sharded q [b, h, s/N, e] into head-sharded q [b, h/N, s, e]; local attention runs over the
whole sequence; a second all-to-all turns the output back. Communication per rank stays constant
when sequence and ranks grow together.

Hybrid: USP (Fang & Zhao, "A Unified Sequence Parallelism Approach for Long Context Generative
AI", 2024), LoongTrain's 2-D attention (Gu et al., 2024), WallFacer's multi-ring. On a 2-D mesh the
sequence is laid out over the flattened index ring_rank·N_u + ulysses_rank. The all-to-all over the
Ulysses group gathers the shards of ranks ring_rank·N_u … ring_rank·N_u + N_u - 1; sorted by
position, they are exactly ring rank ring_rank's shard of the same layout over N_r ranks (for
zigzag: super-chunks ring_rank and 2N_r-1-ring_rank of N_u·C tokens). Ring attention (ring.py) then
runs over the ring group on these head-sharded super-shards. Plain Ulysses is the same exchange
around attention over the whole sequence held locally (a one-rank ring's single block, computed
straight by the kernel, with no fp32 accumulator).

Pipelining (`chunks` = G). Each rank's h/N heads after the exchange are cut into G chunks of
g = h/(N·G) heads. Every exchange towards heads is posted up front, chunk by chunk, in the order
the chunks need them; chunk c's attention waits only for its own arrivals and runs while later
chunks are in flight, and its output is posted back (heads → sequence) as soon as it is computed.
The backward posts every chunk of dout up front and sends each chunk's dq (and dk, dv) back while
the next chunk's backward runs. What stays exposed is the first chunk in and the last chunk out,

    forward    a2a(q/G + kv/Gk)  +  a2a((out + lse)/G)
    backward   a2a(dout/G)       +  a2a(dq/G + dkv/Gk)

as long as each chunk's compute covers the next chunk's traffic; G = 1 is plain Ulysses.

Head order. Query heads are laid out [Gk, N, G/Gk, g] and kv heads [Gk, N, hk/(N·Gk)] (outer to
inner; Gk = the pieces K/V travel in, below): in chunk c = c'·(G/Gk) + i rank j gets the query
heads at (c', j, i, :), and in K/V piece c' the kv heads at (c', j, :). Every rank thus holds whole
GQA groups in the local order of the plain exchange (local q head l reads local kv head
l // (h/hk)), and chunk c's send buffer is a strided view of q: with batch 1 and Gk = G it needs
no copy, and the output's arrivals land in place in the result. With Gk = 1 rank j holds the
contiguous heads j·h/N … (j+1)·h/N - 1 of the plain exchange.

K/V heads (GQA/MQA; q head i uses kv head i // (h/hk)):
  * hk divisible by N_u ('scatter'): K/V move at kv heads (all-to-all), in Gk pieces, Gk the
    largest divisor of G that divides hk/N_u; a piece is posted with the first chunk that needs it
    and its dk, dv go back after its last chunk (`kv_pieces`).
  * otherwise (N_u > hk, or not a divisor): all-gather K/V whole, before the first chunk, and keep
    the kv heads this rank's query heads need: one head when each rank's query heads share a single
    kv head ('one'), else one kv head per query head ('replicate'); Gk = 1.
  A chunk whose query heads do not split evenly over its kv heads gets one kv head per query head.
The adjoints: all-to-all back, or scatter-add into all kv heads and reduce-scatter.

Zigzag input: after the exchange the sequence sits in rank-major shard order. The arrivals are
moved into position order by copies of whole token runs (one strided copy for contig, N + 1 for
zigzag), and the send buffers of the way back are built by the reverse copies; for contig, batch 1
and one head per chunk the buffers are used in place and nothing is copied.

Saved for backward: the head-layout q, packed K/V, out and lse (the same bytes as the local
shards), so the backward spends one all-to-all on dout and one on dq per chunk, and two on dk, dv
per K/V piece.

The rotary embedding in the pack (`cos`, `sin`). Given the tables of this rank's tokens, q and k
arrive before their rotation and are rotated while their send buffers are written (one kernel,
codegen/kernels/a2a_layout.py, where torch runs a copy and ~5 elementwise passes); the rows of a
block are this rank's tokens, so the tables are indexed by the local token on every route (the
all-gather routes rotate K while stacking it with V). The backward rotates dq and dk by the
transpose while unpacking the arrivals of the way back (dk of the all-gather routes after the
reduce-scatter, in fp32). The saved q_h, kv_h are the rotated ones. The generated program passes
the tables where the model rotates q and k just before a Ulysses attention (codegen/rope.py).

Structured masks (masks.py): the per-token tensors cover the whole sequence and are the same on
every rank, so nothing about them is exchanged. After the exchange a Ulysses rank holds whole
sequences of its heads and builds its blocks from the full tensors (local.whole_forward); the
hybrid's ring refines its super-shard blocks as the ring does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqshard.codegen.kernels import a2a_layout
from seqshard.runtime.collectives import (Pending, resolve_group, start_all_gather,
                                          start_all_to_all_single, start_reduce_scatter)
from seqshard.runtime.layout import chunk_permutation, sorting_permutations
from seqshard.runtime.local import whole_backward, whole_forward
from seqshard.runtime.masks import TokenMask, token_mask
from seqshard.runtime.peer import check_transport, start_pull, transport as resolve_transport
from seqshard.runtime.opsupport import (check_attention_inputs, check_mask_inputs, fresh_like,
                                        lse_like, register_attention_op, resolve_options,
                                        unpack_pair)
from seqshard.runtime.ring import ring_backward, ring_forward

__all__ = ["ulysses_attention", "hybrid_attention", "kv_route", "kv_heads_after_exchange",
           "kv_pieces", "default_chunks"]

_HEADS, _SEQ = 1, 2  # dims of [b, h, s, e]; a packed K/V buffer [2, b, hk, s, e] has them at +1

# default_chunks: (chunks, fewest heads per rank) in order of preference, and the fewest rows
# (batch · heads · global sequence) a chunk keeps so that its kernel still fills the GPU
_CHUNK_CHOICES = ((2, 2),)
_MIN_CHUNK_ROWS = 1 << 17


def kv_route(heads: int, kv_heads: int, world: int) -> str:
    """How K/V reach the head layout: 'scatter' (all-to-all at kv heads), 'one' (all-gather, keep
    the single kv head this rank needs) or 'replicate' (all-gather, one kv head per query head)."""
    if kv_heads % world == 0:
        return "scatter"
    return "one" if (heads // kv_heads) % (heads // world) == 0 else "replicate"


def kv_heads_after_exchange(heads: int, kv_heads: int, world: int) -> int:
    route = kv_route(heads, kv_heads, world)
    return {"scatter": kv_heads // world, "one": 1, "replicate": heads // world}[route]


def kv_pieces(heads: int, kv_heads: int, world: int, chunks: int) -> int:
    """How many pieces K/V travel in when the queries go in `chunks`: the largest divisor of
    `chunks` that divides the kv heads per rank ('scatter'); 1 on the all-gather routes."""
    if kv_route(heads, kv_heads, world) != "scatter":
        return 1
    per_rank = kv_heads // world
    return max(d for d in range(1, chunks + 1) if chunks % d == 0 and per_rank % d == 0)


def default_chunks(device, batch: int, heads: int, seq: int, world: int,
                   transport: str = "nccl") -> int:
    """`chunks` when none is given: `pipelined_chunks` when the exchanges run on copy engines
    ('peer'), else 1.

    Off CUDA gloo runs collectives on the cores that compute: nothing to overlap. Over NCCL more
    chunks were slower: NCCL's kernels share the SMs that cuDNN's attention fills and stretch it
    by more than they take alone. Copy engines take no SMs (peer.py), so there the chunks overlap
    (docs/runtime-measurements.md).
    """
    if transport != "peer":
        return 1
    return pipelined_chunks(batch, heads, seq, world)


def pipelined_chunks(batch: int, heads: int, seq: int, world: int) -> int:
    """The chunk count to try when pipelining: 2 when it divides the heads per rank and each chunk
    keeps >= 2^17 rows (batch · its heads · seq), so that its kernel still fills the GPU. More
    chunks were slower over copy engines (docs/runtime-measurements.md)."""
    local = heads // world
    for chunks, fewest in _CHUNK_CHOICES:
        rows = batch * local * seq // chunks
        if local >= fewest and local % chunks == 0 and rows >= _MIN_CHUNK_ROWS:
            return chunks
    return 1


# ---------------------------------------------------------------------------------------------
# The exchange: which heads and tokens go where
# ---------------------------------------------------------------------------------------------

_Run = tuple[int, int, int, int, int]  # (position, first rank, local token, tokens, ranks)
_Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) [s, e] of the local tokens, or None


@dataclass(frozen=True)
class _Exchange:
    """The sequence → heads switch over one Ulysses group, in head chunks, and its inverse."""

    group: dist.ProcessGroup
    route: str
    kv_heads: int
    chunks: int                    # G: query head chunks per rank
    pieces: int                    # Gk: the pieces K/V travel in (1 on the all-gather routes)
    runs: tuple[_Run, ...]         # arrivals (rank-major) -> position order, see `_runs`
    in_order: bool                 # the arrivals are in position order already (contig)
    kv_index: torch.Tensor | None  # kv heads kept after an all-gather ('one'/'replicate')
    perm: torch.Tensor | None      # all-gathered (rank-major) sequence -> position order
    back: torch.Tensor | None      # its inverse
    transport: str = "nccl"        # 'nccl' all-to-all, or pulls by copy engine (peer.py)


def _exchange(group, heads, kv_heads, order, ring_place, local_len, device, chunks,
              how: str = "nccl") -> _Exchange:
    """`ring_place`: (ring rank, ring size) on a 2-D mesh, None for plain Ulysses; `how`: the
    resolved transport."""
    n_u = group.size()
    ring_rank, ring_size = (0, 1) if ring_place is None else ring_place
    first = ring_rank * n_u  # flattened index of this Ulysses group's first rank
    ranks = tuple(range(first, first + n_u))
    perm, back = sorting_permutations(order, ring_size * n_u, local_len, ranks, device)
    route = kv_route(heads, kv_heads, n_u)
    kv_index = None if route == "scatter" else _kv_index(heads, kv_heads, n_u, group.rank(), device)
    return _Exchange(group, route, kv_heads, chunks, kv_pieces(heads, kv_heads, n_u, chunks),
                     _runs(order, ring_size * n_u, local_len, ranks), perm is None, kv_index,
                     perm, back, how)


@functools.lru_cache(maxsize=256)
def _kv_index(heads: int, kv_heads: int, world: int, rank: int, device: torch.device) -> torch.Tensor:
    """The kv heads a rank keeps after all-gathering K/V: the one its query heads share ('one'),
    or one per query head ('replicate')."""
    per_rank = heads // world
    needed = torch.arange(rank * per_rank, (rank + 1) * per_rank) // (heads // kv_heads)
    return (needed[:1] if kv_route(heads, kv_heads, world) == "one" else needed).to(device)


@functools.lru_cache(maxsize=256)
def _runs(order: str, world: int, local_len: int, ranks: tuple[int, ...]) -> tuple[_Run, ...]:
    """The arrivals of an all-to-all (the shards of `ranks` in rank order) in position order, as
    copies of token runs: (p, j, t, n, count) says positions [p, p + count·n) are tokens
    [t, t + n) of the shards of ranks j … j + count - 1 (group ranks), in that order."""
    perm = chunk_permutation(order, world, local_len, ranks)  # position -> arrival index
    starts = torch.ones(len(perm), dtype=torch.bool)
    starts[1:] = (perm[1:] != perm[:-1] + 1) | (perm[1:] % local_len == 0)
    bounds = [*starts.nonzero().flatten().tolist(), len(perm)]
    runs: list[_Run] = []
    for p, end in zip(bounds, bounds[1:]):
        j, t = divmod(int(perm[p]), local_len)
        if runs:
            p0, j0, t0, n0, count = runs[-1]
            if (j, t, end - p, p) == (j0 + count, t0, n0, p0 + n0 * count):
                # the same tokens of the next rank, right after: one strided copy covers both
                runs[-1] = (p0, j0, t0, n0, count + 1)
                continue
        runs.append((p, j, t, end - p, 1))
    return tuple(runs)


def _rows(index: int, size: int) -> slice:
    return slice(index * size, (index + 1) * size)


def _head_blocks(x: torch.Tensor, n: int, pieces: int, chunks: int, c: int) -> torch.Tensor:
    """Chunk c of sequence-layout x [b, heads, s, ...] as [N, b, heads/(N·chunks), s, ...]: block j
    holds the heads rank j gets in chunk c (heads laid out [pieces, N, chunks/pieces, g]). A view."""
    per_piece = chunks // pieces
    heads = x.unflatten(_HEADS, (pieces, n, per_piece, -1))  # [b, pieces, N, per_piece, g, s, ...]
    return heads[:, c // per_piece, :, c % per_piece].movedim(1, 0)


def _split_seq(x_h: torch.Tensor, n: int) -> torch.Tensor:
    """Head-layout x_h [b, g, S, ...] as [N, b, g, S/N, ...] (a view): what the all-to-all moves
    when the arrivals are in position order."""
    return x_h.unflatten(_SEQ, (n, -1)).movedim(_SEQ, 0)


def _arrivals_to_positions(recv: torch.Tensor, dest: torch.Tensor, runs) -> torch.Tensor:
    """recv [N, b, g, s, ...] (rank-major) -> dest [b, g, S, ...] (position order).

    One strided copy per token run (one for contig, N + 1 for zigzag): on CUDA a Triton kernel
    with wide loads (codegen/kernels/a2a_layout.py; torch's cat and strided copy are not
    vectorized); elsewhere torch's strided copies."""
    for p, j, t, n, count in runs:
        _copy(dest[:, :, p:p + count * n].unflatten(_SEQ, (count, n)),
              recv[j:j + count, :, :, t:t + n].movedim(0, _SEQ))
    return dest


def _positions_to_arrivals(src: torch.Tensor, send: torch.Tensor, runs) -> torch.Tensor:
    """The inverse: src [b, g, S, ...] (position order) -> send [N, b, g, s, ...] (rank-major)."""
    for p, j, t, n, count in runs:
        _copy(send[j:j + count, :, :, t:t + n],
              src[:, :, p:p + count * n].unflatten(_SEQ, (count, n)).movedim(_SEQ, 0))
    return send


def _copy(dst: torch.Tensor, src: torch.Tensor, rope: _Rope = None, *,
          transpose: bool = False) -> torch.Tensor:
    """dst <- src, rotated by `rope` (transpose: by its transpose) where given."""
    return a2a_layout.copy_(dst, src, *(rope or (None, None)), transpose=transpose)


def _rotated(blocks: torch.Tensor, rope: _Rope) -> torch.Tensor:
    """blocks [N, b, g, s, e] rotated into a new contiguous buffer: the pack with the rotary
    embedding (one kernel); `blocks` itself without `rope`."""
    return blocks if rope is None else _copy(blocks.new_empty(blocks.shape), blocks, rope)


def _then(pending: Pending, finish) -> Pending:
    """`pending`, with `finish(its result)` applied on wait."""
    return Pending([], pending, lambda p: finish(p.wait()))


_ALL = slice(None)


def _heads_plan(ex: _Exchange, rank: int):
    """What `rank` pulls towards heads: (peer, index into peer's blocks [N, b, g, s, ...], index
    into dest [b, g, S, ...]) for every run of arrivals, in position order."""
    plan = []
    for p, j, t, n, count in ex.runs:
        for i in range(count):
            plan.append((j + i, (rank, _ALL, _ALL, slice(t, t + n)),
                         (_ALL, _ALL, slice(p + i * n, p + (i + 1) * n))))
    return plan


def _seq_plan(ex: _Exchange, rank: int):
    """What `rank` pulls back to the sequence split: (peer, index into peer's x_h [b, g, S, ...],
    index into blocks [N, b, g, s, ...]): its own tokens' runs, from every peer."""
    plan = []
    for p, j, t, n, count in ex.runs:
        if j <= rank < j + count:
            at = p + (rank - j) * n
            plan += [(peer, (_ALL, _ALL, slice(at, at + n)), (peer, _ALL, _ALL, slice(t, t + n)))
                     for peer in range(ex.group.size())]
    return plan


def _start_plan(stage: torch.Tensor, dest: torch.Tensor, plan_of, ex: _Exchange) -> Pending:
    """Run this rank's pull plan over the exchange's transport ('peer' or 'emulated')."""
    pulls = [(peer, src, dest[dst]) for peer, src, dst in plan_of(ex.group.rank())]
    return start_pull(stage, pulls, ex.group, dest, ex.transport)


def _start_to_heads(blocks: torch.Tensor, dest: torch.Tensor, ex: _Exchange,
                    rope: _Rope = None) -> Pending:
    """Post blocks [N, b, g, s, ...] (block j to rank j), rotated by `rope` on the way; the
    arrivals land in dest [b, g, S, ...] in position order. Result: dest."""
    blocks = _rotated(blocks, rope)
    if ex.transport != "nccl":  # every run of arrivals straight into place
        return _start_plan(blocks, dest, functools.partial(_heads_plan, ex), ex)
    in_place = _split_seq(dest, ex.group.size())
    send = a2a_layout.contiguous(blocks)  # the pack: one kernel (a view at batch 1, one chunk)
    if ex.in_order and in_place.is_contiguous():
        return Pending([start_all_to_all_single(send, in_place, ex.group)], dest)
    recv = blocks.new_empty(blocks.shape)
    return _then(start_all_to_all_single(send, recv, ex.group),
                 lambda r: _arrivals_to_positions(r, dest, ex.runs))


def _start_to_seq(x_h: torch.Tensor, blocks: torch.Tensor, ex: _Exchange,
                  rope: _Rope = None) -> Pending:
    """Post head-layout x_h [b, g, S, ...] back to the sequence split; the arrivals land in blocks
    [N, b, g, s, ...], a view into the sequence-layout result, rotated by the transpose of
    `rope` (the gradient of a rotation done by `_start_to_heads`). Result: blocks."""
    if ex.transport != "nccl":  # this rank's tokens, from every peer's x_h, straight into place
        if rope is None:
            return _start_plan(x_h, blocks, functools.partial(_seq_plan, ex), ex)
        return _then(_start_plan(x_h, blocks.new_empty(blocks.shape),
                                 functools.partial(_seq_plan, ex), ex),
                     lambda recv: _copy(blocks, recv, rope, transpose=True))
    send = _split_seq(x_h, ex.group.size())
    if not (ex.in_order and send.is_contiguous()):
        send = _positions_to_arrivals(x_h, x_h.new_empty(blocks.shape), ex.runs)
    if rope is not None:  # the unpack with the transposed rotation: one kernel
        return _then(start_all_to_all_single(send, torch.empty_like(send), ex.group),
                     lambda recv: _copy(blocks, recv, rope, transpose=True))
    if blocks.is_contiguous():
        return start_all_to_all_single(send, blocks, ex.group)
    return _then(start_all_to_all_single(send, torch.empty_like(send), ex.group),
                 lambda recv: _copy(blocks, recv))  # the unpack: one kernel


def _start_kv_piece(k, v, kv_h, piece: int, ex: _Exchange, rope: _Rope = None) -> Pending:
    """Post K/V piece `piece` towards heads (K rotated by `rope`), landing in kv_h [2, b, m, S,
    e]; on the all-gather routes the whole K/V (the only piece) into a new buffer. Result: kv_h."""
    if ex.route != "scatter":
        def keep(kv):
            return _reorder(kv.index_select(_HEADS + 1, ex.kv_index), ex.perm, _SEQ + 1)
        kv = k.new_empty((2, *k.shape))  # torch.stack([rope(k), v]), the rotation on the way
        _copy(kv[0], k, rope)
        kv[1].copy_(v)
        return _then(start_all_gather(kv, _SEQ + 1, ex.group), keep)
    n, rows = ex.group.size(), _rows(piece, kv_h.shape[2] // ex.pieces)
    blocks = (_head_blocks(x, n, ex.pieces, ex.pieces, piece) for x in (k, v))
    return Pending([_start_to_heads(x, kv_h[i][:, rows], ex, rope if i == 0 else None)
                    for i, x in enumerate(blocks)], kv_h)


def _kv_reduce_scatter(dkv_h: torch.Tensor, ex: _Exchange) -> torch.Tensor:
    """The adjoint of the all-gather routes: [2, b, m, s, e] -> [2, b, hk, s/N, e]. Several query
    heads (here and on other ranks) share each kv head: sum them in fp32."""
    dkv_h = _reorder(dkv_h, ex.back, _SEQ + 1)
    b, _, s, e = dkv_h.shape[1:]
    acc = torch.promote_types(dkv_h.dtype, torch.float32)
    full = torch.zeros((2, b, ex.kv_heads, s, e), dtype=acc, device=dkv_h.device)
    full.index_add_(_HEADS + 1, ex.kv_index, dkv_h.to(acc))
    return start_reduce_scatter(full, _SEQ + 1, ex.group).wait()


def _reorder(x: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    return x if index is None else x.index_select(dim, index)


def _kv_slot(c: int, g: int, rep: int, device: torch.device):
    """The local kv heads chunk c's query heads [c·g, (c+1)·g) read (local q head l reads kv head
    l // rep): a slice when they split evenly, else an index of one kv head per query head."""
    if g % rep == 0 or rep % g == 0:
        first = c * g // rep
        return slice(first, first + max(g // rep, 1))
    return _kv_slot_index(c, g, rep, device)


@functools.lru_cache(maxsize=256)
def _kv_slot_index(c: int, g: int, rep: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(c * g, (c + 1) * g) // rep).to(device)


def _take_heads(x: torch.Tensor, slot) -> torch.Tensor:
    return x[:, slot] if isinstance(slot, slice) else x.index_select(_HEADS, slot)


def _add_heads(acc: torch.Tensor, slot, x: torch.Tensor) -> None:
    if isinstance(slot, slice):
        acc[:, slot].add_(x)
    else:
        acc.index_add_(_HEADS, slot, x.to(acc.dtype))


# ---------------------------------------------------------------------------------------------
# Attention over head chunks: the whole sequence held here, or the ring of the hybrid
# ---------------------------------------------------------------------------------------------

def _attention(ring_group, **options):
    """(forward, backward) over head-layout chunks: the ring over `ring_group` (hybrid), or the
    whole sequence held here (ring_group None)."""
    if ring_group is None:
        del options["order"]  # one rank holds the whole sequence in position order
        return (functools.partial(whole_forward, **options),
                functools.partial(whole_backward, **options))
    return (functools.partial(ring_forward, group=ring_group, **options),
            functools.partial(ring_backward, group=ring_group, **options))


# ---------------------------------------------------------------------------------------------
# Forward and backward (ring_group None: plain Ulysses)
# ---------------------------------------------------------------------------------------------

def _ring_place(ring_group):
    return None if ring_group is None else (ring_group.rank(), ring_group.size())


def _plan_exchange(ulysses_group, ring_group, b, h, hk, order, s, device, chunks, transport):
    """The exchange with its transport resolved, and `chunks` = 0 resolved to the default."""
    n = ulysses_group.size()
    how = resolve_transport(device, ulysses_group, transport)
    if chunks == 0:
        chunks = default_chunks(device, b, h, n * s, n, how)
    return _exchange(ulysses_group, h, hk, order, _ring_place(ring_group), s, device, chunks, how)


def hybrid_forward(q, k, v, ring_group, ulysses_group, *, causal: bool, order: str,
                   seq_len: int | None, scale: float, backend: str, chunks: int = 1,
                   transport: str = "nccl", mask: TokenMask | None = None, rope: _Rope = None):
    """(out, lse, q_h, kv_h, out_h, lse_h): the result and what the backward needs, with the
    exchanges pipelined over `chunks` head chunks (module docstring; 0: the default for the
    transport). `rope`: (cos, sin) [s, e] rotating q and k in the packs (module docstring); the
    saved q_h, kv_h are the rotated ones."""
    b, h, s, e = q.shape
    n = ulysses_group.size()
    ex = _plan_exchange(ulysses_group, ring_group, b, h, k.shape[1], order, s, q.device, chunks,
                        transport)
    chunks = ex.chunks
    attend, _ = _attention(ring_group, causal=causal, order=order, seq_len=seq_len, scale=scale,
                           backend=backend, mask=mask)
    g, per_piece = h // n // chunks, chunks // ex.pieces
    m = kv_heads_after_exchange(h, k.shape[1], n)
    q_h = q.new_empty((b, h // n, n * s, e))
    kv_h = k.new_empty((2, b, m, n * s, e)) if ex.route == "scatter" else None
    out_h, lse_h = torch.empty_like(q_h), lse_like(q_h)
    out, lse = fresh_like(q), lse_like(q)

    # Post every exchange towards heads now, in the order the chunks need them (NCCL runs them in
    # that order); chunk c waits only for its own.
    q_in, kv_in = [], []
    for c in range(chunks):
        blocks = _head_blocks(q, n, ex.pieces, chunks, c)
        q_in.append(_start_to_heads(blocks, q_h[:, _rows(c, g)], ex, rope))
        if c % per_piece == 0:
            kv_in.append(_start_kv_piece(k, v, kv_h, c // per_piece, ex, rope))

    back = []
    for c in range(chunks):
        q_c = q_in[c].wait()
        if c % per_piece == 0:
            kv_h = kv_in[c // per_piece].wait()
        slot = _kv_slot(c, g, h // n // m, q.device)
        out_c, lse_c = attend(q_c, _take_heads(kv_h[0], slot), _take_heads(kv_h[1], slot))
        out_h[:, _rows(c, g)].copy_(out_c)
        lse_h[:, _rows(c, g)].copy_(lse_c)
        back += [_start_to_seq(out_c, _head_blocks(out, n, ex.pieces, chunks, c), ex),
                 _start_to_seq(lse_c, _head_blocks(lse, n, ex.pieces, chunks, c), ex)]
    for pending in back:
        pending.wait()
    return out, lse, q_h, kv_h, out_h, lse_h


def hybrid_backward(dout, q_h, kv_h, out_h, lse_h, kv_heads: int, ring_group, ulysses_group, *,
                    causal: bool, order: str, seq_len: int | None, scale: float, backend: str,
                    chunks: int = 1, transport: str = "nccl", mask: TokenMask | None = None,
                    rope: _Rope = None):
    """(dq, dk, dv) of `hybrid_forward`'s inputs (before the rotation by `rope`)."""
    b, h, s, e = dout.shape
    n = ulysses_group.size()
    ex = _plan_exchange(ulysses_group, ring_group, b, h, kv_heads, order, s, dout.device, chunks,
                        transport)
    chunks = ex.chunks
    _, attend_backward = _attention(ring_group, causal=causal, order=order, seq_len=seq_len,
                                    scale=scale, backend=backend, mask=mask)
    g, per_piece, m = h // n // chunks, chunks // ex.pieces, kv_h.shape[2]
    scatter = ex.route == "scatter"
    dq = q_h.new_empty(dout.shape)
    dk, dv = (kv_h.new_empty((b, kv_heads, s, e)) for _ in range(2)) if scatter else (None, None)
    # dk, dv of a K/V piece that several chunks read (or of everything, on the all-gather routes)
    # are summed in fp32 here; with one chunk per piece they go back straight from the kernel.
    acc = None if scatter and per_piece == 1 else torch.zeros(
        kv_h.shape, dtype=torch.promote_types(kv_h.dtype, torch.float32), device=kv_h.device)

    dout_in = [_start_to_heads(_head_blocks(dout, n, ex.pieces, chunks, c),
                               dout.new_empty((b, g, n * s, e)), ex) for c in range(chunks)]
    back = []
    for c in range(chunks):
        rows, slot = _rows(c, g), _kv_slot(c, g, h // n // m, dout.device)
        k_c, v_c = _take_heads(kv_h[0], slot), _take_heads(kv_h[1], slot)
        dq_c, dk_c, dv_c = attend_backward(dout_in[c].wait(), q_h[:, rows], k_c, v_c,
                                           out_h[:, rows], lse_h[:, rows])
        back.append(_start_to_seq(dq_c, _head_blocks(dq, n, ex.pieces, chunks, c), ex, rope))
        piece = c // per_piece
        if acc is None:
            dkv_piece = (dk_c, dv_c)
        else:
            _add_heads(acc[0], slot, dk_c)
            _add_heads(acc[1], slot, dv_c)
            done = scatter and (c + 1) % per_piece == 0  # the piece's last chunk: send its sum
            dkv_piece = [a[:, _rows(piece, m // ex.pieces)].to(kv_h.dtype) for a in acc] if done else []
        back += [_start_to_seq(d, _head_blocks(x, n, ex.pieces, ex.pieces, piece), ex,
                               rope if x is dk else None)
                 for d, x in zip(dkv_piece, (dk, dv))]
    if not scatter:
        dkv = _kv_reduce_scatter(acc, ex)
        if rope is None:
            dk, dv = unpack_pair(dkv, kv_h.dtype)
        else:  # dk's transposed rotation, in fp32, then rounded once
            dk = _copy(torch.empty_like(dkv[0]), dkv[0], rope, transpose=True).to(kv_h.dtype)
            dv = dkv[1].to(kv_h.dtype)
    for pending in back:
        pending.wait()
    return dq, dk, dv


def _fake_outputs(q, k, n_u):
    b, h, s, e = q.shape
    m = kv_heads_after_exchange(h, k.shape[1], n_u)
    q_h = q.new_empty((b, h // n_u, s * n_u, e))
    return (fresh_like(q), lse_like(q), q_h, k.new_empty((2, b, m, s * n_u, e)), fresh_like(q_h),
            lse_like(q_h))


def _fake_grads(dout, q_h, kv_h, out_h, lse_h, kv_heads, *options):
    b, _, s, e = dout.shape
    return q_h.new_empty(dout.shape), *(kv_h.new_empty((b, kv_heads, s, e)) for _ in range(2))


# ---------------------------------------------------------------------------------------------
# Custom ops: Ulysses
# ---------------------------------------------------------------------------------------------

_SavedOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                      torch.Tensor]
_Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _ulysses_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, causal: bool,
                order: str, seq_len: int | None, scale: float, backend: str, chunks: int = 1,
                transport: str = "nccl", positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                window: int | None = None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> _SavedOutputs:
    return hybrid_forward(q, k, v, None, resolve_group(group_name), causal=causal, order=order,
                          seq_len=seq_len, scale=scale, backend=backend, chunks=chunks,
                          transport=transport,
                          mask=token_mask(causal, positions, segments, window, key_valid, q.device),
                          rope=_rope(cos, sin, q))


def _ulysses_backward_op(dout: torch.Tensor, q_h: torch.Tensor, kv_h: torch.Tensor,
                         out_h: torch.Tensor, lse_h: torch.Tensor, kv_heads: int, group_name: str,
                         causal: bool, order: str, seq_len: int | None, scale: float, backend: str,
                         chunks: int = 1, transport: str = "nccl",
                         positions: torch.Tensor | None = None,
                         segments: torch.Tensor | None = None,
                         key_valid: torch.Tensor | None = None, window: int | None = None,
                         cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                         ) -> _Grads:
    return hybrid_backward(dout, q_h, kv_h, out_h, lse_h, kv_heads, None, resolve_group(group_name),
                           causal=causal, order=order, seq_len=seq_len, scale=scale, backend=backend,
                           chunks=chunks, transport=transport,
                           mask=token_mask(causal, positions, segments, window, key_valid,
                                           dout.device),
                           rope=_rope(cos, sin, dout))


def _rope(cos, sin, q) -> _Rope:
    """(cos, sin) as [s, e] tables of q's local tokens, or None."""
    return None if cos is None else a2a_layout.rope_tables(cos, sin, q.shape[2], q.shape[3])


def _ulysses_fake(q, k, v, group_name, *options):
    return _fake_outputs(q, k, resolve_group(group_name).size())


register_attention_op("seqshard::ulysses_attention", _ulysses_op, _ulysses_backward_op,
                      saves="outputs", fake=_ulysses_fake, backward_fake=_fake_grads)


def _check_heads(q, k, n_u: int, algorithm: str) -> None:
    if q.shape[1] % n_u:
        raise ValueError(
            f"{algorithm}: {q.shape[1]} query heads are not divisible by the Ulysses degree {n_u}; "
            "use ring/allgather/tokenring attention, or a hybrid with a Ulysses axis that divides "
            "the heads")


def _check_chunks(q, n_u: int, chunks: int, algorithm: str) -> int:
    local = q.shape[1] // n_u
    if not 1 <= chunks <= local or local % chunks:
        divisors = [d for d in range(1, local + 1) if local % d == 0]
        raise ValueError(f"{algorithm}: chunks={chunks} must divide the {local} heads each rank "
                         f"holds after the exchange ({q.shape[1]} heads / Ulysses degree {n_u}); "
                         f"use one of {divisors}")
    return chunks


def ulysses_attention(q, k, v, group=None, *, causal: bool = True, order: str = "contig",
                      seq_len: int | None = None, scale: float | None = None,
                      backend: str | None = None, chunks: int | None = None,
                      transport: str = "nccl", return_lse: bool = False,
                      positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                      window: int | None = None, key_valid: torch.Tensor | None = None,
                      cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
    """Exact attention of sequence-sharded q, k, v by the Ulysses all-to-all (heads must divide).

    `chunks`: pipeline the exchanges with the attention over this many head chunks per rank (it
    must divide the heads per rank); None picks `default_chunks` (1 unless the transport is
    'peer'). `transport`: 'nccl' (all-to-all), or 'peer' (copy engines over symmetric memory,
    one host; see peer.py). `cos`, `sin`: the rotary embedding's tables for this rank's tokens,
    [s, e] with leading dims of 1 allowed (HF's [1, 1, s, e]), constants: q and k are rotated in
    the sequence → heads pack (Llama/HF's `x·cos + rotate_half(x)·sin`, in fp32, rounded once;
    codegen/kernels/a2a_layout.py) and dq, dk by the transpose on the way back, so q and k are
    passed before their rotation. Otherwise the same arguments (structured masks included) and
    result as `ring_attention`.
    """
    pg = resolve_group(group)
    check_attention_inputs(q, k, v, world=pg.size(), order=order, seq_len=seq_len,
                           algorithm="ulysses_attention")
    positions, segments, window, key_valid = check_mask_inputs(
        q, world=pg.size(), seq_len=seq_len, positions=positions, segments=segments,
        window=window, key_valid=key_valid, algorithm="ulysses_attention")
    _check_heads(q, k, pg.size(), "ulysses_attention")
    check_transport(transport)
    a2a_layout.rope_tables(cos, sin, q.shape[2], q.shape[3])  # ValueError naming the fix
    if chunks is None:
        chunks = 0  # resolved with the transport, inside the op
    else:
        _check_chunks(q, pg.size(), chunks, "ulysses_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse, *_ = torch.ops.seqshard.ulysses_attention(q, k, v, pg.group_name, causal, order,
                                                        seq_len, scale, backend, chunks, transport,
                                                        positions, segments, key_valid, window,
                                                        cos, sin)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Custom ops: hybrid
# ---------------------------------------------------------------------------------------------

def _hybrid_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_group_name: str,
               ulysses_group_name: str, causal: bool, order: str, seq_len: int | None, scale: float,
               backend: str, chunks: int = 1, transport: str = "nccl",
               positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
               key_valid: torch.Tensor | None = None, window: int | None = None) -> _SavedOutputs:
    return hybrid_forward(q, k, v, resolve_group(ring_group_name), resolve_group(ulysses_group_name),
                          causal=causal, order=order, seq_len=seq_len, scale=scale, backend=backend,
                          chunks=chunks, transport=transport,
                          mask=token_mask(causal, positions, segments, window, key_valid, q.device))


def _hybrid_backward_op(dout: torch.Tensor, q_h: torch.Tensor, kv_h: torch.Tensor,
                        out_h: torch.Tensor, lse_h: torch.Tensor, kv_heads: int, ring_group_name: str,
                        ulysses_group_name: str, causal: bool, order: str, seq_len: int | None,
                        scale: float, backend: str, chunks: int = 1, transport: str = "nccl",
                        positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                        key_valid: torch.Tensor | None = None, window: int | None = None
                        ) -> _Grads:
    return hybrid_backward(dout, q_h, kv_h, out_h, lse_h, kv_heads, resolve_group(ring_group_name),
                           resolve_group(ulysses_group_name), causal=causal, order=order,
                           seq_len=seq_len, scale=scale, backend=backend, chunks=chunks,
                           transport=transport,
                           mask=token_mask(causal, positions, segments, window, key_valid,
                                           dout.device))


def _hybrid_fake(q, k, v, ring_group_name, ulysses_group_name, *options):
    return _fake_outputs(q, k, resolve_group(ulysses_group_name).size())


register_attention_op("seqshard::hybrid_attention", _hybrid_op, _hybrid_backward_op,
                      saves="outputs", fake=_hybrid_fake, backward_fake=_fake_grads)


def hybrid_attention(q, k, v, ring_group, ulysses_group, *, causal: bool = True,
                     order: str = "contig", seq_len: int | None = None, scale: float | None = None,
                     backend: str | None = None, chunks: int = 1, transport: str = "nccl",
                     return_lse: bool = False, positions: torch.Tensor | None = None,
                     segments: torch.Tensor | None = None, window: int | None = None,
                     key_valid: torch.Tensor | None = None):
    """Exact attention on a 2-D mesh: Ulysses over `ulysses_group` × ring over `ring_group`.

    The shards follow `order` over the flattened index ring_rank·N_u + ulysses_rank, e.g. the
    groups of `mesh.get_group("ring")` and `mesh.get_group("ulysses")` of a ('ring', 'ulysses')
    DeviceMesh. `chunks` pipelines the Ulysses exchanges with a whole ring pass per head chunk (it
    must divide the heads per Ulysses rank; default 1: the ring already overlaps its own traffic,
    and more chunks mean more, smaller ring steps). `transport` as for `ulysses_attention`.
    Otherwise the same arguments (structured masks included) and result as `ring_attention`.
    """
    ring_pg, ulysses_pg = resolve_group(ring_group), resolve_group(ulysses_group)
    world = ring_pg.size() * ulysses_pg.size()
    check_attention_inputs(q, k, v, world=world, order=order, seq_len=seq_len,
                           algorithm="hybrid_attention")
    positions, segments, window, key_valid = check_mask_inputs(
        q, world=world, seq_len=seq_len, positions=positions, segments=segments, window=window,
        key_valid=key_valid, algorithm="hybrid_attention")
    _check_heads(q, k, ulysses_pg.size(), "hybrid_attention")
    _check_chunks(q, ulysses_pg.size(), chunks, "hybrid_attention")
    check_transport(transport)
    scale, backend = resolve_options(q, scale, backend)
    out, lse, *_ = torch.ops.seqshard.hybrid_attention(q, k, v, ring_pg.group_name,
                                                       ulysses_pg.group_name, causal, order,
                                                       seq_len, scale, backend, chunks, transport,
                                                       positions, segments, key_valid, window)
    return (out, lse) if return_lse else out
