"""Train the built-in Llama with seqshard under torchrun.

    torchrun --nproc-per-node 4 examples/train.py                       # CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 4 examples/train.py --config small --seq 4096 --plan ring

Every rank builds the same model (same seed) and passes the same global batch; the module
shards it. After backward every rank holds the single-device gradients, so a plain optimizer
works and the ranks stay identical.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from seqshard import planner
from seqshard.models import build, named_plans


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny")
    p.add_argument("--seq", type=int, default=61)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--plan", default=None, help="a named plan (ring, allgather, ulysses, tokenring); "
                                                "default: the planner decides")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                           ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(var, value)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model, inputs = build("llama", args.config, device=device, dtype=dtype, batch=1, seq=args.seq)
    overrides = named_plans("llama", args.config)[args.plan][0] if args.plan else None
    pm = planner.parallelize(model, inputs, overrides=overrides)
    if dist.get_rank() == 0:
        print(pm.plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = pm(*inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}  {time.perf_counter() - t0:.3f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
