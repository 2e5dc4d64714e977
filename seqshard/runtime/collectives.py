"""Autograd-aware collectives as `torch.library` custom ops (namespace `seqshard`).

    op (readable wrapper)         forward                                  backward = adjoint
    all_to_all(x, s, g, group)    split dim s over the ranks, concatenate  all_to_all(dy, g, s)
                                  what arrives along dim g
    all_gather(x, d, group)       concatenate every rank's x along d       reduce_scatter(dy, d)
    reduce_scatter(x, d, group)   sum over ranks, keep own slice of d      all_gather(dy, d)
    all_reduce(x, group)          sum over ranks                           all_reduce(dy)
    ring_shift(x, n, group)       send to rank+n, receive from rank-n      ring_shift(dy, -n)

Each moves one contiguous buffer (the dim is brought to the front by a single copy, and put back by
a single copy): no list of chunks and no `torch.cat`. Outputs are fresh tensors, never views of
the input. Every op has a fake (meta) implementation giving its shape and a registered autograd
formula that itself calls these ops, so AOTAutograd / torch.compile trace forward and backward with
fake tensors and treat each collective as one opaque node.

Process groups travel as group names (`group.group_name`; resolved with
`torch.distributed.distributed_c10d._resolve_process_group`). The wrappers accept a
`ProcessGroup`, a name, or None (the default group); a `DeviceMesh` axis gives its group with
`mesh.get_group(axis_name)`.

The non-op helpers `start_all_gather`, `start_reduce_scatter`, `start_all_to_all_single`,
`start_p2p` and `start_shift` return a `Pending` handle so the attention algorithms can overlap
communication with compute. On CUDA the collective runs on NCCL's stream after everything already
queued on the current stream; `wait()` makes the current stream wait for it (the host does not
block), so post a collective before queueing the compute it should overlap, and wait right before
its result is used.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from seqshard.runtime.opsupport import fresh_like

__all__ = [
    "group_name",
    "resolve_group",
    "all_to_all",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "ring_shift",
    "Pending",
    "start_all_gather",
    "start_reduce_scatter",
    "start_all_to_all_single",
    "start_p2p",
    "start_shift",
    "all_to_all_tensor",
]

# torch 2.13 renamed the single-tensor collectives; keep working on 2.11/2.12 (same semantics).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------

def group_name(group=None) -> str:
    """The name of a ProcessGroup (None: the default group); a str is returned as is."""
    if isinstance(group, str):
        return group
    return (dist.group.WORLD if group is None else group).group_name


def resolve_group(group) -> dist.ProcessGroup:
    """A ProcessGroup from a ProcessGroup, a group name, or None (the default group)."""
    if group is None:
        return dist.group.WORLD
    return _resolve_process_group(group) if isinstance(group, str) else group


# ---------------------------------------------------------------------------------------------
# Pending communication
# ---------------------------------------------------------------------------------------------

class Pending:
    """Work in flight; `wait()` returns the result (after an optional finishing step)."""

    def __init__(self, works, result, finish=None):
        self._works, self._result, self._finish = works, result, finish

    def wait(self):
        for work in self._works:
            work.wait()
        return self._finish(self._result) if self._finish else self._result


def _done(result) -> Pending:
    return Pending([], result)


def start_all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> Pending:
    """All-gather along `dim` (rank-major), asynchronously. Result is contiguous."""
    dim, world = dim % x.dim(), group.size()
    if world == 1:
        return _done(x.clone(memory_format=torch.contiguous_format))
    send = x.contiguous()
    recv = send.new_empty((world, *send.shape))  # recv[j] = rank j's x
    work = _all_gather_single(recv.flatten(0, 1), send, group=group, async_op=True)
    return Pending([work], recv, lambda r: r.movedim(0, dim).flatten(dim, dim + 1).contiguous())


def start_reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> Pending:
    """Sum over ranks and keep this rank's slice along `dim` (length / N), asynchronously."""
    dim, world = dim % x.dim(), group.size()
    if world == 1:
        return _done(x.clone(memory_format=torch.contiguous_format))
    send = x.unflatten(dim, (world, x.shape[dim] // world)).movedim(dim, 0).contiguous()
    recv = send.new_empty(send.shape[1:])
    work = _reduce_scatter_single(recv, send.flatten(0, 1), op=dist.ReduceOp.SUM, group=group,
                                  async_op=True)
    return Pending([work], recv)


def start_all_to_all_single(send: torch.Tensor, recv: torch.Tensor,
                            group: dist.ProcessGroup) -> Pending:
    """Piece j of `send` (dim 0 cut into N equal pieces) goes to rank j, and piece j of `recv`
    arrives from rank j, asynchronously; the result is `recv`.

    Both are contiguous and of one shape and dtype; `recv` may be a view into a larger tensor (the
    result lands in place, no copy). The handle keeps `send` and `recv` referenced until `wait()`:
    the caching allocator cannot hand their memory to new tensors while NCCL's stream still reads
    or writes it, whatever ProcessGroupNCCL does (record_stream or stashing). Wait on the stream
    the buffers were allocated on, before dropping the last reference to them.
    """
    assert send.is_contiguous() and recv.is_contiguous(), "all_to_all_single needs contiguous buffers"
    assert send.shape == recv.shape and send.dtype == recv.dtype, (send.shape, recv.shape)
    if group.size() == 1:
        return _done(recv.copy_(send))
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return Pending([work], (recv, send), lambda buffers: buffers[0])


def all_to_all_tensor(x: torch.Tensor, scatter_dim: int, gather_dim: int,
                      group: dist.ProcessGroup) -> torch.Tensor:
    """Split `scatter_dim` into N pieces, piece j to rank j; concatenate arrivals along `gather_dim`."""
    scatter_dim, gather_dim, world = scatter_dim % x.dim(), gather_dim % x.dim(), group.size()
    if world == 1:
        return x.clone(memory_format=torch.contiguous_format)
    send = x.unflatten(scatter_dim, (world, x.shape[scatter_dim] // world)).movedim(scatter_dim, 0)
    send = send.contiguous()
    recv = torch.empty_like(send)  # recv[j] = the piece rank j sent here
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


def start_p2p(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
              group: dist.ProcessGroup, tag: int = 0) -> Pending:
    """Post sends and receives (peers are ranks within `group`) as one batch; result: the recv buffers.

    Every rank must post the matching operations in the same order (NCCL matches by order, gloo by
    tag): the algorithms derive both sides from the same deterministic schedule.
    """
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer, tag=tag) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer, tag=tag) for t, peer in recvs]
    works = dist.batch_isend_irecv(ops) if ops else []
    return Pending(works, [t for t, _ in recvs])


def start_shift(tensors: Sequence[torch.Tensor], shift: int, group: dist.ProcessGroup,
                tag: int = 0) -> Pending:
    """Send each tensor to rank + shift and receive its counterpart from rank - shift (one batch)."""
    world = group.size()
    if shift % world == 0:
        return _done([t.clone(memory_format=torch.contiguous_format) for t in tensors])
    rank = group.rank()
    sends = [(t.contiguous(), (rank + shift) % world) for t in tensors]
    recvs = [(torch.empty_like(t), (rank - shift) % world) for t, _ in sends]
    return start_p2p(sends, recvs, group, tag)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

def _register(name: str, forward, fake, adjoint) -> None:
    """Register `seqshard::<name>`: forward(x, *options) -> y (typed: the annotations are the
    schema), its fake, and autograd dx = adjoint(dy, *options), itself one of these ops."""
    op = torch.library.custom_op(f"seqshard::{name}", forward, mutates_args=())
    op.register_fake(fake)

    def setup_context(ctx, inputs, output):
        ctx.options = inputs[1:]

    def backward(ctx, grad):
        return adjoint(grad, *ctx.options), *([None] * len(ctx.options))

    op.register_autograd(backward, setup_context=setup_context)


def _resized(x: torch.Tensor, group_name: str, *, grow: int | None = None,
             shrink: int | None = None) -> torch.Tensor:
    """An empty tensor like x with dim `grow` times and dim `shrink` over the group size: fakes."""
    shape, world = list(x.shape), _resolve_process_group(group_name).size()
    if shrink is not None:
        shape[shrink] //= world
    if grow is not None:
        shape[grow] *= world
    return x.new_empty(shape)


def _all_to_all_op(x: torch.Tensor, scatter_dim: int, gather_dim: int, group_name: str) -> torch.Tensor:
    return all_to_all_tensor(x, scatter_dim, gather_dim, _resolve_process_group(group_name))


def _all_gather_op(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return start_all_gather(x, dim, _resolve_process_group(group_name)).wait()


def _reduce_scatter_op(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return start_reduce_scatter(x, dim, _resolve_process_group(group_name)).wait()


def _all_reduce_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_resolve_process_group(group_name))
    return out


def _ring_shift_op(x: torch.Tensor, shift: int, group_name: str) -> torch.Tensor:
    return start_shift([x], shift, _resolve_process_group(group_name)).wait()[0]


_register("all_to_all", _all_to_all_op,
          lambda x, scatter, gather, name: _resized(x, name, grow=gather, shrink=scatter),
          lambda dy, scatter, gather, name: torch.ops.seqshard.all_to_all(dy, gather, scatter, name))
_register("all_gather", _all_gather_op,
          lambda x, dim, name: _resized(x, name, grow=dim),
          lambda dy, dim, name: torch.ops.seqshard.reduce_scatter(dy, dim, name))
_register("reduce_scatter", _reduce_scatter_op,
          lambda x, dim, name: _resized(x, name, shrink=dim),
          lambda dy, dim, name: torch.ops.seqshard.all_gather(dy, dim, name))
_register("all_reduce", _all_reduce_op, lambda x, name: fresh_like(x),
          lambda dy, name: torch.ops.seqshard.all_reduce(dy, name))
_register("ring_shift", _ring_shift_op, lambda x, shift, name: fresh_like(x),
          lambda dy, shift, name: torch.ops.seqshard.ring_shift(dy, -shift, name))


# ---------------------------------------------------------------------------------------------
# Readable wrappers (what generated code calls)
# ---------------------------------------------------------------------------------------------

def _divisible(x: torch.Tensor, dim: int, world: int, what: str) -> None:
    if x.shape[dim] % world:
        raise ValueError(f"{what}: dim {dim} of a {tuple(x.shape)} tensor is not divisible by the "
                         f"group size {world}; pad it to a multiple of {world}")


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Scatter `scatter_dim` over the group and gather `gather_dim` (e.g. Ulysses' s → h switch)."""
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all needs two different dims, got {scatter_dim} twice")
    pg = resolve_group(group)
    _divisible(x, scatter_dim, pg.size(), "all_to_all")
    return torch.ops.seqshard.all_to_all(x, scatter_dim, gather_dim, pg.group_name)


def all_gather(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    return torch.ops.seqshard.all_gather(x, dim % x.dim(), group_name(group))


def reduce_scatter(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Sum `x` over the group and keep this rank's 1/N slice along `dim`."""
    pg = resolve_group(group)
    _divisible(x, dim % x.dim(), pg.size(), "reduce_scatter")
    return torch.ops.seqshard.reduce_scatter(x, dim % x.dim(), pg.group_name)


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `x` over the group (out of place)."""
    return torch.ops.seqshard.all_reduce(x, group_name(group))


def ring_shift(x: torch.Tensor, shift: int = 1, group=None) -> torch.Tensor:
    """Send `x` to rank + shift and return what rank - shift sent (one ring step)."""
    return torch.ops.seqshard.ring_shift(x, shift, group_name(group))
