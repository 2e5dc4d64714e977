"""Measure this machine and write a cluster JSON that `Cluster.load` reads.

    seqshard calibrate --out cluster.json                       # one process: compute only
    torchrun --nproc-per-node 8 -m seqshard calibrate --out cluster.json
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
  all groups at once, as training traffic would;
- the compiled program (`fused`: by default on a GPU; `--fused` / `--no-fused`). Its two GPU
  fields keep their default 1.0 when it is off or a measurement fails (the log says why):
  `GPU.fused_bandwidth_efficiency`: a residual add + RMSNorm and SwiGLU's silu·mul, each
  compiled by torch.compile (Inductor), forward + backward at a bandwidth-bound size
  (`Sizes.chains`): the bytes the cost model counts for their fused chains forward and
  backward (`strategies.costs._fused_work`'s count, `chain_work`) per measured second, over
  the copy bandwidth. `GPU.fused_loss_efficiency`: the fused LM-head loss
  (`codegen.kernels.linear_ce.linear_cross_entropy`, forward + backward, `Sizes.loss`)
  against its formula (`fused_loss_time`: three GEMMs at the measured matmul rate, one pass
  over the logits at the copy bandwidth): formula / measured. costmodel may not import
  codegen, so the caller passes the kernel (`calibrate(fused_loss=...)`); `seqshard calibrate`
  does (`python -m seqshard.costmodel.calibrate` does not: the loss keeps its default). On a
  CPU, Inductor needs a C++ compiler; without one the chains are skipped with a message.

It runs on CPU too (gloo, small sizes), so the calibration path is testable. Fields it does not
measure (op-kind efficiencies, overlap slowdown, block efficiency) keep the GPU class defaults;
with one process the links come from the preset `links_from`, renamed "<link>-preset". At the
end it prints a table of what it measured and writes it beside the JSON (FILE.md).
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

from seqshard.costmodel import compute as comp
from seqshard.costmodel.cluster import COLLECTIVES, GPU, PRESETS, Cluster, Link
from seqshard.costmodel.compute import attention_flops

__all__ = ["Sizes", "calibrate", "main", "chain_work", "chains_time", "fused_loss_time"]


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
    chains: tuple[int, int, int] = (64, 32, 64)
    """(tokens, hidden, ffn) of the fused chains measured: add + RMSNorm over [tokens, hidden],
    silu·mul over [tokens, ffn]."""
    loss: tuple[int, int, int, int] = (64, 32, 256, 32)
    """(tokens, dim, vocab, chunk) of the fused LM-head loss measured."""

    def __post_init__(self):
        if self.matmul < 1 or self.heads < 1 or self.head_dim < 1 or self.copy_bytes < 1 \
                or len(self.chains) != 3 or len(self.loss) != 4 \
                or min(*self.chains, *self.loss) < 1:
            raise ValueError(f"Sizes must be positive: {self}")
        if not self.attention or list(self.attention) != sorted(set(self.attention)):
            raise ValueError(f"Sizes.attention must be increasing lengths, got {self.attention}")
        if not self.messages or list(self.messages) != sorted(set(self.messages)):
            raise ValueError(f"Sizes.messages must be increasing byte counts, got {self.messages}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"Sizes.repeats must be ≥ 1 and warmup ≥ 0, got {self.repeats}, {self.warmup}")

    @classmethod
    def gpu(cls) -> Sizes:
        """Sizes for a datacenter GPU: attention at 2K … 128K and head dims 64-128 (about a
        minute); the fused chains at Llama-3.2-1B's widths over 32K tokens (128-512 MiB a
        tensor in bf16), the fused loss at its LM head over 16K tokens in chunks of 4096 (what
        codegen runs for a whole loss: 1 GiB of logits a chunk)."""
        return cls(matmul=8192, attention=(2048, 8192, 32768, 131072), heads=32, head_dim=128,
                   messages=(1 << 16, 1 << 20, 1 << 24, 1 << 28), copy_bytes=1 << 30,
                   head_dims=(64, 72, 96), repeats=5, warmup=2, chains=(32768, 2048, 8192),
                   loss=(16384, 2048, 128256, 4096))

    @classmethod
    def cpu(cls) -> Sizes:
        """Small sizes that run in seconds on a CPU (the smoke test)."""
        return cls(matmul=128, attention=(64, 128), heads=2, head_dim=16,
                   messages=(1 << 12, 1 << 16), copy_bytes=1 << 22, head_dims=(8,), repeats=3,
                   warmup=1, chains=(256, 64, 128), loss=(256, 64, 1024, 64))


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


# --- the compiled program ------------------------------------------------------------------------
#
# What the cost model gives a compiled program (strategies/costs.py), written out for the shapes
# measured here (costmodel may not import strategies; tests/test_costmodel_calibrate.py checks
# these against `Costs` on the same ops).

def _norm_chain(x, r, w):
    """A layer's residual add and the RMSNorm after it: (x + r, rms_norm(x + r) · w)."""
    h = x + r
    return h, F.rms_norm(h, (h.shape[-1],), w, 1e-5)


