"""Pipelined Ulysses (head chunks) equals single-device attention and plain Ulysses; gloo on CPU.

Every case runs `ulysses_attention` with `chunks` = G and with chunks = 1, forward and backward, on
the same shards, and compares out, dq, dk, dv with a float64 reference (relative error <= 1e-5 in
float32) and with the unpipelined run (<= 1e-6). Cases: G ∈ {2, 3, 4} at 12 heads per rank and
G = 4 at 4 heads per rank (one head per chunk: the exchange buffers used in place) × {causal, full}
× {contig, zigzag} × {divisible, padded} × {MHA, GQA}, batch 1 and 2, shards contiguous or
strided ([b, s, h, e] memory, as a model's projections give them), at 2 and 4 ranks. The GQA
pairs cycle through every K/V path: pieces Gk = G, 1 < Gk < G, Gk = 1, chunks whose query heads do
not split evenly over their kv heads (replicated), and the all-gather routes 'one'/'replicate'.

A failure names the case; its pieces point to the bug: only zigzag → ulysses._runs (the token-run
copies); only GQA → the head order / `_kv_slot` or the fp32 sum of dk, dv per piece; only at
batch 1 (or contig) → the in-place buffers of `_start_to_heads` / `_start_to_seq`; differs from
chunks=1 but not from the reference → an order of summation changed.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from seqshard import testing
from seqshard.runtime import hybrid_attention, layout, ulysses_attention
from seqshard.runtime.ulysses import default_chunks, kv_pieces, kv_route, pipelined_chunks
from test_runtime_attention import reference

TOL, TOL_UNPIPELINED = 1e-5, 1e-6

# heads per rank -> (h, hk) pairs per world; each covers a different K/V path (see the docstring)
_GQA = {
    (2, 12): [(24, 12), (24, 8), (24, 6), (24, 2), (24, 3), (24, 1)],
    (4, 12): [(48, 16), (48, 8), (48, 12), (48, 4), (48, 6), (48, 2)],
    (2, 4): [(8, 4), (8, 2), (8, 1)],
    (4, 4): [(16, 8), (16, 4), (16, 2)],
}
_CHUNKS = ((2, 12), (3, 12), (4, 12), (4, 4))  # (chunks, heads per rank)


@dataclass(frozen=True)
class Case:
    chunks: int
    causal: bool
    order: str
    heads: tuple[int, int]
    batch: int
    seq_len: int
    padded: int
    bshe: bool  # the shards are [b, s, h, e] in memory, passed as [b, h, s, e] views
    seed: int
    transport: str = "nccl"  # of the pipelined run ('emulated': peer.py's pull plans)

    def __str__(self) -> str:
        h, hk = self.heads
        return (f"chunks {self.chunks} {'causal' if self.causal else 'full'} {self.order} "
                f"h{h}/hk{hk} b{self.batch} seq {self.seq_len}/{self.padded}"
                + (" bshe" if self.bshe else "") + f" {self.transport} seed {self.seed}")


def make_cases(world: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    gqa = {key: itertools.cycle(pairs) for key, pairs in _GQA.items()}
    cases = []
    for (chunks, local), causal, order, padded, kind in itertools.product(
            _CHUNKS, (True, False), ("contig", "zigzag"), (False, True), ("MHA", "GQA")):
        heads = (world * local, world * local) if kind == "MHA" else next(gqa[world, local])
        multiple = layout.layout_multiple(order, world)
        if padded:
            seq_len = rng.choice(range(3, 3 * multiple + 2, 2))
            padded_len = layout.padded_length(seq_len, order, world)
        else:
            seq_len = padded_len = multiple * rng.randint(1, 3)
        cases.append(Case(chunks, causal, order, heads, rng.choice((1, 2)), seq_len, padded_len,
                          rng.random() < 0.25, rng.randrange(2**31),
                          ("nccl", "emulated")[len(cases) % 2]))
    return cases


def check_case(case: Case) -> dict[str, tuple[float, float, float, float]]:
    """Worker: per output, squared error and norm against the reference, and squared difference
    and norm against chunks=1."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(case.seed)
    (h, hk), b, s = case.heads, case.batch, case.padded
    q, dout = (torch.randn(b, h, s, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, hk, s, 8, generator=gen) for _ in range(2))
    expected = reference(q, k, v, dout, case.causal, case.seq_len)

    def shard(x):
        return layout.shard(x, 2, case.order, rank, world)

    def run(chunks, transport):
        leaves = [shard(x).transpose(1, 2).contiguous() if case.bshe else shard(x) for x in (q, k, v)]
        for x in leaves:
            x.requires_grad_()
        ql, kl, vl = (x.transpose(1, 2) if case.bshe else x for x in leaves)
        out = ulysses_attention(ql, kl, vl, causal=case.causal, order=case.order,
                                seq_len=case.seq_len, backend="math", chunks=chunks,
                                transport=transport)
        dout_l = shard(dout)
        out.backward(dout_l.transpose(1, 2).contiguous().transpose(1, 2) if case.bshe else dout_l)
        grads = (x.grad.transpose(1, 2) if case.bshe else x.grad for x in leaves)
        return out.detach(), *grads

    result = {}
    for name, got, plain, ref in zip(("out", "dq", "dk", "dv"), run(case.chunks, case.transport),
                                        run(1, "nccl"), expected):
        ref = shard(ref)
        assert got.dtype == torch.float32 and got.shape == ref.shape, (name, got.shape, ref.shape)
        result[name] = (((got.double() - ref) ** 2).sum().item(), (ref**2).sum().item(),
                        ((got - plain).double() ** 2).sum().item(), (plain.double()**2).sum().item())
    return result


