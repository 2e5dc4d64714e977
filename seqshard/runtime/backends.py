"""Local attention backends behind one interface: `(out, lse)` forward, backward from a given out/lse.

    attention_forward(q, k, v)                 -> out [b, h, sq, e] (q's dtype), lse [b, h, sq]
    attention_backward(dout, q, k, v, out, lse) -> dq, dk, dv          (the inputs' dtypes)

`lse` is the natural-log logsumexp of the scaled scores, fp32 (fp64 for fp64 inputs). The backward
takes out and lse as *given*: the distributed algorithms pass the merged global ones, so that
P = exp(s - lse) is this block's slice of the global softmax and D = rowsum(dout ∘ out) the global
correction term (the FlashAttention-2 backward, Dao 2023, evaluated per block as ring attention
needs; ring-flash-attn does the same).

Masks. `causal` is top-left aligned on a square block (query i sees keys j <= i); callers split a
causal mask with an offset into full blocks and square causal blocks (blocks.py). `kv_len` cuts a
suffix of padded keys: keys >= kv_len are masked; with `causal` the block is square and query rows
>= kv_len are padding too (out 0, lse -inf, dq 0). Both are done by slicing, so a kernel only ever
sees a full problem or a top-left causal square. A row that sees no key has lse = -inf; the
backward treats it as contributing nothing.

`mask` (bool [b or 1, 1, sq, sk], True = visible) is any other mask: the blocks of documents,
windows and key padding that are neither full nor causal (blocks.refine). `cudnn` takes it as an
additive -inf bias, and its backward accepts a merged lse with the bias too (checked on an H200 by
the gpu tests of tests/test_runtime_masks.py); `fa4` hands such a block to cuDNN when cuDNN can
run it; every other backend runs such a block on `math`.
A row the mask leaves without keys gets out 0, lse -inf and no gradient on both.

GQA/MQA: q head i uses kv head i // (H // Hk). `math`, `flash_attn` and `fa4` handle it natively;
the aten SDPA kernels get the kv heads expanded and dk/dv summed over each group.

Kernels (`BACKENDS`):
    math        reference on any device: fp32 accumulation (fp64 for fp64 inputs), materializes
                the score matrix.
    flash_cpu   aten._scaled_dot_product_flash_attention_for_cpu and its backward.
    cudnn       aten._scaled_dot_product_cudnn_attention (CUDA, fp16/bf16); lse comes as
                [b, h, s, 1].
    flash       aten._scaled_dot_product_flash_attention (FlashAttention-2 inside PyTorch; CUDA,
                fp16/bf16).
    efficient   aten._scaled_dot_product_efficient_attention (CUTLASS memory-efficient attention;
                CUDA, also fp32); lse comes padded to a multiple of 32 rows.
    flash_attn  the flash-attn package (>= 2.7, its registered torch.ops.flashattn ops; CUDA,
                fp16/bf16), when importable.
    fa4         FlashAttention-4 (`pip install seqshard[fa4]`: flash-attn-4, CuTe DSL kernels for
                sm90 and sm100; fp16/bf16, head dims multiples of 8 up to 256 on sm90), when
                importable: the fastest on Hopper (1.13-1.16x cuDNN, docs/anchors.md), so the
                automatic choice there; at the head dims it was checked at (FA4_CHECKED_HEAD_DIMS),
                and at those of FA4_PAD_TO zero-padded to a checked one. See "FlashAttention-4"
                below.

`select_backend(device, dtype, head_dim, override=...)` picks one (env SEQSHARD_ATTN_BACKEND
overrides the automatic choice) and `backend_report(...)` says why each one is or is not usable.

FlashAttention-4. Its public `flash_attn_func` is an autograd function whose backward uses the lse
it produced; the ring needs a backward from a merged lse, so this backend calls the two functions
under it, `flash_attn.cute.interface._flash_attn_fwd` and `_flash_attn_bwd` (written against
flash-attn-4 4.0.0b36; another version that changed them fails with an error naming the function
and the installed version). Conventions, from its source: tensors [b, s, h, e] (ours are
[b, h, s, e]: passed as transposed views, no copy; out, dq, dk, dv are allocated dense
[b, h, s, e] and handed over transposed, so they come back dense in our layout - or, with
`seq_major=True`, allocated in its own layout, dense [b, s, h, e], and returned as transposed
views, which a layer's projections read without a copy); lse fp32 [b, h, s] in natural log
(the kernel computes (max·scale·log2 e + log2 sum) · ln 2; the backward's preprocess multiplies
it by log2 e again), so no conversion; `softmax_scale` multiplies q·k as ours; causal is aligned
bottom-right, the same as top-left on the square blocks this interface passes; K/V at their own
head count (GQA packed in the forward, dK/dV summed in fp32 by its postprocess). Its backward
wants out and dout in q's dtype: the merged fp32 out is cast. Kernels are compiled on first use
per (head dim, causal, q heads per kv head, dtype); FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
keeps them on disk between processes.

Padded head dims. At head dim 72 FlashAttention-4 4.0.0b36's backward returns a wrong dq on an H200
(its sm90 backward kernel rounds the head dim to a multiple of 16, 80, while the dQ accumulator's
preprocess and postprocess round it to a multiple of 32, 96: flash_attn/cute/flash_bwd_sm90.py
`tile_hdim`, interface.py `hdim_multiple_of`; the same holds for dK/dV with GQA). A head dim in
`FA4_PAD_TO` runs FA4 at the checked head dim it maps to: q, k, v (and in the backward out and
dout) get zero columns appended, the softmax scale of the *true* head dim is passed explicitly,
and out, dq, dk, dv are sliced back. Exact: zero columns add nothing to q·k (so the scores, P and
lse are unchanged), give zero output columns, and the padded columns of dq, dk, dv are dropped.
The cost: copies of q, k, v (forward) and q, k, v, out, dout (backward) at the padded width and of
the sliced results, and the padded FLOPs (72 → 128: 1.78x); the planner prices the padded FLOPs
(planner/parallel.py). `backend_report` and the choice log name the mode: "fa4 (head dim 72
padded to 128)".
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "attention_forward",
    "attention_backward",
    "select_backend",
    "backend_report",
    "unsupported_reason",
    "describe",
    "fa4_head_dim",
    "as_seq_major",
    "empty_seq_major",
]

log = logging.getLogger(__name__)

BACKENDS = ("math", "flash_cpu", "cudnn", "flash", "efficient", "flash_attn", "fa4")
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# GQA helpers and lse shapes
# ---------------------------------------------------------------------------------------------

def _expand_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """[b, hk, s, e] -> [b, hk·rep, s, e] with q head i reading kv head i // rep."""
    if rep == 1:
        return x
    b, hk, s, e = x.shape
    return x.unsqueeze(2).expand(b, hk, rep, s, e).reshape(b, hk * rep, s, e)


