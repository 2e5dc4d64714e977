"""Alpha-beta collectives: the formulas by hand, monotonicity, and identities between them."""

import pytest
import sympy

from seqshard.costmodel import Cluster
from seqshard.costmodel import collectives as C
from seqshard.costmodel.cluster import COLLECTIVES, PRESETS

MiB = 2**20
NVLINK = PRESETS["h200"][1]
ALPHA = NVLINK.latency


def test_hand_computed_all_gather_and_all_to_all():
    # 4 GPUs, 256 MiB gathered: 3 steps + 3/4 of the buffer at 317 GB/s
    assert C.all_gather(256 * MiB, 4, NVLINK) == pytest.approx(3 * ALPHA + 0.75 * 256 * MiB / 317e9)
    # 16 MiB all-to-all: the small-message point, 119 GB/s
    assert C.all_to_all(16 * MiB, 4, NVLINK) == pytest.approx(3 * ALPHA + 0.75 * 16 * MiB / 119e9)
    # 64 MiB lies halfway between 16 and 256 MiB in log size: the mean bandwidth
    assert C.all_to_all(64 * MiB, 4, NVLINK) == pytest.approx(3 * ALPHA + 0.75 * 64 * MiB / 195.5e9)
    # one ring step of 256 MiB at 261 GB/s
    assert C.send_recv(256 * MiB, 4, NVLINK) == pytest.approx(ALPHA + 256 * MiB / 261e9)
    # ring all-reduce: 2(n-1) steps, 2(n-1)/n of the buffer at 318 GB/s
    assert C.all_reduce(256 * MiB, 8, NVLINK) == pytest.approx(14 * ALPHA + 1.75 * 256 * MiB / 318e9)


def test_a_group_of_one_moves_nothing():
    for kind, fn in C.COLLECTIVE_TIME.items():
        assert fn(MiB, 1, NVLINK) == 0.0, kind
        assert C.bytes_sent(kind, MiB, 1) == 0


@pytest.mark.parametrize("kind", COLLECTIVES)
@pytest.mark.parametrize("axis_of", [("h200x8", (8,), 0), ("h100x128", (16, 8), 0), ("h100x128", (128,), 0)])
def test_time_grows_with_bytes(kind, axis_of):
    text, mesh, axis = axis_of
    c = Cluster.parse(text)
    link, n = c.axis_link(mesh, axis), c.axis_group_size(mesh, axis)
    sizes = [2**k for k in range(8, 34)]
    times = [C.COLLECTIVE_TIME[kind](s, n, link) for s in sizes]
    assert all(a < b for a, b in zip(times, times[1:])), kind


def test_all_reduce_is_reduce_scatter_plus_all_gather_for_large_messages():
    size = 1 << 30
    ar = C.all_reduce(size, 8, NVLINK)
    assert C.all_reduce_algorithm(size, 8, NVLINK) == "ring"
    assert ar == pytest.approx(C.reduce_scatter(size, 8, NVLINK) + C.all_gather(size, 8, NVLINK), rel=0.01)
    assert C.bytes_sent("all_reduce", size, 8) == pytest.approx(
        C.bytes_sent("reduce_scatter", size, 8) + C.bytes_sent("all_gather", size, 8))


def test_tree_all_reduce_wins_for_small_messages_and_many_ranks():
    # 8 GPUs on NVLink: ring's 14 steps cost less than its 8x smaller byte count saves above ~20 MB
    assert C.all_reduce_algorithm(64 * 1024, 8, NVLINK) == "tree"
    assert C.all_reduce_algorithm(1 << 30, 8, NVLINK) == "ring"
    # 1024 GPUs: 2046 ring steps at the network's latency; the tree's 20 steps win even at 1 GiB
    link = Cluster.parse("h100x1024").axis_link((1024,), 0)
    assert C.all_reduce_algorithm(1 << 30, 1024, link) == "tree"
    assert C.all_reduce(64 * 1024, 1024, link) < 2 * 1023 * link.latency  # below ring's latency


def test_symbolic_sizes_give_the_numeric_time():
    b, n = sympy.symbols("b n", positive=True)
    for kind, fn in C.COLLECTIVE_TIME.items():
        expr = fn(b, 4, NVLINK)
        assert isinstance(expr, sympy.Expr), kind
        assert float(expr.subs(b, 100 * MiB)) == pytest.approx(fn(100 * MiB, 4, NVLINK)), kind
        both = fn(b, n, NVLINK)
        assert float(both.subs({b: 100 * MiB, n: 8})) == pytest.approx(fn(100 * MiB, 8, NVLINK)), kind
