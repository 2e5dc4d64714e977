"""Fused LM head + cross-entropy: `CE(hidden @ weight.T, labels)` without the [T, V] logits.

    loss = linear_cross_entropy(hidden [T, d], weight [V, d], labels [T],
                                ignore_index=-100, reduction="mean", divisor=None, chunk=None)

Design (Liger's, after mgmalek/efficient_cross_entropy): the forward walks the tokens in chunks
of `chunk` rows and, when gradients are wanted, computes them there, so backward only scales
them by the incoming gradient:

    for each chunk c of the tokens kept (label != ignore_index):
        h = hidden[c]                             gathered (into dh's rows of the chunk, not yet
                                                  written) when some tokens are ignored
        x = h @ weight.T                          [c, V], hidden's dtype (cuBLAS, fp32 inside)
        ce_rows_kernel(x, labels[c])              one program per row, fp32: online logsumexp
                                                  over BLOCK_V tiles, the row's loss, and x
                                                  overwritten by scale·(softmax(x) - onehot)
        dW   += x.T @ h                           cuBLAS addmm in place (fp32 inside the GEMM;
                                                  the first chunk writes dW: no zero fill)
        dh[c] = x @ weight                        written in place into dh
    dh's rows spread to the kept tokens' places, the ignored ones zeroed
    backward: dh, dW scaled by the incoming gradient (skipped when it is 1: one host sync)

Skipping the ignored tokens (`skip_ignored`, the default) is where this beats Liger's loop,
which computes every row: an ignored token's logits only ever get a zero gradient. It costs one
host sync in the forward (how many tokens are kept: the GEMMs' row count), and nothing in
memory: the gathered rows live in dh's rows the chunk will write, the indices in int32. The
gather and the spread move dh's bytes about six times (~0.4 ms at 32K tokens × d 4096, where a
token's GEMMs and row cost ~5 µs and the last chunk's rows round up to a 128-row tile), so the
tokens are gathered only when at least 1/SKIP_SHARE (1/128) of them are ignored: one ignored
token a sequence (a causal LM's last) runs every row, as Liger does.

Measured (bench/results/fused_loss-20261202-032422, -033543 and -034251, d 4096, V 128256,
bf16, one H200, interleaved with Liger, ratios of medians): half the tokens ignored as prompt
spans, 0.542-0.546 of Liger's time at 32K tokens and 0.550-0.554 at 128K. With 1% ignored at
random (bench/codegen.py's labels) still a tie, 0.994-1.003 and 0.998-1.000 (codegen.py's runs:
0.985, 1.002, 1.012 at 32K; 1.000, 0.999, 1.001 at 128K): 1% of the GEMM rows is about what the
rounding of the last chunk to a tile and the gather give back. None ignored: a tie, 1.002-1.007
and 1.000-1.002 (the same GEMMs at the same chunk, the same row kernel). Extra peak memory
equal to Liger's to 0.1 MiB, or below.

Tried and measured no faster: each chunk's dh GEMM on a side stream beside its dW GEMM (the two
contend for the SMs: bench/results/codegen-20261202-015800); launch variants of the row kernel
(one program per SM, pass 2 walking the row backwards for L2 reuse, 8K/16K tiles: it already
runs at the copy bandwidth with its three passes, ce_rows-20261202-031256); the dh GEMM without
reduced-precision bf16 reduction and cuBLASLt for any of the GEMMs (faster in one run, slower in
the next: fused_loss-20261202-032422, ce_rows-20261202-031713).

Why this design over recomputing in backward: three GEMMs per token (forward logits, dh, dW) —
what an unfused LM head costs — where recomputing the logits in backward adds a fourth (+33%).
The softmax/gradient step is one Triton kernel reading each logit twice and writing it once, in
place; no other [c, V] buffer exists. Peak memory beyond the inputs: one chunk of logits, dh
and dW (the loss is summed a chunk at a time: no [T] buffer).

dW's accumulator (`accumulate`): by default the weight's dtype, as Liger does - each chunk's
GEMM sums its tokens in fp32 and the running sum is rounded to bf16 once per chunk (on a bf16
test, dW's error against fp32 is 1.05-1.15× torch's own unchunked error at 4-16 chunks).
`accumulate=torch.float32` keeps an fp32 accumulator (cuBLAS's fp32-output GEMM on bf16
inputs, `addmm(..., out_dtype)`) and casts once at the end: torch's error exactly, but 4 bytes a
weight instead of 2 during the loop plus the cast's copy: at V 128256 × d 4096, 2 GiB more at
the peak than the default, which is what puts it above Liger's memory.

`reduction="mean"` divides by the tokens not ignored (or by `divisor`, a tensor: codegen passes
the count over the ranks that split the tokens), folded into the kernel's gradient scale (no
host sync for it). An ignored token (label == ignore_index) adds 0 to the loss and gets a zero
gradient. Labels must lie in [0, V) otherwise (ParallelModule checks token ids before a call).

The Triton path runs on CUDA tensors (or any under TRITON_INTERPRET=1, for tests); elsewhere
the same chunk loop runs the rows in torch. torch.compile runs this function eagerly (a graph
break), as it does seqshard's other runtime helpers it cannot trace.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["linear_cross_entropy", "default_chunk", "triton_usable"]

MAX_BLOCK_V = 32768       # a row's tile: 32 fp32 values a thread at 32 warps (Liger's size)
CHUNK_BYTES = 1 << 30     # default chunk: logits of at most this many bytes
MIN_CHUNK = 1024          # and at least this many tokens
SKIP_SHARE = 128          # ignored tokens leave the GEMMs when at least 1/SKIP_SHARE of them


@functools.lru_cache(maxsize=1)
def _kernels():
    try:
        from seqshard.codegen.kernels import _linear_ce_kernel
    except ImportError:
        return None
    return _linear_ce_kernel


def triton_usable(t: torch.Tensor) -> bool:
    """The Triton kernels run on `t`'s device: CUDA, or any device under TRITON_INTERPRET=1."""
    return (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _kernels() is not None


def default_chunk(tokens: int, vocab: int, itemsize: int, dim: int | None = None) -> int:
    """Tokens per chunk, a power of two: Liger's rule (a chunk's logits about as large as the
    hidden states, T·d elements: 1024 tokens at 32K × d 4096 × V 128256, 4096 at 128K) but at
    least MIN_CHUNK (GEMMs of fewer rows run below peak: Liger's rule gives 256 at 16K × d
    2048), at most CHUNK_BYTES of logits (4096 at V 128256 in bf16) and at most `tokens`."""
    fit = max(1, CHUNK_BYTES // max(1, vocab * itemsize))
    chunk = 1 << (fit.bit_length() - 1)
    if dim:
        per = -(-tokens // -(-vocab // dim))                       # ceil(T / ceil(V / d))
        chunk = min(chunk, max(MIN_CHUNK, 1 << max(0, (per - 1).bit_length())))
    return max(1, min(tokens, chunk))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         divisor: torch.Tensor | None = None, chunk: int | None = None,
                         accumulate: torch.dtype | None = None,
                         out_dtype: torch.dtype = torch.float32,
                         block_v: int | None = None, skip_ignored: bool = True) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, labels, ignore_index=..., reduction=...) computed in
    chunks of `chunk` tokens (default `default_chunk`), the logits in fp32 inside the kernel.

    hidden [T, d], weight [V, d], labels [T] (int); reduction "mean" (over the tokens not
    ignored, or `divisor`) or "sum". accumulate: dW's accumulator dtype (None: the weight's).
    out_dtype: the loss's dtype. block_v: the kernel's tile over V (tests). skip_ignored: the
    GEMMs take only the tokens not ignored when at least 1/SKIP_SHARE are (one host sync to count
    them); False: every token, no host sync in the forward."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1] \
            or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy takes hidden [T, d], weight [V, d], labels [T]; "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if reduction == "mean" and divisor is None:
        divisor = (labels != ignore_index).sum()
    if reduction == "sum":
        divisor = None
    T, V = hidden.shape[0], weight.shape[0]
    chunk = chunk or default_chunk(T, V, hidden.element_size(), hidden.shape[1])
    return _run(hidden, weight, labels, divisor, ignore_index, chunk, accumulate, out_dtype,
                block_v, skip_ignored)