def _sum_kv_grad(dx: torch.Tensor, rep: int) -> torch.Tensor:
    """The adjoint of `_expand_kv`: sum the gradients of the q heads that share a kv head."""
    if rep == 1:
        return dx
    b, h, s, e = dx.shape
    return dx.reshape(b, h // rep, rep, s, e).sum(2, dtype=torch.promote_types(dx.dtype, torch.float32))


def _lse_bhs(lse: torch.Tensor, rows: int) -> torch.Tensor:
    """Kernels return lse as [b, h, s], [b, h, s, 1] or [b, h, s rounded up]: make it [b, h, s]."""
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse[:, :, :rows].to(torch.promote_types(lse.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# math: the reference
# ---------------------------------------------------------------------------------------------

def _scores(q, k, causal, scale, mask=None):
    """Scores grouped by kv head: [b, hk, rep, sq, sk] in fp32 (fp64 for fp64 inputs); keys
    outside `mask` [b|1, 1, sq, sk] at -inf."""
    b, h, sq, e = q.shape
    hk = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).reshape(b, hk, h // hk, sq, e)
    s = torch.matmul(qg, k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        above = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(above, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return qg, s


def _math_forward(q, k, v, causal, scale, mask=None):
    b, h, sq, e = q.shape
    _, s = _scores(q, k, causal, scale, mask)
    lse = torch.logsumexp(s, dim=-1)
    # a row the mask leaves without keys: lse -inf, and exp(s - 0) = 0 gives out 0 (not nan)
    shift = lse if mask is None else lse.masked_fill(torch.isneginf(lse), 0.0)
    p = torch.exp(s - shift.unsqueeze(-1))
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))
    return out.reshape(b, h, sq, v.shape[-1]).to(q.dtype), lse.reshape(b, h, sq)


def _math_backward(dout, q, k, v, out, lse, causal, scale, mask=None):
    b, h, sq, e = q.shape
    hk = k.shape[1]
    qg, s = _scores(q, k, causal, scale, mask)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc).reshape(b, hk, h // hk, sq, 1))
    do = dout.to(acc).reshape(b, hk, h // hk, sq, -1)
    o = out.to(acc).reshape(b, hk, h // hk, sq, -1)
    vg = v.to(acc).unsqueeze(2)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    dp = torch.matmul(do, vg.transpose(-1, -2))
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(acc).unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qg).sum(2) * scale
    return dq.reshape(b, h, sq, e), dk, dv


# ---------------------------------------------------------------------------------------------
# aten SDPA kernels that expose lse
# ---------------------------------------------------------------------------------------------

def _rep(q, k) -> int:
    return q.shape[1] // k.shape[1]


def _flash_cpu_forward(q, k, v, causal, scale):
    rep = _rep(q, k)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _expand_kv(k, rep), _expand_kv(v, rep), 0.0, causal, scale=scale)
    return out, _lse_bhs(lse, q.shape[2])


def _flash_cpu_backward(dout, q, k, v, out, lse, causal, scale):
    rep = _rep(q, k)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, _expand_kv(k, rep), _expand_kv(v, rep), out, lse.contiguous(), 0.0, causal,
        scale=scale)
    return dq, _sum_kv_grad(dk, rep), _sum_kv_grad(dv, rep)


def _flash_forward(q, k, v, causal, scale):
    rep = _rep(q, k)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, _expand_kv(k, rep), _expand_kv(v, rep), 0.0, causal, False, scale=scale)
    return out, _lse_bhs(lse, q.shape[2])


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    # dropout_p = 0: the rng state is not read; pass tensors of the forward's types.
    rep = _rep(q, k)
    ke, ve = _expand_kv(k, rep), _expand_kv(v, rep)
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.zeros((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, ke, ve, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal,
        rng_state, unused, scale=scale)
    return dq, _sum_kv_grad(dk, rep), _sum_kv_grad(dv, rep)


def _cudnn_forward(q, k, v, causal, scale):
    # dense [b, h, s, e] inputs: the backward below hands cuDNN the same layout
    rep = _rep(q, k)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.contiguous(), _expand_kv(k, rep).contiguous(), _expand_kv(v, rep).contiguous(), None, True,
        0.0, causal, False, scale=scale)
    return out, _lse_bhs(lse, q.shape[2])


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    # cuDNN wants one memory layout for q, out and dout; make everything dense [b, h, s, e].
    rep = _rep(q, k)
    q, out, dout = q.contiguous(), out.contiguous(), dout.contiguous()
    ke, ve = _expand_kv(k, rep).contiguous(), _expand_kv(v, rep).contiguous()
    seed = torch.zeros((), dtype=torch.long, device=q.device)
    offset = torch.zeros((), dtype=torch.long, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, ke, ve, out, lse.unsqueeze(-1).contiguous(), seed, offset, None, None, None,
        q.shape[2], k.shape[2], 0.0, causal, scale=scale)
    return dq, _sum_kv_grad(dk, rep), _sum_kv_grad(dv, rep)


def _bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None = None):
    """An additive bias [b, h, sq, sk] (a broadcast view) of q's dtype: 0 where `mask` (or
    `keep`, rows) is True, -inf elsewhere."""
    seen = mask if keep is None else mask | keep
    bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, float("-inf"))
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _cudnn_masked_forward(q, k, v, mask, scale):
    """cuDNN with the mask as a -inf bias. A row without keys would come out nan: it attends
    every key instead, and its out and lse are set to 0 and -inf after."""
    rep = _rep(q, k)
    empty = ~mask.any(-1, keepdim=True)  # [b|1, 1, sq, 1]
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.contiguous(), _expand_kv(k, rep).contiguous(), _expand_kv(v, rep).contiguous(),
        _bias(mask, q, k, empty), True, 0.0, False, False, scale=scale)
    lse = _lse_bhs(lse, q.shape[2])
    return out.masked_fill(empty, 0.0), lse.masked_fill(empty.squeeze(-1), float("-inf"))


