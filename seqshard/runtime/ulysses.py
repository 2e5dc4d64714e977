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
runs over the ring group on these head-sharded super-shards. Plain Ulysses is the hybrid with a
one-rank ring, which is how it is implemented.

K/V heads (GQA/MQA; q head i uses kv head i // (h/hk)):
  * hk divisible by N_u: K/V move at kv heads (all-to-all, scatter heads).
  * otherwise (N_u > hk, or not a divisor): all-gather K/V along the sequence at kv heads and keep
    the kv heads this rank's query heads need: one head when each rank's query heads share a single
    kv head, else one kv head per query head (replicated).
The adjoints: all-to-all back, or scatter-add into all kv heads and reduce-scatter.

Zigzag input: after the exchange the sequence sits in rank-major shard order; one local
index_select puts it in position order, and its inverse is applied on the way back.

Saved for backward: the head-layout q, packed K/V, out and lse (the same bytes as the local
shards), so the backward spends one all-to-all on dout and three on the gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqshard.runtime.collectives import (all_to_all_tensor, resolve_group, start_all_gather,
                                          start_reduce_scatter)
from seqshard.runtime.layout import sorting_permutations
from seqshard.runtime.opsupport import (check_attention_inputs, lse_like,
                                        register_autograd_saving_outputs, resolve_options,
                                        unpack_pair)
from seqshard.runtime.ring import ring_backward, ring_forward

__all__ = ["ulysses_attention", "hybrid_attention", "kv_route", "kv_heads_after_exchange"]

_HEADS, _SEQ = 1, 2  # dims of [b, h, s, e]; a packed K/V buffer [2, b, hk, s, e] has them at +1


def kv_route(heads: int, kv_heads: int, world: int) -> str:
    """How K/V reach the head layout: 'scatter' (all-to-all at kv heads), 'one' (all-gather, keep
    the single kv head this rank needs) or 'replicate' (all-gather, one kv head per query head)."""
    if kv_heads % world == 0:
        return "scatter"
    return "one" if (heads // kv_heads) % (heads // world) == 0 else "replicate"


def kv_heads_after_exchange(heads: int, kv_heads: int, world: int) -> int:
    route = kv_route(heads, kv_heads, world)
    return {"scatter": kv_heads // world, "one": 1, "replicate": heads // world}[route]


@dataclass(frozen=True)
class _Exchange:
    """The sequence → heads switch over one Ulysses group, and its inverse."""

    group: dist.ProcessGroup
    route: str
    kv_heads: int
    kv_index: torch.Tensor | None  # kv heads kept after an all-gather ('one'/'replicate')
    perm: torch.Tensor | None      # gathered (rank-major) sequence -> position order
    back: torch.Tensor | None      # its inverse


def _exchange(group, heads, kv_heads, order, ring_place, local_len, device) -> _Exchange:
    """`ring_place`: (ring rank, ring size) on a 2-D mesh, None for plain Ulysses."""
    n_u = group.size()
    ring_rank, ring_size = (0, 1) if ring_place is None else ring_place
    first = ring_rank * n_u  # flattened index of this Ulysses group's first rank
    ranks = tuple(range(first, first + n_u))
    perm, back = sorting_permutations(order, ring_size * n_u, local_len, ranks, device)
    route = kv_route(heads, kv_heads, n_u)
    kv_index = None if route == "scatter" else _kv_index(heads, kv_heads, n_u, group.rank(), device)
    return _Exchange(group, route, kv_heads, kv_index, perm, back)


@functools.lru_cache(maxsize=256)
def _kv_index(heads: int, kv_heads: int, world: int, rank: int, device: torch.device) -> torch.Tensor:
    """The kv heads a rank keeps after all-gathering K/V: the one its query heads share ('one'),
    or one per query head ('replicate')."""
    per_rank = heads // world
    needed = torch.arange(rank * per_rank, (rank + 1) * per_rank) // (heads // kv_heads)
    return (needed[:1] if kv_route(heads, kv_heads, world) == "one" else needed).to(device)


def _reorder(x: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    return x if index is None else x.index_select(dim, index)


def _to_heads(x, ex: _Exchange) -> torch.Tensor:
    """[b, h, s/N, e] -> [b, h/N, s, e] in position order."""
    return _reorder(all_to_all_tensor(x, _HEADS, _SEQ, ex.group), ex.perm, _SEQ)


def _to_seq(x_h, ex: _Exchange) -> torch.Tensor:
    """[b, h/N, s, (e)] -> [b, h, s/N, (e)]; also for lse [b, h/N, s]."""
    return all_to_all_tensor(_reorder(x_h, ex.back, _SEQ), _SEQ, _HEADS, ex.group)


def _kv_to_heads(k, v, ex: _Exchange) -> torch.Tensor:
    """Packed K/V [2, b, hk, s/N, e] -> [2, b, kv heads after exchange, s, e] in position order."""
    kv = torch.stack([k, v])
    if ex.route == "scatter":
        kv = all_to_all_tensor(kv, _HEADS + 1, _SEQ + 1, ex.group)
    else:
        kv = start_all_gather(kv, _SEQ + 1, ex.group).wait().index_select(_HEADS + 1, ex.kv_index)
    return _reorder(kv, ex.perm, _SEQ + 1)


def _kv_to_seq(dkv_h, ex: _Exchange) -> torch.Tensor:
    """The adjoint of `_kv_to_heads`: [2, b, m, s, e] -> [2, b, hk, s/N, e]."""
    dkv_h = _reorder(dkv_h, ex.back, _SEQ + 1)
    if ex.route == "scatter":
        return all_to_all_tensor(dkv_h, _SEQ + 1, _HEADS + 1, ex.group)
    # several query heads (here and on other ranks) share each kv head: sum them in fp32
    b, _, s, e = dkv_h.shape[1:]
    acc = torch.promote_types(dkv_h.dtype, torch.float32)
    full = torch.zeros((2, b, ex.kv_heads, s, e), dtype=acc, device=dkv_h.device)
    full.index_add_(_HEADS + 1, ex.kv_index, dkv_h.to(acc))
    return start_reduce_scatter(full, _SEQ + 1, ex.group).wait()


# ---------------------------------------------------------------------------------------------
# Forward and backward (ring_group None: plain Ulysses)
# ---------------------------------------------------------------------------------------------

def _ring_place(ring_group):
    return None if ring_group is None else (ring_group.rank(), ring_group.size())


def hybrid_forward(q, k, v, ring_group, ulysses_group, *, causal: bool, order: str,
                   seq_len: int | None, scale: float, backend: str):
    """(out, lse, q_h, kv_h, out_h, lse_h): the result and what the backward needs."""
    ex = _exchange(ulysses_group, q.shape[1], k.shape[1], order, _ring_place(ring_group), q.shape[2],
                   q.device)
    q_h = _to_heads(q, ex)
    kv_h = _kv_to_heads(k, v, ex)
    out_h, lse_h = ring_forward(q_h, kv_h[0], kv_h[1], ring_group, causal=causal, order=order,
                                seq_len=seq_len, scale=scale, backend=backend)
    return _to_seq(out_h, ex), _to_seq(lse_h, ex), q_h, kv_h, out_h, lse_h


def hybrid_backward(dout, q_h, kv_h, out_h, lse_h, kv_heads: int, ring_group, ulysses_group, *,
                    causal: bool, order: str, seq_len: int | None, scale: float, backend: str):
    n_u = ulysses_group.size()
    ex = _exchange(ulysses_group, q_h.shape[1] * n_u, kv_heads, order, _ring_place(ring_group),
                   q_h.shape[2] // n_u, q_h.device)
    dq_h, dk_h, dv_h = ring_backward(_to_heads(dout, ex), q_h, kv_h[0], kv_h[1], out_h, lse_h,
                                     ring_group, causal=causal, order=order, seq_len=seq_len,
                                     scale=scale, backend=backend)
    return (_to_seq(dq_h, ex), *unpack_pair(_kv_to_seq(torch.stack([dk_h, dv_h]), ex), dq_h.dtype))


def _fake_outputs(q, k, n_u):
    b, h, s, e = q.shape
    m = kv_heads_after_exchange(h, k.shape[1], n_u)
    q_h = q.new_empty((b, h // n_u, s * n_u, e))
    return (torch.empty_like(q), lse_like(q), q_h, q.new_empty((2, b, m, s * n_u, e)),
            torch.empty_like(q_h), lse_like(q_h))


def _fake_grads(dout, kv_heads):
    b, _, s, e = dout.shape
    return torch.empty_like(dout), *(dout.new_empty((b, kv_heads, s, e)) for _ in range(2))


# ---------------------------------------------------------------------------------------------
# Custom ops: Ulysses
# ---------------------------------------------------------------------------------------------

_SavedOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                      torch.Tensor]
_Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("seqshard::ulysses_attention", mutates_args=())
def _ulysses_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, causal: bool,
                order: str, seq_len: int | None, scale: float, backend: str) -> _SavedOutputs:
    return hybrid_forward(q, k, v, None, resolve_group(group_name), causal=causal, order=order,
                          seq_len=seq_len, scale=scale, backend=backend)


@_ulysses_op.register_fake
def _(q, k, v, group_name, *options):
    return _fake_outputs(q, k, resolve_group(group_name).size())


@torch.library.custom_op("seqshard::ulysses_attention_backward", mutates_args=())
def _ulysses_backward_op(dout: torch.Tensor, q_h: torch.Tensor, kv_h: torch.Tensor,
                         out_h: torch.Tensor, lse_h: torch.Tensor, kv_heads: int, group_name: str,
                         causal: bool, order: str, seq_len: int | None, scale: float, backend: str
                         ) -> _Grads:
    return hybrid_backward(dout, q_h, kv_h, out_h, lse_h, kv_heads, None, resolve_group(group_name),
                           causal=causal, order=order, seq_len=seq_len, scale=scale, backend=backend)


@_ulysses_backward_op.register_fake
def _(dout, q_h, kv_h, out_h, lse_h, kv_heads, *rest):
    return _fake_grads(dout, kv_heads)


register_autograd_saving_outputs(_ulysses_op, torch.ops.seqshard.ulysses_attention_backward)


def _check_heads(q, k, n_u: int, algorithm: str) -> None:
    if q.shape[1] % n_u:
        raise ValueError(
            f"{algorithm}: {q.shape[1]} query heads are not divisible by the Ulysses degree {n_u}; "
            "use ring/allgather/tokenring attention, or a hybrid with a Ulysses axis that divides "
            "the heads")


def ulysses_attention(q, k, v, group=None, *, causal: bool = True, order: str = "contig",
                      seq_len: int | None = None, scale: float | None = None,
                      backend: str | None = None, return_lse: bool = False):
    """Exact attention of sequence-sharded q, k, v by the Ulysses all-to-all (heads must divide).

    Same arguments and result as `ring_attention`.
    """
    pg = resolve_group(group)
    check_attention_inputs(q, k, v, world=pg.size(), order=order, seq_len=seq_len,
                           algorithm="ulysses_attention")
    _check_heads(q, k, pg.size(), "ulysses_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse, *_ = torch.ops.seqshard.ulysses_attention(q, k, v, pg.group_name, causal, order,
                                                        seq_len, scale, backend)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Custom ops: hybrid
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("seqshard::hybrid_attention", mutates_args=())
def _hybrid_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_group_name: str,
               ulysses_group_name: str, causal: bool, order: str, seq_len: int | None, scale: float,
               backend: str) -> _SavedOutputs:
    return hybrid_forward(q, k, v, resolve_group(ring_group_name), resolve_group(ulysses_group_name),
                          causal=causal, order=order, seq_len=seq_len, scale=scale, backend=backend)


@_hybrid_op.register_fake
def _(q, k, v, ring_group_name, ulysses_group_name, *options):
    return _fake_outputs(q, k, resolve_group(ulysses_group_name).size())


@torch.library.custom_op("seqshard::hybrid_attention_backward", mutates_args=())
def _hybrid_backward_op(dout: torch.Tensor, q_h: torch.Tensor, kv_h: torch.Tensor,
                        out_h: torch.Tensor, lse_h: torch.Tensor, kv_heads: int, ring_group_name: str,
                        ulysses_group_name: str, causal: bool, order: str, seq_len: int | None,
                        scale: float, backend: str) -> _Grads:
    return hybrid_backward(dout, q_h, kv_h, out_h, lse_h, kv_heads, resolve_group(ring_group_name),
                           resolve_group(ulysses_group_name), causal=causal, order=order,
                           seq_len=seq_len, scale=scale, backend=backend)


@_hybrid_backward_op.register_fake
def _(dout, q_h, kv_h, out_h, lse_h, kv_heads, *rest):
    return _fake_grads(dout, kv_heads)


register_autograd_saving_outputs(_hybrid_op, torch.ops.seqshard.hybrid_attention_backward)


def hybrid_attention(q, k, v, ring_group, ulysses_group, *, causal: bool = True,
                     order: str = "contig", seq_len: int | None = None, scale: float | None = None,
                     backend: str | None = None, return_lse: bool = False):
    """Exact attention on a 2-D mesh: Ulysses over `ulysses_group` × ring over `ring_group`.

    The shards follow `order` over the flattened index ring_rank·N_u + ulysses_rank, e.g. the
    groups of `mesh.get_group("ring")` and `mesh.get_group("ulysses")` of a ('ring', 'ulysses')
    DeviceMesh. Otherwise the same arguments and result as `ring_attention`.
    """
    ring_pg, ulysses_pg = resolve_group(ring_group), resolve_group(ulysses_group)
    world = ring_pg.size() * ulysses_pg.size()
    check_attention_inputs(q, k, v, world=world, order=order, seq_len=seq_len,
                           algorithm="hybrid_attention")
    _check_heads(q, k, ulysses_pg.size(), "hybrid_attention")
    scale, backend = resolve_options(q, scale, backend)
    out, lse, *_ = torch.ops.seqshard.hybrid_attention(q, k, v, ring_pg.group_name,
                                                       ulysses_pg.group_name, causal, order,
                                                       seq_len, scale, backend)
    return (out, lse) if return_lse else out
