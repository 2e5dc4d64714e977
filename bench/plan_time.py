"""How long planning takes, for several model sizes and cluster sizes (CPU only, no GPU).

    python bench/plan_time.py [--out bench/results]

For each case: capture (torch.export on the meta device) + factor analysis + strategies + costs
+ CP-SAT, wall-clock seconds of each phase, the number of template nodes the CP-SAT model has
after clustering identical layers, and the attention strategy chosen. Writes
plan_time-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.dims import analyze
from seqshard.models import build
from seqshard import solver
from seqshard.planner.api import activation_bytes, atom_orders, sequence_orders
from seqshard.strategies import Costs

CASES = [  # (model config, tokens, cluster, mesh); sizes that fit without activation recompute
    ("llama3-8b", 1 << 17, "h200x8", (("sp", 8),)),
    ("llama3-8b", 1 << 20, "h100x128", (("node", 16), ("gpu", 8))),
    ("llama3-70b", 1 << 20, "h100x1024", (("node", 128), ("gpu", 8))),
    ("llama3-70b", 1 << 20, "h100x1024", (("sp", 1024),)),
    ("llama3-70b", 1 << 21, "h100x2048", (("node", 256), ("gpu", 8))),
]


def run_case(config, tokens, cluster_name, mesh):
    t0 = time.perf_counter()
    model, inputs = build("llama", config, device="meta", dtype=torch.bfloat16, batch=1, seq=tokens)
    t1 = time.perf_counter()
    dims = analyze(capture(model, inputs))
    t2 = time.perf_counter()
    cluster = Cluster.parse(cluster_name)
    orders = sequence_orders(dims, None)
    costs = Costs(dims, cluster, mesh, training=True, dtype_bytes=activation_bytes(dims),
                  orders=atom_orders(dims, orders))
    pb = solver.build_problem(dims, costs, mesh, None, "sharded")
    t3 = time.perf_counter()
    sol = solver.solve(pb, 0.9 * cluster.gpu.hbm_capacity)
    plan = solver.to_plan(pb, sol, orders)
    t4 = time.perf_counter()
    att = sorted({f"{n.algorithm} [{n.split_str()}]" for n in plan.attention()})
    return dict(model=config, tokens=tokens, cluster=cluster_name, mesh=[list(m) for m in mesh],
                nodes=sum(pb.mult.values()), templates=len(pb.strategies),
                strategies=sum(len(s) for s in pb.strategies.values()),
                build_s=t1 - t0, capture_s=t2 - t1, costs_s=t3 - t2, solve_s=t4 - t3,
                plan_s=t4 - t1, status=sol.status, attention=att,
                predicted_step_s=plan.predicted.step_s)


def markdown(rows, meta) -> str:
    out = [f"# Planning time ({meta['date']}, {meta['machine']}, torch {meta['torch']})", "",
           f"Command: `{meta['command']}`. Model state sharded (FSDP-style), training, bf16.",
           "plan = capture + analysis + strategies/costs + CP-SAT (model construction on meta "
           "excluded).", "",
           "| model | tokens | cluster | mesh | nodes → templates | strategies | capture s | costs s "
           "| CP-SAT s | plan s | attention |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = "×".join(f"{a}{n}" for a, n in r["mesh"])
        out.append(f"| {r['model']} | {r['tokens']:,} | {r['cluster']} | {mesh} | {r['nodes']} → "
                   f"{r['templates']} | {r['strategies']} | {r['capture_s']:.1f} | {r['costs_s']:.1f} | "
                   f"{r['solve_s']:.1f} | **{r['plan_s']:.1f}** | {', '.join(r['attention'])} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    rows = []
    for case in CASES:
        r = run_case(*case)
        rows.append(r)
        print(f"{r['model']:10s} {r['tokens']:>9,} {r['cluster']:10s} plan {r['plan_s']:5.1f} s "
              f"(capture {r['capture_s']:.1f}, costs {r['costs_s']:.1f}, CP-SAT {r['solve_s']:.1f}) "
              f"{r['templates']}/{r['nodes']} nodes  {', '.join(r['attention'])}", flush=True)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                command=" ".join(["python"] + sys.argv))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"plan_time-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, meta))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