def _cudnn_masked_backward(dout, q, k, v, out, lse, mask, scale):
    """The backward of `_cudnn_masked_forward` given out and lse: every masked key at -inf (a row
    without keys then has P = 0), and the lse of rows that saw nothing anywhere (+inf here)
    made finite, which cuDNN needs."""
    rep = _rep(q, k)
    q, out, dout = q.contiguous(), out.contiguous(), dout.contiguous()
    ke, ve = _expand_kv(k, rep).contiguous(), _expand_kv(v, rep).contiguous()
    lse = lse.masked_fill(torch.isinf(lse), 0.0)
    seed = torch.zeros((), dtype=torch.long, device=q.device)
    offset = torch.zeros((), dtype=torch.long, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, ke, ve, out, lse.unsqueeze(-1).contiguous(), seed, offset, _bias(mask, q, k),
        None, None, q.shape[2], k.shape[2], 0.0, False, scale=scale)
    return dq, _sum_kv_grad(dk, rep), _sum_kv_grad(dv, rep)


def _efficient_forward(q, k, v, causal, scale):
    rep = _rep(q, k)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, _expand_kv(k, rep), _expand_kv(v, rep), None, True, 0.0, causal, scale=scale)
    return out, _lse_bhs(lse, q.shape[2])


def _efficient_backward(dout, q, k, v, out, lse, causal, scale):
    rep = _rep(q, k)
    rows = q.shape[2]
    lse = F.pad(lse, (0, -rows % 32)).contiguous()  # the kernel's own lse is padded to 32 rows
    seed = torch.zeros((), dtype=torch.long)
    offset = torch.zeros((), dtype=torch.long)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _expand_kv(k, rep), _expand_kv(v, rep), None, out, lse, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale)
    return dq, _sum_kv_grad(dk, rep), _sum_kv_grad(dv, rep)


