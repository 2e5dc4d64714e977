"""GPU smoke test: every distributed attention algorithm once, bf16, on 2+ GPUs (NCCL).

Each run shards the same global q, k, v (and upstream gradient) over the GPUs, runs one algorithm
forward and backward in bf16, gathers out, dq, dk, dv and compares them with an fp32 reference
(PyTorch SDPA, math kernel, on one GPU). The yardstick is flash-attention's accuracy rule: our
error against fp32 must be at most 2× the error of PyTorch's own single-GPU bf16 SDPA on the same
inputs (+1e-4 absolute slack). Speed is not measured here (one untimed-quality run each; the
milliseconds printed are for orientation only).

    python bench/gpu_smoke.py                          # one process per visible GPU (at least 2)
    python bench/gpu_smoke.py --nproc 2 --backend cudnn,flash,efficient
    torchrun --nproc-per-node 2 bench/gpu_smoke.py     # or under torchrun

Prints a table with the local attention backend each run used, writes
bench/results/gpu_smoke-<time>.json and .md (date, device, torch version, command), and exits 1
if any run fails.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) stays off on the lent machines; set before torch/NCCL initialize.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import report  # noqa: E402
import timing  # noqa: E402
from seqshard.runtime import (allgather_attention, backend_report, hybrid_attention, layout,  # noqa: E402
                              local_attention, ring_attention, select_backend, tokenring_attention,
                              ulysses_attention)
from seqshard.runtime.collectives import all_gather  # noqa: E402

SLACK = 1e-4


@dataclass(frozen=True)
class Run:
    name: str
    algorithm: str
    order: str = "zigzag"
    causal: bool = True
    kv_heads: int | None = None  # None: --kv-heads
    padded: bool = False         # seq_len = S - --pad
    mesh: tuple[int, int] | None = None  # hybrid (ring, ulysses)
    head_stride: int | None = None
    transport: str = "nccl"      # Ulysses / hybrid exchanges (runtime/peer.py)
    chunks: int | None = None    # Ulysses head chunks (None: the default)


def runs(world: int, args) -> list[Run]:
    local_kv = args.kv_heads if args.kv_heads % world == 0 else args.heads  # kv heads split too
    return [
        Run("ring contig causal", "ring", order="contig"),
        Run("ring zigzag causal", "ring"),
        Run("ring zigzag full", "ring", causal=False),
        Run("ring zigzag causal padded", "ring", padded=True),
        Run("allgather zigzag causal", "allgather"),
        Run("allgather head_stride=1 padded", "allgather", padded=True, head_stride=1),
        Run("ulysses zigzag causal", "ulysses"),
        Run("ulysses MQA padded", "ulysses", kv_heads=1, padded=True),
        Run("ulysses nccl zigzag causal", "ulysses", transport="nccl", chunks=1),
        Run("ulysses peer chunks=2 zigzag padded", "ulysses", padded=True, transport="peer",
            chunks=2),
        Run("ulysses peer chunks=1 contig full", "ulysses", order="contig", causal=False,
            transport="peer", chunks=1),
        Run("tokenring zigzag causal", "tokenring"),
        Run("tokenring contig full padded", "tokenring", order="contig", causal=False, padded=True),
        Run(f"hybrid 1x{world} causal", "hybrid", mesh=(1, world)),
        Run(f"hybrid {world}x1 causal", "hybrid", mesh=(world, 1)),
        *([Run(f"hybrid 2x{world // 2} causal padded", "hybrid", mesh=(2, world // 2), padded=True)]
          if world >= 4 and world % 2 == 0 else []),
        Run("local (heads split) causal", "local", order="contig", kv_heads=local_kv),
    ]


# ---------------------------------------------------------------------------------------------
# Reference and yardstick (single GPU)
# ---------------------------------------------------------------------------------------------

def global_inputs(args, kv_heads: int, device):
    gen = torch.Generator().manual_seed(1234 + kv_heads)
    q_shape = (args.batch, args.heads, args.seq, args.head_dim)
    kv_shape = (args.batch, kv_heads, args.seq, args.head_dim)
    return [torch.randn(s, generator=gen).to(device) for s in (q_shape, kv_shape, kv_shape, q_shape)]


def sdpa(q, k, v, dout, causal: bool, seq_len: int, dtype, math_kernel: bool):
    """Single-GPU SDPA in `dtype` (kv heads expanded), padded rows zeroed; returns out, dq, dk, dv."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = (x.to(dtype).detach().requires_grad_() for x in (q, k, v))
    s = q.shape[2]
    mask = None
    if seq_len < s:
        pos = torch.arange(s, device=q.device)
        i, j = pos.unsqueeze(1), pos.unsqueeze(0)
        mask = (j < seq_len) & ((j <= i) if causal else True)
    backends = [SDPBackend.MATH] if math_kernel else [
        SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             attn_mask=mask, is_causal=causal and mask is None)
    valid = (torch.arange(s, device=q.device) < seq_len).to(out.dtype).unsqueeze(-1)
    out = out * valid
    out.backward(dout.to(dtype))
    return [t.detach() for t in (out, q.grad, k.grad, v.grad)]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------
