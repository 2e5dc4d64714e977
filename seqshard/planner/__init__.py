"""The public entry points: the driver on top of the pipeline.

    plan = planner.plan(model, inputs, cluster=Cluster.preset("h200", gpus=8))   # no GPU needed
    pm = planner.parallelize(model, inputs)                                      # under torchrun

`plan` runs capture → dims → strategies → solver; `parallelize` runs those (or takes a plan) and
then codegen. Planning imports nothing of `seqshard.runtime`; `parallelize` does.
"""

from seqshard.strategies import Cost, NodePlan, Plan, Predicted, Split

from .api import plan
from .parallel import ParallelModule, parallelize

__all__ = ["plan", "parallelize", "ParallelModule", "Plan", "NodePlan", "Split", "Cost", "Predicted"]