def _swiglu_chain(g, u):
    """SwiGLU's silu(gate) · up."""
    return F.silu(g) * u


def chain_work(tokens: int, hidden: int, ffn: int, item: int) -> list[comp.Work]:
    """Forward work of `_norm_chain` and `_swiglu_chain` as `strategies.costs._fused_work`
    counts it for a compiled layer: each op's eager FLOPs; bytes: a tensor from outside the
    chain read once (by its first reader), an output read outside it written once. The add
    reads x and r and writes h; RMSNorm reads its weight and writes y (h stays inside); silu
    reads the gate (its output stays inside); the mul reads up and writes the product."""
    th, tf = tokens * hidden, tokens * ffn
    return [comp.Work(th, 3 * th * item, "pointwise", item),              # h = x + r
            comp.Work(5 * th, (th + hidden) * item, "reduction", item),   # y = rms_norm(h) · w
            comp.Work(tf, tf * item, "pointwise", item),                   # silu(g)
            comp.Work(tf, 2 * tf * item, "pointwise", item)]               # silu(g) · u


def chains_time(works: list[comp.Work], gpu: GPU) -> float:
    """Seconds the cost model gives these chain ops forward + backward on `gpu` (the roofline of
    `Work.time`, bytes at the bandwidth of a compiled chain: `GPU.fused_bandwidth_efficiency` ×
    hbm_bandwidth). Without the one launch floor per chain kernel (`costs.KERNEL_S`, 4 µs: 16 µs
    for the two chains forward and backward, under 1% at `Sizes.gpu`'s size)."""
    eff = gpu.fused_bandwidth_efficiency
    if eff != 1:
        gpu = replace(gpu, hbm_bandwidth=gpu.hbm_bandwidth * eff, fused_bandwidth_efficiency=1.0)
    return sum(w.time(gpu) + w.backward().time(gpu) for w in works)


def fused_loss_time(tokens: int, dim: int, vocab: int, item: int, gpu: GPU, *,
                    training: bool = True) -> float:
    """Seconds the cost model gives the fused LM-head loss (`strategies.costs._fused_loss_work`):
    the head's GEMM with, when training, dh and dW (3× its FLOPs, 3× the eager linear's bytes:
    logits and hidden), at the matmul rate; one pass over the logits reading them twice and
    writing the gradient over them (`item`-byte logits); over `GPU.fused_loss_efficiency`."""
    logits = tokens * vocab
    k = 3 if training else 1
    head = comp.Work(2 * logits * dim * k, item * (logits + tokens * dim) * k, "matmul", item)
    rows = comp.Work(5 * logits, 3 * logits * item, "reduction", item)
    return (head.time(gpu) + rows.time(gpu)) / gpu.fused_loss_efficiency