# One distributed run
# ---------------------------------------------------------------------------------------------

def run_algorithm(run: Run, q, k, v, seq_len: int, backend: str | None):
    kw = dict(causal=run.causal, seq_len=seq_len, backend=backend)
    if run.algorithm == "local":
        return local_attention(q, k, v, **kw)
    kw["order"] = run.order
    if run.algorithm == "ring":
        return ring_attention(q, k, v, **kw)
    if run.algorithm == "allgather":
        return allgather_attention(q, k, v, head_stride=run.head_stride, **kw)
    if run.algorithm == "ulysses":
        return ulysses_attention(q, k, v, chunks=run.chunks, transport=_transport(run, q), **kw)
    if run.algorithm == "tokenring":
        return tokenring_attention(q, k, v, **kw)
    mesh = MESHES[run.mesh]
    return hybrid_attention(q, k, v, mesh.get_group("ring"), mesh.get_group("ulysses"),
                            transport=_transport(run, q), **kw)


def _transport(run: Run, q) -> str:
    """'peer' needs CUDA; on the CPU its pull plans run emulated (runtime/peer.py)."""
    return "emulated" if run.transport == "peer" and not q.is_cuda else run.transport


MESHES: dict = {}


def check(run: Run, args, backend: str | None, cache: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(args)
    kv_heads = run.kv_heads or args.kv_heads
    seq_len = args.seq - args.pad if run.padded else args.seq
    key = (kv_heads, run.causal, seq_len)
    if key not in cache:
        inputs = global_inputs(args, kv_heads, device)
        ref = sdpa(*inputs, run.causal, seq_len, torch.float32, math_kernel=True)
        low = sdpa(*inputs, run.causal, seq_len, torch.bfloat16, math_kernel=False)
        cache[key] = (inputs, ref, [rel(a, b) for a, b in zip(low, ref)])
    (q, k, v, dout), ref, yardstick = cache[key]

    if run.algorithm == "local":  # heads split: each rank holds whole sequences of its heads
        def shard(x):
            return x.chunk(world, 1)[rank]

        def unshard(x):
            return all_gather(x, 1)
    else:
        def shard(x):
            return layout.shard(x, 2, run.order, rank, world)

        def unshard(x):
            return layout.unshard(all_gather(x, 2), 2, run.order, world)

    ql, kl, vl = (shard(x).to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    chosen = select_backend(device, torch.bfloat16, args.head_dim, override=backend)
    outs = []

    def step():
        outs.append(run_algorithm(run, ql, kl, vl, seq_len, backend))
        outs[-1].backward(shard(dout).to(torch.bfloat16))
    ms = timing.measure(step, repeats=1, device=device).median_ms  # one cold run: orientation only
    out = outs[0]
    ours = [unshard(t.detach()) for t in (out, ql.grad, kl.grad, vl.grad)]
    errors = [rel(a, b) for a, b in zip(ours, ref)]
    ok = all(e <= 2 * y + SLACK for e, y in zip(errors, yardstick)) and all(e == e for e in errors)
    return dict(run=run.name, backend=chosen, seq_len=seq_len, kv_heads=kv_heads, ms=round(ms, 2),
                errors=dict(zip(("out", "dq", "dk", "dv"), errors)),
                sdpa_bf16=dict(zip(("out", "dq", "dk", "dv"), yardstick)), ok=ok)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ("| run | backend | seq | kv heads | out err (2×sdpa) | dq err | dk err | dv err | ms | ok |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        cells = [f"{r['errors'][n]:.2e} ({2 * r['sdpa_bf16'][n] + SLACK:.2e})"
                 for n in ("out", "dq", "dk", "dv")]
        lines.append(f"| {r['run']} | {r['backend']} | {r['seq_len']} | {r['kv_heads']} | "
                     + " | ".join(cells) + f" | {r['ms']} | {'yes' if r['ok'] else '**NO**'} |")
    return head + "\n".join(lines) + "\n"


def write_results(rows, args, backends):
    stamp = report.stamp()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (script check only)"
    meta = dict(date=stamp, device=device, gpus=dist.get_world_size(),
                torch=torch.__version__, command=" ".join([sys.executable, *sys.argv]),
                args=vars(args), backends=backends)
    md = (f"# GPU smoke {stamp}\n\n{meta['device']} × {meta['gpus']}, torch {meta['torch']}\n\n"
          f"`{meta['command']}`\n\nlocal backends: {backends}\n\n" + table(rows))
    return report.write_json_and_markdown(Path(__file__).resolve().parent / "results",
                                          f"gpu_smoke-{stamp}", dict(**meta, rows=rows), md)


def main(args) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    for run in runs(world, args):
        if run.mesh is not None and run.mesh not in MESHES:
            MESHES[run.mesh] = init_device_mesh(args.device, run.mesh, mesh_dim_names=("ring", "ulysses"))
    usable = backend_report(_device(args), torch.bfloat16, args.head_dim)
    chosen = [b for b in args.backend or [None] if b is None or usable.get(b) == "ok"]
    skipped = sorted(set(args.backend or []) - set(chosen))
    rows, cache = [], {}
    for backend in chosen:
        for run in runs(world, args):
            rows.append(check(run, args, backend, cache))
    if rank == 0:
        print(f"local attention backends for bf16, head dim {args.head_dim}: {usable}")
        if skipped:
            print(f"skipped (not usable here): {skipped}")
        print(table(rows))
        print(f"written: {write_results(rows, args, usable)}")
    failed = [r["run"] for r in rows if not r["ok"]]
    if failed and rank == 0:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="processes to spawn (default: all GPUs)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=4096, help="padded global length (multiple of 2·GPUs)")
    p.add_argument("--pad", type=int, default=37, help="padding of the padded runs")
    p.add_argument("--backend", type=lambda s: s.split(","), default=None,
                   help="comma list of local backends to run everything with (default: automatic)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: gloo on CPU, only to check this script itself")
    return p.parse_args(argv)


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    sys.exit(_run_in_group(args))


def _device(args) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def _run_in_group(args) -> int:
    if args.device == "cuda":
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    try:
        return main(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    args = parse_args()
    if "RANK" in os.environ:  # under torchrun
        sys.exit(_run_in_group(args))
    world = args.nproc or torch.cuda.device_count()
    if world < 2:
        sys.exit(f"needs at least 2 processes (GPUs), found {torch.cuda.device_count()} GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        torch.multiprocessing.spawn(_worker, args=(world, port, args), nprocs=world)
    except torch.multiprocessing.ProcessExitedException as e:
        sys.exit(f"a rank failed: {e}")
