"""The Triton kernels of fused.py (imported on first use: CPU-only installs need no Triton)."""

import triton
import triton.language as tl


@triton.jit
def merge_kernel(acc_ptr, acc_lse_ptr, out_ptr, lse_ptr, n_rows, H, S, E,
                 a_b, a_h, a_s, al_b, al_h, al_s, o_b, o_h, o_s, l_b, l_h, l_s,
                 BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n_rows
    s = rows % S
    h = (rows // S) % H
    b = rows // (S * H)
    acc_l = tl.load(acc_lse_ptr + b * al_b + h * al_h + s * al_s, mask=live, other=0.0)
    new_l = tl.load(lse_ptr + b * l_b + h * l_h + s * l_s, mask=live, other=0.0).to(tl.float32)
    diff = acc_l - new_l
    diff = tl.where(diff != diff, 0.0, diff)  # both -inf: nan; any weights do (outs are 0)
    w_acc = tl.sigmoid(diff)
    w_new = tl.sigmoid(-diff)
    top = tl.maximum(acc_l, new_l)
    # logaddexp; log(1 + t) for t = exp(-|diff|) <= 1 is off log1p by < 6e-8 absolute
    merged = tl.where(top == float("-inf"), top, top + tl.log(1.0 + tl.exp(-tl.abs(diff))))
    cols = tl.arange(0, BLOCK_E)
    mask = live[:, None] & (cols < E)[None, :]
    acc_at = acc_ptr + (b * a_b + h * a_h + s * a_s)[:, None] + cols[None, :]
    out_at = out_ptr + (b * o_b + h * o_h + s * o_s)[:, None] + cols[None, :]
    acc = tl.load(acc_at, mask=mask, other=0.0)
    out = tl.load(out_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(acc_at, w_acc[:, None] * acc + w_new[:, None] * out, mask=mask)
    tl.store(acc_lse_ptr + b * al_b + h * al_h + s * al_s, merged, mask=live)

@triton.jit
def add_kernel(acc_ptr, x_ptr, n_rows, H, S, E, a_b, a_h, a_s, x_b, x_h, x_s,
                BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n_rows
    s = rows % S
    h = (rows // S) % H
    b = rows // (S * H)
    cols = tl.arange(0, BLOCK_E)
    mask = live[:, None] & (cols < E)[None, :]
    acc_at = acc_ptr + (b * a_b + h * a_h + s * a_s)[:, None] + cols[None, :]
    x_at = x_ptr + (b * x_b + h * x_h + s * x_s)[:, None] + cols[None, :]
    acc = tl.load(acc_at, mask=mask, other=0.0)
    x = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(acc_at, acc + x, mask=mask)


@triton.jit
def copy_kernel(dst_ptr, src_ptr, n_rows, B, C, D, E, d_a, d_b, d_c, d_d, s_a, s_b, s_c, s_d,
                BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n_rows
    d = rows % D
    c = (rows // D) % C
    b = (rows // (D * C)) % B
    a = rows // (D * C * B)
    cols = tl.arange(0, BLOCK_E)
    mask = live[:, None] & (cols < E)[None, :]
    src_at = src_ptr + (a * s_a + b * s_b + c * s_c + d * s_d)[:, None] + cols[None, :]
    dst_at = dst_ptr + (a * d_a + b * d_b + c * d_c + d * d_d)[:, None] + cols[None, :]
    tl.store(dst_at, tl.load(src_at, mask=mask), mask=mask)