@torch.compiler.disable
def _run(hidden, weight, labels, divisor, ignore_index, chunk, accumulate, out_dtype, block_v,
         skip_ignored):
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight, labels.contiguous(), divisor,
                                     ignore_index, chunk, accumulate, out_dtype, block_v,
                                     skip_ignored)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, ignore_index, chunk, accumulate, out_dtype,
                block_v, skip_ignored):
        T, d = hidden.shape
        V = weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = want_h or want_w
        scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
        if divisor is not None:
            scale = scale / divisor.to(torch.float32)
        kept = ignored = None
        if skip_ignored:  # one host sync: how many rows the GEMMs take
            valid = labels != ignore_index
            ignored = (~valid).nonzero()[:, 0]
            if ignored.numel() * SKIP_SHARE >= T:
                kept = valid.nonzero()[:, 0].to(torch.int32)  # index_select takes int32: half the bytes
            del valid
        n = T if kept is None else kept.numel()
        rows = torch.empty(min(n, chunk), dtype=torch.float32, device=hidden.device)  # one chunk's
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if want_h else None
        acc = accumulate or weight.dtype  # the first chunk writes dW in its dtype: no zero fill
        dw = (torch.empty if acc == hidden.dtype and n else torch.zeros)(
            V, d, dtype=acc, device=weight.device) if want_w else None
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            if kept is None:
                h, y = hidden[start:end], labels[start:end]
            else:  # the chunk's kept tokens gathered: into dh's rows [start, end) while unwritten
                sel = kept[start:end]
                h = torch.index_select(hidden, 0, sel, out=dh[start:end]) if dh is not None \
                    else hidden.index_select(0, sel)
                y = labels.index_select(0, sel)
            x = torch.mm(h, weight.t())                                # [c, V]
            _rows(x, y, rows[: end - start], scale, ignore_index, grad, block_v)
            if dw is not None:  # before dh: h may live in dh's rows
                if start == 0 and dw.dtype == x.dtype:
                    torch.mm(x.t(), h, out=dw)
                else:
                    _accumulate(dw, x.t(), h)
            if dh is not None:
                torch.mm(x, weight, out=dh[start:end])
            loss += rows[: end - start].sum()
            del x, h
        if kept is not None and dh is not None:
            _spread_rows_(dh, kept, ignored, chunk)
        if divisor is not None:
            loss = loss / divisor.to(torch.float32)
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        ctx.grads = (dh, dw)
        return loss.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dh, dw = ctx.grads
        ctx.grads = None
        g = g.reshape(1).to(torch.float32)
        if not (g.is_cuda and bool(g.eq(1).item())):  # a loss backpropagated as is: no pass
            for t in (dh, dw):
                if t is not None:
                    _scale_(t, g)
        return dh, dw, None, None, None, None, None, None, None, None