def check_cases(cases: list[Case]) -> list[dict]:
    return [check_case(case) for case in cases]


def assert_pipelined_exact(cases: list[Case], per_rank: list[list[dict]]) -> None:
    failures = []
    for i, case in enumerate(cases):
        for name in ("out", "dq", "dk", "dv"):
            err, ref, diff, plain = (sum(r[i][name][j] for r in per_rank) for j in range(4))
            rel = math.sqrt(err) / max(math.sqrt(ref), 1e-30)
            rel_plain = math.sqrt(diff) / max(math.sqrt(plain), 1e-30)
            if not rel <= TOL:  # also catches nan
                failures.append(f"{case}: {name} relative error {rel:.2e} against the reference")
            if not rel_plain <= TOL_UNPIPELINED:
                failures.append(f"{case}: {name} differs from chunks=1 by {rel_plain:.2e}")
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures)


def test_cases_cover_every_kv_path():
    """The GQA pairs above really reach every K/V path (guards the case table itself)."""
    seen = set()
    for world in (2, 4):
        for case in make_cases(world, seed=world):
            h, hk = case.heads
            route = kv_route(h, hk, world)
            pieces = kv_pieces(h, hk, world, case.chunks)
            g, rep = h // world // case.chunks, h // hk
            kind = route if route != "scatter" else (
                "Gk=G" if pieces == case.chunks else "Gk=1" if pieces == 1 else "1<Gk<G")
            seen.add(kind)
            if route == "scatter" and g % rep and rep % g:
                seen.add("uneven")
    assert seen == {"Gk=G", "1<Gk<G", "Gk=1", "uneven", "one", "replicate"}, seen


def test_pipelined_matches_single_device_and_plain_on_2_ranks(pool2):
    cases = make_cases(2, seed=2)
    assert_pipelined_exact(cases, pool2.run(check_cases, cases))


def test_pipelined_matches_single_device_and_plain_on_4_ranks(pool4):
    cases = make_cases(4, seed=4)
    assert_pipelined_exact(cases, pool4.run(check_cases, cases))


def hybrid_chunks_match() -> float:
    """Worker (2×2 mesh): the hybrid with chunks=2 (by emulated copy-engine pulls) against
    chunks=1 (NCCL all-to-all), GQA, zigzag, padded."""
    mesh = testing.mesh((2, 2), ("ring", "ulysses"))
    groups = (mesh.get_group("ring"), mesh.get_group("ulysses"))
    gen = torch.Generator().manual_seed(7)
    q, dout = (torch.randn(2, 8, 16, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 4, 16, 8, generator=gen) for _ in range(2))

    def run(chunks, transport):
        ql, kl, vl = (layout.shard(x, 2, "zigzag", dist.get_rank(), 4).requires_grad_()
                      for x in (q, k, v))
        out = hybrid_attention(ql, kl, vl, *groups, order="zigzag", seq_len=13, backend="math",
                               chunks=chunks, transport=transport)
        out.backward(layout.shard(dout, 2, "zigzag", dist.get_rank(), 4))
        return out.detach(), ql.grad, kl.grad, vl.grad

    return max(((a - b).norm() / b.norm()).item() for a, b in zip(run(2, "emulated"), run(1, "nccl")))


def test_hybrid_chunks_match_unpipelined(pool4):
    assert max(pool4.run(hybrid_chunks_match)) <= TOL_UNPIPELINED


