"""Distributed attention equals single-device attention: out and dq, dk, dv, float32, gloo on CPU.

Every algorithm × {causal, full} × {MHA, GQA, MQA} × {divisible, padded length} × {contig,
zigzag}, twice, with shapes drawn from a seed (head dims 128, 64, 16, 8; batch 1-2; odd lengths
down to three valid tokens, so some ranks hold only padding). Each worker call runs a whole batch
of cases: every rank builds the same global tensors, runs the algorithm on its shard, and returns
squared errors and squared reference norms, so the test reports the global relative error
‖a−b‖/‖b‖ per case against a float64 reference written independently of seqshard (explicit mask,
softmax, matmul).

A failure names the case; its pieces point to the bug: only padded cases → the seq_len handling
(blocks.py, layout.valid_count); only zigzag → pair_blocks / chunk_permutation; only dk/dv → the
travelling accumulators (ring) or the adjoint of the K/V exchange (Ulysses 'one'/'replicate'
routes); only GQA at 4 ranks under Ulysses → ulysses.kv_route.
"""

from __future__ import annotations

import itertools
import math
import random
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from seqshard.testing import assert_sharded_exact

from seqshard import testing
from seqshard.runtime import (allgather_attention, hybrid_attention, layout, local_attention,
                              ring_attention, tokenring_attention, ulysses_attention)

TOL = 1e-5

# (h, hk) pairs with 1 < hk < h; cycled so every Ulysses K/V route appears at 2 and 4 ranks.
_GQA = {2: [(4, 2), (6, 3), (8, 4)], 4: [(8, 2), (12, 6), (8, 4), (12, 3)]}


@dataclass(frozen=True)
class Case:
    algorithm: str
    causal: bool
    order: str
    heads: tuple[int, int]
    batch: int
    head_dim: int
    seq_len: int
    padded: int
    backend: str
    head_stride: int | None
    seed: int

    def __str__(self) -> str:
        h, hk = self.heads
        return (f"{self.algorithm} {'causal' if self.causal else 'full'} {self.order} h{h}/hk{hk} "
                f"b{self.batch} e{self.head_dim} seq {self.seq_len}/{self.padded} {self.backend}"
                + (f" stride {self.head_stride}" if self.head_stride else "") + f" seed {self.seed}")


def make_cases(algorithm: str, world: int, ulysses_degree: int, seed: int, rounds: int = 2) -> list[Case]:
    """`rounds` × every combination of mask, head kind, padding and order, shapes drawn from `seed`."""
    rng = random.Random(seed)
    gqa = itertools.cycle(_GQA[ulysses_degree])
    cases = []
    for _, causal, kind, padded, order in itertools.product(
            range(rounds), (True, False), ("MHA", "GQA", "MQA"), (False, True), ("contig", "zigzag")):
        h = ulysses_degree * rng.choice((1, 2))
        heads = {"MHA": (h, h), "GQA": next(gqa), "MQA": (h, 1)}[kind]
        multiple = layout.layout_multiple(order, world)
        if padded:
            # odd, so never a multiple of 2 or 4 ranks' layouts; from 3: with a single valid token dq
            # and dk are 0 up to rounding and no relative error exists
            seq_len = rng.choice(range(3, 3 * multiple + 2, 2))
            padded_len = layout.padded_length(seq_len, order, world) + (rng.randint(1, 4) if world == 1 else 0)
        else:
            seq_len = padded_len = multiple * rng.randint(1, 3) + (rng.randint(1, 16) if world == 1 else 0)
        cases.append(Case(
            algorithm, causal, order, heads, batch=rng.choice((1, 2)),
            head_dim=rng.choice((128, 64, 16, 8)), seq_len=seq_len,
            padded=padded_len,
            backend=rng.choice(("math", "flash_cpu")),
            head_stride=rng.choice((None, 1)) if algorithm == "allgather" else None,
            seed=rng.randrange(2**31)))
    return cases


