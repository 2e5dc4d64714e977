"""Strategies: typed layouts and their redistribution steps, and the attention registry.

A failure here points at `seqshard/strategies` (layout.py, algorithms.py) or at the cost model's
mirror of the runtime's K/V route (`costmodel.attention.ulysses_kv_route`)."""

from __future__ import annotations

import pytest

from seqshard.costmodel import AttentionShape
from seqshard.strategies import ALGORITHMS, P, PlanError, R, Shard, redistribution, split_axes


def test_layouts_print_like_dtensor_placements():
    assert [str(p) for p in (Shard(3), R, P)] == ["S(3)", "R", "P"]
    assert Shard(3) == Shard(3) and Shard(3) != Shard(4) and Shard(3) != R
    assert split_axes((Shard(1), R, Shard(1)), 1) == [0, 2]


def test_redistribution_steps():
    s, h = 1, 2
    # Ulysses' switch s → h is one all-to-all; partial sums reduce first
    assert [(x.kind, x.src, x.dst) for x in redistribution((Shard(s),), (Shard(h),))] == \
        [("all_to_all", s, h)]
    steps = redistribution((P, Shard(s)), (Shard(h), R))
    assert [x.kind for x in steps] == ["reduce_scatter", "all_gather"]
    # a factor split over two axes is gathered inner axis first and sliced outer axis first
    assert [x.axis for x in redistribution((Shard(s), Shard(s)), (R, R))] == [1, 0]
    assert [x.axis for x in redistribution((R, R), (Shard(s), Shard(s)))] == [0, 1]
    with pytest.raises(PlanError):
        redistribution((R,), (P,))
    # each step's `after` walks from the source layout to the target
    lay = (P, Shard(s))
    for step in redistribution(lay, (Shard(h), R)):
        lay = step.after(lay)
    assert lay == (Shard(h), R)


def test_registry_entries_are_complete():
    for name, algo in ALGORITHMS.items():
        assert algo.name == name and callable(algo.cost)
        assert algo.seq_axes in (0, 1, 2)
        assert (algo.runtime is None) == (algo.seq_axes == 0), name


def test_registry_runtime_functions_exist():
    import seqshard.runtime

    for algo in ALGORITHMS.values():
        if algo.runtime:
            assert callable(getattr(seqshard.runtime, algo.runtime)), algo.runtime


def test_ulysses_head_rule_in_one_place():
    rule = ALGORITHMS["ulysses"].check_heads
    assert rule(8, 2, (4,)) is None          # kv heads below the degree: replicated after the exchange
    assert "6 heads cannot be split 4 ways" in rule(6, 6, (4,))
    assert ALGORITHMS["hybrid"].check_heads(8, 8, (2, 4)) is None   # inner (Ulysses) axis: 4
    assert ALGORITHMS["hybrid"].check_heads(6, 6, (4, 2)) is None
    assert ALGORITHMS["ring"].check_heads(6, 1, (4,)) is None


def test_cost_model_kv_route_mirrors_the_runtime():
    """The cost model prices the K/V route the runtime takes; the runtime imports no compiler
    stage, so the rule lives twice and this test keeps them equal."""
    from seqshard.runtime.ulysses import kv_route

    for heads in (1, 2, 4, 6, 8, 12, 16, 32):
        for kv in [k for k in range(1, heads + 1) if heads % k == 0]:
            for world in (1, 2, 3, 4, 8):
                if heads % world:
                    continue
                shape = AttentionShape(batch=1, heads=heads, kv_heads=kv, seq=64, head_dim=8)
                assert ALGORITHMS["ulysses"].kv_route(shape, world) == kv_route(heads, kv, world), \
                    (heads, kv, world)
