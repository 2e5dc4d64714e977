"""The layout copies around all-to-alls, with the rotary embedding fused: one pass where torch
takes a permute copy and ~5 elementwise passes.

    pack(x [b, h, s, e], world, cos=None, sin=None)  ->  send [world, b, h/world, s, e]
    unpack(send [N, b, g, s, e], cos=None, sin=None) ->  x [b, N·g, s, e]
    copy_(dst, src, cos=None, sin=None, transpose=False)   the kernel on any strided views

`pack` is the sequence → heads all-to-all's send buffer of Ulysses (DeepSpeed-Ulysses, Jacobs et
al. 2023): heads cut into `world` groups, rank r's group contiguous at send[r]; `unpack` is its
inverse (the head → sequence exchange's arrivals, or the gradient). With cos, sin [s, e] (the
tables of Llama/HF's rotary embedding, one row per local token: positions are the caller's) the
rows are rotated on the way, rotate-half form

    rope(x) = x·cos + rotate_half(x)·sin,      rotate_half(x) = [-x[e/2:], x[:e/2]]

and `inverse=True` applies its transpose x·cos - rotate_half(x·sin) (the inverse rotation when
cos and sin repeat over the two halves, as in Llama/HF). Both are autograd functions, each the
other's backward: d pack(+rope) = unpack(+transposed rope), exactly (the same kernel, the same
rounding). cos and sin are constants (no gradient; passing ones that require one is refused).

`copy_` is the kernel itself: dst = src (or rope(src)) for views of up to five dims of one shape
and dtype with a unit stride over the last dim, any other strides (the rotary tables are indexed
by the second-to-last dim, the token). Ulysses (runtime/ulysses.py) moves its blocks through it
to and from the all-to-all's buffers (one launch, rows moved with wide loads; torch's strided
copy and cat are not vectorized).

Numerics: a plain copy is exact; the rotation is computed in fp32 and rounded once to the
output dtype (torch in bf16 rounds after each of its ops). The Triton path runs on CUDA tensors
(or any under TRITON_INTERPRET=1, for tests); elsewhere the same formulas run in torch (fp64
inputs: in fp64).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["pack", "unpack", "copy_", "contiguous", "triton_usable", "rope_reference",
           "rope_tables"]

_ROPE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The kernel module, or None without Triton."""
    try:
        from seqshard.codegen.kernels import _a2a_layout_kernel
    except ImportError:
        return None
    return _a2a_layout_kernel


