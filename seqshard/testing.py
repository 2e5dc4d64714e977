"""A pool of distributed worker processes that runs many test cases.

Starting a process group costs seconds per process on a small CI machine, so tests start the
workers once per module and send them cases:

    pool = WorkerPool(world_size=4)            # spawns 4 processes, gloo on CPU
    results = pool.run(check_ring, 128, True)  # calls check_ring(128, True) on every rank
    pool.close()

`fn` must be importable by name (a module-level function). Each rank's return value comes back in
rank order. If any rank raises, `run` raises `WorkerError` with that rank's traceback. If a case
does not finish within `timeout` seconds (a collective that never matches hangs forever), the pool
kills its workers and raises; the next `run` starts fresh workers.

Inside a case, `torch.distributed` is initialized (gloo on CPU; with `backend="nccl"` each
rank has its own GPU), and `mesh(shape, names)` gives a cached `DeviceMesh` (creating
sub-groups is collective and slow, so each shape is built once per worker).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

__all__ = ["WorkerPool", "WorkerError", "mesh", "assert_sharded_exact", "rel", "record_step",
           "attention_layers", "attention_layers_problem"]


class WorkerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, inbox, outbox) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int, *, backend: str = "gloo", timeout: float = 300.0):
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self.backend,
                                              self._inboxes[r], self._outbox), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> list:
        """Call `fn(*args, **kwargs)` on every rank; return the results in rank order."""
        import queue

        if not self._procs:
            self._start()
        for box in self._inboxes:
            box.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(results) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._outbox.get(timeout=self.timeout)
            except queue.Empty:
                self.close(kill=True)
                raise WorkerError(
                    f"{fn.__name__} did not finish on ranks "
                    f"{sorted(set(range(self.world_size)) - set(results) - set(errors))} within "
                    f"{self.timeout:.0f} s (a collective that never matched?); workers restarted"
                ) from None
            (results if ok else errors)[rank] = value
        if errors:
            rank = min(errors)
            raise WorkerError(f"{fn.__name__} failed on rank {rank} of {self.world_size}:\n{errors[rank]}")
        return [results[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        for p, box in zip(self._procs, getattr(self, "_inboxes", [])):
            if not kill and p.is_alive():
                box.put(None)
        for p in self._procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
        self._procs = []


_MESHES: dict = {}


def mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    """A DeviceMesh over the whole world on the current device type, cached per worker."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    key = (tuple(shape), tuple(names))
    if key not in _MESHES:
        device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        _MESHES[key] = init_device_mesh(device, tuple(shape), mesh_dim_names=tuple(names))
    return _MESHES[key]


def assert_sharded_exact(cases: list, per_rank: list[list[dict]], tol: float = 1e-5) -> None:
    """Every case's every output exact across ranks: each rank reports, per case and output name,
    (sum of squared errors of its shard, sum of squared reference values); the relative error is
    over the whole tensor, sqrt(Σ err) / sqrt(Σ ref). NaN fails. Raises one AssertionError that
    lists every mismatch."""
    import math

    failures = []
    for i, case in enumerate(cases):
        for name in per_rank[0][i]:
            err = sum(rank_results[i][name][0] for rank_results in per_rank)
            ref = sum(rank_results[i][name][1] for rank_results in per_rank)
            rel = math.sqrt(err) / max(math.sqrt(ref), 1e-30)
            if not rel <= tol:  # also catches nan
                failures.append(f"{case}: {name} relative error {rel:.2e}")
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures)


def rel(a, b) -> float:
    """Relative error of `a` against the reference `b`: |a - b| / |b| (Frobenius norms)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def record_step(worst: dict, step: int, model, ref, loss, loss_ref, optimizers) -> None:
    """After both backwards of one training step: the error of the loss and of every gradient
    of `model` against `ref`, then one step of each optimizer and the error of every parameter,
    into `worst` (keys `loss@0`, `grad layers.0.w@0`, `param layers.0.w@0`, ...)."""
    worst[f"loss@{step}"] = rel(loss, loss_ref)
    pairs = list(zip(model.named_parameters(), ref.named_parameters()))
    for (n, p), (_, pr) in pairs:
        worst[f"grad {n}@{step}"] = rel(p.grad, pr.grad)
    for opt in optimizers:
        opt.step()
        opt.zero_grad()
    for (n, p), (_, pr) in pairs:
        worst[f"param {n}@{step}"] = rel(p.detach(), pr.detach())


def attention_layers(n: int, d: int = 256, heads: int = 4):
    """`n` identical attention blocks `layers.0..n-1` (one layer class; LayerNorm, a fused qkv
    projection, causal SDPA, an output projection and a residual) ending in x².mean(): the
    small model the memory-formulation tests (recompute, offload, selective) plan at millions
    of tokens on the meta device, small enough that brute force can enumerate its plans."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = heads
            self.norm = nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            B, S, D = x.shape
            qkv = self.qkv(self.norm(x)).view(B, S, 3, self.heads, D // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(o.transpose(1, 2).reshape(B, S, D)) + x

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(n)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x.pow(2).mean()

    return Layers()


def attention_layers_problem(n: int = 4, tokens: int = 1 << 18, gpus: int = 8):
    """The planner's problem (`solver.build_problem`) for `attention_layers(n)` in bf16 at
    `tokens` on a 1-D mesh of `gpus` H200s, training, replicated state: what the brute-force
    checks of the memory formulation enumerate."""
    import torch

    from seqshard.capture import capture
    from seqshard.costmodel import Cluster
    from seqshard.dims import analyze
    from seqshard.solver import build_problem
    from seqshard.strategies import Costs

    with torch.device("meta"):
        model = attention_layers(n).to(torch.bfloat16)
        x = torch.empty(1, tokens, 256, dtype=torch.bfloat16)
    dims = analyze(capture(model, (x,)), axes={"x": "b s d"})
    mesh = (("sp", gpus),)
    costs = Costs(dims, Cluster.preset("h200", gpus=gpus), mesh, training=True, dtype_bytes=2)
    return build_problem(dims, costs, mesh, None, "replicated")
