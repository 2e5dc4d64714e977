"""codegen/kernels/a2a_layout.py: the all-to-all layout copies (permute + pack, optional fused
rotary embedding) against torch: pack/unpack of q and of GQA K/V ([b, h, s, e], h 12 and hk 4,
P = 2 and 4, 5 tokens, head dim 72: half a row is not a power of two), from a strided [b, s, h, e]
view as models make q, fp32 and bf16, forward and backward, on the Triton kernel (CPU,
TRITON_INTERPRET=1, in a subprocess) and on the torch path.

The rules: a plain pack/unpack is bit-exact; with the rotation, fp32 within 1e-6 of float64
Llama/HF `x·cos + rotate_half(x)·sin`, bf16 faithfully rounded (within one bf16 ulp of float64
on the same bf16 inputs and tables) and, where the conversion rounds to nearest (torch, CUDA;
Triton's interpreter truncates fp32 to bf16), no worse than HF's formula run in bf16; the
backward of pack(+rope) is exactly unpack(+transposed rope) and vice versa; unpack(inverse)
undoes pack's rotation (fp32). Failures point at: the kernel's index arithmetic
or its rotation (_a2a_layout_kernel.py: the Triton case fails, the torch one passes), the
formulas or the autograd pairing (a2a_layout.py: both fail)."""

import os
import subprocess
import sys

import pytest
import torch

_CHECK = r"""
import os
import torch
from seqshard.codegen.kernels import a2a_layout as L

TRITON = TRITON_FLAG
dev = torch.device(DEVICE)
assert L.triton_usable(*[torch.empty(2, 2, device=dev)] * 2, rope=True) == TRITON
NEAREST = not (TRITON and os.environ.get("TRITON_INTERPRET") == "1")

def faithful(got, ref, scale):
    # got within one bf16 ulp of ref (float64), plus fp32 error on terms of size scale
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    return bool(((got.double() - ref).abs() <= ulp + 1e-6 * scale).all())

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)

def hf_rope(x, cos, sin):  # Llama/HF apply_rotary_pos_emb, in x's dtype
    return x * cos + rotate_half(x) * sin

def blocks(x, p):  # [b, h, s, e] -> [p, b, h/p, s, e], torch's permute copy
    return x.unflatten(1, (p, -1)).movedim(1, 0).contiguous()

b, s, e = 2, 5, 72
gen = torch.Generator().manual_seed(0)
pos = torch.tensor([3, 4, 11, 12, 40])      # a zigzag shard's tokens: the tables are per token
inv = 1.0 / (10000 ** (torch.arange(0, e, 2, dtype=torch.float64) / e))
ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
COS, SIN = (t[None, None].to(dev) for t in (ang.cos(), ang.sin()))   # HF's [1, 1, s, e]
worst = {}
# q and GQA K/V (12:4 heads) at P = 2 and 4 (3 and 1 heads a rank for P = 4), each dtype twice
for heads, p, dt in ((12, 2, torch.float32), (12, 4, torch.bfloat16), (4, 2, torch.bfloat16),
                     (4, 4, torch.float32)):
    base = torch.randn(b, s, heads, e, generator=gen).to(dev)
    grad = torch.randn(b, s, heads, e, generator=gen).to(dev)
    cos, sin = COS.to(dt), SIN.to(dt)
    x = base.to(dt).transpose(1, 2)         # [b, h, s, e], strided as a model's q
    # plain pack / unpack: exact both ways, and each other's backward
    send = L.pack(x, p)
    assert send.is_contiguous() and torch.equal(send, blocks(x, p))
    assert torch.equal(L.unpack(send), x)
    xg = x.detach().clone().requires_grad_()
    g = blocks(grad.to(dt).transpose(1, 2), p)
    L.pack(xg, p).backward(g)
    assert torch.equal(xg.grad, L.unpack(g))
    sg = send.clone().requires_grad_()
    L.unpack(sg).backward(grad.to(dt).transpose(1, 2))
    assert torch.equal(sg.grad, blocks(grad.to(dt).transpose(1, 2), p))
    # pack + rope against float64 HF (on the tables as the kernel reads them)
    C64, S64 = cos.double(), sin.double()
    ref = blocks(hf_rope(x.double(), C64, S64), p)
    xg = x.detach().clone().requires_grad_()
    got = L.pack(xg, p, cos, sin)
    got.backward(g)
    x64 = x.detach().double().requires_grad_()
    blocks(hf_rope(x64, C64, S64), p).backward(g.double())
    pairs = [(got, ref), (xg.grad, x64.grad)]
    # the backward is unpack with the transposed rotation, bit for bit
    assert torch.equal(xg.grad, L.unpack(g, cos, sin, inverse=True))
    # unpack + rope: its backward is pack with the transposed rotation
    sg = send.clone().requires_grad_()
    up = L.unpack(sg, cos, sin)
    gx = grad.to(dt).transpose(1, 2)
    up.backward(gx)
    assert torch.equal(sg.grad, L.pack(gx, p, cos, sin, inverse=True))
    s64 = send.double().requires_grad_()
    want = hf_rope(s64.movedim(0, 1).flatten(1, 2), C64, S64)
    want.backward(gx.double())
    pairs += [(up, want.detach()), (sg.grad, s64.grad)]
    errs = [rel(a, r) for a, r in pairs]
    if dt == torch.float32:
        # unpack(inverse) undoes pack's rotation
        errs.append(rel(L.unpack(L.pack(x, p, cos, sin), cos, sin, inverse=True), x))
        assert max(errs) <= 1e-6, (heads, p, errs)
    else:  # bf16: faithfully rounded, and no worse than HF's formula run in bf16
        scale = 2 * max(x.abs().max().item(), gx.abs().max().item())
        assert all(faithful(a, r, scale) for a, r in pairs), (heads, p, errs)
        torch_bf16 = rel(blocks(hf_rope(x, cos, sin), p), ref)
        assert errs[0] <= torch_bf16 or not NEAREST, (heads, p, errs, torch_bf16)
    worst[str(dt)] = max(worst.get(str(dt), 0.0), max(errs))

# copy_ on strided views on both sides (a chunk's heads of a [b, h, s, e] tensor into a
# transposed buffer), 5 dims, plain and rotated
src = torch.randn(3, 2, 4, 5, 72, generator=gen).to(dev)[:, :, 1:3]
dst = torch.empty(2, 3, 2, 5, 72, device=dev).transpose(0, 1)
assert torch.equal(L.copy_(dst, src), src)
# tables whose halves differ (the formulas hold per column): the rotation and its transpose
# x·cos - rotate_half(x·sin), the adjoint, against float64
cos_r, sin_r = torch.randn(2, 5, 72, generator=gen).double().to(dev)
L.copy_(dst, src, cos_r.float(), sin_r.float())
assert rel(dst, hf_rope(src.double(), cos_r, sin_r)) <= 1e-6
L.copy_(dst, src, cos_r.float(), sin_r.float(), transpose=True)
assert rel(dst, src.double() * cos_r - rotate_half(src.double() * sin_r)) <= 1e-6
print(worst)
"""


