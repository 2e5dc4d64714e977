"""The local attention op's layouts (runtime/local.py, "Layout rule"): out, dq, dk, dv seq-major
(dense [b, s, h, e] seen as [b, h, s, e]) and lse dense [b, h, s], the same from the real op on
every kernel path and from its fake implementation (Inductor plans buffers and asserts strides
from the fake); and a compiled layer keeps the op inside its one graph.

A failure of the first test: a kernel path of whole_forward / whole_backward returns another
layout and the op no longer copies it into the rule's (Inductor then fails with "expected ...
stride" at the op), or the fakes no longer match. Of the second: Dynamo breaks the layer at the
runtime's local_attention (codegen/compiled.py `_allow_attention_in_graph`), so the template runs
as three graphs and the op's dout is made contiguous between them."""

import copy
import os
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import seqshard.runtime.local  # noqa: F401 - registers seqshard::local_attention
from seqshard.models import AXES, build
from seqshard.runtime import backends
from seqshard.runtime.local import layout_of


def _stand_in():
    """FlashAttention-4's two entry points on its [b, s, h, e] layout, computed by math (as in
    tests/test_fa4.py): what the fa4 path allocates and returns is exercised on a CPU."""
    def fwd(q, k, v, *, softmax_scale, causal, return_lse, out):
        o, lse = backends._math_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal, softmax_scale)
        out.copy_(o.transpose(1, 2))
        return out, lse, None, None, None

    def bwd(q, k, v, out, dout, lse, *, softmax_scale, causal, dq, dk, dv):
        grads = backends._math_backward(*(x.transpose(1, 2) for x in (dout, q, k, v, out)), lse,
                                        causal, softmax_scale)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g.transpose(1, 2))
        return dq, dk, dv
    return types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd)


def _layouts(tensors):
    return [(tuple(t.shape), t.stride()) for t in tensors]


@pytest.mark.parametrize("backend,seq_major_in,seq_len,e", [
    ("flash_cpu", True, None, 8), ("flash_cpu", False, 11, 8), ("math", True, None, 8),
    ("fa4", True, None, 8), ("fa4", False, 11, 8), ("fa4", True, None, 72)])
def test_local_op_real_and_fake_layouts_agree(monkeypatch, backend, seq_major_in, seq_len, e):
    """GQA; seq_len 11: a padded row (out 0, F.pad); head dim 72: FA4 zero-padded to 96."""
    if backend == "fa4":
        monkeypatch.setattr(backends, "_fa4_module", lambda: (_stand_in(), "4.0.0b36"))
    b, h, hk, s = 2, 4, 2, 12
    gen = torch.Generator().manual_seed(0)

    def make(heads):
        x = torch.randn((b, s, heads, e) if seq_major_in else (b, heads, s, e), generator=gen)
        return x.transpose(1, 2) if seq_major_in else x

    q, k, v, dout = make(h), make(hk), make(hk), make(h)
    options = (True, seq_len, e ** -0.5, backend, None, None, None, None)
    op, backward = torch.ops.seqshard.local_attention, torch.ops.seqshard.local_attention_backward
    out, lse = op(q, k, v, *options)
    grads = backward(dout, q, k, v, out, lse, *options)
    with FakeTensorMode() as mode:
        fq, fk, fv, fdout = (mode.from_tensor(x) for x in (q, k, v, dout))
        fout, flse = op(fq, fk, fv, *options)
        fgrads = backward(fdout, fq, fk, fv, mode.from_tensor(out), mode.from_tensor(lse), *options)
    assert _layouts((out, lse)) == _layouts((fout, flse)), "forward: real vs fake"
    assert _layouts(grads) == _layouts(fgrads), "backward: real vs fake"
    assert [layout_of(x) for x in (out, *grads)] == ["bshe"] * 4 and lse.is_contiguous()
    ref_out, ref_lse = backends.attention_forward(q, k, v, causal=True, kv_len=seq_len,
                                                  backend="math")
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    ref = backends.attention_backward(dout, q, k, v, ref_out, ref_lse, causal=True, kv_len=seq_len,
                                      backend="math")
    assert all(torch.allclose(g, r, atol=1e-5, rtol=1e-5) for g, r in zip(grads, ref))


def test_fa4_writes_seq_major_only_when_asked(monkeypatch):
    """backends' fa4 path: seq_major=True hands FA4 dense [b, s, h, e] buffers (no copy after);
    by default dense [b, h, s, e] ones, which Ulysses' all-to-all sends as they are."""
    monkeypatch.setattr(backends, "_fa4_module", lambda: (_stand_in(), "4.0.0b36"))
    q, k, v, dout = (torch.randn(1, n, 10, 8) for n in (4, 2, 2, 4))
    for seq_major, layout in ((True, "bshe"), (False, "bhse")):
        out, lse = backends.attention_forward(q, k, v, causal=True, backend="fa4",
                                              seq_major=seq_major)
        grads = backends.attention_backward(dout, q, k, v, out, lse, causal=True, backend="fa4",
                                            seq_major=seq_major)
        assert [layout_of(x) for x in (out, *grads)] == [layout] * 4, seq_major


def compiled_local_attention(backend):
    """Tiny llama at world size 1, attention through seqshard.runtime.local_attention (as where
    FA4 runs), compile="layers": Dynamo's graphs and breaks, the layouts the op saw, and the
    largest relative error of loss and gradients against the model."""
    from torch._dynamo.utils import counters

    from seqshard.planner import parallel
    from seqshard.runtime import local

    os.environ[local.LAYOUT_LOG_ENV] = "1"
    local.LAYOUTS.clear()
    counters.clear()
    model, inputs = build("llama", "tiny", batch=1, seq=24)
    ref = copy.deepcopy(model)
    chosen = parallel.local_attention_kernel
    parallel.local_attention_kernel = lambda dims, device: "runtime"
    try:
        pm = parallel.parallelize(model, inputs, axes=AXES["llama"], compile="layers",
                                  compile_backend=backend)
    finally:
        parallel.local_attention_kernel = chosen
    loss, want = pm(*inputs), ref(*inputs)
    loss.backward()
    want.backward()
    errs = [((loss - want).abs() / want.abs()).item()]
    errs += [((p.grad - r.grad).norm() / r.grad.norm()).item()
             for p, r in zip(model.parameters(), ref.parameters())]
    del os.environ[local.LAYOUT_LOG_ENV]
    seen = {(key[0], n): rec["layout"] for key, recs in local.LAYOUTS.items()
            for n, rec in recs.items()}
    return (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), seen,
            max(errs))


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        os.environ.get("SEQSHARD_INDUCTOR_TESTS") != "1",
        reason="Inductor compiles C++ on this CPU (~70 s): SEQSHARD_INDUCTOR_TESTS=1"))])
def test_compiled_layer_keeps_local_attention_in_one_graph(pool1, backend):
    (graphs, breaks, seen, err), = pool1.run(compiled_local_attention, backend)
    assert (graphs, breaks) == (1, 0), f"{graphs} Dynamo graphs, {breaks} breaks: one expected"
    assert err <= 1e-5, err
    # the gradient of out reaches the backward op as o_proj's backward wrote it, not re-laid out
    assert seen[("local_attention_backward", "dout")] == "bshe", seen
    assert all(seen[(op, n)] == "bshe" for op, n in seen if n in ("out", "dq", "dk", "dv")), seen
