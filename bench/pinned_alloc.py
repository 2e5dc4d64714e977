"""What a pinned host buffer costs to allocate, and to fill, on this machine.

    python bench/pinned_alloc.py            # one GPU, ~15 s: JSON + markdown under $OUT

Offload (runtime/offload.py) copies each offloaded layer input into a fresh pinned buffer
(`torch.empty(..., pin_memory=True)`) in forward. PyTorch's caching host allocator keeps freed
pinned blocks, so only the first step pays for page-locking them; a step that is timed cold
(bench/memory.py `steps=1`) pays it for every offloaded input on the thread that issues the
forward. This measures: the first allocations of `--gib` 1 GiB buffers (uncached), the same
again after freeing them (cached), and one 1 GiB copy each way between the GPU and a pinned
buffer. The cost model does not price the first kind (a one-time cost of a run).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def run(n: int) -> dict:
    import torch

    torch.cuda.init()
    gib = 2**30

    def alloc(count):
        t0 = time.perf_counter()
        bufs = [torch.empty(gib, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        return bufs, time.perf_counter() - t0

    bufs, first = alloc(n)
    del bufs
    bufs, again = alloc(n)
    gpu = torch.empty(gib, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bufs[0].copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    d2h = time.perf_counter() - t0
    t0 = time.perf_counter()
    gpu.copy_(bufs[0], non_blocking=True)
    torch.cuda.synchronize()
    h2d = time.perf_counter() - t0
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, buffers=n,
                first_alloc_s=first, first_alloc_s_per_gib=first / n, cached_alloc_s=again,
                d2h_s_per_gib=d2h, h2d_s_per_gib=h2d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=int, default=8, help="1 GiB buffers to allocate")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    r = run(args.gib)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "pinned_alloc-" + time.strftime("%Y%m%d-%H%M%S"))
    with open(base + ".json", "w") as f:
        json.dump(r, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# Pinned host memory ({r['device']}, torch {r['torch']})\n\n"
                f"`bench/pinned_alloc.py --gib {args.gib}`\n\n"
                f"| what | seconds |\n|---|---|\n"
                f"| first allocation, per GiB | {r['first_alloc_s_per_gib']:.3f} |\n"
                f"| the same {args.gib} GiB again (cached) | {r['cached_alloc_s']:.3f} |\n"
                f"| copy GPU → pinned, 1 GiB | {r['d2h_s_per_gib']:.4f} |\n"
                f"| copy pinned → GPU, 1 GiB | {r['h2d_s_per_gib']:.4f} |\n")
    print(open(base + ".md").read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
