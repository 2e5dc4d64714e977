"""The Triton kernels of accumulate.py (imported on first use: CPU-only installs need no Triton).

Each program handles BLOCK_R rows of the last dim (a row: one (b, h, s) of a [b, h, s, e] view),
BLOCK_E wide; outer strides are arguments, the last dim has unit stride.
"""

import triton
import triton.language as tl


@triton.jit
def _rows(n_rows, H, S, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's rows as (b, h, s) (64-bit), the live rows, the columns and the tile mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n_rows
    cols = tl.arange(0, BLOCK_E)
    return rows // (S * H), (rows // S) % H, rows % S, live, cols, live[:, None] & (cols < E)[None, :]


@triton.jit
def merge_kernel(acc_ptr, acc_lse_ptr, out_ptr, lse_ptr, n_rows, H, S, E,
                 a_b, a_h, a_s, al_b, al_h, al_s, o_b, o_h, o_s, l_b, l_h, l_s,
                 BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    b, h, s, live, cols, mask = _rows(n_rows, H, S, E, BLOCK_R, BLOCK_E)
    acc_l = tl.load(acc_lse_ptr + b * al_b + h * al_h + s * al_s, mask=live, other=0.0)
    new_l = tl.load(lse_ptr + b * l_b + h * l_h + s * l_s, mask=live, other=0.0).to(tl.float32)
    diff = acc_l - new_l
    diff = tl.where(diff != diff, 0.0, diff)  # both -inf: nan; any weights do (outs are 0)
    w_acc = tl.sigmoid(diff)
    w_new = tl.sigmoid(-diff)
    top = tl.maximum(acc_l, new_l)
    # logaddexp; log(1 + t) for t = exp(-|diff|) <= 1 is off log1p by < 6e-8 absolute
    merged = tl.where(top == float("-inf"), top, top + tl.log(1.0 + tl.exp(-tl.abs(diff))))
    acc_at = acc_ptr + (b * a_b + h * a_h + s * a_s)[:, None] + cols[None, :]
    out_at = out_ptr + (b * o_b + h * o_h + s * o_s)[:, None] + cols[None, :]
    acc = tl.load(acc_at, mask=mask, other=0.0)
    out = tl.load(out_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(acc_at, w_acc[:, None] * acc + w_new[:, None] * out, mask=mask)
    tl.store(acc_lse_ptr + b * al_b + h * al_h + s * al_s, merged, mask=live)


@triton.jit
def add_kernel(acc_ptr, x_ptr, n_rows, H, S, E, a_b, a_h, a_s, x_b, x_h, x_s,
               BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    b, h, s, live, cols, mask = _rows(n_rows, H, S, E, BLOCK_R, BLOCK_E)
    acc_at = acc_ptr + (b * a_b + h * a_h + s * a_s)[:, None] + cols[None, :]
    x_at = x_ptr + (b * x_b + h * x_h + s * x_s)[:, None] + cols[None, :]
    acc = tl.load(acc_at, mask=mask, other=0.0)
    x = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(acc_at, acc + x, mask=mask)

