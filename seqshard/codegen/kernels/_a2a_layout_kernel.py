"""The Triton kernel of a2a_layout.py (imported on first use: CPU-only installs need no Triton).

One program moves BLOCK_R rows (a row: the last dim, E wide, unit stride) of a view of up to five
dims [a, b, c, d, E] from src to dst, any other strides on either side (passed in, 64-bit
offsets). With ROPE the row is rotated on the way (rotate-half, the form Llama/HF use) by row d
of the tables cos, sin [d, E]; d is the token, the second-to-last dim of the view.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows", "B", "C", "D"])  # sizes: one compile for all lengths
def layout_kernel(dst_ptr, src_ptr, cos_ptr, sin_ptr, n_rows, B, C, D, E,
                  d_a, d_b, d_c, d_d, s_a, s_b, s_c, s_d, cos_d, sin_d,
                  BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, ROPE: tl.constexpr,
                  TRANSPOSE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n_rows
    # token-major: consecutive rows are one token's heads (d outer). The layouts this moves are
    # [b, s, h, e] on one side (a token's heads adjacent) and head blocks of [s, e] on the
    # other; token-major reads (or writes) whole tokens on the first and runs h sequential
    # streams on the second. The view's own order (d inner) instead strides through the
    # token-major side h times, 256 B per token each time: 0.1x torch's copy from 64K tokens on
    # (bench/results/kernels-20261201-232207.md). With ROPE a program's rows also share their
    # token, so its cos/sin rows are read once from memory and then from cache.
    per_token = n_rows // D
    d, r = rows // per_token, rows % per_token
    c, ab = r % C, r // C
    a, b = ab // B, ab % B
    src_row = (a * s_a + b * s_b + c * s_c + d * s_d)[:, None]
    dst_row = (a * d_a + b * d_b + c * d_c + d * d_d)[:, None]
    cols = tl.arange(0, BLOCK_E)[None, :]
    if not ROPE:
        mask = live[:, None] & (cols < E)
        tl.store(dst_ptr + dst_row + cols, tl.load(src_ptr + src_row + cols, mask=mask), mask=mask)
    else:
        # BLOCK_E covers half a row: x1 = x[:E/2], x2 = x[E/2:]
        half = E // 2
        mask = live[:, None] & (cols < half)
        x1 = tl.load(src_ptr + src_row + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_ptr + src_row + half + cols, mask=mask, other=0.0).to(tl.float32)
        cos_row = (d * cos_d)[:, None]
        sin_row = (d * sin_d)[:, None]
        c1 = tl.load(cos_ptr + cos_row + cols, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cos_row + half + cols, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + sin_row + cols, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + sin_row + half + cols, mask=mask, other=0.0).to(tl.float32)
        if TRANSPOSE:  # the adjoint: x·cos - rotate_half(x·sin), the inverse rotation
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:          # x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1]
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        out_ty = dst_ptr.dtype.element_ty
        tl.store(dst_ptr + dst_row + cols, y1.to(out_ty), mask=mask)
        tl.store(dst_ptr + dst_row + half + cols, y2.to(out_ty), mask=mask)
