"""Strategies: for every node, the legal layouts and attention algorithms, and what each costs.

    layout.py      Shard / R / P placements, layouts, and the redistribution steps between them
    algorithms.py  the registry of distributed attention algorithms (one entry each)
    strategy.py    a node's strategies: `candidates` (what the solver chooses from), `resolve`
    overrides.py   forced choices per module pattern
    costs.py       a strategy's and a redistribution's price, from `seqshard.costmodel`
    plan.py        `Plan`: the solver's output and codegen's input (JSON, a table, explanations)
    plan_html.py   a plan as one self-contained HTML page (`Plan.to_html`)
    from_plan.py   a plan's names → strategies
"""

from .algorithms import ALGORITHMS, Algorithm
from .costs import Costs
from .layout import P, R, Layout, PlanError, Shard, Step, redistribution, replicated, split_axes
from .overrides import Spec, parse_spec, spec_for
from .plan import Cost, NodePlan, Plan, Predicted, Split
from .from_plan import orders_of, resolve_plan
from .strategy import (Strategy, atoms_of, candidates, is_attention, plan_nodes, resolve,
                       tensor_inputs, whole_somewhere)

__all__ = ["ALGORITHMS", "Algorithm", "Costs", "P", "R", "Layout", "PlanError", "Shard", "Step",
           "redistribution", "replicated", "split_axes", "Spec", "parse_spec", "spec_for", "Cost",
           "NodePlan", "Plan", "Predicted", "Split", "orders_of", "resolve_plan", "Strategy",
           "atoms_of", "candidates", "is_attention", "plan_nodes", "resolve", "tensor_inputs",
           "whole_somewhere"]