def _rows(x: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor,
          ignore_index: int, grad: bool, block_v: int | None) -> None:
    """rows[i] = logsumexp(x[i]) - x[i, labels[i]] (0 where ignored); with `grad`, x[i] is
    overwritten by scale·(softmax(x[i]) - onehot(labels[i])) (0 where ignored)."""
    n, V = x.shape
    if n == 0:
        return
    if triton_usable(x):
        block = block_v or min(MAX_BLOCK_V, 1 << (V - 1).bit_length())
        _kernels().ce_rows_kernel[(n,)](x, x.stride(0), labels, rows, scale, V, ignore_index,
                                        BLOCK_V=block, GRAD=grad,
                                        num_warps=32 if block >= 8192 else 4)
        return
    xf = x.float()
    lse = torch.logsumexp(xf, 1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    rows.copy_(torch.where(valid, lse - xf.gather(1, safe[:, None])[:, 0], 0.0))
    if grad:
        s = scale * valid.to(torch.float32)                               # [n]
        g = torch.exp(xf - lse[:, None]) * s[:, None]
        g.scatter_add_(1, safe[:, None], -s[:, None])
        x.copy_(g)


_MIXED_ADDMM: dict[str, bool] = {}
"""Device type → whether `torch.addmm(acc_fp32, a_bf16, b_bf16, fp32, out=acc)` ran there."""


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place; acc fp32 over bf16/fp16 a, b through cuBLAS's fp32-output GEMM
    (`addmm.dtype`, CUDA) where it exists, else through a temporary in a's dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    kind = acc.device.type
    if _MIXED_ADDMM.get(kind, acc.is_cuda):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _MIXED_ADDMM[kind] = True
            return
        except (RuntimeError, TypeError):
            _MIXED_ADDMM[kind] = False
    acc.add_(torch.mm(a, b))


def _spread_rows_(dh: torch.Tensor, kept: torch.Tensor, ignored: torch.Tensor, block: int) -> None:
    """dh's first len(kept) rows, compacted, moved in place to rows `kept` (ascending); rows
    `ignored` zeroed. Blocks go last to first: block [s, e) lands on rows kept[s:e] >= s, above
    every row not moved yet, so one block's copy (a clone, as its rows may overlap its targets)
    is the only extra memory."""
    n = kept.numel()
    for start in reversed(range(0, n, block)):
        end = min(n, start + block)
        dh.index_copy_(0, kept[start:end].long(), dh[start:end].clone())
    dh.index_fill_(0, ignored, 0)


def _scale_(t: torch.Tensor, g: torch.Tensor) -> None:
    """t *= g in place, computed in fp32 (g: one fp32 element on t's device; its shape [1]
    makes torch's mul compute in fp32 too)."""
    if t.dtype != torch.float32 and triton_usable(t) and t.is_contiguous():
        n = t.numel()
        _kernels().scale_kernel[(-(-n // 4096),)](t, g, n, BLOCK=4096)
        return
    t.mul_(g)
