"""One rank's side of bench/attention.py: the process groups and meshes, every system's callable,
one config timed (`timing.measure`, back to back) or checked for accuracy, and the agreement of
all ranks on its outcome, so that every rank takes the same path after a failure.
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_peers as peers
import timing
from attention_configs import (OURS, ORDER, Config, PlanOptions, Shape, base_row, estimate_iter_s,
                               group_sizes, iterations, systems_at)

ERRORS = ("out", "dq", "dk", "dv")


class Bench:
    """Process groups, meshes and the systems' callables for one rank (the process group is up)."""

    def __init__(self, args, shape: Shape, opts: PlanOptions):
        from torch.distributed.device_mesh import init_device_mesh

        from seqshard.runtime import select_backend

        self.args, self.shape, self.opts = args, shape, opts
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda"
                       else torch.device("cpu"))
        self.meshes, self.groups = {}, {}
        for n in group_sizes(self.world, opts.ns):
            if n > 1:
                mesh = init_device_mesh(args.device, (self.world // n, n),
                                        mesh_dim_names=("rep", "cp"))
                self.meshes[n], self.groups[n] = mesh["cp"], mesh.get_group("cp")
        self.hybrid = None
        if 4 in self.groups:
            m = init_device_mesh(args.device, (self.world // 4, 2, 2),
                                 mesh_dim_names=("rep", "ring", "ulysses"))
            self.hybrid = (m.get_group("ring"), m.get_group("ulysses"))
        self.backend = select_backend(self.device, torch.bfloat16, shape.head_dim)
        self.kernel_backends = peers.sdpa_backends(self.backend, self.device)  # the ideal, the yardstick
        self.peer_backends = (peers.sdpa_backends_named(args.peer_sdpa) if args.peer_sdpa
                              else self.kernel_backends)
        self.deepspeed = self.deepspeed_error = None  # imported at the first DeepSpeed config

    def versions(self) -> dict:
        """The report's description of the machine and the local kernels."""
        meta = {"torch": torch.__version__, "cuda": torch.version.cuda}
        if self.args.device == "cuda":
            meta["device"] = torch.cuda.get_device_name()
            meta["cudnn"] = torch.backends.cudnn.version()
            try:
                meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception as exc:
                meta["nccl"] = f"unknown ({exc})"
        else:
            meta["device"] = "cpu (script check only)"
        meta["local_backend"] = self.backend
        meta["kernel_sdpa_backends"] = peers.sdpa_label(self.kernel_backends)
        meta["peer_sdpa_backends"] = peers.sdpa_label(self.peer_backends)
        meta["deepspeed"] = self.deepspeed
        return meta

    # -- inputs and systems ------------------------------------------------------------------

    def random_inputs(self, system, n, seq, kv, seed):
        """Local shards (random, not zeros) in the system's layout, leaves requiring grad."""
        h, e, s = self.shape.heads, self.shape.head_dim, seq // n
        q_shape, kv_shape = ((1, s, h, e), (1, s, kv, e)) if system == "ds-ulysses" else \
            ((1, h, s, e), (1, kv, s, e))
        gen = torch.Generator(self.device).manual_seed(seed)

        def randn(shape):
            return torch.randn(shape, generator=gen, device=self.device, dtype=torch.bfloat16)

        q, k, v, dout = randn(q_shape), randn(kv_shape), randn(kv_shape), randn(q_shape)
        return [x.requires_grad_() for x in (q, k, v)], dout

    def attention_fn(self, system: str, n: int):
        """fn(q, k, v) -> out in the system's layout, and a context to run it in."""
        from seqshard.runtime import (allgather_attention, hybrid_attention, local_attention,
                                      ring_attention, tokenring_attention, ulysses_attention)

        group = self.groups.get(n)
        kw = dict(causal=True, order=ORDER[system])
        stride = self.args.allgather_head_stride or None
        ours = {
            "ours-local": lambda q, k, v: local_attention(q, k, v, causal=True),
            "ring": lambda q, k, v: ring_attention(q, k, v, group, **kw),
            "ulysses": lambda q, k, v: ulysses_attention(q, k, v, group, **kw),
            # copy-engine exchanges (runtime/peer.py), pipelined over head chunks
            "ulysses-peer": lambda q, k, v: ulysses_attention(q, k, v, group, transport="peer", **kw),
            "allgather": lambda q, k, v: allgather_attention(q, k, v, group, head_stride=stride, **kw),
            "tokenring": lambda q, k, v: tokenring_attention(q, k, v, group, **kw),
            "hybrid": lambda q, k, v: hybrid_attention(q, k, v, *self.hybrid, **kw),
        }
        if system in ours:
            return ours[system], contextlib.nullcontext()
        if system == "sdpa":
            def sdpa(q, k, v):
                rep = q.shape[1] // k.shape[1]
                with sdpa_kernel(self.kernel_backends, set_priority=True):
                    return F.scaled_dot_product_attention(q, peers.expand(k, rep),
                                                          peers.expand(v, rep), is_causal=True)
            return sdpa, contextlib.nullcontext()
        if system in ("cp-allgather", "cp-alltoall"):
            rotate = system.split("-")[1]
            return peers.cp_attention(self.meshes[n], rotate, self.peer_backends, self.device)
        if system == "ds-ulysses":
            return peers.ds_ulysses_attention(group, self.peer_backends), contextlib.nullcontext()
        raise ValueError(f"unknown system {system!r}")

    def ensure_deepspeed(self):
        """DeepSpeed imported and its comm initialized, once; a failure is remembered, so later
        DeepSpeed configs fail fast with the same message."""
        if self.deepspeed_error is not None:
            raise RuntimeError(self.deepspeed_error)
        if self.deepspeed is None:
            try:
                self.deepspeed = peers.import_deepspeed(self.device, dist.get_backend())
            except Exception as exc:
                self.deepspeed_error = f"DeepSpeed unavailable: {describe(exc)}"
                raise RuntimeError(self.deepspeed_error) from exc
        return self.deepspeed

    # -- one config, agreed across ranks -------------------------------------------------------

    def agree(self, err: str | None, payload):
        """Every rank's outcome → one status: ok only if all ranks are ok."""
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (err, payload))
        errors = [e for e, _ in gathered if e]
        if errors:
            return "error", errors[0], None
        return "ok", None, [p for _, p in gathered]

    def run(self, cfg: Config) -> list[dict]:
        """The config's rows, the same on every rank: one timing row (the slowest rank's median),
        or an accuracy row per system. A failure on any rank is an error row."""
        if cfg.system == "accuracy":
            try:
                new = self.accuracy(cfg)
            except Exception as exc:  # the shared part (reference, yardstick): no collectives
                free()
                _, error, _ = self.agree(describe(exc), None)
                new = [base_row(cfg, self.shape, "error", error)]
            for r in new:
                r["config"] = cfg.key
            return new
        start = time.monotonic()
        try:
            result, err = self.measure(cfg), None
        except Exception as exc:
            result, err = None, describe(exc)
            if self.args.verbose:
                traceback.print_exc()
        free()
        status, error, per_rank = self.agree(err, result)
        row = base_row(cfg, self.shape, status, error)
        row["backend"] = (self.backend if cfg.system in (*OURS, "ours-local")
                          else peers.sdpa_label(self.kernel_backends) if cfg.system == "sdpa"
                          else peers.sdpa_label(self.peer_backends))
        if status == "ok":  # timing.measure's slowest="median", across the agreement
            slowest = max(per_rank, key=lambda p: p["median_ms"])
            row.update(median_ms=slowest["median_ms"], times_ms=slowest["times_ms"],
                       median_ms_ranks=[p["median_ms"] for p in per_rank],
                       peak_mem_gib=max((p["peak_mem_gib"] or 0) for p in per_rank) or None,
                       warmup=slowest["warmup"], reps=slowest["reps"],
                       sdpa_ops=per_rank[0]["sdpa_ops"])
        row["wall_s"] = round(time.monotonic() - start, 2)
        return [row]

    def measure(self, cfg: Config) -> dict:
        """This rank's median, times and peak memory for one config (raises on failure)."""
        if cfg.system == "ds-ulysses":
            self.ensure_deepspeed()
        fn, ctx = self.attention_fn(cfg.system, cfg.n)
        seed = self.args.seed * 1009 + self.rank
        inputs, dout = self.random_inputs(cfg.system, cfg.n, cfg.seq, cfg.kv_heads, seed)
        backward = cfg.mode == "fwdbwd"

        def step():
            out = fn(*inputs)
            if backward:
                out.backward(dout)
            for x in inputs:
                x.grad = None

        warmup, reps = iterations(estimate_iter_s(cfg, self.shape))
        profiled = cfg.tier == "headline"  # the first warm-up runs under the CPU profiler
        cuda = self.device.type == "cuda"
        with ctx:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()
            ops = sdpa_ops_of(step) if profiled else None
            timed = timing.measure(step, warmup=warmup - (1 if profiled else 0), repeats=reps,
                                   device=self.device, back_to_back=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return {"median_ms": timed.median_ms, "times_ms": timed.times_ms, "peak_mem_gib": peak,
                "warmup": warmup, "reps": reps, "sdpa_ops": ops}

    # -- the accuracy check ------------------------------------------------------------------

    def accuracy(self, cfg: Config) -> list[dict]:
        """Every system at n, bf16, on one set of global inputs: errors of out, dq, dk, dv against
        an fp32 reference, next to those of single-GPU bf16 SDPA (the yardstick)."""
        h, e, s, kv, n = self.shape.heads, self.shape.head_dim, cfg.seq, cfg.kv_heads, cfg.n
        gen = torch.Generator(self.device).manual_seed(self.args.seed + kv)  # same on every rank
        q, k, v, dout = (torch.randn(shape, generator=gen, device=self.device)
                         for shape in ((1, h, s, e), (1, kv, s, e), (1, kv, s, e), (1, h, s, e)))
        ref = reference_fp32(q, k, v, dout)
        yard = [rel(a, b) for a, b in zip(sdpa_bf16(q, k, v, dout, self.kernel_backends), ref)]
        rows = []
        for system in systems_at(n):
            if self.opts.systems is not None and system not in self.opts.systems:
                continue
            start = time.monotonic()
            try:
                if system == "ds-ulysses":
                    self.ensure_deepspeed()
                got = self._run_global(system, n, q, k, v, dout)
                errors, err = [rel(a, b) for a, b in zip(got, ref)], None
                del got
            except Exception as exc:  # recorded; every rank reaches `agree` below
                errors, err = None, describe(exc)
            free()
            status, error, per_rank = self.agree(err, errors)
            row = {**base_row(cfg, self.shape, status, error), "key": f"{cfg.key}-{system}",
                   "system": system, "order": ORDER[system], "backend": self.backend,
                   "wall_s": round(time.monotonic() - start, 2)}
            if status == "ok":
                errs = per_rank[0]
                row["errors"] = dict(zip(ERRORS, errs))
                row["sdpa_bf16"] = dict(zip(ERRORS, yard))
                row["ok"] = all(a <= 2 * b for a, b in zip(errs, yard)) and all(a == a for a in errs)
            rows.append(row)
        return rows

    def _run_global(self, system, n, q, k, v, dout):
        """Shard global fp32 inputs into the system's layout, run it in bf16 forward + backward,
        and return out, dq, dk, dv gathered back to global [b, h, s, e]."""
        from seqshard.runtime import layout

        group = self.groups[n]
        r = group.rank()
        order = ORDER[system]
        bshd = system == "ds-ulysses"

        def shard(x):
            if bshd:
                return x.transpose(1, 2).chunk(n, dim=1)[r].contiguous()
            return layout.shard(x, 2, order, r, n)

        def unshard(x):
            if bshd:
                return gather(x.contiguous(), 1, group).transpose(1, 2)
            return layout.unshard(gather(x.contiguous(), 2, group), 2, order, n)

        fn, ctx = self.attention_fn(system, n)
        ql, kl, vl = (shard(x).to(torch.bfloat16).requires_grad_() for x in (q, k, v))
        with ctx:
            out = fn(ql, kl, vl)
            out.backward(shard(dout).to(torch.bfloat16))
        with torch.no_grad():
            return [unshard(t.detach()).float() for t in (out, ql.grad, kl.grad, vl.grad)]


# ---------------------------------------------------------------------------------------------
# Reference, yardstick and small helpers
# ---------------------------------------------------------------------------------------------

def reference_fp32(q, k, v, dout):
    """fp32 attention forward + backward (SDPA math kernel), a few heads at a time."""
    h, kv = q.shape[1], k.shape[1]
    rep = h // kv
    step = max(1, 8 // rep)  # kv heads per chunk: 8 query heads
    outs = [[], [], [], []]
    for j in range(0, kv, step):
        qs = slice(j * rep, (j + step) * rep)
        kvs = slice(j, j + step)
        qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q[:, qs], k[:, kvs], v[:, kvs]))
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qc, peers.expand(kc, rep), peers.expand(vc, rep),
                                               is_causal=True)
        o.backward(dout[:, qs])
        for acc, t in zip(outs, (o, qc.grad, kc.grad, vc.grad)):
            acc.append(t.detach())
    return [torch.cat(acc, dim=1) for acc in outs]


def sdpa_bf16(q, k, v, dout, backends):
    """Single-GPU bf16 SDPA (the best kernel, as a user calls it) forward + backward."""
    rep = q.shape[1] // k.shape[1]
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    with sdpa_kernel(backends, set_priority=True):
        o = F.scaled_dot_product_attention(qb, peers.expand(kb, rep), peers.expand(vb, rep),
                                           is_causal=True)
    o.backward(dout.to(torch.bfloat16))
    return [t.detach().float() for t in (o, qb.grad, kb.grad, vb.grad)]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gather(x, dim: int, group):
    n = group.size()
    buf = x.new_empty((n * x.shape[0], *x.shape[1:]))  # rank-major along dim 0 (gloo wants this)
    dist.all_gather_into_tensor(buf, x.contiguous(), group=group)
    return buf.unflatten(0, (n, x.shape[0])).movedim(0, dim).flatten(dim, dim + 1)


def sdpa_ops_of(step) -> list[str]:
    """Run `step` under the CPU profiler; the attention kernels (aten ops) it called."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "flash_attn" in n
                  or n.startswith(("aten::_flash_attention", "aten::_efficient_attention")))


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:600]


def free():
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
