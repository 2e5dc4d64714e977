"""model_state="auto": the planner plans replicated, sharded (more than one GPU) and offloaded
optimizer state (training), skips one whose state alone exceeds the budget, and keeps the
feasible plan of least predicted step time, with the comparison in its notes; `parallelize`
chooses among what it runs (replicated, sharded) and runs the state the plan was priced for.

Failures point at planner/api.py (`_least_step_state`: which states are tried, the state-alone
check, the choice, the note), Plan.model_state (strategies/plan.py: JSON, hash) or
planner/parallel.py (the "auto" branch of `parallelize`). Planning on the meta device; one test
on 2 gloo ranks."""

import re

import pytest
import torch

from seqshard import cli
from seqshard.capture import capture
from seqshard.dims import analyze
from seqshard.models import AXES, build, named_plans
from seqshard.planner.api import plan_captured
from seqshard.solver import Infeasible
from seqshard.strategies import Plan
from seqshard.testing import mesh as make_mesh
from seqshard.testing import rel


@pytest.fixture(scope="module")
def small():
    """The `small` Llama (4 layers, d 512, vocab 4096; 16.0M parameters) at 8K tokens, bf16:
    244 MiB of state replicated with mixed-precision AdamW (16 bytes a parameter)."""
    model, inputs = build("llama", "small", device="meta", dtype=torch.bfloat16, seq=8192)
    return analyze(capture(model, inputs)), sum(p.numel() for p in model.parameters())


def _steps(dims, **kw) -> dict:
    """Predicted step of each state planned alone (None: infeasible)."""
    out = {}
    for s in ("replicated", "sharded", "offload"):
        try:
            out[s] = plan_captured(dims, model_state=s, **kw).predicted.step_s
        except Infeasible:
            out[s] = None
    return out


def _note(p: Plan) -> str:
    return next(x for x in p.notes if x.startswith(f"model state {p.model_state} (auto"))


def test_auto_keeps_the_state_of_least_step_time(small):
    """Room for all three on 4 GPUs: each planned, the fastest kept (the same plan as asking for
    that state alone), the others' figures in the note."""
    dims, _ = small
    p = plan_captured(dims, cluster="h200x4", model_state="auto")
    steps = _steps(dims, cluster="h200x4")
    assert None not in steps.values()
    assert p.model_state == min(steps, key=steps.get)
    assert p.predicted.step_s == pytest.approx(steps[p.model_state], rel=1e-3)
    assert p.notes[0].startswith("cluster") and f"model state {p.model_state}," in p.notes[0]
    for s in steps:
        assert re.search(fr"{s}: [\d.e-]+ s/step, peak [\d.]+ MiB", _note(p)), _note(p)


def test_auto_skips_a_state_that_cannot_fit(small):
    """A budget under the replicated state (244 MiB) is not solved for it; on one GPU sharded is
    not tried and offload (parameters and gradients on the GPU, 61 MiB) is what remains; a
    budget under every state raises naming each."""
    dims, n = small
    budget = 0.8 * 16 * n
    p = plan_captured(dims, cluster="h200x4", model_state="auto", memory_budget=budget)
    assert "replicated: skipped, its state alone needs 244.1 MiB per GPU (budget 195.3 MiB)" \
        in _note(p)
    assert p.model_state in ("sharded", "offload")
    p = plan_captured(dims, cluster="h200x1", model_state="auto", memory_budget=3 * 2**30)
    assert "sharded: not tried, one GPU" in _note(p)
    with pytest.raises(Infeasible, match=r"no model state fits: replicated: skipped, its state "
                       r"alone needs 244.1 MiB .*; sharded: skipped, .* 61.0 MiB .*; offload: "
                       r"skipped, .* 61.0 MiB per GPU \(budget 45.8 MiB\)"):
        plan_captured(dims, cluster="h200x4", model_state="auto", memory_budget=3 * n)


def test_auto_in_inference_and_its_options(small):
    """No optimizer state in inference: offload not tried. A tuple restricts the choice; a state
    the planner does not know is a ValueError. Plan.model_state survives JSON and counts in the
    hash."""
    dims, _ = small
    p = plan_captured(dims, cluster="h200x4", model_state="auto", training=False)
    assert "offload: not tried, no optimizer state in inference" in _note(p)
    q = plan_captured(dims, cluster="h200x4", model_state=("replicated",))
    assert q.model_state == "replicated" and "of replicated;" in _note(q)
    with pytest.raises(ValueError, match="model_state must be 'auto', one of .* got 'zero'"):
        plan_captured(dims, cluster="h200x4", model_state=("replicated", "zero"))
    s = plan_captured(dims, cluster="h200x4", model_state="sharded")
    assert Plan.from_json(s.to_json()).model_state == "sharded" and s.hash() != q.hash()
    assert Plan.from_json(q.to_json()) == q


def test_cli_default_is_auto(capsys):
    """`seqshard plan` without --state plans the states and prints the comparison."""
    assert cli.main(["plan", "--config", "tiny", "--seq", "4096", "--cluster", "h200x1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"note: model state replicated \(auto: .*\): replicated: .* s/step, peak "
                     r".*; sharded: not tried, one GPU; offload: .* s/step", out), out


# ------------------------------------------------------------------ parallelize
def auto_runs_what_it_planned():
    """parallelize(model_state="auto") under a budget the replicated state (16 bytes a float32
    parameter) does not fit: it shards, and one AdamW step matches the single device. A plan
    priced with offload is refused under "auto"; a plan priced sharded is refused under the
    default replicated state (it would run with memory the plan did not price)."""
    import copy

    from seqshard.planner import parallelize

    model, inputs = build("llama", "tiny", batch=1, seq=29)
    ref = copy.deepcopy(model)
    overrides, names = named_plans("llama", "tiny")["ring"]
    state = 16 * sum(p.numel() for p in model.parameters())
    mesh = make_mesh((2,), names)
    pm = parallelize(model, inputs, mesh=mesh, overrides=overrides, axes=AXES["llama"],
                     model_state="auto", memory_budget=0.95 * state)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-4) for m in (model, ref)]
    loss, loss_ref = pm(*inputs), ref(*inputs)
    loss.backward()
    loss_ref.backward()
    for o in opts:
        o.step()
    err = max([rel(loss.detach(), loss_ref.detach())] +
              [rel(p.full_tensor().detach(), q.detach())
               for p, q in zip(model.parameters(), ref.parameters())])
    offload = plan_captured(analyze(capture(ref, inputs), AXES["llama"]), cluster="h200x2",
                            mesh=(("sp", 2),), model_state="offload")
    try:
        parallelize(ref, inputs, mesh=mesh, plan=offload, model_state="auto")
        refused = ""
    except ValueError as e:
        refused = str(e)
    try:  # a plan priced sharded, run with the default (replicated) state: refused, not run
        parallelize(ref, inputs, mesh=mesh, plan=pm.plan)
        mismatch = ""
    except ValueError as e:
        mismatch = str(e)
    return (pm.plan.model_state, pm.sharded_layers, err, _note(pm.plan), refused, mismatch)


def test_parallelize_auto_runs_the_chosen_state(pool2):
    for chosen, layers, err, note, refused, mismatch in pool2.run(auto_runs_what_it_planned):
        assert chosen == "sharded" and layers == ["layers.0", "layers.1"], (chosen, note)
        assert "replicated: skipped" in note and "offload" not in note, note
        assert err <= 1e-5, err
        assert "priced with model_state='offload', which seqshard does not run" in refused, refused
        assert "priced with model_state='sharded'" in mismatch and "'auto'" in mismatch, mismatch
