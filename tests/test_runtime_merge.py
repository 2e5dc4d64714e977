"""The fp32 lse merge stays exact however far apart the blocks' score scales are.

Partial results are built from float64 attention over each key block and rounded to fp32, as a
kernel would hand them over. A naive merge (exp(lse) sums) overflows past |lse| ≈ 88; a merge in
the inputs' precision drifts as the ring grows. Failures here point at merge.py.
"""

from __future__ import annotations

import pytest
import torch

from seqshard.runtime.merge import accumulator, merge, merge_, merge_all


def _blocks(n_blocks: int, offsets: torch.Tensor, seed: int = 0, rows: int = 16, keys: int = 8,
            e: int = 32):
    """Scores per key block shifted by offsets[j]; returns the fp32 partials and the float64
    attention over all keys."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, rows, n_blocks, keys, generator=gen, dtype=torch.float64) * 3
    scores = scores + offsets.view(1, 1, 1, n_blocks, 1)
    values = torch.randn(2, 3, n_blocks, keys, e, generator=gen, dtype=torch.float64)
    lse = torch.logsumexp(scores, dim=-1)  # [2, 3, rows, n_blocks]
    outs = torch.einsum("bhrnk,bhnke->bhrne", torch.softmax(scores, dim=-1), values)
    partials = [(outs[:, :, :, j].float(), lse[:, :, :, j].float()) for j in range(n_blocks)]
    flat = scores.flatten(-2)
    full_out = torch.softmax(flat, dim=-1) @ values.flatten(2, 3)
    return partials, full_out, torch.logsumexp(flat, dim=-1)


def _merged_sequentially(partials):
    out, lse = accumulator(partials[0][0])
    for o, l in partials:
        merge_(out, lse, o, l)
    return out, lse


def _float64_merge(partials):
    """The exact merge of the given fp32 inputs, evaluated in float64."""
    lse = torch.logsumexp(torch.stack([l.double() for _, l in partials]), dim=0)
    out = sum(torch.exp(l.double() - lse).unsqueeze(-1) * o.double() for o, l in partials)
    return out, lse


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("merger", ["sequential", "pairwise", "all"])
def test_merge_is_exact_when_block_scales_differ_by_1e4(merger):
    n = 64
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    offsets = torch.linspace(-1e4, 0.0, n, dtype=torch.float64)[shuffle]
    offsets[::8] = torch.linspace(-4.0, 4.0, 8, dtype=torch.float64)  # a few comparable blocks
    partials, full_out, full_lse = _blocks(n, offsets)
    if merger == "sequential":
        out, lse = _merged_sequentially(partials)
    elif merger == "pairwise":
        out, lse = partials[0]
        for o, l in partials[1:]:
            out, lse = merge(out, lse, o, l)
    else:
        out, lse = merge_all(*zip(*partials))
    assert out.dtype == lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel(out, full_out) < 1e-6
    assert (lse.double() - full_lse).abs().max() < 1e-5


def test_merge_does_not_overflow_at_huge_magnitudes():
    """lse of +1e4 and -1e4 in one merge: exp() of either overflows or vanishes in fp32. The
    one-shot merge is exact for its fp32 inputs; the running (ring) merge rounds its fp32 lse
    accumulator at every step, whose ulp at 1e4 is 1e-3, so it is held to 1e-4 there."""
    offsets = torch.tensor([1e4, -1e4, 1e4 + 3.0, 1e4 - 2.0, -1e4 + 5.0, 0.0], dtype=torch.float64)
    partials, _, _ = _blocks(len(offsets), offsets, seed=2)
    exact_out, exact_lse = _float64_merge(partials)
    for (out, lse), tol in ((merge_all(*zip(*partials)), 1e-6), (_merged_sequentially(partials), 1e-4)):
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        assert _rel(out, exact_out) < tol
        assert ((lse.double() - exact_lse).abs() / exact_lse.abs()).max() < 1e-7


def test_no_drift_as_the_ring_grows():
    """Merging 2, 8, 64 comparable blocks one at a time (a ring of that many ranks): the error
    against float64 grows no faster than a random walk of fp32 roundings (~1e-7·sqrt(n)); a
    systematic drift (e.g. accumulating in the inputs' precision) grows linearly and fails. The
    one-shot merge stays at a single rounding."""
    for n in (2, 8, 64):
        offsets = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        partials, full_out, _ = _blocks(n, offsets, seed=n)
        sequential = _rel(_merged_sequentially(partials)[0], full_out)
        one_shot = _rel(merge_all(*zip(*partials))[0], full_out)
        assert sequential < 2e-7 * n**0.5, (n, sequential)
        assert one_shot < 4e-7, (n, one_shot)


def test_rows_without_keys_merge_as_identity():
    """A partial with lse = -inf (no visible key) leaves the other unchanged, with no NaN; two
    such partials give out 0, lse -inf."""
    partials, _, _ = _blocks(1, torch.zeros(1, dtype=torch.float64), seed=3)
    o, l = partials[0]
    empty_out, empty_lse = accumulator(o)
    out, lse = merge(empty_out, empty_lse, o, l)
    assert torch.equal(out, o) and torch.equal(lse, l)
    out, lse = merge(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(out, empty_out) and torch.isneginf(lse).all()
    acc_out, acc_lse = accumulator(o)
    merge_(acc_out, acc_lse, empty_out, empty_lse)
    assert not acc_out.isnan().any() and torch.isneginf(acc_lse).all()
