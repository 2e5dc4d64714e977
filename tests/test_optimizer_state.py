"""The optimizer a plan prices (`planner.plan(optimizer=...)`): "adamw" keeps an fp32 master copy
and fp32 moments (16 bytes a bf16 parameter), "adamw-pure" its moments in the parameter dtype
and no master (8 bytes, torch.optim.AdamW on bf16 parameters). Failures point at
costmodel/compute.py (`optimizer_bytes`, `optimizer_step`) or solver/problem.py's model-state
branch."""

import pytest
import torch

from seqshard import cli
from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.costmodel import compute as comp
from seqshard.dims import analyze
from seqshard.models import build
from seqshard.planner.api import plan_captured
from seqshard.solver import build_problem
from seqshard.strategies import Costs

GIB = 2**30


@pytest.fixture(scope="module")
def small():
    """The `small` Llama (4 layers, d 512, vocab 4096) at 8K tokens, bf16, on the meta device."""
    model, inputs = build("llama", "small", device="meta", dtype=torch.bfloat16, seq=8192)
    n = sum(p.numel() for p in model.parameters())
    return analyze(capture(model, inputs)), n


def _state(dims, optimizer) -> float:
    """The model-state bytes the problem prices (parameters, gradients, optimizer state)."""
    cluster = Cluster.preset("h200", gpus=1)
    costs = Costs(dims, cluster, (("sp", 1),), training=True, dtype_bytes=2)
    return build_problem(dims, costs, (("sp", 1),), None, "replicated", optimizer=optimizer).static_bytes


def _saves_memory(p) -> bool:
    """Does the plan use any memory strategy (recompute, chunks, offload, ...)?"""
    return any(getattr(p, f, ()) for f in ("recompute", "chunks", "offload", "chunked_modules"))


def test_bytes_per_parameter():
    assert comp.model_state(1000, param_bytes=2, **comp.optimizer_bytes("adamw", 2)).total == 16000
    pure = comp.model_state(1000, param_bytes=2, **comp.optimizer_bytes("adamw-pure", 2))
    assert (pure.params, pure.grads, pure.optimizer) == (2000, 2000, 4000)
    # fp32 parameters: no master either way, fp32 moments
    assert comp.model_state(1000, param_bytes=4, **comp.optimizer_bytes("adamw-pure", 4)).total == 16000
    with pytest.raises(ValueError, match="adamw-pure"):
        comp.optimizer_bytes("sgd", 2)
    gpu = Cluster.preset("h200", gpus=1).gpu
    # mixed: g 2 + 4 states·4 + master 2·4 + p 2 = 28 bytes moved; pure: 2 + 4·2 + 2·2 = 14
    assert comp.optimizer_step(1e9, gpu) == pytest.approx(28e9 / gpu.hbm_bandwidth)
    assert comp.optimizer_step(1e9, gpu, **comp.optimizer_bytes("adamw-pure", 2)) == \
        pytest.approx(14e9 / gpu.hbm_bandwidth)


def test_plan_prices_the_optimizer(small):
    """Same plan, 8 bytes a parameter less state and a shorter optimizer step; a budget between
    the two peaks fits only the pure optimizer without recompute; offload moves less to the host."""
    dims, n = small
    kw = dict(cluster="h200x1", time_limit=10.0)
    mixed = plan_captured(dims, **kw)
    pure = plan_captured(dims, optimizer="adamw-pure", **kw)
    assert mixed.hash() == pure.hash()
    assert mixed.predicted.peak_memory_bytes - pure.predicted.peak_memory_bytes == pytest.approx(8 * n)
    assert _state(dims, "adamw") == 16 * n and _state(dims, "adamw-pure") == 8 * n
    assert mixed.predicted.step_s > pure.predicted.step_s
    assert any("optimizer adamw-pure" in note for note in pure.notes)

    budget = pure.predicted.peak_memory_bytes + 2 * n  # fits pure as it is, not mixed
    tight_mixed = plan_captured(dims, memory_budget=budget, **kw)
    tight_pure = plan_captured(dims, memory_budget=budget, optimizer="adamw-pure", **kw)
    assert not _saves_memory(tight_pure) and _saves_memory(tight_mixed)
    assert tight_mixed.predicted.peak_memory_bytes <= budget

    off_mixed = plan_captured(dims, model_state="offload", **kw)
    off_pure = plan_captured(dims, model_state="offload", optimizer="adamw-pure", **kw)
    assert off_mixed.predicted.peak_memory_bytes == pytest.approx(off_pure.predicted.peak_memory_bytes)
    assert off_mixed.predicted.step_s > off_pure.predicted.step_s
    with pytest.raises(ValueError, match="optimizer must be one of"):
        plan_captured(dims, optimizer="adam8bit", **kw)


def test_cli_optimizer(capsys):
    rc = cli.main(["plan", "--model", "llama", "--config", "small", "--seq", "2K",
                   "--cluster", "h200x1", "--optimizer", "adamw-pure"])
    out = capsys.readouterr().out
    assert rc == 0 and "optimizer adamw-pure" in out