def _measure_chains(gpu: GPU, sizes: Sizes, device, group, dtype, backend: str):
    """(fused_bandwidth_efficiency, table row): the two chains compiled, forward + backward;
    the bytes `chain_work` counts (forward and backward) per second, over the copy bandwidth."""
    tokens, hidden, ffn = sizes.chains
    norm = torch.compile(_norm_chain, backend=backend, dynamic=False)
    swiglu = torch.compile(_swiglu_chain, backend=backend, dynamic=False)

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    x, r, w, g, u = leaf(tokens, hidden), leaf(tokens, hidden), leaf(hidden), leaf(tokens, ffn), \
        leaf(tokens, ffn)
    grads = [torch.randn_like(v) for v in (x, x, g)]

    def step():  # autograd.grad: no .grad accumulated, as after zero_grad(set_to_none=True)
        h, y = norm(x, r, w)
        torch.autograd.grad((h, y, swiglu(g, u)), (x, r, w, g, u), grads)

    step()  # compiles forward and backward
    t = _median_time(step, sizes, device, group)
    works = chain_work(tokens, hidden, ffn, x.element_size())
    counted = sum(w.bytes + w.backward().bytes for w in works)
    eff = counted / t / gpu.hbm_bandwidth  # bandwidth bound at these sizes on a GPU
    _log(f"fused chains (add + RMSNorm {tokens}×{hidden}, silu·mul {tokens}×{ffn}, {dtype}, "
         f"{backend}): {t * 1e3:.3g} ms fwd+bwd, {counted / 1e9:.3g} GB counted, "
         f"{counted / t / 1e9:.4g} GB/s = {eff:.3g} of the copy bandwidth")
    return eff, ("fused chains fwd+bwd (add+RMSNorm, silu·mul)",
                 f"{tokens}×{hidden}, {tokens}×{ffn}", f"{t * 1e3:.3f} ms",
                 f"{chains_time(works, gpu) * 1e3:.3f} ms",
                 f"fused_bandwidth_efficiency = {eff:.4g}")


def _measure_loss(gpu: GPU, sizes: Sizes, device, group, dtype, fused_loss):
    """(fused_loss_efficiency, table row): `fused_loss(hidden, weight, labels, chunk=...)`
    forward + backward against `fused_loss_time`."""
    tokens, dim, vocab, chunk = sizes.loss
    hidden = torch.randn(tokens, dim, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, dtype=dtype) * dim**-0.5).requires_grad_()
    labels = torch.randint(vocab, (tokens,), device=device)

    def step():
        torch.autograd.grad(fused_loss(hidden, weight, labels, chunk=chunk), (hidden, weight))

    step()  # compiles the Triton kernels
    t = _median_time(step, sizes, device, group)
    formula = fused_loss_time(tokens, dim, vocab, hidden.element_size(), gpu)
    eff = formula / t
    _log(f"fused loss ({tokens} tokens × d {dim} × V {vocab}, chunks of {chunk}, {dtype}): "
         f"{t * 1e3:.3g} ms fwd+bwd, formula {formula * 1e3:.3g} ms: efficiency {eff:.3g}")
    return eff, ("fused LM-head loss fwd+bwd", f"{tokens}×{dim}×{vocab}, chunk {chunk}",
                 f"{t * 1e3:.3f} ms", f"{formula * 1e3:.3f} ms",
                 f"fused_loss_efficiency = {eff:.4g}")


def _measure_fused(gpu: GPU, sizes: Sizes, device, backend: str, fused_loss):
    """`gpu` with the compiled program's two fields measured (each kept at its default when its
    measurement cannot run), and the table rows of what was measured."""
    group = dist.group.WORLD if dist.is_initialized() else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fields, rows = {}, []
    try:
        fields["fused_bandwidth_efficiency"], row = _measure_chains(gpu, sizes, device, group,
                                                                    dtype, backend)
        rows.append(row)
    except Exception as e:  # noqa: BLE001 - no compiler (Inductor on a CPU needs a C++ one), ...
        _log(f"fused chains: not measured (torch.compile backend {backend!r} failed: "
             f"{type(e).__name__}: {str(e)[:300]}); fused_bandwidth_efficiency keeps "
             f"{gpu.fused_bandwidth_efficiency}")
    if fused_loss is None:
        _log("fused loss: not measured (no kernel given: `seqshard calibrate` passes codegen's "
             f"linear_cross_entropy); fused_loss_efficiency keeps {gpu.fused_loss_efficiency}")
    else:
        try:
            fields["fused_loss_efficiency"], row = _measure_loss(gpu, sizes, device, group, dtype,
                                                                 fused_loss)
            rows.append(row)
        except Exception as e:  # noqa: BLE001 - reported, the default kept
            _log(f"fused loss: not measured ({type(e).__name__}: {str(e)[:300]}); "
                 f"fused_loss_efficiency keeps {gpu.fused_loss_efficiency}")
    return replace(gpu, **fields), rows


