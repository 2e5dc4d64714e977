"""The CP-SAT stage: choose one strategy per node, minimizing predicted step time under a
memory budget.

    problem.py   the sets: template nodes, their strategies and costs, clustered tensors, moves
    clusters.py  identical layers solved once
    model.py     the CP-SAT model; its docstring is the formulation; `solve`
    figures.py   the memory and time of one chosen plan, counted directly (the model's check,
                 explain's notes)
    explain.py   solution → Plan, with every attention node's alternatives
"""

from .explain import explain_all, to_plan
from .model import NS, Infeasible, Model, Solution, solve
from .problem import Problem, Tensor, TokenRegion, build_problem, token_chains, token_regions

__all__ = ["build_problem", "solve", "to_plan", "explain_all", "Model", "Solution", "Problem",
           "Tensor", "Infeasible", "NS", "token_regions", "token_chains", "TokenRegion"]
