"""codegen/kernels/accumulate.py: the ring's fp32 merge and fp32 += bf16 add kernels against
runtime/merge.py's torch formulas (merge_rows_ into row slices of an accumulator, with empty rows
on either side; add_rows_), fp32 and bf16 partials, on the CPU under TRITON_INTERPRET=1 and on
CUDA. Failures point at _accumulate_kernel.py (the torch formulas are test_runtime_merge.py's)."""

import os
import subprocess
import sys

import pytest
import torch


_CHECK = r"""
import torch
from seqshard.codegen.kernels import accumulate
from seqshard.runtime import merge

def case(device, dt, seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, s, e = 2, 3, 40, 24                       # e not a power of two: masked columns
    acc = torch.randn(b, h, 2 * s, e, generator=gen)
    acc_l = torch.randn(b, h, 2 * s, generator=gen) * 30
    out = torch.randn(b, h, s, e, generator=gen)
    lse = torch.randn(b, h, s, generator=gen) * 30
    acc_l[0, 0, 5:9] = float("-inf"); acc[0, 0, 5:9] = 0   # empty accumulator rows
    lse[0, 0, :2] = float("-inf"); out[0, 0, :2] = 0       # ... two of them also empty here
    lse[1, 2, 7] = float("-inf"); out[1, 2, 7] = 0         # an empty partial row
    acc, acc_l, out, lse = (t.to(device) for t in (acc, acc_l, out, lse))
    out = out.to(dt)
    rows = slice(5, 5 + s)                                 # a row slice: strided, offset
    ref, ref_l = acc.clone(), acc_l.clone()
    w, m = merge.merge(ref[:, :, rows], ref_l[:, :, rows], out.float(), lse)
    ref[:, :, rows], ref_l[:, :, rows] = w, m
    got, got_l = acc.clone(), acc_l.clone()
    assert accumulate.usable(got, out)
    accumulate.merge_rows_(got[:, :, rows], got_l[:, :, rows], out, lse)
    finite = torch.isfinite(ref_l)
    assert torch.equal(finite, torch.isfinite(got_l)), "-inf rows differ"
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    err_l = (got_l[finite] - ref_l[finite]).abs().max().item()
    summed = acc.clone(); summed[:, :, rows] += out.float()
    added = acc.clone(); accumulate.add_rows_(added[:, :, rows], out)
    err_add = (added - summed).abs().max().item()
    assert err <= 1e-6 and err_l <= 1e-5 and err_add <= 1e-6, (dt, err, err_l, err_add)
    return err, err_l, err_add

for seed, dt in enumerate((torch.float32, torch.bfloat16)):
    print(case(DEVICE, dt, seed))
"""


def test_accumulate_kernels_match_torch_under_the_triton_interpreter():
    """accumulate.merge_rows_ and add_rows_ on the CPU (TRITON_INTERPRET=1), against merge.merge."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = _CHECK.replace("DEVICE", '"cpu"')
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
def test_accumulate_kernels_match_torch_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    exec(_CHECK.replace("DEVICE", '"cuda"'), {})