def reference(q, k, v, dout, causal: bool, seq_len: int):
    """float64 single-device attention: masked keys >= seq_len, padded query rows 0 (and their
    upstream gradient ignored). Returns out, dq, dk, dv."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    s_pad = q.shape[2]
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(s_pad).unsqueeze(1)
    j = torch.arange(s_pad).unsqueeze(0)
    masked = (j >= seq_len) | ((j > i) if causal else torch.zeros((), dtype=torch.bool))
    p = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
    out = (p @ v.repeat_interleave(rep, 1)) * (torch.arange(s_pad) < seq_len).double().unsqueeze(-1)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _run(case: Case, q, k, v):
    kw = dict(causal=case.causal, seq_len=case.seq_len, backend=case.backend)
    if case.algorithm == "local":
        return local_attention(q, k, v, **kw)
    kw["order"] = case.order
    if case.algorithm == "ring":
        return ring_attention(q, k, v, None, **kw)
    if case.algorithm == "tokenring":
        return tokenring_attention(q, k, v, None, **kw)
    if case.algorithm == "allgather":
        return allgather_attention(q, k, v, None, head_stride=case.head_stride, **kw)
    if case.algorithm == "ulysses":
        return ulysses_attention(q, k, v, None, **kw)
    if case.algorithm == "hybrid":
        mesh = testing.mesh((2, dist.get_world_size() // 2), ("ring", "ulysses"))
        return hybrid_attention(q, k, v, mesh.get_group("ring"), mesh.get_group("ulysses"), **kw)
    raise AssertionError(case.algorithm)


def check_case(case: Case, rank: int, world: int) -> dict[str, tuple[float, float]]:
    """Squared error and squared reference norm of this rank's out, dq, dk, dv."""
    gen = torch.Generator().manual_seed(case.seed)
    h, hk = case.heads
    b, e, s = case.batch, case.head_dim, case.padded
    q = torch.randn(b, h, s, e, generator=gen)
    k = torch.randn(b, hk, s, e, generator=gen)
    v = torch.randn(b, hk, s, e, generator=gen)
    dout = torch.randn(b, h, s, e, generator=gen)
    expected = reference(q, k, v, dout, case.causal, case.seq_len)

    # rank r of the flattened index (ring-major on the 2-D mesh: the global rank) holds its shard
    def shard(x):
        return layout.shard(x, 2, case.order, rank, world)

    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    out = _run(case, ql, kl, vl)
    out.backward(shard(dout))
    got = (out, ql.grad, kl.grad, vl.grad)
    result = {}
    for name, a, ref in zip(("out", "dq", "dk", "dv"), got, expected):
        ref = shard(ref)
        assert a.dtype == torch.float32 and a.shape == ref.shape, (name, a.dtype, a.shape, ref.shape)
        result[name] = (((a.double() - ref) ** 2).sum().item(), (ref**2).sum().item())
    return result


def check_cases(cases: list[Case]) -> list[dict[str, tuple[float, float]]]:
    """Worker: run every case on this rank."""
    return [check_case(case, dist.get_rank(), dist.get_world_size()) for case in cases]




ALGORITHMS = ("ring", "allgather", "ulysses", "tokenring")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_single_device_on_2_ranks(pool2, algorithm):
    cases = make_cases(algorithm, world=2, ulysses_degree=2, seed=zlib.crc32(algorithm.encode()) + 2)
    assert_sharded_exact(cases, pool2.run(check_cases, cases))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_single_device_on_4_ranks(pool4, algorithm):
    cases = make_cases(algorithm, world=4, ulysses_degree=4, seed=zlib.crc32(algorithm.encode()) + 4)
    assert_sharded_exact(cases, pool4.run(check_cases, cases))


def test_hybrid_matches_single_device_on_2x2_mesh(pool4):
    """Ulysses over the inner mesh axis × ring over the outer one; shards laid out over the
    flattened (ring-major) index."""
    cases = make_cases("hybrid", world=4, ulysses_degree=2, seed=22)
    assert_sharded_exact(cases, pool4.run(check_cases, cases))


