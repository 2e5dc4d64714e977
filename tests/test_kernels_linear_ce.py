"""codegen/kernels/linear_ce.py: the fused LM head + cross-entropy against
F.cross_entropy(hidden @ weight.T) in float32 (loss, d hidden and d weight ≤ 1e-5 relative), with
ignored tokens (scattered, in spans, all of them; skipped by the GEMMs, or not), chunks that do
not divide the tokens and tiles that do not divide the vocabulary, on the Triton kernel (CPU,
TRITON_INTERPRET=1) and on the torch path.

Failures point at: the kernel's online logsumexp or its gradient pass (_linear_ce_kernel.py:
the Triton case fails, the torch one passes), the chunk loop, the dW accumulation or the gather
and spread of kept tokens (linear_ce._LinearCrossEntropy.forward, _spread_rows_: both fail), or
the backward's scaling by the incoming gradient (only the cases with a gradient other than 1
fail)."""

import os
import subprocess
import sys

import pytest
import torch

_CHECK = r"""
import torch
import torch.nn.functional as F
from seqshard.codegen.kernels.linear_ce import linear_cross_entropy, triton_usable

TRITON = TRITON_FLAG
assert triton_usable(torch.empty(1, device=DEVICE)) == TRITON

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

def case(dtype, reduction, ignore, seed, grad_out=1.5, accumulate=None, skip=True,
         ignored=(3, 10, 36)):
    # 37 tokens in chunks of 10 (10, 10, 10, 7); V 300 in tiles of 128 (128, 128, 44)
    gen = torch.Generator().manual_seed(seed)
    T, d, V = 37, 16, 300
    h = torch.randn(T, d, generator=gen)
    w = torch.randn(V, d, generator=gen) * 0.5
    y = torch.randint(0, V, (T,), generator=gen)
    y[list(ignored)] = ignore
    h, w, y = h.to(DEVICE), w.to(DEVICE), y.to(DEVICE)
    def run(fn, dt):
        hh = h.to(dt).clone().requires_grad_(); ww = w.to(dt).clone().requires_grad_()
        loss = fn(hh, ww)
        (loss * grad_out).backward()
        return loss.detach(), hh.grad, ww.grad
    ref = run(lambda a, b: F.cross_entropy(a @ b.T, y, ignore_index=ignore, reduction=reduction),
              torch.float32)
    got = run(lambda a, b: linear_cross_entropy(a, b, y, ignore_index=ignore, reduction=reduction,
                                                chunk=10, block_v=128, accumulate=accumulate,
                                                skip_ignored=skip),
              dtype)
    errs = [rel(g, r) for g, r in zip(got, ref)]
    if dtype == torch.float32:
        assert max(errs) <= 1e-5, (reduction, ignore, errs)
        with torch.no_grad():  # no gradient wanted: the forward alone
            alone = linear_cross_entropy(h, w, y, ignore_index=ignore, reduction=reduction, chunk=10)
        assert rel(alone, ref[0]) <= 1e-5
    else:  # the accuracy rule: at most twice torch's own error at this precision
        torch_lp = run(lambda a, b: F.cross_entropy((a @ b.T).float(), y, ignore_index=ignore,
                                                    reduction=reduction), dtype)
        base = [rel(g, r) for g, r in zip(torch_lp, ref)]
        assert all(e <= 2 * b + 1e-6 for e, b in zip(errs, base)), (errs, base)
    return errs

print(case(torch.float32, "mean", -100, 0))
print(case(torch.float32, "sum", 5, 1))
print(case(torch.bfloat16, "mean", -100, 2))
print(case(torch.bfloat16, "mean", -100, 2, accumulate=torch.float32))
print(case(torch.float32, "mean", -100, 3, skip=False))  # every token through the GEMMs
print(case(torch.float32, "sum", -100, 4, ignored=list(range(12)) + list(range(20, 31))))
print(case(torch.float32, "sum", -100, 5, ignored=range(37)))  # no token left: 0, zero gradients
"""


def test_linear_ce_triton_kernel_exact_under_the_interpreter():
    """ce_rows_kernel on the CPU (TRITON_INTERPRET=1, in a subprocess: Triton reads it when
    the kernel is defined): loss and both gradients."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = _CHECK.replace("TRITON_FLAG", "True").replace("DEVICE", '"cpu"')
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_linear_ce_torch_path_exact(monkeypatch):
    """The same chunk loop with the rows in torch (devices Triton does not run on)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    exec(_CHECK.replace("TRITON_FLAG", "False").replace("DEVICE", '"cpu"'), {})


def test_linear_ce_rejects_wrong_shapes_and_reductions():
    from seqshard.codegen.kernels.linear_ce import linear_cross_entropy

    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(h, w.T, y)


@pytest.mark.gpu
def test_linear_ce_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    exec(_CHECK.replace("TRITON_FLAG", "True").replace("DEVICE", '"cuda"'), {})
