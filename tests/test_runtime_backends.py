"""Local attention backends: (out, lse) forward and the backward from a *given* out and lse.

CPU: `math` and `flash_cpu` against an independent float64 reference, GQA/MQA, causal/full,
key-padding cuts; the block-wise backward with the merged global lse summing to the full
gradient (what ring attention relies on); backend selection. GPU (marked `gpu`, skipped on CPU):
every CUDA kernel in bf16 within 2× the error of PyTorch's own bf16 SDPA against an fp32
reference, and its backward from a merged lse.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seqshard.runtime import backends
from seqshard.runtime.backends import attention_backward, attention_forward, select_backend
from seqshard.runtime.merge import merge_all


def reference(q, k, v, causal, kv_len, scale=None):
    """float64 attention with keys >= kv_len masked; with causal, rows >= kv_len are padding (0)."""
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    n_q, n_k = s.shape[-2:]
    kv_len = n_k if kv_len is None else kv_len
    i, j = torch.arange(n_q).unsqueeze(1), torch.arange(n_k).unsqueeze(0)
    masked = (j >= kv_len) | ((j > i) if causal else torch.zeros((), dtype=torch.bool))
    p = torch.softmax(s.masked_fill(masked, float("-inf")), dim=-1).nan_to_num()
    out = p @ v.repeat_interleave(rep, 1)
    if causal:
        out = out * (torch.arange(n_q) < kv_len).double().unsqueeze(-1)
    return out


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _inputs(b, h, hk, n_q, n_k, e, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, h, n_q, e, generator=gen, device=device, dtype=dtype)
    k = torch.randn(b, hk, n_k, e, generator=gen, device=device, dtype=dtype)
    v = torch.randn(b, hk, n_k, e, generator=gen, device=device, dtype=dtype)
    dout = torch.randn(b, h, n_q, e, generator=gen, device=device, dtype=dtype)
    return q, k, v, dout


HEADS = [(4, 4), (4, 2), (6, 1)]


@pytest.mark.parametrize("backend,causal,heads,kv_len,e", itertools.product(
    ("math", "flash_cpu"), (True, False), HEADS, (None, 13, 0), (64, 8)))
def test_cpu_backends_match_reference(backend, causal, heads, kv_len, e):
    h, hk = heads
    q, k, v, dout = _inputs(2, h, hk, 21, 21, e)
    out, lse = attention_forward(q, k, v, causal=causal, kv_len=kv_len, backend=backend)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (2, h, 21)
    if kv_len == 0:
        assert not out.any() and torch.isneginf(lse).all()
        grads = attention_backward(dout, q, k, v, out, lse, causal=causal, kv_len=kv_len, backend=backend)
        assert not any(g.any() for g in grads)
        return
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference(qd, kd, vd, causal, kv_len)
    assert _rel(out, ref) < 1e-6
    if causal and kv_len is not None:  # padded rows: out 0, lse -inf, gradients 0
        assert not out[:, :, kv_len:].any() and torch.isneginf(lse[:, :, kv_len:]).all()
        dout = dout.clone()
        dout[:, :, kv_len:] = 0
    ref.backward(dout.double())
    grads = attention_backward(dout, q, k, v, out, lse, causal=causal, kv_len=kv_len, backend=backend)
    for name, g, r in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
        assert g.dtype == torch.float32 and _rel(g, r) < 1e-6, name


def test_math_is_exact_in_float64():
    q, k, v, _ = _inputs(1, 4, 2, 9, 9, 16, dtype=torch.float64)
    out, lse = attention_forward(q, k, v, causal=True, backend="math")
    assert lse.dtype == torch.float64
    assert _rel(out, reference(q, k, v, True, None)) < 1e-14


@pytest.mark.parametrize("backend", ["math", "flash_cpu"])
@pytest.mark.parametrize("causal", [True, False])
def test_block_backward_with_merged_lse_sums_to_full_gradient(backend, causal):
    """Split the keys into blocks (causal: a full block, then the diagonal square), merge the
    forward partials, run each block's backward with the merged out/lse: the sum is the gradient."""
    n = 12
    q, k, v, dout = _inputs(2, 4, 2, n, n, 16, seed=1)
    if causal:  # queries [8, 12) at offset 8: keys [0, 8) full, [8, 12) causal square
        qs, cuts = q[:, :, 8:], [(0, 8, False), (8, 12, True)]
    else:
        qs, cuts = q, [(0, 5, False), (5, 9, False), (9, 12, False)]
    parts = [attention_forward(qs, k[:, :, a:b], v[:, :, a:b], causal=c, backend=backend) for a, b, c in cuts]
    out, lse = merge_all(*zip(*parts))
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref_full = reference(qd, kd, vd, causal, None)
    ref = ref_full[:, :, 8:] if causal else ref_full
    assert _rel(out, ref) < 1e-6
    dout = dout[:, :, : qs.shape[2]]
    ref.backward(dout.double())
    dq = torch.zeros_like(qs)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for a, b, c in cuts:
        gq, gk, gv = attention_backward(dout, qs, k[:, :, a:b], v[:, :, a:b], out.float(), lse,
                                        causal=c, backend=backend)
        dq += gq
        dk[:, :, a:b] += gk
        dv[:, :, a:b] += gv
    ref_dq = qd.grad[:, :, 8:] if causal else qd.grad
    assert _rel(dq, ref_dq) < 1e-6 and _rel(dk, kd.grad) < 1e-6 and _rel(dv, vd.grad) < 1e-6