# ---------------------------------------------------------------------------------------------
# flash-attn package: [b, s, h, e] layout, GQA native
# ---------------------------------------------------------------------------------------------

@functools.cache
def _flash_attn_ops():
    """torch.ops.flashattn after importing flash_attn (>= 2.7 registers it), or None."""
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_interface  # noqa: F401  (registers the ops)
    except ImportError:
        return None
    ops = torch.ops.flashattn
    return ops if hasattr(ops, "_flash_attn_forward") and hasattr(ops, "_flash_attn_backward") else None


def _flash_attn_forward(q, k, v, causal, scale):
    ops = _flash_attn_ops()
    out, lse, _, _ = ops._flash_attn_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale, causal, -1, -1, 0.0,
        None, False)
    return out.transpose(1, 2), _lse_bhs(lse, q.shape[2])


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    ops = _flash_attn_ops()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (qt, kt, vt))
    ops._flash_attn_backward(
        dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse.contiguous(), dq, dk, dv, 0.0,
        scale, causal, -1, -1, 0.0, None, False, None)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# FlashAttention-4 (flash-attn-4, CuTe DSL): [b, s, h, e] layout, GQA native, lse natural log
# ---------------------------------------------------------------------------------------------

FA4_TESTED = "4.0.0b36"
"""The flash-attn-4 release whose private entry points `_fa4_forward` / `_fa4_backward` call."""


@functools.cache
def _fa4_module():
    """(flash_attn.cute.interface, version) when importable with both entry points, else
    (None, why not)."""
    try:
        from flash_attn.cute import interface
    except Exception as e:  # ImportError, or the CuTe DSL failing to load its libraries
        return None, f"flash-attn-4 is not importable ({type(e).__name__}: {e}; pip install seqshard[fa4])"
    version = _fa4_version()
    missing = [n for n in ("_flash_attn_fwd", "_flash_attn_bwd") if not callable(getattr(interface, n, None))]
    if missing:
        return None, (f"flash-attn-4 {version} has no flash_attn.cute.interface.{' or .'.join(missing)} "
                      f"(seqshard's fa4 backend is written against {FA4_TESTED})")
    return interface, version


def _fa4_version() -> str:
    for dist in ("flash-attn-4", "flash_attn_4"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "(version unknown)"


def _fa4_call(name: str, *args, **kwargs):
    """flash_attn.cute.interface.`name`(*args, **kwargs); a failure that is not running out of
    memory is re-raised naming the function, the installed version and the one this was written
    against (an API change shows as a TypeError or AssertionError inside)."""
    module, version = _fa4_module()
    if module is None:
        raise RuntimeError(f"attention backend 'fa4': {version}")
    fn = getattr(module, name, None)
    what = f"flash_attn.cute.interface.{name} (flash-attn-4 {version}; seqshard's fa4 backend is written against {FA4_TESTED})"
    if not callable(fn):
        raise RuntimeError(f"{what} does not exist")
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in args if isinstance(t, torch.Tensor))
        raise RuntimeError(f"{what} failed on [{shapes}] with {sorted(kwargs)}: "
                           f"{type(e).__name__}: {e}") from e