def test_a2a_layout_kernel_exact_under_the_interpreter():
    """layout_kernel on the CPU (TRITON_INTERPRET=1, in a subprocess: Triton reads it when
    the kernel is defined)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = _CHECK.replace("TRITON_FLAG", "True").replace("DEVICE", '"cpu"')
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a2a_layout_torch_path_exact(monkeypatch):
    """The same checks on the torch path (devices Triton does not run on, installs without it)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    exec(_CHECK.replace("TRITON_FLAG", "False").replace("DEVICE", '"cpu"'), {})


def test_a2a_layout_rejects_bad_tables_and_heads():
    from seqshard.codegen.kernels import a2a_layout as L

    x = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="divisible"):
        L.pack(x, 3)
    with pytest.raises(ValueError, match=r"\[s, e\]"):
        L.pack(x, 2, torch.ones(4, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match="both"):
        L.pack(x, 2, torch.ones(3, 8), None)
    with pytest.raises(ValueError, match="gradient"):
        L.pack(x, 2, torch.ones(3, 8, requires_grad=True), torch.ones(3, 8))
    with pytest.raises(ValueError, match="even"):
        L.pack(torch.randn(1, 4, 3, 7), 2, torch.ones(3, 7), torch.ones(3, 7))


@pytest.mark.gpu
def test_a2a_layout_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    exec(_CHECK.replace("TRITON_FLAG", "True").replace("DEVICE", '"cuda"'), {})