def test_lse_layouts_of_the_kernels_are_normalized():
    lse = torch.randn(2, 3, 5)
    assert torch.equal(backends._lse_bhs(lse.unsqueeze(-1), 5), lse)  # cuDNN: [b, h, s, 1]
    assert torch.equal(backends._lse_bhs(torch.cat([lse, torch.zeros(2, 3, 27)], -1), 5), lse)  # padded to 32


def test_gqa_expand_and_its_adjoint():
    k = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    expanded = backends._expand_kv(k, 4)
    assert torch.equal(expanded[:, 7], k[:, 7 // 4])
    g = torch.randn_like(expanded)
    expanded.backward(g)
    assert torch.allclose(backends._sum_kv_grad(g, 4), k.grad)


def test_select_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("SEQSHARD_ATTN_BACKEND", raising=False)
    assert select_backend("cpu", torch.float32, 64) == "flash_cpu"
    assert select_backend("cpu", torch.float32, 64, override="math") == "math"
    monkeypatch.setenv("SEQSHARD_ATTN_BACKEND", "math")
    assert select_backend("cpu", torch.float32, 64) == "math"
    with pytest.raises(ValueError, match="'cudnn' cannot run .* needs a CUDA device"):
        select_backend("cpu", torch.bfloat16, 64, override="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("cpu", torch.float32, 64, override="xformers")
    report = backends.backend_report("cpu", torch.float32, 64)
    assert report["math"] == report["flash_cpu"] == "ok" and report["flash"] == "needs a CUDA device"
    assert report["fa4"] == "needs a CUDA device"


def test_interface_errors_name_the_fix():
    q, k, v, _ = _inputs(1, 4, 2, 6, 8, 8)
    with pytest.raises(ValueError, match="causal block must be square"):
        attention_forward(q, k, v, causal=True)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_forward(q[:, :3], k, v)
    with pytest.raises(ValueError, match=r"kv_len=9 outside \[0, 8\]"):
        attention_forward(q, k, v, kv_len=9)


# ---------------------------------------------------------------------------------------------
# GPU: run on the device machine (pytest -m gpu)
# ---------------------------------------------------------------------------------------------

CUDA_BACKENDS = ("cudnn", "flash", "efficient", "flash_attn", "fa4")


def _sdpa_bf16_error(q, k, v, dout, causal):
    """Error of PyTorch's own bf16 SDPA against fp32 math: the yardstick (flash-attn's rule)."""
    rep = q.shape[1] // k.shape[1]
    def run(dtype):
        expanded = (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        xs = [x.to(dtype).detach().requires_grad_() for x in expanded]
        out = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=causal)
        out.backward(dout.to(dtype))
        return [out] + [x.grad for x in xs]
    ref = run(torch.float32)
    low = run(torch.bfloat16)
    return [(a.float() - b).norm().item() / b.norm().item() for a, b in zip(low, ref)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend,causal,heads",
                         itertools.product(CUDA_BACKENDS, (True, False), ((8, 8), (8, 2))))
def test_cuda_backend_bf16_within_2x_of_sdpa(backend, causal, heads):
    reason = backends.unsupported_reason(backend, "cuda", torch.bfloat16, 128)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    h, hk = heads
    q, k, v, dout = _inputs(2, h, hk, 1024, 1024, 128, device="cuda", seed=3)
    yard = _sdpa_bf16_error(q, k, v, dout, causal)
    out, lse = attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal, backend=backend)
    ref_out, ref_lse = attention_forward(q, k, v, causal=causal, backend="math")
    assert lse.shape == (2, h, 1024) and lse.dtype == torch.float32
    assert (lse - ref_lse).abs().max().item() < 0.05
    grads = attention_backward(dout.bfloat16(), q.bfloat16(), k.bfloat16(), v.bfloat16(), out, lse,
                               causal=causal, backend=backend)
    ref_grads = attention_backward(dout, q, k, v, ref_out, ref_lse, causal=causal, backend="math")
    errors = [_rel(a.float(), b.double()) for a, b in zip((out, *grads), (ref_out, *ref_grads))]
    # dk/dv of GQA sum over the group: compare with the group-summed yardstick loosely (its
    # expanded-head errors are per head), so allow 2× the largest yardstick error for them
    limits = [2 * yard[0], 2 * yard[1], 2 * max(yard[2:]), 2 * max(yard[2:])]
    assert all(e <= lim + 1e-3 for e, lim in zip(errors, limits)), (errors, yard)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backend_backward_from_merged_lse(backend):
    """The kernel's backward must accept an lse it did not produce (the merged one)."""
    reason = backends.unsupported_reason(backend, "cuda", torch.bfloat16, 64)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    q, k, v, dout = (x.bfloat16() for x in _inputs(1, 4, 2, 256, 512, 64, device="cuda", seed=4))
    parts = [attention_forward(q, k[:, :, a:a + 256], v[:, :, a:a + 256], backend=backend) for a in (0, 256)]
    out, lse = merge_all(*zip(*parts))
    out = out.bfloat16()
    whole = attention_backward(dout, q, k, v, out, lse, backend=backend)
    halves = [attention_backward(dout, q, k[:, :, a:a + 256], v[:, :, a:a + 256], out, lse, backend=backend)
              for a in (0, 256)]
    dq = halves[0][0].float() + halves[1][0].float()
    dk = torch.cat([halves[0][1], halves[1][1]], 2)
    assert _rel(dq, whole[0].double()) < 2e-2 and _rel(dk.float(), whole[1].double()) < 2e-2
    assert math.isfinite(dq.norm().item())