def triton_usable(dst: torch.Tensor, src: torch.Tensor, rope: bool = False) -> bool:
    """The kernel applies to `dst <- src`: views of 1 to 5 dims of one shape and dtype, a unit
    stride over the last, CUDA (or the interpreter), Triton importable; with rope an fp32, bf16
    or fp16 dtype."""
    if not 1 <= dst.dim() <= 5 or dst.shape != src.shape or dst.dtype != src.dtype:
        return False
    if dst.stride(-1) != 1 or src.stride(-1) != 1 or dst.numel() == 0:
        return False
    if rope and dst.dtype not in _ROPE_DTYPES:
        return False
    if not (dst.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _kernels() is not None


COPY_MIN_BYTES = 48 * 2**20
"""A plain copy (no rotation) smaller than this goes to torch's copy kernel: below it the Triton
launch costs about what it saves (Llama-3-8B k/v, 8 heads of 128: 0.62-0.77x torch's copy at
8K tokens, 4 MiB; 0.94-1.11x at 16K, 32 MiB; 1.29-1.45x at 32K, 64 MiB)."""


def _copy_pays(src: torch.Tensor) -> bool:
    """Does the kernel beat torch's copy for a plain move of `src` (bench/results/
    kernels-20261202-002544.md, one H200)? Rows whose width is a multiple of 16 elements
    (aligned wide loads: head dim 128, 1.3-2.3x torch from 64 MiB on; the arrivals' reorder
    with one kv head a rank is the exception, 0.7-0.8x) and at least
    COPY_MIN_BYTES; not a head dim such as 72, where the row tile is 128 wide and the loads
    cannot be vectorized (0.17-0.21x torch). Off CUDA (Triton's interpreter: tests) always."""
    if not src.is_cuda:
        return True
    return src.shape[-1] % 16 == 0 and src.numel() * src.element_size() >= COPY_MIN_BYTES


def _launch(n_rows: int, width: int, rope: bool):
    """(block_r, block_e, grid): tiles of ~4K elements; BLOCK_E the next power of two >= the
    row (half a row with rope, where a program reads both halves)."""
    block_e = 1 << max(0, (width - 1).bit_length())
    block_r = max(1, min(64, 4096 // (block_e * (2 if rope else 1))))
    return block_r, block_e, (-(-n_rows // block_r),)


def rope_tables(cos, sin, s: int, e: int):
    """cos, sin as [s, e] views with a unit stride over e (HF's [b or 1, 1, s, e] with leading
    dims of 1 too), or a ValueError."""
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin, or neither")
    if cos is None:
        return None, None
    out = []
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[-2:] != (s, e) or any(n != 1 for n in t.shape[:-2]):
            raise ValueError(f"{name} must be [s, e] = [{s}, {e}] (leading dims of 1 allowed, "
                             f"one row per token of the view), got {tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError(f"{name} requires a gradient; the fused rotary embedding treats its "
                             "tables as constants (apply the rotation in the model instead)")
        t = t.reshape(s, e)
        out.append(t if t.stride(-1) == 1 else t.contiguous())
    if e % 2:
        raise ValueError(f"the rotary embedding needs an even head dim, got {e}")
    return out[0], out[1]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   transpose: bool = False) -> torch.Tensor:
    """The rotation in torch, in fp32 (fp64 for fp64 x), rounded once to x's dtype: the kernel's
    formulas. cos, sin broadcast against x's last two dims [s, e]."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].to(dtype), x[..., h:].to(dtype)
    c1, c2 = cos[..., :h].to(dtype), cos[..., h:].to(dtype)
    s1, s2 = sin[..., :h].to(dtype), sin[..., h:].to(dtype)
    if transpose:
        y = torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1], -1)
    else:
        y = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], -1)
    return y.to(x.dtype)


def copy_(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor | None = None,
          sin: torch.Tensor | None = None, *, transpose: bool = False) -> torch.Tensor:
    """dst <- src, or rope(src) (transpose: its transpose) with cos, sin [s, e] indexed by the
    second-to-last dim; one kernel launch where `triton_usable`, torch otherwise. Returns dst."""
    assert dst.shape == src.shape, (dst.shape, src.shape)
    rope = cos is not None
    if rope:
        cos, sin = rope_tables(cos, sin, src.shape[-2], src.shape[-1])
    if dst.numel() == 0:
        return dst
    if not triton_usable(dst, src, rope) or (not rope and not _copy_pays(src)):
        return dst.copy_(rope_reference(src, cos, sin, transpose) if rope else src)
    while dst.dim() < 5:
        dst, src = dst.unsqueeze(0), src.unsqueeze(0)
    a, b, c, d, e = src.shape
    n_rows = a * b * c * d
    block_r, block_e, grid = _launch(n_rows, e // 2 if rope else e, rope)
    tables = (cos, sin, cos.stride(0), sin.stride(0)) if rope else (src, src, 0, 0)
    _kernels().layout_kernel[grid](
        dst, src, tables[0], tables[1], n_rows, b, c, d, e, *dst.stride()[:4],
        *src.stride()[:4], tables[2], tables[3], BLOCK_R=block_r, BLOCK_E=block_e, ROPE=rope,
        TRANSPOSE=transpose, num_warps=4)
    return dst


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """x.contiguous() through the kernel: x itself when contiguous, else one launch."""
    if x.is_contiguous():
        return x
    return copy_(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)


def _blocks(x: torch.Tensor, world: int) -> torch.Tensor:
    """x [b, h, s, e] as [world, b, h/world, s, e]: block r holds heads r·h/world ... (a view)."""
    return x.unflatten(1, (world, -1)).movedim(1, 0)


def _pack(x, world, cos, sin, inverse):
    b, h, s, e = x.shape
    send = x.new_empty((world, b, h // world, s, e))
    return copy_(send, _blocks(x, world), cos, sin, transpose=inverse)


def _unpack(send, cos, sin, inverse):
    n, b, g, s, e = send.shape
    x = send.new_empty((b, n * g, s, e))
    copy_(_blocks(x, n), send, cos, sin, transpose=inverse)
    return x


class _Layout(torch.autograd.Function):
    """pack (to_send) or unpack, each the other's backward with the rotation transposed."""

    @staticmethod
    def forward(ctx, x, world, cos, sin, to_send, inverse):
        ctx.save_for_backward(cos, sin)
        ctx.world, ctx.to_send, ctx.inverse = world, to_send, inverse
        return _pack(x, world, cos, sin, inverse) if to_send else _unpack(x, cos, sin, inverse)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        dx = _Layout.apply(g, ctx.world, cos, sin, not ctx.to_send, not ctx.inverse)
        return dx, None, None, None, None, None


def pack(x: torch.Tensor, world: int, cos: torch.Tensor | None = None,
         sin: torch.Tensor | None = None, *, inverse: bool = False) -> torch.Tensor:
    """x [b, h, s, e] (any strides, unit stride over e) -> a new contiguous [world, b, h/world,
    s, e]: send[r] holds heads r·h/world ... (r+1)·h/world - 1; with cos, sin [s, e] rotated
    (inverse: by the transpose). Differentiable: its backward is `unpack` with the rotation
    transposed."""
    if x.dim() != 4 or x.shape[1] % world:
        raise ValueError(f"pack takes x [b, h, s, e] with h divisible by world={world}, "
                         f"got {tuple(x.shape)}")
    cos, sin = rope_tables(cos, sin, x.shape[2], x.shape[3])
    return _run(x, world, cos, sin, True, inverse)


def unpack(send: torch.Tensor, cos: torch.Tensor | None = None,
           sin: torch.Tensor | None = None, *, inverse: bool = False) -> torch.Tensor:
    """send [N, b, g, s, e] -> a new contiguous [b, N·g, s, e] (pack's inverse); with cos, sin
    [s, e] rotated (inverse: by the transpose, which undoes pack's rotation). Differentiable:
    its backward is `pack` with the rotation transposed."""
    if send.dim() != 5:
        raise ValueError(f"unpack takes send [N, b, g, s, e], got {tuple(send.shape)}")
    cos, sin = rope_tables(cos, sin, send.shape[3], send.shape[4])
    return _run(send, send.shape[0], cos, sin, False, inverse)


def _run(x, world, cos, sin, to_send, inverse):
    return _eager_apply()(x, world, cos, sin, to_send, inverse)


@functools.lru_cache(maxsize=1)
def _eager_apply():
    """_Layout.apply behind torch.compiler.disable (torch.compile runs it eagerly, a graph
    break), made on first use: the decorator loads torch._dynamo, which importing this module
    (the runtime's leaf) should not."""
    return torch.compiler.disable(_Layout.apply)