def empty_seq_major(shape, like: torch.Tensor) -> torch.Tensor:
    """An empty [b, h, s, e] tensor of `like`'s dtype and device laid out seq-major: dense
    [b, s, h, e] seen through a transpose (FA4's own layout, and the one a projection's output
    [b, s, h·e] has)."""
    b, h, s, e = shape
    return torch.empty((b, s, h, e), dtype=like.dtype, device=like.device).transpose(1, 2)


def as_seq_major(x: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, e] laid out seq-major (`empty_seq_major`): x itself if it is, else a copy."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _fa4_outputs(like: tuple[torch.Tensor, ...], seq_major: bool) -> tuple[torch.Tensor, ...]:
    """Empty results of FA4's [b, s, h, e] shape for tensors `like` [b, h, s, e]: dense in it
    (`seq_major`), else transposed views of dense [b, h, s, e] tensors."""
    if seq_major:
        return tuple(empty_seq_major(x.shape, x).transpose(1, 2) for x in like)
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format).transpose(1, 2)
                 for x in like)


def _fa4_forward(q, k, v, causal, scale, seq_major=False):
    e, run = q.shape[-1], fa4_head_dim(q.shape[-1])
    if run != e:  # q, k, v: [b, h, s, e] -> [b, h, s, run], zero columns (see "Padded head dims")
        q, k, v = (F.pad(x, (0, run - e)) for x in (q, k, v))
        out, lse = _fa4_forward(q, k, v, causal, scale)
        return (as_seq_major if seq_major else torch.Tensor.contiguous)(out[..., :e]), lse
    out, = _fa4_outputs((q,), seq_major)
    res = _fa4_call("_flash_attn_fwd", q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    softmax_scale=scale, causal=causal, return_lse=True, out=out)
    lse = res[1] if isinstance(res, (tuple, list)) and len(res) >= 2 else None
    b, h, s = q.shape[:3]
    if lse is None or tuple(lse.shape) != (b, h, s) or lse.dtype != torch.float32:
        got = "nothing" if lse is None else f"{tuple(lse.shape)} {lse.dtype}"
        raise RuntimeError(f"flash_attn.cute.interface._flash_attn_fwd (flash-attn-4 {_fa4_version()}) "
                           f"returned lse {got}, expected ({b}, {h}, {s}) torch.float32 as in "
                           f"{FA4_TESTED}")
    if res[0].data_ptr() != out.data_ptr():  # it allocated its own out: [b, s, h, e]
        return res[0].transpose(1, 2), lse
    return out.transpose(1, 2), lse


def _fa4_backward(dout, q, k, v, out, lse, causal, scale, seq_major=False):
    e, run = q.shape[-1], fa4_head_dim(q.shape[-1])
    if run != e:  # everything at the padded head dim; the padded columns of dq, dk, dv dropped
        padded = (F.pad(x.to(q.dtype), (0, run - e)) for x in (dout, q, k, v, out))
        dense = as_seq_major if seq_major else torch.Tensor.contiguous
        return tuple(dense(g[..., :e]) for g in _fa4_backward(*padded, lse, causal, scale))
    dq, dk, dv = _fa4_outputs((q, k, v), seq_major)
    res = _fa4_call("_flash_attn_bwd", q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    out.to(q.dtype).transpose(1, 2), dout.to(q.dtype).transpose(1, 2),
                    lse.float().contiguous(), softmax_scale=scale, causal=causal, dq=dq, dk=dk, dv=dv)
    grads = tuple(res[:3]) if isinstance(res, (tuple, list)) and len(res) >= 3 else (dq, dk, dv)
    return tuple(g.transpose(1, 2) for g in grads)


_KERNELS = {
    "math": (_math_forward, _math_backward),
    "flash_cpu": (_flash_cpu_forward, _flash_cpu_backward),
    "cudnn": (_cudnn_forward, _cudnn_backward),
    "flash": (_flash_forward, _flash_backward),
    "efficient": (_efficient_forward, _efficient_backward),
    "flash_attn": (_flash_attn_forward, _flash_attn_backward),
    "fa4": (_fa4_forward, _fa4_backward),
}
assert tuple(_KERNELS) == BACKENDS


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------

