"""Merging partial attention results: (out_a, lse_a) ⊕ (out_b, lse_b) in fp32.

Attention over the union of two disjoint key sets is a weighted sum of the attention over each:

    lse = log(exp(lse_a) + exp(lse_b)) = max + log1p(exp(-|lse_a - lse_b|))      (logaddexp)
    out = sigmoid(lse_a - lse_b) · out_a + sigmoid(lse_b - lse_a) · out_b

(Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018; the block merge of
FlashAttention and Ring Attention, Liu et al. 2023.) Nothing is exponentiated except a
non-positive number, so no score scale overflows, and the weights come from the *difference* of
the two lse, never from the rounded merged lse (whose fp32 rounding would scale both weights by
the same wrong factor when |lse| is large). A row that saw no key (lse = -inf, out = 0) merges as
the identity. Partials are kept in fp32 (fp64 for fp64 inputs) whatever the precision of the
kernel that produced them: merging in bf16 is the drift users see in ring attention
implementations. Running merges round once per step, so their error grows like a random walk of
fp32 roundings (~1e-7·sqrt(blocks)); `merge_all` merges many partials with a single rounding.
"""

from __future__ import annotations

import torch

from seqshard.codegen.kernels import accumulate

__all__ = ["accumulator", "merge", "merge_", "merge_all"]


def accumulator(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty partial result for q's rows: out = 0, lse = -inf, in fp32 (fp64 for fp64 q)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=dtype, device=q.device)
    return out, lse


def _sigmoid_weights(lse_a: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid(lse_a - lse_b) and sigmoid(lse_b - lse_a), as [..., 1] for broadcasting over e.

    Taken from the difference, not from the rounded merged lse: at |lse| ~ 1e4 an fp32 lse is
    only good to ~1e-3 absolute, and exp(lse_a - lse) would carry that error into every weight.
    Both -inf (no key on either side, both outs 0): the difference is nan; any weights do.
    """
    diff = lse_a - lse_b
    diff = diff.masked_fill(torch.isnan(diff), 0.0).unsqueeze(-1)
    return torch.sigmoid(diff), torch.sigmoid(-diff)


def merge(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged (out, lse) of two partials over disjoint keys; out-of-place, fp32 or wider."""
    dtype = torch.promote_types(lse_a.dtype, torch.float32)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    w_a, w_b = _sigmoid_weights(lse_a, lse_b)
    return w_a * out_a + w_b * out_b, torch.logaddexp(lse_a, lse_b)


def merge_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge a partial into an accumulator (from `accumulator`, or a row slice of one) in place.

    On CUDA with fp32 accumulators this is one Triton kernel
    (seqshard.codegen.kernels.accumulate.merge_rows_); elsewhere the
    torch ops below, which compute the same formulas."""
    if acc_out.dim() == 4 and acc_lse.dtype == torch.float32 and accumulate.usable(acc_out, out):
        accumulate.merge_rows_(acc_out, acc_lse, out, lse)
        return
    lse = lse.to(acc_lse.dtype)
    w_acc, w_new = _sigmoid_weights(acc_lse, lse)
    acc_out.mul_(w_acc).add_(w_new * out)
    acc_lse.copy_(torch.logaddexp(acc_lse, lse))


def merge_all(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge many partials at once: one max shift, weights normalized by their own sum."""
    dtype = torch.promote_types(lses[0].dtype, torch.float32)
    lse_stack = torch.stack([l.to(dtype) for l in lses])
    top = lse_stack.amax(dim=0)
    top = top.masked_fill(torch.isneginf(top), 0.0)  # all -inf: every weight is 0
    weights = torch.exp(lse_stack - top)
    total = weights.sum(dim=0)
    out = (weights.unsqueeze(-1) * torch.stack([o.to(dtype) for o in outs])).sum(0)
    out = out / total.masked_fill(total == 0, 1.0).unsqueeze(-1)
    return out, top + torch.log(total)