def _table(gpu: GPU, sizes: Sizes, fused_rows) -> str:
    """What was measured, as a markdown table."""
    top = gpu.attention_causal[-1]
    rows = [("matmul bf16", f"{sizes.matmul}³", "", "",
             f"matmul_bf16 = {gpu.matmul_bf16 / 1e12:.4g} TFLOP/s"),
            ("matmul fp32", f"{sizes.matmul}³", "", "",
             f"matmul_fp32 = {gpu.matmul_fp32 / 1e12:.4g} TFLOP/s"),
            ("copy, read + write", f"{sizes.copy_bytes} B", "", "",
             f"hbm_bandwidth = {gpu.hbm_bandwidth / 1e9:.4g} GB/s"),
            (f"attention {gpu.attention_backend} causal fwd+bwd", f"S={top[0]:.0f}", "", "",
             f"attention_causal = {top[1] / 1e12:.4g} TFLOP/s"), *fused_rows]
    lines = ["| measured | size | time | cost model's time (defaults) | GPU field |",
             "|---|---|---|---|---|", *(f"| {' | '.join(r)} |" for r in rows)]
    return "\n".join(lines)


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

def calibrate(out_path, *, sizes: Sizes | None = None, links_from: str = "h200",
              fused: bool | None = None, fused_loss=None,
              compile_backend: str = "inductor") -> Cluster:
    """Measure this machine (and the process group, if one is initialized) and write a cluster
    JSON to `out_path` (rank 0 writes). Returns the `Cluster`, the same on every rank.

    fused: measure the compiled program's fields (default: on a GPU); fused_loss: the fused
    LM-head loss to time, `linear_cross_entropy(hidden, weight, labels, chunk=...)` of
    `codegen.kernels.linear_ce` (None: not measured); compile_backend: torch.compile's backend
    for the chains ("inductor"; "aot_eager" runs the path without generating kernels)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if sizes is None:
        sizes = Sizes.gpu() if device.type == "cuda" else Sizes.cpu()
    world = dist.get_world_size() if dist.is_initialized() else 1
    _log(f"measuring {device} ({world} rank{'s' if world > 1 else ''})")
    gpu = _measure_gpu(sizes, device)
    fused_rows = []
    if fused if fused is not None else device.type == "cuda":
        gpu, fused_rows = _measure_fused(gpu, sizes, device, compile_backend, fused_loss)
    else:
        _log("compiled program: not measured (--fused measures it; on a GPU it is on by default)")
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
        table = _table(gpu, sizes, fused_rows)
        md = Path(out_path).with_suffix(".md")
        md.write_text(f"# seqshard calibrate: {cluster}\n\n{table}\n")
        _log(f"summary:\n{table}")
        _log(f"wrote {out_path} and {md.name}: {cluster}")
    return cluster


def main(argv: list[str] | None = None, *, fused_loss=None) -> int:
    """`seqshard calibrate --out FILE [--quick] [--links-from PRESET] [--fused | --no-fused]
    [--compile-backend NAME]`; fused_loss: the kernel `calibrate` times (the CLI passes it)."""
    parser = argparse.ArgumentParser(prog="seqshard calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="cluster JSON to write")
    parser.add_argument("--quick", action="store_true", help="the small CPU sizes, on any device")
    parser.add_argument("--links-from", default="h200", choices=sorted(PRESETS),
                        help="preset whose links a single process reports (default: h200)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the compiled program: fused chains and the fused LM-head "
                        "loss (default: on a GPU)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the fused chains (default: inductor)")
    args = parser.parse_args(argv)

    started = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    try:
        calibrate(args.out, sizes=Sizes.cpu() if args.quick else None, links_from=args.links_from,
                  fused=args.fused, fused_loss=fused_loss, compile_backend=args.compile_backend)
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