def test_local_attention_matches_single_device():
    """Heads split, whole sequence local: no group at all."""
    cases = [c for c in make_cases("local", world=1, ulysses_degree=2, seed=11) if c.order == "contig"]
    assert_sharded_exact(cases, [[check_case(case, 0, 1) for case in cases]])


def rejected_inputs() -> list[str]:
    """Worker (2 ranks): each bad call's ValueError message."""
    q, kv = torch.zeros(1, 4, 4, 8), torch.zeros(1, 2, 4, 8)
    calls = [
        lambda: ulysses_attention(torch.zeros(1, 3, 4, 8), *[torch.zeros(1, 3, 4, 8)] * 2),
        lambda: ring_attention(torch.zeros(1, 4, 3, 8), *[torch.zeros(1, 2, 3, 8)] * 2, order="zigzag"),
        lambda: allgather_attention(q, kv, kv, seq_len=9),
        lambda: tokenring_attention(q, torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8)),
        lambda: ring_attention(q, kv, kv, order="striped"),
        lambda: ring_attention(q, kv, kv, backend="cudnn"),
        lambda: ring_attention(q, torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8)),
        lambda: allgather_attention(q, kv, kv, head_stride=0),
    ]
    messages = []
    for call in calls:
        try:
            call()
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_bad_inputs_raise_errors_that_name_the_fix(pool2):
    messages = pool2.run(rejected_inputs)[0]
    expected = [
        "3 query heads are not divisible by the Ulysses degree 2; use ring",
        "zigzag needs the global length padded to a multiple of 2·N = 4",
        "seq_len=9 must be in [1, 8]",
        "4 query heads are not a multiple of 3 kv heads",
        "sequence order must be one of",
        "'cudnn' cannot run",
        "must agree in batch, local sequence length and head dim",
        "head_stride must be >= 1",
    ]
    for got, want in zip(messages, expected):
        assert want in got, (want, got)


def opcheck_attention_ops(with_hybrid: bool) -> bool:
    """Worker: torch.library.opcheck on every attention op: schema (no mutation or aliasing), fake
    implementation vs real outputs, autograd registration, and AOT dispatch (traces the backward
    op's fake implementation too)."""
    name = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(1, 4, 4, 8, generator=gen, requires_grad=True)
    kv = [torch.randn(1, 2, 4, 8, generator=gen, requires_grad=True) for _ in range(2)]
    options = (True, "zigzag", 7 if dist.get_world_size() == 2 else 13, 8**-0.5, "math")
    calls = [] if with_hybrid else [
        (torch.ops.seqshard.ring_attention.default, (q, *kv, name, *options)),
        (torch.ops.seqshard.tokenring_attention.default, (q, *kv, name, *options)),
        (torch.ops.seqshard.allgather_attention.default, (q, *kv, name, *options, 1)),
        (torch.ops.seqshard.ulysses_attention.default, (q, *kv, name, *options)),
        (torch.ops.seqshard.ulysses_attention.default, (q, kv[0][:, :1], kv[1][:, :1], name, *options)),
        (torch.ops.seqshard.local_attention.default, (q, *kv, False, 3, 0.3, "flash_cpu")),
    ]
    if with_hybrid:
        mesh = testing.mesh((2, 2), ("ring", "ulysses"))
        groups = (mesh.get_group("ring").group_name, mesh.get_group("ulysses").group_name)
        mqa = (kv[0][:, :1], kv[1][:, :1])
        calls.append((torch.ops.seqshard.hybrid_attention.default, (q, *mqa, *groups, *options)))
    for op, args in calls:
        torch.library.opcheck(op, args)
    return True


def test_attention_ops_pass_opcheck(pool2):
    assert pool2.run(opcheck_attention_ops, False) == [True, True]


def test_hybrid_op_passes_opcheck(pool4):
    assert pool4.run(opcheck_attention_ops, True) == [True] * 4