def _check(q, k, v, causal, kv_len, backend, mask=None):
    if backend not in _KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, h, s, e] and k, v [b, hk, s, e] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same batch and head "
                         "dim, and q heads a multiple of kv heads")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"a causal block must be square, got {q.shape[2]} queries × {k.shape[2]} "
                         "keys (split an offset causal mask into full and square causal blocks)")
    if kv_len is not None and not 0 <= kv_len <= k.shape[2]:
        raise ValueError(f"kv_len={kv_len} outside [0, {k.shape[2]}]")
    if mask is not None and (causal or mask.dtype != torch.bool or mask.dim() != 4
                             or mask.shape[0] not in (1, q.shape[0]) or mask.shape[1] != 1
                             or mask.shape[2:] != (q.shape[2], k.shape[2])):
        raise ValueError(f"mask must be bool [{q.shape[0]} or 1, 1, {q.shape[2]}, {k.shape[2]}] "
                         f"without causal, got {mask.dtype} {tuple(mask.shape)}, causal={causal}")


def _pad_rows(x: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    pad = rows - x.shape[2]
    if pad == 0:
        return x
    return F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad), value=value)


def _extents(q, k, v, causal, scale, kv_len, backend, mask=None):
    """Checked inputs: (scale, query rows, key rows) the kernel sees; causal blocks are square."""
    _check(q, k, v, causal, kv_len, backend, mask)
    n_k = k.shape[2] if kv_len is None else kv_len
    return (q.shape[-1] ** -0.5 if scale is None else scale), (n_k if causal else q.shape[2]), n_k


def _math_masked_forward(q, k, v, mask, scale):
    return _math_forward(q, k, v, False, scale, mask)


def _math_masked_backward(dout, q, k, v, out, lse, mask, scale):
    return _math_backward(dout, q, k, v, out, lse, False, scale, mask)


@functools.cache
def _cudnn_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return unsupported_reason("cudnn", device, dtype, head_dim) is None


def _masked_kernels(backend: str, n_q: int, n_k: int, q: torch.Tensor):
    """(forward, backward) for a block under a bool mask: cuDNN's (with a bias) or math's. FA4
    takes no bool mask here: its blocks go to cuDNN where cuDNN runs."""
    if backend == "fa4" and _cudnn_usable(q.device, q.dtype, q.shape[-1]):
        backend = "cudnn"
    if _kernel(backend, n_q, n_k) == "cudnn":
        return _cudnn_masked_forward, _cudnn_masked_backward
    return _math_masked_forward, _math_masked_backward


def _kernel(backend: str, n_q: int, n_k: int) -> str:
    """The kernel that runs a block: `backend`, except that cuDNN refuses one query against one
    key ("s_q = s_kv = 1 is not supported", torch 2.11, H200), which a one-token document or
    padded tail makes: math does that block."""
    return "math" if backend == "cudnn" and n_q == n_k == 1 else backend


def _layout_option(name: str, seq_major: bool) -> dict:
    """The kernel's keyword for `seq_major`: FA4 writes that layout itself; the others' results
    are copied into it after (`as_seq_major`)."""
    return {"seq_major": True} if seq_major and name == "fa4" else {}


def attention_forward(q, k, v, *, causal: bool = False, scale: float | None = None,
                      kv_len: int | None = None, backend: str = "math",
                      mask: torch.Tensor | None = None, seq_major: bool = False):
    """Local attention: `(out, lse)` for q [b, h, sq, e] against k, v [b, hk, sk, e].
    `seq_major`: out laid out seq-major (`as_seq_major`; FA4 writes it so, no copy); else as
    the kernel returns it."""
    scale, n_q, n_k = _extents(q, k, v, causal, scale, kv_len, backend, mask)
    if n_k == 0:
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype, device=q.device)
    elif mask is not None:
        forward, _ = _masked_kernels(backend, n_q, n_k, q)
        out, lse = forward(q, k[:, :, :n_k], v[:, :, :n_k], mask[..., :n_k], scale)
    else:
        name = _kernel(backend, n_q, n_k)
        forward, _ = _KERNELS[name]
        out, lse = forward(q[:, :, :n_q], k[:, :, :n_k], v[:, :, :n_k], causal, scale,
                           **_layout_option(name, seq_major))
        out, lse = _pad_rows(out, q.shape[2], 0.0), _pad_rows(lse, q.shape[2], float("-inf"))
    return (as_seq_major(out) if seq_major else out), lse


