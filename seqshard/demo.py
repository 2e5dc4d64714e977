"""`seqshard demo`: plan both built-in models at production sizes, run the plans at tiny sizes
on local processes, and compare with the single-device model.

For each model:
  1. plan it on the meta device at a size where parallelism matters (llama: 128K tokens; video
     DiT: 64 frames × 1024 patches) for as many H200s as there are local ranks, and print the
     plan and the planner's reasons for one attention layer;
  2. apply that same plan (plans are written in factors, not sizes) to the tiny model on
     local processes - gloo on CPU, or NCCL when there are at least two GPUs;
  3. report the largest relative difference from the single-device model for the loss and
     every parameter gradient, the time of one training step, and the generated code of one
     block.
"""

from __future__ import annotations

import copy
import os
import time

import torch

from seqshard.models import AXES, build

PRODUCTION = {  # (config, sizes) planned on the meta device
    "llama": ("tiny", dict(batch=1, seq=1 << 17)),
    "video_dit": ("tiny", dict(batch=1, frames=64, patches=1024)),
}
RUN = {  # sizes the plan is run at; not divisible by the ranks on purpose
    "llama": dict(batch=2, seq=61),
    "video_dit": dict(batch=2, frames=7, patches=13),
}
BLOCK = {"llama": "layers.0.attn", "video_dit": "blocks.1"}


def make_plan(family: str, ranks: int):
    from seqshard.planner import plan

    config, sizes = PRODUCTION[family]
    model, inputs = build(family, config, device="meta", dtype=torch.bfloat16, **sizes)
    inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs)
    return plan(model, inputs, mesh=(("sp", ranks),), axes=AXES[family])


def run_rank(family: str, plan, device: str):
    """On every rank: the single-device model and the planned one, one training step each."""
    import torch.distributed as dist

    from seqshard.planner import parallelize
    from seqshard.testing import mesh

    config = PRODUCTION[family][0]
    model, inputs = build(family, config, device=device, **RUN[family])
    ref = copy.deepcopy(model)
    pm = parallelize(model, inputs, plan=plan, mesh=mesh((dist.get_world_size(),), ("sp",)),
                     axes=AXES[family])
    loss_ref = ref(*inputs)
    loss_ref.backward()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = pm(*inputs)
    loss.backward()
    sync()
    seconds = time.perf_counter() - t0
    diffs = {"loss": ((loss - loss_ref).abs() / loss_ref.abs()).item()}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        diffs[name] = ((p.grad - q.grad).norm() / q.grad.norm()).item()
    calls = [line for line in pm.code.splitlines() if "seqshard_runtime" in line and "_grad" not in line]
    return dict(diffs=diffs, seconds=seconds, code=pm.program.code_of(BLOCK[family]),
                collectives=len(calls))


def main(ranks: int = 4, models=("llama", "video_dit")) -> int:
    from seqshard.testing import WorkerPool

    t_start = time.perf_counter()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                           ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(var, value)
        ranks, backend, device = min(ranks, gpus), "nccl", "cuda"
    else:
        backend, device = "gloo", "cpu"
    print(f"seqshard demo: {ranks} ranks on {'GPUs (NCCL)' if device == 'cuda' else 'CPU (gloo)'}\n")
    pool = WorkerPool(ranks, backend=backend)
    worst = 0.0
    try:
        for family in models:
            config, sizes = PRODUCTION[family]
            print(f"=== {family} ({config}) ===")
            t0 = time.perf_counter()
            plan = make_plan(family, ranks)
            print(f"planned at {sizes} for {ranks} H200s in {time.perf_counter() - t0:.1f} s:")
            print(plan)
            att = plan.attention()
            print(plan.explain(att[min(1, len(att) - 1)].node), "\n")
            results = pool.run(run_rank, family, plan, device)
            r = results[0]
            where = max(r["diffs"], key=r["diffs"].get)
            worst = max(worst, r["diffs"][where])
            print(f"generated code of {BLOCK[family]} on rank 0 (the whole program makes "
                  f"{r['collectives']} sharding and attention calls):")
            print(indent(r["code"]))
            print(f"\nran the plan at {RUN[family]} on {ranks} ranks: loss rel. diff "
                  f"{r['diffs']['loss']:.1e}, largest gradient rel. diff {r['diffs'][where]:.1e} "
                  f"({where}), step (fwd+bwd) {max(x['seconds'] for x in results) * 1e3:.0f} ms\n")
    finally:
        pool.close()
    print(f"demo done in {time.perf_counter() - t_start:.0f} s; largest relative difference from the "
          f"single-device model: {worst:.1e} ({'OK' if worst <= 1e-5 else 'TOO LARGE'})")
    return 0 if worst <= 1e-5 else 1


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
