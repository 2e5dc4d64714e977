"""The Triton kernel of linear_ce.py (imported on first use: CPU-only installs need no Triton).

One program per row of a logits chunk [c, V] (unit stride over V): an online logsumexp over
BLOCK_V-wide tiles, the row's loss, and with GRAD the row's gradient written over its logits.
"""

import triton
import triton.language as tl


@triton.jit
def ce_rows_kernel(x_ptr, x_stride, labels_ptr, loss_ptr, scale_ptr, V, ignore_index,
                   BLOCK_V: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    label = tl.load(labels_ptr + row)
    # pass 1: running max m and Σ exp(x - m), fp32
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    ignored = label == ignore_index
    target = tl.load(x_row + tl.where(ignored, 0, label)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - target))
    if GRAD:
        # pass 2: d loss / d x = scale · (softmax(x) - onehot(label)), 0 on an ignored row
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr).to(tl.float32))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            live = cols < V
            x = tl.load(x_row + cols, mask=live, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * scale
            g = tl.where(cols == label, g - scale, g)
            tl.store(x_row + cols, g.to(x_ptr.dtype.element_ty), mask=live)


@triton.jit
def scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """x *= g (a one-element fp32 tensor), computed in fp32: a bf16 gradient scaled by the
    incoming gradient without rounding the scale to bf16 first."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    g = tl.load(g_ptr).to(tl.float32)
    tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=live)
