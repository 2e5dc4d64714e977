"""Triton kernels for the ring's fp32 bookkeeping: one pass where torch takes several.

    merge_rows_(acc_out, acc_lse, out, lse)   runtime.merge.merge_ in one kernel: read the
                                              accumulator and the partial once, write the
                                              accumulator once
    add_rows_(acc, x)                         acc += x (fp32 += bf16), vectorized

Why: in torch the merge is ~5 passes over the fp32 accumulator (weights, scale, product, sum,
lse) and the mixed-dtype add is not vectorized; at long sequences these show in the step time
(docs/runtime-measurements.md). (The strided copies of Ulysses' exchange are a2a_layout.py's.)

Tensors are [b, h, s, e] views with a unit stride over e (row slices of contiguous accumulators,
kernel outputs); lse is [b, h, s]. Other strides are passed to the kernel, so slices need no copy.
Offsets are 64-bit. `usable(...)` says when the kernels apply (CUDA, or any device under
TRITON_INTERPRET=1 for tests; fp32 accumulators; Triton importable); runtime/merge.py and
runtime/blocks.py fall back to torch otherwise. Numerics are runtime/merge.py's: weights from the
lse difference via sigmoid, logaddexp via log(1 + t), a row no key reached (both lse -inf) stays
out 0, lse -inf.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["usable", "merge_rows_", "add_rows_"]


@functools.lru_cache(maxsize=1)
def _kernels():
    """The kernel module, or None without Triton."""
    try:
        from seqshard.codegen.kernels import _accumulate_kernel
    except ImportError:
        return None
    return _accumulate_kernel


def usable(acc: torch.Tensor, *others: torch.Tensor) -> bool:
    """The fused kernels apply: fp32 accumulator, unit stride over e, CUDA (or the interpreter)."""
    if acc.dtype != torch.float32 or acc.stride(-1) != 1 or any(t.stride(-1) != 1 for t in others):
        return False
    if not (acc.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _kernels() is not None


def _launch(n_rows: int, e: int):
    """(block_r, block_e, grid): tiles of ~4K elements, BLOCK_E the next power of two >= e."""
    block_e = 1 << max(0, (e - 1).bit_length())
    block_r = max(1, min(64, 4096 // block_e))
    return block_r, block_e, (-(-n_rows // block_r),)


def merge_rows_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor) -> None:
    """runtime.merge.merge_ fused: (acc_out, acc_lse) ⊕= (out, lse), in place. acc_out, out
    [b, h, s, e] (acc fp32), acc_lse, lse [b, h, s]."""
    assert acc_out.shape == out.shape and acc_lse.shape == lse.shape == out.shape[:-1], \
        (acc_out.shape, out.shape, acc_lse.shape, lse.shape)
    if out.numel() == 0:
        return
    b, h, s, e = out.shape
    n_rows = b * h * s
    block_r, block_e, grid = _launch(n_rows, e)
    _kernels().merge_kernel[grid](
        acc_out, acc_lse, out, lse, n_rows, h, s, e, *acc_out.stride()[:3], *acc_lse.stride(),
        *out.stride()[:3], *lse.stride(), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4)


def add_rows_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x for [b, h, s, e] views (acc fp32, x any float dtype), in place."""
    assert acc.shape == x.shape, (acc.shape, x.shape)
    if x.numel() == 0:
        return
    b, h, s, e = x.shape
    n_rows = b * h * s
    block_r, block_e, grid = _launch(n_rows, e)
    _kernels().add_kernel[grid](
        acc, x, n_rows, h, s, e, *acc.stride()[:3], *x.stride()[:3],
        BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4)