def attention_backward(dout, q, k, v, out, lse, *, causal: bool = False, scale: float | None = None,
                       kv_len: int | None = None, backend: str = "math",
                       mask: torch.Tensor | None = None, seq_major: bool = False):
    """Gradients of local attention given the (possibly globally merged) `out` and `lse`.
    `seq_major`: dq, dk, dv laid out seq-major, as `attention_forward`'s out."""
    scale, n_q, n_k = _extents(q, k, v, causal, scale, kv_len, backend, mask)
    if n_k == 0:
        grads = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    elif mask is not None:
        # a row that saw no key (lse = -inf, out = 0) must contribute nothing: P = exp(s - inf) = 0
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        _, backward = _masked_kernels(backend, n_q, n_k, q)
        dq, dk, dv = backward(dout.to(q.dtype), q, k[:, :, :n_k], v[:, :, :n_k], out, lse,
                              mask[..., :n_k], scale)
        grads = (dq.to(q.dtype), _pad_rows(dk, k.shape[2], 0.0).to(k.dtype),
                 _pad_rows(dv, v.shape[2], 0.0).to(v.dtype))
    else:
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # as above
        name = _kernel(backend, n_q, n_k)
        _, backward = _KERNELS[name]
        dq, dk, dv = backward(dout[:, :, :n_q].to(q.dtype), q[:, :, :n_q], k[:, :, :n_k],
                              v[:, :, :n_k], out[:, :, :n_q], lse[:, :, :n_q], causal, scale,
                              **_layout_option(name, seq_major))
        grads = (_pad_rows(dq, q.shape[2], 0.0).to(q.dtype),
                 _pad_rows(dk, k.shape[2], 0.0).to(k.dtype),
                 _pad_rows(dv, v.shape[2], 0.0).to(v.dtype))
    return tuple(as_seq_major(g) for g in grads) if seq_major else grads


# ---------------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------------

