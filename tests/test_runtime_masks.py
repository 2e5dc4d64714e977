"""Structured masks (documents, positions, sliding window, key padding) are exact under every
attention algorithm: out and dq, dk, dv in float32 against a float64 single-device reference.

The mask family of notes MASKS.md: query i attends key j iff same document (segments), causal by
positions, positions[i] - positions[j] < window, and key_valid[j]. Mask kinds:

    documents        packed documents (segments), causal by index
    doc_positions    position_ids that restart at each document, causal by position; with the
                     segments for MHA, without them for GQA (then a query also sees earlier
                     positions of other documents, and the layouts' causal block structure no
                     longer applies: blocks.refine classifies everything)
    window           sliding window, causal
    key_padding      [B, S] key padding (left padding and holes); causal for MHA, full for GQA,
                     so some causal rows see no key at all (out 0, grads 0)
    combined         documents + restarting positions + window + key padding

× {MHA, GQA} × {divisible, padded (odd) length} × contig/zigzag (alternating) at 2 ranks; a
subset at 4 ranks; the hybrid on a 2×2 mesh; local attention in process. The reference builds
the dense mask from the rule, independently of seqshard.runtime.masks. Beside them: the refined
blocks cover every mask exactly once (documents, tiles, the causal structure), which kernels
packed documents and windows get, the ops under opcheck with masks, input errors, and on GPU
(marked gpu) cuDNN's masked blocks.

A failure names the case: only doc_positions without segments → masks.index_causal / the
structure; only zigzag → blocks.refine's row indices (masks.global_index); only tokenring →
pair_span vs the refined blocks; only rows with no visible key (key_padding causal) → the math
kernel's -inf handling (backends._math_forward).
"""

from __future__ import annotations

import itertools
import math
import re
import random
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from seqshard.testing import assert_sharded_exact

from seqshard import testing
from seqshard.runtime import (allgather_attention, backends, blocks, hybrid_attention, layout,
                              local_attention, ring_attention, tokenring_attention,
                              ulysses_attention)
from seqshard.runtime.blocks import gathered_blocks, pair_blocks
from seqshard.runtime.masks import token_mask

TOL = 1e-5
KINDS = ("documents", "doc_positions", "window", "key_padding", "combined")
_GQA = {2: (4, 2), 4: (8, 2)}


@dataclass(frozen=True)
class Case:
    algorithm: str
    kind: str
    order: str
    heads: tuple[int, int]
    batch: int
    head_dim: int
    seq_len: int
    padded: int
    backend: str
    seed: int

    def __str__(self) -> str:
        h, hk = self.heads
        return (f"{self.algorithm} {self.kind} {self.order} h{h}/hk{hk} b{self.batch} "
                f"e{self.head_dim} seq {self.seq_len}/{self.padded} {self.backend} "
                f"seed {self.seed}")