def opcheck_pipelined_ops() -> bool:
    """Worker (4 ranks): torch.library.opcheck on the Ulysses and hybrid ops with chunks > 1: schema
    (no mutation or aliasing), fake implementation against real outputs, autograd registration and
    AOT dispatch (traces the backward op's fake implementation too)."""
    name = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(1, 8, 4, 8, generator=gen, requires_grad=True)
    kv = [torch.randn(1, 4, 4, 8, generator=gen, requires_grad=True) for _ in range(2)]
    options = (True, "zigzag", 13, 8**-0.5, "math")
    mesh = testing.mesh((2, 2), ("ring", "ulysses"))
    groups = (mesh.get_group("ring").group_name, mesh.get_group("ulysses").group_name)
    torch.library.opcheck(torch.ops.seqshard.ulysses_attention.default, (q, *kv, name, *options, 2))
    torch.library.opcheck(torch.ops.seqshard.hybrid_attention.default, (q, *kv, *groups, *options, 4))
    return True


def test_pipelined_ops_pass_opcheck(pool4):
    assert pool4.run(opcheck_pipelined_ops) == [True] * 4


def rejected_chunks() -> list[str]:
    """Worker (2 ranks): the ValueError of each bad `chunks`."""
    q = torch.zeros(1, 12, 4, 8)
    messages = []
    for chunks in (0, 4, 7):
        try:
            ulysses_attention(q, q, q, chunks=chunks)
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_bad_chunks_raise_errors_that_name_the_fix(pool2):
    for message in pool2.run(rejected_chunks)[0]:
        assert "must divide the 6 heads each rank holds" in message, message
        assert "use one of [1, 2, 3, 6]" in message, message


def test_default_chunks():
    """1 by default (NCCL measured slower on 4×H200); over copy engines 2 whenever the heads per
    rank are even and each chunk keeps 2^17 rows."""
    k128, k32 = 128 * 1024, 32 * 1024
    assert default_chunks("cpu", 1, 32, k128, 4) == 1
    assert default_chunks(torch.device("cuda", 0), 1, 32, k128, 4) == 1
    assert default_chunks(torch.device("cuda", 0), 1, 32, k128, 4, "peer") == 2  # copy engines
    assert pipelined_chunks(1, 32, k128, 4) == 2      # 8 heads per rank
    assert pipelined_chunks(1, 8, k128, 4) == 2       # 2 heads per rank
    assert pipelined_chunks(1, 4, k128, 4) == 1       # 1 head per rank
    assert pipelined_chunks(1, 12, k128, 4) == 1      # 3 heads per rank: 2 does not divide
    assert pipelined_chunks(1, 32, k32, 4) == 2       # 8 heads × 32K: 2^17 rows per chunk
    assert pipelined_chunks(1, 8, k32, 4) == 1        # 2 heads × 32K: too few rows
    assert pipelined_chunks(1, 32, 8 * 1024, 4) == 1


def reorders(interpret: bool) -> None:
    """The run copies of the exchange against cat / index_select, both ways, contig and zigzag,
    with strided destinations; `interpret`: through the Triton kernel (kernels/a2a_layout.py)."""
    from seqshard.codegen.kernels import a2a_layout
    from seqshard.runtime import layout
    from seqshard.runtime.ulysses import _arrivals_to_positions, _positions_to_arrivals, _runs

    n, b, g, s, e = 4, 2, 3, 6, 8
    for order in ("contig", "zigzag"):
        runs = _runs(order, n, s, tuple(range(n)))
        recv = torch.randn(n, b, g, s, e)
        for dest in (torch.empty(b, g, n * s, e), torch.empty(g, b, n * s, e).transpose(0, 1)):
            assert a2a_layout.triton_usable(dest[:, :, :s], recv[0]) == interpret
            got = _arrivals_to_positions(recv, dest, runs)
            # recv is rank-major; the positions of rank j's local tokens come from the layout
            expected = torch.empty(b, g, n * s, e)
            for j in range(n):
                expected[:, :, layout.local_positions(order, j, n, s)] = recv[j]
            assert torch.equal(got, expected), order
            back = _positions_to_arrivals(got, torch.empty(g, n, b, s, e).permute(1, 2, 0, 3, 4),
                                          runs)
            assert torch.equal(back, recv), order


def test_reorders_are_exact():
    reorders(interpret=False)


def test_reorders_are_exact_through_the_triton_copy():
    pytest.importorskip("triton")
    import subprocess
    import sys
    code = ("import torch; torch.manual_seed(0); "
            "from test_runtime_ulysses_pipeline import reorders; reorders(interpret=True)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1",
                                   PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                                               os.environ.get("PYTHONPATH", "")])))
    assert done.returncode == 0, done.stdout + done.stderr