def _sm(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# backend: (dtypes, largest head dim, smallest compute capability); head dims are multiples of 8
_CUDA_LIMITS = {
    "cudnn": (_HALF, 128, 80),
    "flash": (_HALF, 256, 80),
    "efficient": ((torch.float32, *_HALF), 512, 50),
    "flash_attn": (_HALF, 256, 80),
    "fa4": (_HALF, 256, 90),
}


def _missing(name: str) -> str | None:
    if name == "flash" and not torch.backends.cuda.is_flash_attention_available():
        return "this PyTorch build has no flash attention"
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    if name == "flash_attn" and _flash_attn_ops() is None:
        return "flash-attn (>= 2.7) is not importable"
    if name == "fa4":
        module, why_not = _fa4_module()
        return why_not if module is None else None
    return None


def unsupported_reason(name: str, device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why backend `name` cannot run attention of this device/dtype/head dim, or None if it can."""
    device = torch.device(device)
    if name not in _KERNELS:
        return f"unknown backend (choose one of {BACKENDS})"
    if name == "math":
        return None
    if name == "flash_cpu":
        if device.type != "cpu":
            return "CPU only"
        return None if dtype in (torch.float32, torch.float64, *_HALF) else f"no {dtype} kernel"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA device"
    if name == "efficient":
        # its backward given an lse it did not produce returns a wrong dq, so a ring's block
        # backward would be wrong (docs/runtime-measurements.md)
        return "its backward is wrong with a merged lse (torch 2.11, H200)"
    dtypes, max_head_dim, min_sm = _CUDA_LIMITS[name]
    if dtype not in dtypes:
        return f"no {dtype} kernel"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head dim {head_dim} is not a multiple of 8 up to {max_head_dim}"
    if _sm(device) < min_sm:
        return f"needs sm{min_sm}+, this GPU is sm{_sm(device)}"
    if name == "fa4":
        reason = _fa4_arch_reason(_sm(device), head_dim)
        if reason:
            return reason
    return _missing(name)


FA4_CHECKED_HEAD_DIMS = (64, 96, 128)
"""Head dims whose FlashAttention-4 forward and backward were checked against the math reference
on an H200 (tests/test_fa4.py, GPU tests; 96 with MHA and GQA: bench/results/
fa4-20261201-210430.md). At 72 and 80, 4.0.0b36's backward returns a wrong dq (relative error
1.03 causal, 1.28 full, against ~0.004 for SDPA: the sm90 backward rounds the head dim up to 16,
its dQ accumulator up to 32) while out, dk and dv are right."""

FA4_PAD_TO = {72: 96}
"""Head dims FlashAttention-4 runs zero-padded, and the checked head dim each is padded to (see
"Padded head dims" above); a head dim neither checked nor here is refused, and the next backend
(cuDNN) runs it. 72: the DiT's. Measured on an H200 (bench/results/fa4-20261201-210430.md,
fwd+bwd at d72's useful FLOPs, 32K/128K, causal and full): padded to 96, 412-440 TFLOP/s
(1.25-1.37x cuDNN's 300-329) and within the bf16 rule; to 128, 357-381 (1.13-1.19x); to 80,
faster (465-477) but with 72's wrong dq."""


def fa4_head_dim(head_dim: int) -> int:
    """The head dim FlashAttention-4 runs a head dim at: itself, or its padded one (`FA4_PAD_TO`)."""
    return FA4_PAD_TO.get(head_dim, head_dim)


def describe(name: str, head_dim: int) -> str:
    """A backend's name with its mode at this head dim, as the choice log and plan notes say it:
    "fa4 (head dim 72 padded to 128)"; other backends and head dims: the name."""
    if name == "fa4" and fa4_head_dim(head_dim) != head_dim:
        return f"fa4 (head dim {head_dim} padded to {fa4_head_dim(head_dim)})"
    return name


def _fa4_arch_reason(sm: int, head_dim: int) -> str | None:
    """FlashAttention-4's own limits (flash_attn.cute.interface._validate_head_dims, 4.0.0b36):
    its backward runs on sm90, sm100/sm110 and sm120; seqshard uses the sm90 and sm100 kernels
    (the ones its kernels were tuned for); head dims up to 256 on sm90, up to 128 or 256 on sm100;
    and only the head dims seqshard checked (FA4_CHECKED_HEAD_DIMS), or padded to one of them
    (FA4_PAD_TO)."""
    if sm // 10 not in (9, 10):
        return f"seqshard uses FlashAttention-4's sm90 and sm100 kernels, this GPU is sm{sm}"
    run = fa4_head_dim(head_dim)
    if sm // 10 == 10 and not (run <= 128 or run == 256):
        return f"FlashAttention-4 on sm{sm} takes head dims up to 128 or 256, not {run}"
    if run != head_dim and run not in FA4_CHECKED_HEAD_DIMS:
        return (f"head dim {head_dim} pads to {run} (FA4_PAD_TO), which is not in "
                f"FA4_CHECKED_HEAD_DIMS {FA4_CHECKED_HEAD_DIMS}")
    if run not in FA4_CHECKED_HEAD_DIMS:
        padded = ", ".join(f"{d} -> {p}" for d, p in FA4_PAD_TO.items())
        return (f"head dim {head_dim} is unchecked for FlashAttention-4 (checked: "
                f"{', '.join(map(str, FA4_CHECKED_HEAD_DIMS))}; padded: {padded or 'none'}; at 72 "
                "its backward gave a wrong dq on an H200)")
    return None


def _preference(device: torch.device) -> tuple[str, ...]:
    if device.type == "cpu":
        return ("flash_cpu", "math")
    if device.type == "cuda":
        # FlashAttention-4 runs 1.13-1.16x cuDNN on an H200 (docs/anchors.md), when installed;
        # cuDNN is the fastest SDPA kernel on Hopper (docs/runtime-measurements.md).
        first = ("fa4", "cudnn", "flash") if _sm(device) >= 90 else ("flash", "cudnn")
        return (*first, "flash_attn", "efficient", "math")
    return ("math",)


def select_backend(device, dtype: torch.dtype, head_dim: int, *, override: str | None = None) -> str:
    """The local attention backend to use; `override` (or env SEQSHARD_ATTN_BACKEND) forces one."""
    device = torch.device(device)
    name = override or os.environ.get("SEQSHARD_ATTN_BACKEND")
    if name:
        reason = unsupported_reason(name, device, dtype, head_dim)
        if reason:
            raise ValueError(f"attention backend {name!r} cannot run {dtype} head dim {head_dim} on "
                             f"{device}: {reason}")
        return name
    passed = []
    for name in _preference(device):
        reason = unsupported_reason(name, device, dtype, head_dim)
        if reason is None:
            _log_choice(describe(name, head_dim), device.type, dtype, head_dim, tuple(passed))
            return name
        passed.append(f"{name}: {reason}")
    raise AssertionError("math always applies")


@functools.cache
def _log_choice(name, device_type, dtype, head_dim, passed: tuple[str, ...] = ()):
    log.info("attention backend %s for %s %s head dim %d%s", name, device_type, dtype, head_dim,
             f" (preferred before it: {'; '.join(passed)})" if passed else "")


def backend_report(device, dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    """For each backend: 'ok', 'ok: fa4 (head dim 72 padded to 128)' (a mode, `describe`) or why
    it cannot run here (for logs and benchmark tables)."""
    report = {}
    for name in BACKENDS:
        mode = describe(name, head_dim)
        report[name] = unsupported_reason(name, device, dtype, head_dim) or \
            ("ok" if mode == name else f"ok: {mode}")
    return report
