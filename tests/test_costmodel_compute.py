"""Roofline compute, FLOP/byte counters, attention FLOPs and model-state memory."""

import pytest
import sympy

from seqshard.costmodel import compute as K
from seqshard.costmodel.cluster import PRESETS

H200 = PRESETS["h200"][0]


def test_roofline_picks_the_binding_limit():
    big = K.linear(8192, 8192, 8192)
    assert big.flops == 2 * 8192**3
    assert big.time(H200) == pytest.approx(2 * 8192**3 / 758e12)           # compute bound
    add = K.pointwise(1 << 30, inputs=2, outputs=1)
    assert add.time(H200) == pytest.approx(3 * 2 * (1 << 30) / 4.15e12)    # memory bound
    assert K.op_time(1e12, 0, "matmul", H200, dtype_bytes=4) == pytest.approx(1e12 / H200.matmul_fp32)
    with pytest.raises(ValueError, match="unknown op kind"):
        K.op_time(1, 1, "attention", H200)


def test_einsum_counts_like_the_matmul_it_is():
    b, s, d, e = 2, 128, 64, 96
    w = K.einsum("bsd,de->bse", (b, s, d), (d, e))
    assert w.kind == "matmul"
    assert w.flops == K.linear(b * s, d, e).flops == 2 * b * s * d * e
    assert w.bytes == K.linear(b * s, d, e).bytes
    mul = K.einsum("bs,bs->bs", (b, s), (b, s))
    assert mul.kind == "pointwise" and mul.flops == b * s
    with pytest.raises(ValueError, match="explicit"):
        K.einsum("bsd,de", (b, s, d), (d, e))
    with pytest.raises(ValueError, match="index 'd'"):
        K.einsum("bsd,de->bse", (b, s, d), (d + 1, e))


def test_norm_softmax_embedding_are_memory_bound_on_a_gpu():
    for w in (K.norm(1 << 26, 4096), K.softmax(1 << 26), K.embedding(1 << 16, 4096),
              K.reduction(1 << 26, 1 << 14)):
        assert w.time(H200) == pytest.approx(w.bytes / H200.hbm_bandwidth)


def test_backward_of_a_matmul_is_two_forwards():
    w = K.linear(4096, 4096, 4096)
    assert w.backward().flops == 2 * w.flops
    assert w.backward().time(H200) == pytest.approx(2 * w.time(H200))


def test_attention_flops_follow_flashattention():
    f = K.attention_flops(1, 32, 8192, 8192, 128, causal=False)
    assert f == 4 * 32 * 8192**2 * 128
    assert K.attention_flops(1, 32, 8192, 8192, 128, causal=True) == f / 2
    assert K.attention_flops(1, 32, 8192, 8192, 128, causal=True, training=True) == 3.5 * f / 2
    # at the measured point, time × rate gives the FLOPs back
    t = K.attention_time(1, 32, 131072, 131072, 128, causal=True, gpu=H200, training=True)
    flops = K.attention_flops(1, 32, 131072, 131072, 128, causal=True, training=True)
    assert flops / t == pytest.approx(535e12)


def test_model_state_with_adamw():
    m = K.model_state(8e9, param_bytes=2)         # bf16 params and grads, fp32 master + 2 states
    assert (m.params, m.grads, m.optimizer) == (16e9, 16e9, 96e9)
    assert m.total == 16 * 8e9
    assert K.model_state(8e9, param_bytes=4).total == 16 * 8e9  # fp32: no master copy, fp32 grads
    assert K.model_state(8e9, training=False).total == 16e9
    assert "GiB" in str(m)


def test_symbolic_counts_and_times():
    s = sympy.Symbol("s", positive=True)
    w = K.linear(s, 4096, 4096)
    t = w.time(H200)
    assert isinstance(t, sympy.Expr)
    assert float(t.subs(s, 65536)) == pytest.approx(K.linear(65536, 4096, 4096).time(H200))
    a = K.attention_time(1, 32, s, s, 128, causal=True, gpu=H200)
    num = K.attention_time(1, 32, 20000, 20000, 128, causal=True, gpu=H200)
    assert float(a.subs(s, 20000)) == pytest.approx(num)