def make_cases(algorithm: str, world: int, ulysses_degree: int, seed: int,
               subset: bool = False) -> list[Case]:
    """Every kind × {MHA, GQA} × {divisible, padded}, orders alternating; `subset`: one head kind
    and padding per mask kind (alternating)."""
    rng = random.Random(seed)
    combos = list(itertools.product(KINDS, ("MHA", "GQA"), (False, True)))
    if subset:
        combos = [c for i, c in enumerate(combos) if i % 4 in (0, 3)]
    cases = []
    for i, (kind, heads, padded) in enumerate(combos):
        order = ("contig", "zigzag")[i % 2]
        multiple = layout.layout_multiple(order, world)
        least = -(-8 // multiple)  # >= 8 tokens: documents, windows and padding all have room
        if padded:
            seq_len = rng.choice(range(least * multiple + 1, (least + 2) * multiple, 2))
            padded_len = layout.padded_length(seq_len, order, world)
        else:
            seq_len = padded_len = multiple * rng.randint(least, least + 2)
        h = ulysses_degree * rng.choice((1, 2))
        cases.append(Case(algorithm, kind, order,
                          (h, h) if heads == "MHA" else _GQA[ulysses_degree],
                          batch=rng.choice((1, 2)), head_dim=rng.choice((8, 16)),
                          seq_len=seq_len, padded=padded_len,
                          backend=rng.choice(("math", "flash_cpu")),
                          seed=rng.randrange(2**31)))
    return cases


def _documents(rng: random.Random, rows: int, n: int) -> torch.Tensor:
    """Document ids [rows, n]: random lengths from 1 to n/2 (some cross shard boundaries)."""
    out = []
    for _ in range(rows):
        ids, doc = [], 0
        while len(ids) < n:
            ids += [doc] * rng.randint(1, max(1, n // 2))
            doc += 1
        out.append(ids[:n])
    return torch.tensor(out)


def _restarting(segments: torch.Tensor) -> torch.Tensor:
    """position_ids that restart at 0 at each document."""
    n = segments.shape[1]
    idx = torch.arange(n).expand_as(segments)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def mask_options(case: Case) -> dict:
    """The keyword arguments (causal and the per-token tensors) of a case, drawn from its seed;
    redrawn until some query sees two keys (else dq and dk are 0 and no relative error exists)."""
    rng = random.Random(case.seed)
    while True:
        options = _draw_options(case, rng)
        if (dense_mask(options, case.seq_len, case.seq_len).sum(-1) >= 2).any():
            return options


def _draw_options(case: Case, rng: random.Random) -> dict:
    n, b = case.seq_len, case.batch
    rows = rng.choice((1, b))  # B may be 1 and broadcast over the batch
    mha = case.heads[0] == case.heads[1]
    options: dict = dict(causal=True)
    if case.kind in ("documents", "doc_positions", "combined"):
        segments = _documents(rng, rows, n)
        options["segments"] = segments
        if case.kind != "documents":
            options["positions"] = _restarting(segments)
            if case.kind == "doc_positions" and not mha:
                del options["segments"]
    if case.kind in ("window", "combined"):
        options["window"] = rng.randint(1, max(1, n // 2))
    if case.kind in ("key_padding", "combined"):
        valid = torch.rand(rows, n, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        valid = valid > 0.25
        for r in range(rows):
            valid[r, :rng.randint(0, n // 3)] = False  # left padding
        valid[:, rng.randrange(n)] = True  # a sequence of padding only is not a use
        options["key_valid"] = valid
        options["causal"] = case.kind == "combined" or mha
    return options


def dense_mask(options: dict, seq_len: int, padded: int) -> torch.Tensor:
    """bool [B|1, padded, padded] by the rule of MASKS.md; padding rows and columns masked."""
    idx = torch.arange(seq_len)
    seen = torch.ones(1, seq_len, seq_len, dtype=torch.bool)
    pos = options.get("positions", idx.unsqueeze(0))
    qp, kp = pos.unsqueeze(2), pos.unsqueeze(1)
    if "segments" in options:
        seg = options["segments"]
        seen = seen & (seg.unsqueeze(2) == seg.unsqueeze(1))
    if options["causal"]:
        seen = seen & (kp <= qp)
    if "window" in options:
        seen = seen & (qp - kp < options["window"])
    if "key_valid" in options:
        seen = seen & options["key_valid"].unsqueeze(1)
    full = torch.zeros(seen.shape[0], padded, padded, dtype=torch.bool)
    full[:, :seq_len, :seq_len] = seen
    return full


def reference(q, k, v, dout, seen):
    """float64 attention under the dense mask `seen` [B|1, S, S]; a row that sees no key outputs
    0 and gets no gradient. Returns out, dq, dk, dv."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    seen = seen.unsqueeze(1)
    some = seen.any(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(~(seen | ~some), float("-inf")), dim=-1) * some
    out = p @ v.repeat_interleave(rep, 1)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _run(case: Case, q, k, v, options: dict):
    kw = dict(seq_len=case.seq_len, backend=case.backend, **options)
    if case.algorithm == "local":
        return local_attention(q, k, v, **kw)
    kw["order"] = case.order
    if case.algorithm == "ring":
        return ring_attention(q, k, v, None, **kw)
    if case.algorithm == "tokenring":
        return tokenring_attention(q, k, v, None, **kw)
    if case.algorithm == "allgather":
        return allgather_attention(q, k, v, None, head_stride=1, **kw)
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
    options = mask_options(case)
    expected = reference(q, k, v, dout, dense_mask(options, case.seq_len, s))

    def shard(x):
        return layout.shard(x, 2, case.order, rank, world)

    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    out = _run(case, ql, kl, vl, options)
    out.backward(shard(dout))
    result = {}
    for name, a, ref in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), expected):
        ref = shard(ref)
        assert a.dtype == torch.float32 and a.shape == ref.shape, (name, a.dtype, a.shape,
                                                                   ref.shape)
        result[name] = (((a.double() - ref) ** 2).sum().item(), (ref**2).sum().item())
    return result


def check_cases(cases: list[Case]) -> list[dict[str, tuple[float, float]]]:
    """Worker: run every case on this rank."""
    return [check_case(case, dist.get_rank(), dist.get_world_size()) for case in cases]




ALGORITHMS = ("ring", "allgather", "tokenring", "ulysses")


def test_masks_exact_on_2_ranks(pool2):
    cases = [c for a in ALGORITHMS for c in make_cases(a, 2, 2, zlib.crc32(a.encode()) + 2)]
    assert_sharded_exact(cases, pool2.run(check_cases, cases))


def test_masks_exact_on_4_ranks_and_2x2_hybrid(pool4):
    cases = [c for a in ALGORITHMS for c in make_cases(a, 4, 4, zlib.crc32(a.encode()) + 4,
                                                        subset=True)]
    cases += make_cases("hybrid", 4, 2, seed=22)
    assert_sharded_exact(cases, pool4.run(check_cases, cases))


def test_local_attention_masks_exact(monkeypatch):
    """Also with tiles of 4 rows (blocks._TILE), so that windows and key padding cut masked
    blocks into tiles that merge in fp32."""
    cases = make_cases("local", 1, 2, seed=11)
    assert_sharded_exact(cases, [[check_case(case, 0, 1) for case in cases]])
    monkeypatch.setattr(blocks, "_TILE", 4)
    monkeypatch.setattr(blocks, "_EMPTY_TILES", 0)
    cases = [c for c in make_cases("local", 1, 2, seed=13) if c.kind in ("window", "combined")]
    assert_sharded_exact(cases, [[check_case(case, 0, 1) for case in cases]])


# ---------------------------------------------------------------------------------------------
# Blocks: what the masks cost
# ---------------------------------------------------------------------------------------------

def _counted(blocks, batch: int, n_q: int, n_k: int) -> torch.Tensor:
    """How often each (query, key) pair of a shard pair is covered by the blocks."""
    count = torch.zeros(batch, n_q, n_k, dtype=torch.int64)
    for b in blocks:
        ones = torch.ones(b.q1 - b.q0, b.k1 - b.k0, dtype=torch.int64)
        part = b.mask[:, 0].long() if b.mask is not None else ones.tril() if b.causal else ones
        count[:, b.q0:b.q1, b.k0:b.k1] += part
    return count


@pytest.mark.parametrize("order,world,empty_tiles", [("zigzag", 2, 0), ("contig", 3, 0.75),
                                                     ("zigzag", 4, 0)])
def test_refined_blocks_cover_the_mask_exactly_once(monkeypatch, order, world, empty_tiles):
    """Every visible (query, key) pair of every shard pair lies in exactly one block, and no
    invisible one in any: for ring-style pairs and all-gathered keys, every mask kind, padded
    lengths, tiles of 3 rows (so tiling, documents and the causal structure all take part)."""
    monkeypatch.setattr(blocks, "_TILE", 3)
    monkeypatch.setattr(blocks, "_EMPTY_TILES", empty_tiles)
    for i, kind in enumerate(KINDS):
        seq_len = 11 + 4 * i
        padded = layout.padded_length(seq_len, order, world)
        case = Case("ring", kind, order, (2, 2) if i % 2 else (2, 1), 2, 8, seq_len, padded,
                    "math", 1000 + i)
        options = mask_options(case)
        mask = token_mask(options["causal"], options.get("positions"), options.get("segments"),
                          options.get("window"), options.get("key_valid"), torch.device("cpu"))
        seen = dense_mask(options, seq_len, padded).long()
        local_len = padded // world
        pos = [layout.local_positions(order, r, world, local_len) for r in range(world)]
        for q_rank, kv_rank in itertools.product(range(world), range(world)):
            got = pair_blocks(order, options["causal"], q_rank, kv_rank, world, local_len,
                              seq_len, mask)
            want = seen[:, pos[q_rank]][:, :, pos[kv_rank]]
            assert torch.equal(_counted(got, want.shape[0], local_len, local_len), want), (
                kind, q_rank, kv_rank, [str(b) for b in got])
        for rank in range(world):
            got = gathered_blocks(order, options["causal"], rank, world, local_len, seq_len, mask)
            want = seen[:, pos[rank]]
            assert torch.equal(_counted(got, want.shape[0], local_len, padded), want), (
                kind, rank, [str(b) for b in got])


def _kinds(blocks) -> list[str]:
    return ["masked" if b.mask is not None else "causal" if b.causal else "full" for b in blocks]


@pytest.mark.parametrize("with_positions", (False, True))
def test_packed_documents_run_on_full_and_causal_kernels_only(with_positions):
    """Documents under a causal mask (by index, or by position_ids that restart per document)
    split into per-document blocks (varlen), each a full or causal block: no masked kernel, and
    the pairs that share no document are skipped."""
    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])  # 16 tokens, 4 ranks × 4 (contig)
    positions = torch.tensor([list(range(5)) + list(range(7)) + list(range(4))])
    mask = token_mask(True, positions if with_positions else None, segments, None, None,
                      torch.device("cpu"))
    assert mask.index_causal
    for order, q_rank, kv_rank in itertools.product(("contig", "zigzag"), range(4), range(4)):
        local_len = 4
        blocks = pair_blocks(order, True, q_rank, kv_rank, 4, local_len, None, mask)
        assert set(_kinds(blocks)) <= {"full", "causal"}, (order, q_rank, kv_rank, blocks)
    # contig: rank 3 (tokens 12-15, document 2) shares no document with ranks 0 and 1
    assert pair_blocks("contig", True, 3, 0, 4, 4, None, mask) == []
    assert pair_blocks("contig", True, 3, 1, 4, 4, None, mask) == []
    # rank 1 holds 4 (doc 0) and 5-7 (doc 1): a causal block for each document, nothing across
    assert [str(b) for b in pair_blocks("contig", True, 1, 1, 4, 4, None, mask)] == [
        "q[0:1]×k[0:1]", "q[1:4]×k[1:4] causal"]
    # all-gather: rank 1 sees document 0's first 4 tokens in full, and its own rows causally
    assert [str(b) for b in gathered_blocks("contig", True, 1, 4, 4, None, mask)] == [
        "q[0:1]×k[0:4]", "q[0:1]×k[4:5]", "q[1:4]×k[5:8] causal"]


def test_positions_that_do_not_increase_drop_the_causal_structure():
    """Restarting positions without documents: a later key with a smaller position is visible,
    so the structure cannot skip blocks above the diagonal."""
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    mask = token_mask(True, positions, None, None, None, torch.device("cpu"))
    assert not mask.index_causal
    # rank 0 (positions 0-3) sees the keys of rank 1 (positions 0-3, later tokens) at positions
    # <= its own: a causal square where causal by index would see nothing
    assert _kinds(pair_blocks("contig", True, 0, 1, 2, 4, None, mask)) == ["causal"]
    positions = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 4]])
    mask = token_mask(True, positions, None, None, None, torch.device("cpu"))
    assert _kinds(pair_blocks("contig", True, 0, 1, 2, 4, None, mask)) == ["masked"]


def test_window_skips_blocks_out_of_reach():
    mask = token_mask(True, None, None, 3, None, torch.device("cpu"))
    assert pair_blocks("contig", True, 3, 0, 4, 4, None, mask) == []
    assert _kinds(pair_blocks("contig", True, 1, 0, 4, 4, None, mask)) == ["masked"]
    assert _kinds(pair_blocks("contig", True, 0, 0, 4, 4, None, mask)) == ["masked"]


def test_masked_kernel_rows_without_keys_are_zero():
    """backends: a masked block whose row sees nothing gives out 0, lse -inf, and no gradient,
    also when the merged lse of that row is finite (other blocks saw keys)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(4))
    seen = torch.tensor([[[[True, False, True], [False, False, False], [True, True, True]]]])
    out, lse = backends.attention_forward(q, k, v, mask=seen, backend="flash_cpu")
    assert torch.isneginf(lse[:, :, 1]).all() and (out[:, :, 1] == 0).all()
    assert torch.isfinite(out).all()
    lse_merged = lse.masked_fill(torch.isneginf(lse), 1.5)  # as if another block saw keys
    dq, dk, dv = backends.attention_backward(dout, q, k, v, out, lse_merged, mask=seen)
    assert (dq[:, :, 1] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


# ---------------------------------------------------------------------------------------------
# GPU: run on the device machine (pytest -m gpu)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_local_attention_masks_exact_in_fp32():
    """On CUDA: fp32 runs the masked blocks on math, the others on whatever the backend picks."""
    cases = make_cases("local", 1, 2, seed=11)
    errors = []
    for case in cases:
        gen = torch.Generator().manual_seed(case.seed)
        h, hk = case.heads
        xs = [torch.randn(case.batch, n, case.padded, 64, generator=gen) for n in (h, hk, hk, h)]
        options = mask_options(case)
        expected = reference(*xs, dense_mask(options, case.seq_len, case.padded))
        q, k, v = (x.cuda().requires_grad_() for x in xs[:3])
        on_gpu = {key: value.cuda() if torch.is_tensor(value) else value
                  for key, value in options.items()}
        out = local_attention(q, k, v, seq_len=case.seq_len, **on_gpu)
        out.backward(xs[3].cuda())
        for name, a, ref in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), expected):
            rel = ((a.double().cpu() - ref).norm() / ref.norm()).item()
            if not rel <= TOL:
                errors.append(f"{case}: {name} {rel:.1e}")
    assert not errors, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(512, 512, 1), (237, 512, 2), (100, 37, 2)])
def test_cuda_masked_cudnn_block_within_2x_of_sdpa(shape):
    """cuDNN with a -inf bias: forward, and backward from a merged lse, in bf16 within 2× the
    error of PyTorch's own bf16 SDPA with that mask (both against fp32 math); rows without keys
    come out 0 with no gradient."""
    n_q, n_k, mask_batch = shape
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 8, n_q, 128, device="cuda", generator=gen)
    k, v = (torch.randn(2, 4, n_k, 128, device="cuda", generator=gen) for _ in range(2))
    dout = torch.randn(2, 8, n_q, 128, device="cuda", generator=gen)
    seen = torch.rand(mask_batch, 1, n_q, n_k, device="cuda", generator=gen) > 0.5
    seen[..., :3, :] = False  # rows without keys
    ref_out, ref_lse = backends.attention_forward(q, k, v, mask=seen, backend="math")
    out, lse = backends.attention_forward(*(x.bfloat16() for x in (q, k, v)), mask=seen,
                                          backend="cudnn")
    assert (out[:, :, :3] == 0).all() and torch.isneginf(lse[:, :, :3]).all()
    # merged with another block's partial that saw the first rows' keys too
    other = torch.randn_like(ref_lse)
    merged_lse, merged_out = torch.logaddexp(ref_lse, other), torch.randn_like(ref_out)
    ref = backends.attention_backward(dout, q, k, v, merged_out, merged_lse, mask=seen,
                                      backend="math")
    got = backends.attention_backward(*(x.bfloat16() for x in (dout, q, k, v, merged_out)),
                                      merged_lse, mask=seen, backend="cudnn")
    assert (got[0][:, :, :3] == 0).all()

    def sdpa(dtype):
        xs = [x.to(dtype).requires_grad_() for x in (q, k.repeat_interleave(2, 1),
                                                      v.repeat_interleave(2, 1))]
        o = torch.nn.functional.scaled_dot_product_attention(xs[0][:, :, 3:], *xs[1:],
                                                             attn_mask=seen[..., 3:, :])
        o.backward(dout[:, :, 3:].to(dtype))
        return [o, *(x.grad for x in xs)]
    yard = [(a.float() - b).norm().item() / b.norm().item()
            for a, b in zip(sdpa(torch.bfloat16), sdpa(torch.float32))]
    errors = [(a.float() - b).norm().item() / b.norm().item()
              for a, b in zip((out, *got), (ref_out, *ref))]
    limits = [2 * yard[0], 2 * yard[1], 2 * max(yard[2:]), 2 * max(yard[2:])]
    assert all(e <= lim + 1e-3 for e, lim in zip(errors, limits)), (errors, yard)


# ---------------------------------------------------------------------------------------------
# The ops: schemas and errors
# ---------------------------------------------------------------------------------------------

def opcheck_masked_ops() -> bool:
    """Worker: torch.library.opcheck on the ops with every mask argument given: schema, fake
    implementation and autograd registration for all, AOT dispatch (the backward op's fake with
    the mask options) for one op of each `saves` kind (ring: inputs, Ulysses: outputs), as the
    rest is the same registration and costs seconds each."""
    name = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(1, 4, 4, 8, generator=gen, requires_grad=True)
    kv = [torch.randn(1, 2, 4, 8, generator=gen, requires_grad=True) for _ in range(2)]
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    valid = torch.tensor([[False, True, True, True, True, False, True]])
    masks = (positions, segments, valid, 3)
    options = (True, "zigzag", 7, 8**-0.5, "math")
    calls = [
        (torch.ops.seqshard.ring_attention.default, (q, *kv, name, *options, *masks)),
        (torch.ops.seqshard.tokenring_attention.default, (q, *kv, name, *options, *masks)),
        (torch.ops.seqshard.allgather_attention.default, (q, *kv, name, *options, 1, *masks)),
        (torch.ops.seqshard.ulysses_attention.default, (q, *kv, name, *options, 1, "nccl",
                                                        *masks)),
        (torch.ops.seqshard.local_attention.default, (q, *kv, True, 3, 0.3, "flash_cpu",
                                                      positions[:, :3], segments[:, :3],
                                                      valid[:, :3], 2)),
    ]
    cheap = ("test_schema", "test_autograd_registration", "test_faketensor")
    for i, (op, args) in enumerate(calls):
        torch.library.opcheck(op, args, test_utils=cheap if i in (1, 2, 4) else
                              (*cheap, "test_aot_dispatch_dynamic"))
    return True


def test_masked_ops_pass_opcheck(pool2):
    assert pool2.run(opcheck_masked_ops) == [True, True]


def test_bad_mask_inputs_raise_errors_that_name_the_fix():
    q = torch.zeros(2, 2, 6, 8)
    cases = [
        (dict(segments=torch.zeros(2, 5, dtype=torch.long)), "segments must be [2 or 1, 6]"),
        (dict(segments=torch.zeros(3, 6, dtype=torch.long)), "segments must be [2 or 1, 6]"),
        (dict(positions=torch.zeros(1, 6)), "positions must be an integer tensor"),
        (dict(key_valid=torch.ones(1, 6)), "key_valid must be a bool (or integer 0/1) tensor"),
        (dict(window=0), "window must be a positive int"),
        (dict(positions=torch.arange(6)), "positions must be [2 or 1, 6]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            local_attention(q, q, q, **kwargs)
    # seq_len: the tensors cover the valid tokens only
    with pytest.raises(ValueError, match=re.escape("key_valid must be [2 or 1, 5]")):
        local_attention(q, q, q, seq_len=5, key_valid=torch.ones(2, 6, dtype=torch.bool))
    local_attention(q, q, q, seq_len=5, key_valid=torch.ones(2, 5, dtype=torch.long))
