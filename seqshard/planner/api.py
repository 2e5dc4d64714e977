"""`planner.plan`: a model and a cluster → a Plan, with no GPU and no process group."""

from __future__ import annotations

from seqshard.capture import capture
from seqshard.dims import DimAnalysis, analyze

from .overrides import plan_from_overrides
from .plan import Plan

__all__ = ["plan", "plan_captured"]


def plan(model, example_inputs, *, cluster=None, mesh: tuple[tuple[str, int], ...] | None = None,
         axes: dict[str, str] | None = None, overrides: dict[str, str] | None = None,
         memory_budget: float | None = None, training: bool = True) -> Plan:
    """Capture `model` on `example_inputs` (the meta device works) and plan it.

    cluster: a `costmodel.Cluster` (default: one H200 node of 8 GPUs); mesh: axis names and sizes
    (default: one axis "sp" over every GPU of the cluster)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    dims = analyze(capture(model, example_inputs), axes)
    return plan_captured(dims, mesh=mesh, overrides=overrides, cluster=cluster,
                         memory_budget=memory_budget, training=training)


def plan_captured(dims: DimAnalysis, *, mesh=None, overrides=None, cluster=None,
                  memory_budget=None, training=True) -> Plan:
    if mesh is None:
        raise ValueError("plan needs a mesh (axis names and sizes) until the solver lands")
    if not overrides:
        raise ValueError("no solver yet: pass overrides (e.g. {'*': 'split:s ring'})")
    return plan_from_overrides(dims, tuple(mesh), overrides)
