"""Alpha-beta time of each collective over one group of a mesh axis.

Every function here is `time(size, group_size, link) -> seconds`, with

    size   the bytes of the full per-rank buffer, as nccl-tests counts it: the gathered output of
           an all-gather, the unreduced input of a reduce-scatter, the buffer of an all-reduce,
           each rank's send buffer of an all-to-all, the message of a send/recv;
    n      the group size (ranks along the axis);
    link   `Cluster.axis_link(mesh_shape, axis)`: per-step latency α and a bus-bandwidth table.

and the model

    T = steps · α + bytes_per_gpu / busbw(size)

where busbw(size) is the link's measured bus bandwidth for that collective at that message
size (interpolated in log size: small messages reach less of the link) and bytes_per_gpu is
what one GPU sends:

    all-gather, reduce-scatter   (n-1)/n · size     n-1 ring steps
    all-reduce (ring)           2(n-1)/n · size   2(n-1) ring steps
    all-reduce (tree)            2 · size          2·⌈log2 n⌉ steps (reduce up, broadcast down)
    all-to-all                   (n-1)/n · size     n-1 peers
    send/recv (one ring step)    size               1 step

Sizes may be sympy expressions (see `symbolic`); the group size may be too.
"""

from __future__ import annotations

from seqshard.costmodel.cluster import Link
from seqshard.costmodel.symbolic import is_symbolic, sceil_log2, smin

__all__ = ["all_gather", "reduce_scatter", "all_reduce", "all_reduce_algorithm", "all_to_all",
           "send_recv", "bytes_sent", "COLLECTIVE_TIME"]


def _alone(n) -> bool:
    return not is_symbolic(n) and n == 1


def all_gather(size, group_size, link: Link):
    """Ring all-gather (NCCL Ring): T = (n-1)·α + (n-1)/n · size / busbw_AG(size)."""
    n = group_size
    if _alone(n):
        return 0.0
    return (n - 1) * link.latency + (n - 1) / n * size / link.bus_bandwidth("all_gather", size)


def reduce_scatter(size, group_size, link: Link):
    """Ring reduce-scatter (NCCL Ring): T = (n-1)·α + (n-1)/n · size / busbw_RS(size)."""
    n = group_size
    if _alone(n):
        return 0.0
    return (n - 1) * link.latency + (n - 1) / n * size / link.bus_bandwidth("reduce_scatter", size)


def _all_reduce_ring(size, n, link: Link):
    return 2 * (n - 1) * link.latency + 2 * (n - 1) / n * size / link.bus_bandwidth("all_reduce", size)


def _all_reduce_tree(size, n, link: Link):
    return 2 * sceil_log2(n) * link.latency + 2 * size / link.bus_bandwidth("all_reduce", size)


def all_reduce(size, group_size, link: Link):
    """All-reduce as NCCL's tuner would run it: the faster of Ring and Tree.

        ring:  T = 2(n-1)·α + 2(n-1)/n · size / busbw_AR(size)    (reduce-scatter + all-gather)
        tree:  T = 2⌈log2 n⌉·α + 2 · size / busbw_AR(size)        (double binary tree, pipelined)

    Ring moves fewer bytes, Tree takes fewer steps: Tree wins for small messages over many ranks.
    NVLS and CollNet (in-switch reduction) are not modelled; calibrate captures them if enabled.
    """
    n = group_size
    if _alone(n):
        return 0.0
    return smin(_all_reduce_ring(size, n, link), _all_reduce_tree(size, n, link))


def all_reduce_algorithm(size: float, group_size: int, link: Link) -> str:
    """"ring" or "tree": which NCCL algorithm `all_reduce` priced (numbers only)."""
    if _all_reduce_tree(size, group_size, link) < _all_reduce_ring(size, group_size, link):
        return "tree"
    return "ring"


def all_to_all(size, group_size, link: Link):
    """All-to-all (NCCL send/recv to every peer): T = (n-1)·α + (n-1)/n · size / busbw_A2A(size)."""
    n = group_size
    if _alone(n):
        return 0.0
    return (n - 1) * link.latency + (n - 1) / n * size / link.bus_bandwidth("all_to_all", size)


def send_recv(size, group_size, link: Link):
    """One ring step, every rank sending `size` bytes to its neighbour: T = α + size / bw_P2P(size)."""
    if _alone(group_size):
        return 0.0
    return link.latency + size / link.bus_bandwidth("send_recv", size)


COLLECTIVE_TIME = {
    "all_gather": all_gather,
    "reduce_scatter": reduce_scatter,
    "all_reduce": all_reduce,
    "all_to_all": all_to_all,
    "send_recv": send_recv,
}
"""Collective name → its `time(size, group_size, link)` function."""


def bytes_sent(kind: str, size, group_size):
    """Bytes one GPU sends in collective `kind` on a buffer of `size` bytes (ring all-reduce)."""
    n = group_size
    if kind == "send_recv":
        return 0 if _alone(n) else size
    per = {"all_gather": 1, "reduce_scatter": 1, "all_to_all": 1, "all_reduce": 2}
    if kind not in per:
        raise ValueError(f"unknown collective {kind!r}; use one of {sorted(COLLECTIVE_TIME)}")
    return per[kind] * (n - 1) / n * size
