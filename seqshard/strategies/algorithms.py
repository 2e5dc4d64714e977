"""The distributed attention algorithms: one registry entry each, and everything about one
algorithm is reachable from its entry.

    ALGORITHMS["ulysses"].seq_axes       # 1: the sequence is split over one mesh axis
    ALGORITHMS["ulysses"].heads_rule(h, hk, degrees)   # None, or why these heads don't work
    ALGORITHMS["ulysses"].cost           # costmodel.attention.ulysses
    ALGORITHMS["ulysses"].runtime        # "ulysses_attention", a function of seqshard.runtime

Strategies enumerate and check algorithms here, the cost model prices them with `cost`, codegen
emits a call to `runtime` (named, not imported: planning loads no runtime). Adding an algorithm
is one entry, its cost function and its runtime function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from seqshard.costmodel import attention as att_cost

__all__ = ["Algorithm", "ALGORITHMS", "NAMES", "SEQ_ALGORITHMS", "for_seq_axes"]


def _no_rule(heads: int, kv_heads: int, degrees: tuple[int, ...]) -> str | None:
    return None


def _heads_over_inner_axis(heads: int, kv_heads: int, degrees: tuple[int, ...]) -> str | None:
    """Ulysses' all-to-all gives each rank of its (innermost) axis heads/N whole heads; kv heads
    below N are all-gathered and replicated after the exchange (costmodel `ulysses_kv_route`)."""
    n = degrees[-1]
    if heads % n:
        return (f"{heads} heads cannot be split {n} ways by Ulysses; use ring/allgather/tokenring, "
                f"or a Ulysses degree that divides {heads}")
    return None


@dataclass(frozen=True)
class Algorithm:
    name: str
    seq_axes: int
    """How many mesh axes split the sequence: 0 (local attention), 1, or 2 (hybrid: ring on the
    outer axis, Ulysses on the inner)."""
    cost: Callable
    """`costmodel.attention` function: (AttentionShape, training, group_size, link, gpu, order)."""
    runtime: str | None
    """Name of the `seqshard.runtime` function codegen calls; None: the captured op runs as is."""
    heads_rule: Callable[[int, int, tuple[int, ...]], str | None] = _no_rule
    """(local heads, local kv heads, degree of each sequence axis) → None if legal, else why not."""
    kv_route: Callable | None = None
    """How K/V reach the head layout (Ulysses family): `costmodel.attention.ulysses_kv_route`,
    the mirror of `runtime.ulysses.kv_route` (tests/test_strategies.py checks they agree)."""
    summary: str = ""

    def check_heads(self, heads: int, kv_heads: int, degrees: tuple[int, ...]) -> str | None:
        return self.heads_rule(heads, kv_heads, degrees)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("local", 0, att_cost.local, None,
              summary="the sequence is whole on every rank: the local kernel, no communication"),
    Algorithm("ring", 1, att_cost.ring, "ring_attention",
              summary="K/V blocks travel around the ring; partial outputs merge by lse"),
    Algorithm("allgather", 1, att_cost.allgather, "allgather_attention",
              summary="all-gather K/V at kv heads, attend local queries to every key"),
    Algorithm("tokenring", 1, att_cost.tokenring, "tokenring_attention",
              summary="queries travel, partial (out, lse) return to their owners"),
    Algorithm("ulysses", 1, att_cost.ulysses, "ulysses_attention", _heads_over_inner_axis,
              att_cost.ulysses_kv_route,
              summary="all-to-all from sequence to heads, full-length local attention, and back"),
    Algorithm("hybrid", 2, att_cost.hybrid, "hybrid_attention", _heads_over_inner_axis,
              att_cost.ulysses_kv_route,
              summary="Ulysses over the inner axis × ring over the outer axis"),
)}

NAMES = tuple(ALGORITHMS)
SEQ_ALGORITHMS = tuple(n for n, a in ALGORITHMS.items() if a.seq_axes)


def for_seq_axes(count: int) -> list[Algorithm]:
    """The algorithms that split the sequence over `count` mesh axes."""
    return [a for a in ALGORITHMS.values() if a.seq_axes == count]
