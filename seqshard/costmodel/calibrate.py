"""Measure this machine and write a cluster JSON that `Cluster.load` reads.

    seqshard calibrate --out cluster.json                       # one process: compute only
    torchrun --nproc-per-node 8 -m seqshard.costmodel.calibrate --out cluster.json
    torchrun --nnodes 2 --nproc-per-node 8 ... --out cluster.json   # NVLink and network levels

What it measures (medians of `repeats` timed runs after `warmup`):

- bf16 and fp32 matmul rate: 2n³ / t for an n×n×n matmul;
- device copy bandwidth: 2·bytes / t (read + write), as `GPU.hbm_bandwidth` counts it;
- attention forward+backward rate per local sequence length, causal and not, and relative to
  a few head dims, per local attention kernel (FlashAttention's FLOP count): cuDNN through
  `torch.nn.functional.scaled_dot_product_attention` (on a CPU: SDPA's CPU kernel, "flash_cpu"),
  and FlashAttention-4 (`flash_attn.cute.flash_attn_func`) where the runtime would choose it
  (sm90/sm100 with flash-attn-4 importable). The GPU's `attention_backend` is the kernel the
  runtime picks (fa4 there, else cuDNN), the other's rates go to `attention_kernels`;
- with ≥ 2 ranks: per-step latency α (a tiny all-gather: t / (n-1)) and, per collective and
  message size, the bus bandwidth that makes the alpha-beta model of `collectives` reproduce
  the measured time: busbw = bytes_per_gpu / (t - steps·α). Times are the slowest rank's.
  On one node the whole world is one level; across nodes (LOCAL_WORLD_SIZE < WORLD_SIZE) the
  ranks of a node measure the inner link and the ranks with the same local rank the network,
  all groups at once, as training traffic would.

It runs on CPU too (gloo, small sizes), so the calibration path is testable. Fields it does not
measure (op-kind efficiencies, overlap slowdown, block efficiency) keep the GPU class defaults;
with one process the links come from the preset `links_from`, renamed "<link>-preset".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqshard.costmodel.cluster import COLLECTIVES, GPU, PRESETS, Cluster, Link
from seqshard.costmodel.compute import attention_flops

__all__ = ["Sizes", "calibrate", "main"]


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """What to measure, and how often."""

    matmul: int
    """n of the n×n×n matmul."""
    attention: tuple[int, ...]
    """Local sequence lengths of the attention rate table (B = 1)."""
    heads: int
    """Attention heads."""
    head_dim: int
    """Attention head dimension."""
    messages: tuple[int, ...]
    """Message sizes in bytes (nccl-tests' size: the full per-rank buffer)."""
    copy_bytes: int
    """Bytes of the copied buffer for the memory bandwidth."""
    head_dims: tuple[int, ...] = ()
    """Head dims whose attention rate is measured relative to `head_dim` (at a middle length)."""
    repeats: int = 5
    """Timed runs per measurement (the median counts)."""
    warmup: int = 2
    """Untimed runs before them."""

    def __post_init__(self):
        if self.matmul < 1 or self.heads < 1 or self.head_dim < 1 or self.copy_bytes < 1:
            raise ValueError(f"Sizes must be positive: {self}")
        if not self.attention or list(self.attention) != sorted(set(self.attention)):
            raise ValueError(f"Sizes.attention must be increasing lengths, got {self.attention}")
        if not self.messages or list(self.messages) != sorted(set(self.messages)):
            raise ValueError(f"Sizes.messages must be increasing byte counts, got {self.messages}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"Sizes.repeats must be ≥ 1 and warmup ≥ 0, got {self.repeats}, {self.warmup}")

    @classmethod
    def gpu(cls) -> Sizes:
        """Sizes for a datacenter GPU: attention at 2K … 128K and head dims 64-128 (about a minute)."""
        return cls(matmul=8192, attention=(2048, 8192, 32768, 131072), heads=32, head_dim=128,
                   messages=(1 << 16, 1 << 20, 1 << 24, 1 << 28), copy_bytes=1 << 30,
                   head_dims=(64, 72, 96), repeats=5, warmup=2)

    @classmethod
    def cpu(cls) -> Sizes:
        """Small sizes that run in seconds on a CPU (the smoke test)."""
        return cls(matmul=128, attention=(64, 128), heads=2, head_dim=16,
                   messages=(1 << 12, 1 << 16), copy_bytes=1 << 22, head_dims=(8,), repeats=3,
                   warmup=1)


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[calibrate] {msg}", flush=True)


def _median_time(fn, sizes: Sizes, device: torch.device, group=None) -> float:
    """Median seconds of fn() over the repeats; with a process group, the slowest rank's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(sizes.warmup):
        fn()
    times = []
    for _ in range(sizes.repeats):
        if group is not None:
            dist.barrier(group=group)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    if group is not None:
        slowest = torch.tensor([t], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        t = slowest.item()
    return t


# --- one GPU -------------------------------------------------------------------------------------

def _measure_gpu(sizes: Sizes, device: torch.device) -> GPU:
    """Rates of this GPU; with a process group, of the slowest GPU (so every rank agrees)."""
    group = dist.group.WORLD if dist.is_initialized() else None
    n = sizes.matmul
    rates = {}
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = _median_time(lambda: a @ b, sizes, device, group)
        rates[dtype] = 2 * n**3 / t
        _log(f"matmul {n}³ {label}: {rates[dtype] / 1e12:.3g} TFLOP/s")

    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), sizes, device, group)
    copy_bw = 2 * sizes.copy_bytes / t
    _log(f"copy {sizes.copy_bytes} B: {copy_bw / 1e9:.3g} GB/s (read + write)")

    kernels = []  # (name, causal table, full table, head dim table), the runtime's pick first
    fa4 = _fa4_func(device)
    if fa4 is not None:
        try:
            kernels.append(("fa4", *_attention_tables(_fa4_step(fa4), "fa4", sizes, device, group)))
        except Exception as e:  # noqa: BLE001 - a kernel that fails here is reported, not priced
            _log(f"attention fa4: failed ({type(e).__name__}: {e}); not priced")
    sdpa = "cudnn" if device.type == "cuda" else "flash_cpu"
    kernels.append((sdpa, *_attention_tables(_sdpa_step, sdpa, sizes, device, group)))
    (backend, causal_table, full_table, head_table), *others = kernels

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        name = "cpu"
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPU(name=name, matmul_bf16=rates[torch.bfloat16], matmul_fp32=rates[torch.float32],
               hbm_bandwidth=copy_bw, hbm_capacity=float(capacity),
               attention_causal=causal_table, attention_full=full_table,
               attention_head_dim=head_table, attention_backend=backend,
               attention_kernels=tuple(others))


# --- attention kernels ---------------------------------------------------------------------------
#
# A kernel is step_for(q, k, v, grad, causal) -> step(), tensors [1, h, s, e] bf16 requiring grad.

def _sdpa_step(q, k, v, grad, causal):
    """PyTorch SDPA; on a GPU restricted to cuDNN (the runtime's "cudnn" backend)."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def step():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)
        return step
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)


def _fa4_func(device: torch.device):
    """FlashAttention-4's `flash_attn_func` where the runtime would pick it (sm90/sm100 GPU,
    flash-attn-4 importable), else None."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return None
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - not installed, or its libraries fail to load
        _log(f"attention fa4: not measured (flash-attn-4 is not importable: {type(e).__name__}: {e})")
        return None
    return flash_attn_func


def _fa4_step(func):
    def step_for(q, k, v, grad, causal):
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        gt = grad.transpose(1, 2).contiguous()

        def step():
            out = func(qt, kt, vt, causal=causal)
            (out[0] if isinstance(out, tuple) else out).backward(gt)
        return step
    return step_for


def _attention_tables(step_for, name: str, sizes: Sizes, device: torch.device, group):
    """(causal table, full table, head dim table) of one kernel, forward+backward."""
    def rate(length, head_dim, causal):
        shape = (1, sizes.heads, length, head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
        t = _median_time(step_for(q, k, v, grad, causal), sizes, device, group)
        return attention_flops(1, sizes.heads, length, length, head_dim, causal=causal,
                               training=True) / t

    tables = {}
    for causal in (True, False):
        points = []
        for length in sizes.attention:
            points.append((length, rate(length, sizes.head_dim, causal)))
            _log(f"attention {name} {'causal' if causal else 'full'} S={length}: "
                 f"{points[-1][1] / 1e12:.3g} TFLOP/s fwd+bwd")
        tables[causal] = tuple(points)

    # smaller heads reach less of the rate: measure a few head dims at one middle length
    length = sizes.attention[len(sizes.attention) // 2]
    head_rates = {}
    for head_dim in sorted({*sizes.head_dims, sizes.head_dim}):
        head_rates[head_dim] = (dict(tables[True])[length] if head_dim == sizes.head_dim
                                else rate(length, head_dim, True))
        _log(f"attention {name} causal S={length} head dim {head_dim}: "
             f"{head_rates[head_dim] / 1e12:.3g} TFLOP/s")
    head_table = tuple((float(d), r / head_rates[sizes.head_dim]) for d, r in sorted(head_rates.items()))
    return tables[True], tables[False], head_table


# --- one link ------------------------------------------------------------------------------------

def _steps(kind: str, n: int) -> int:
    return {"all_gather": n - 1, "reduce_scatter": n - 1, "all_reduce": 2 * (n - 1),
            "all_to_all": n - 1, "send_recv": 1}[kind]


def _bytes_per_gpu(kind: str, size: int, n: int) -> float:
    return {"all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n,
            "all_to_all": (n - 1) / n, "send_recv": 1.0}[kind] * size


def _collective(kind: str, size: int, group, device: torch.device):
    """fn() running collective `kind` on a `size`-byte buffer (fp32 elements) over `group`."""
    n = dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group)
    me = ranks.index(dist.get_rank())
    numel = max(n, size // 4 // n * n)  # divisible by n
    buf = torch.ones(numel, device=device)
    out = torch.empty_like(buf)
    shard = torch.empty(numel // n, device=device)
    # torch ≥ 2.13 names them *_single; older releases (the GPU machine's 2.11) *_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if kind == "all_gather":
        return lambda: gather(buf, shard, group=group)
    if kind == "reduce_scatter":
        return lambda: scatter(shard, buf, group=group)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(buf, group=group)
    if kind == "all_to_all":
        return lambda: dist.all_to_all_single(out, buf, group=group)
    assert kind == "send_recv", kind
    nxt, prv = ranks[(me + 1) % n], ranks[(me - 1) % n]

    def ring_step():
        ops = [dist.P2POp(dist.isend, buf, nxt, group), dist.P2POp(dist.irecv, out, prv, group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return ring_step


def _measure_link(name: str, group, sizes: Sizes, device: torch.device) -> Link:
    n = dist.get_world_size(group)
    t = _median_time(_collective("all_gather", 4 * n, group, device), sizes, device, group)
    alpha = t / (n - 1)
    _log(f"{name}: latency {alpha * 1e6:.3g} µs per step (all-gather of {4 * n} B over {n} ranks)")
    tables = {}
    for kind in COLLECTIVES:
        points = []
        for size in sizes.messages:
            t = _median_time(_collective(kind, size, group, device), sizes, device, group)
            busbw = _bytes_per_gpu(kind, size, n) / max(t - _steps(kind, n) * alpha, 0.05 * t)
            points.append((size, busbw))
            _log(f"{name} {kind} {size} B: {t * 1e6:.1f} µs, bus bandwidth {busbw / 1e9:.3g} GB/s")
        tables[kind] = tuple(points)
    return Link(name=name, latency=alpha, **tables)


def _measure_levels(sizes: Sizes, device: torch.device) -> tuple[tuple[Link, int], ...]:
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node >= world:
        return ((_measure_link("intra", dist.group.WORLD, sizes, device), world),)
    if world % per_node:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={per_node}")
    nodes = world // per_node
    node_groups, _ = dist.new_subgroups_by_enumeration(
        [list(range(i * per_node, (i + 1) * per_node)) for i in range(nodes)])
    rail_groups, _ = dist.new_subgroups_by_enumeration(
        [list(range(j, world, per_node)) for j in range(per_node)])
    inner = _measure_link("intra", node_groups, sizes, device) if per_node > 1 else None
    outer = _measure_link("inter", rail_groups, sizes, device)
    if inner is None:  # one GPU per node: nothing joins GPUs inside a node
        return ((outer, world),)
    return ((inner, per_node), (outer, nodes))


# --- entry points --------------------------------------------------------------------------------

def calibrate(out_path, *, sizes: Sizes | None = None, links_from: str = "h200") -> Cluster:
    """Measure this machine (and the process group, if one is initialized) and write a cluster
    JSON to `out_path` (rank 0 writes). Returns the `Cluster`, the same on every rank."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if sizes is None:
        sizes = Sizes.gpu() if device.type == "cuda" else Sizes.cpu()
    world = dist.get_world_size() if dist.is_initialized() else 1
    _log(f"measuring {device} ({world} rank{'s' if world > 1 else ''})")
    gpu = _measure_gpu(sizes, device)
    if world > 1:
        levels = _measure_levels(sizes, device)
    else:
        if links_from not in PRESETS:
            raise ValueError(f"links_from={links_from!r} is not a preset; use one of {sorted(PRESETS)}")
        link = PRESETS[links_from][1]
        levels = ((replace(link, name=f"{link.name}-preset"), 1),)
        _log(f"one process: no links measured; the link is {links_from}'s {link.name} "
             "(run under torchrun with ≥ 2 ranks to measure it)")
    cluster = Cluster(gpu=gpu, gpus=world, levels=levels)
    if world == 1 or dist.get_rank() == 0:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        cluster.save(out_path)
        _log(f"wrote {out_path}: {cluster}")
    return cluster


def main(argv: list[str] | None = None) -> int:
    """`seqshard calibrate --out FILE [--quick] [--links-from PRESET]`."""
    parser = argparse.ArgumentParser(prog="seqshard calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="cluster JSON to write")
    parser.add_argument("--quick", action="store_true", help="the small CPU sizes, on any device")
    parser.add_argument("--links-from", default="h200", choices=sorted(PRESETS),
                        help="preset whose links a single process reports (default: h200)")
    args = parser.parse_args(argv)

    started = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    try:
        calibrate(args.out, sizes=Sizes.cpu() if args.quick else None, links_from=args.links_from)
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
