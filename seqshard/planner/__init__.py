"""Planner: strategies per node, the CP-SAT solver, and the public entry points.

    plan = planner.plan(model, inputs, cluster=Cluster.preset("h200", gpus=8))
    pm = planner.parallelize(model, inputs)

`parallelize` runs the later stages (passes, codegen) too, so it is loaded on first use: the
passes read plans from this package, and this package must not need them to plan.
"""

from .api import plan
from .plan import Cost, NodePlan, Plan, Predicted, Split

__all__ = ["plan", "parallelize", "ParallelModule", "Plan", "NodePlan", "Split", "Cost", "Predicted"]


def __getattr__(name):
    if name in ("parallelize", "ParallelModule"):
        from . import parallel

        return getattr(parallel, name)
    raise AttributeError(f"module 'seqshard.planner' has no attribute {name!r}")
