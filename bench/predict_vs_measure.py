"""Predicted vs measured step time and peak memory, for several plans of the built-in models.

    torchrun --nproc-per-node 4 bench/predict_vs_measure.py --out DIR [--budget-s 240]

For each case, rank 0 plans the model with the H200 preset (or `--cluster FILE` from
`seqshard calibrate`), every rank runs that plan in bf16 (forward + backward, no optimizer
step), and the medians of CUDA-event timings are compared with the plan's predicted step time.
Memory: `torch.cuda.max_memory_allocated` during one step against the predicted peak without
optimizer state (no optimizer runs here). Writes predict_vs_measure-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import report
import timing
from seqshard.costmodel import Cluster
from seqshard.costmodel import compute as comp
from seqshard.models import AXES, build, named_plans
from seqshard.planner import Plan, parallelize, plan
from seqshard.testing import mesh as make_mesh

CASES = [  # (family, config, sizes, overrides name or None for the planner's own plan)
    ("llama", "llama3-1b", dict(batch=1, seq=32768), None),
    ("llama", "llama3-1b", dict(batch=1, seq=32768), "ring"),
    ("llama", "llama3-1b", dict(batch=1, seq=32768), "ulysses"),
    ("llama", "llama3-1b", dict(batch=1, seq=65536), None),
    ("video_dit", "dit-bench", dict(batch=1, frames=64, patches=1024), None),
    ("video_dit", "dit-bench", dict(batch=1, frames=64, patches=1024), "ulysses"),
    ("video_dit", "dit-bench", dict(batch=1, frames=128, patches=2304), None),
    ("llama", "llama3-1b", dict(batch=1, seq=32768), "allgather"),
]
DRY_RUN = [  # --dry-run: the same code paths on CPU with gloo, tiny models
    ("llama", "tiny", dict(batch=1, seq=61), None),
    ("llama", "tiny", dict(batch=1, seq=61), "ring"),
    ("video_dit", "tiny", dict(batch=1, frames=7, patches=13), None),
]


def cast(inputs, dtype):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def run_case(family, config, sizes, plan_name, cluster, device="cuda", repeats=5):
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    text = [None]
    if rank == 0:
        model, inputs = build(family, config, device="meta", dtype=dtype, **sizes)
        overrides = named_plans(family, config)[plan_name][0] if plan_name else None
        p = plan(model, cast(inputs, dtype), cluster=cluster, mesh=(("sp", world),),
                 axes=AXES[family], overrides=overrides)
        text[0] = p.to_json()
    dist.broadcast_object_list(text, src=0)
    p = Plan.from_json(text[0])
    model, inputs = build(family, config, device=device, dtype=dtype, **sizes)
    inputs = cast(inputs, dtype)
    pm = parallelize(model, inputs, plan=p, mesh=make_mesh((world,), ("sp",)), axes=AXES[family],
                     check_inputs=False, compile=False, kernels=False)
    for _ in range(2):  # warm-up (allocations, kernel selection, NCCL channels)
        pm(*inputs).backward()
    for q in model.parameters():
        q.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # isolated steps (the warm-ups above, so that the peak memory counts only these); the slowest
    # rank's median sets the step
    step_s = timing.measure(lambda: pm(*inputs).backward(), repeats=repeats, device=device,
                            slowest="median").median_ms / 1e3
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    measured = torch.tensor([step_s, float(peak)], device=device, dtype=torch.float64)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    n_params = sum(q.numel() for q in model.parameters())
    state = comp.model_state(n_params, training=True, param_bytes=2)
    predicted_mem = p.predicted.peak_memory_bytes - state.optimizer
    att = sorted({f"{n.algorithm} [{n.split_str()}]" for n in p.attention()})
    return dict(family=family, config=config, sizes=sizes, plan=plan_name or "planner",
                attention=att, predicted_s=p.predicted.step_s, measured_s=measured[0].item(),
                time_error=p.predicted.step_s / measured[0].item() - 1,
                predicted_bytes=predicted_mem, measured_bytes=measured[1].item(),
                memory_error=predicted_mem / max(measured[1].item(), 1) - 1, plan_hash=p.hash())


def markdown(rows, meta):
    out = [f"# Predicted vs measured ({meta['date']}, {meta['device']}, torch {meta['torch']})", "",
           f"Command: `{meta['command']}`. Cluster model: {meta['cluster']}. bf16, forward + "
           "backward, no optimizer step; median of 5 steps after 2 warm-up steps; the slowest "
           "rank. Memory: peak allocated vs predicted peak without optimizer state.", "",
           "| model | sizes | plan | attention | predicted | measured | error | pred. memory | "
           "measured memory | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['family']} {r['config']} | {r['sizes']} | {r['plan']} | failed: "
                       f"{r['error'][:80]} | | | | | | |")
            continue
        out.append(f"| {r['family']} {r['config']} | {r['sizes']} | {r['plan']} | "
                   f"{', '.join(r['attention'])} | {r['predicted_s'] * 1e3:.1f} ms | "
                   f"{r['measured_s'] * 1e3:.1f} ms | {r['time_error']:+.0%} | "
                   f"{r['predicted_bytes'] / 2**30:.1f} GiB | {r['measured_bytes'] / 2**30:.1f} GiB | "
                   f"{r['memory_error']:+.0%} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        mean_t = sum(abs(r["time_error"]) for r in ok) / len(ok)
        mean_m = sum(abs(r["memory_error"]) for r in ok) / len(ok)
        out += ["", f"Mean absolute error: time {mean_t:.0%}, memory {mean_m:.0%} over {len(ok)} cases."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--cluster", default=None, help="cluster JSON (default: the H200 preset)")
    p.add_argument("--budget-s", type=float, default=240, help="stop starting cases after this")
    p.add_argument("--dry-run", action="store_true", help="tiny models on CPU with gloo")
    args = p.parse_args(argv)
    for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, value)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo" if args.dry_run else "nccl")
    world = dist.get_world_size()
    cluster = Cluster.load(args.cluster) if args.cluster else Cluster.preset("h200", gpus=world)
    t0, rows = time.perf_counter(), []
    os.makedirs(args.out, exist_ok=True)
    for family, config, sizes, plan_name in (DRY_RUN if args.dry_run else CASES):
        go = torch.tensor([time.perf_counter() - t0 < args.budget_s], device=device)
        dist.broadcast(go, src=0)
        if not go.item():
            break
        try:
            row = run_case(family, config, sizes, plan_name, cluster, device)
        except Exception as e:  # noqa: BLE001 - record and go on; every rank fails alike
            row = dict(family=family, config=config, sizes=sizes, plan=plan_name or "planner",
                       error=f"{type(e).__name__}: {e}")
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                    device=f"{world}x " + (torch.cuda.get_device_name() if device == "cuda" else "CPU"),
                    cluster=str(cluster),
                    command=" ".join(["torchrun", f"--nproc-per-node={world}"] + sys.argv))
        report.write_json_and_markdown(args.out, f"predict_vs_measure-{meta['date']}",
                                       dict(meta=meta, rows=rows), markdown(rows, meta))
        print(markdown(rows, meta))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
