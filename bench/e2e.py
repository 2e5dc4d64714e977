"""End-to-end long-context training on 4 GPUs: seqshard's own plan against native PyTorch
(FSDP2 + context parallel + full activation checkpointing, the torchtitan recipe), measured in
the same run, on the Llama-3-8B shape (seqshard/models `llama3-8b`), one sequence per step.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python bench/e2e.py --ranks 4 \\
        --seqs 128K,256K --budget-s 540                     # the sweep (default lengths below)
    ... python bench/e2e.py --ranks 4 --seqs 512K --systems seqshard --budget-s 560
    ... python bench/e2e.py --ranks 4 --no-sweep --loss --loss-steps 100 --budget-s 560
    python bench/e2e.py --plan-only --ranks 4           # CPU: seqshard's plans at every length
    python bench/e2e.py --smoke --ranks 2               # CPU, gloo, `tiny`: every path, ~30 s

The script launches its own ranks (`torch.distributed.run --standalone`, --ranks of them) when
it is not already under torchrun; `torchrun --nproc-per-node 4 bench/e2e.py ...` works too. It
sets the three NVLink-multicast variables above itself (before torch loads) when they are
missing, and refuses to run with any of them set otherwise (the lent machines keep NVLS off);
it sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for both systems unless another value
is given (seqshard's long plans need it: planner/parallel.py `_warn_fragmentation`).

What fits in one call of 600 s (the plans' predictions for 4 H200s, `--plan-only`: step 10.3 s
at 128K, 35 s at 256K, 129 s at 512K, 501 s at 1M, 2250 s at 2M; native 14.5 s at 128K and out
of memory at 256K, shared/ANCHORS.md): 128K and 256K for both systems in one call, 512K
(seqshard) in a second; 1M and 2M do not fit a call (a cold step and the start-up pass 600 s)
and are `not run` unless --budget-s allows them. --layers L runs an L-layer model of the same
width (every row says `layers`), e.g. to see what runs at 1M/2M within a call.

Systems (the same model, the same initial weights, the same tokens; a step is zero_grad,
forward, backward, AdamW step, one sequence of S tokens):

    native    torchtitan's recipe: fp32 parameters; every block under activation
              checkpointing (checkpoint_wrapper, non-reentrant), then `fully_shard` per block
              and on the root, `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`;
              `context_parallel` over the mesh with the token ids, labels and the rotary cos/sin
              as its buffers (sequence dims 1, 1, 0, 0; causal load balancing), rotate method
              --cp-rotate (torchtitan's default "allgather"); forward and backward inside the
              context; LM head + F.cross_entropy on fp32 logits of the local tokens (the mean
              over equal local counts: FSDP's averaged reduction makes it the global mean);
              `torch.optim.AdamW(fused=True)` in fp32. The lengths run in order and native
              stops at the first that runs out of memory (an `oom` row).
              --smoke: PyTorch's context parallel has no CPU attention rule (aten.
              _scaled_dot_product_flash_attention_for_cpu has no sharding strategy), so the CPU
              check runs native without it: every rank the whole sequence (the same loss and
              gradients); the CUDA path always uses it.
    seqshard  the planner's own plan, no overrides: rank 0 plans the bf16 model (meta device)
              with model_state ("replicated", "sharded") - what parallelize's "auto" plans -
              and optimizer="adamw" (fp32 master state, as native) for the
              H200 preset at the world size, local attention priced at the kernel the runtime
              runs here (as `parallelize` prices it when it plans) and compile/kernels "auto"
              (on for CUDA); every rank then runs `parallelize(model, (ids, labels), plan=...,
              model_state="auto", mixed_precision=MixedPrecisionPolicy(bf16, fp32))` with the
              default compile/kernels (the plan is made outside `parallelize` only because the
              model it runs holds fp32 master parameters, and a plan priced on an fp32 capture
              would price fp32 compute). Where the plan chooses replicated state, the model is
              built in the compute dtype (seqshard's mixed precision is FSDP2's) and the row says
              so. AdamW(fused=True). Stops at the first length that runs out of memory or is
              infeasible. The row keeps the plan's hash, its printed table (JSON), a summary
              (the algorithm of each attention, the memory strategies: bench/memory.py's
              `memory_strategies`), its prediction (`plan.predicted.step_s`,
              `.peak_memory_bytes`) against the measurement. --compile off / --kernels off:
              eager / no fused loss (both planned and run so). --smoke plans under a budget of
              SMOKE_BUDGET_MIB, so that `tiny` splits its sequence (all-gather over s).

Measured, per configuration: one untimed warm-up step (AdamW's state, the first all-gathers,
seqshard's compile), `torch.cuda.reset_peak_memory_stats`, then --repeats timed steps
(`timing.measure`, isolated, `slowest="median"`: the slowest rank's median). A configuration
whose estimated step (bench/memory.py's estimate at 30% MFU) passes --cold-s runs no warm-up:
AdamW's state is made by a step of zero gradients at lr 0, then one timed, cold step (the row
says `cold`: for seqshard it includes compiling). Peak: torch.cuda.max_memory_allocated, the
largest over ranks, over the timed steps (`peak_gib`, what the plan predicts) and over the whole
configuration (`peak_all_gib`). native's prediction: the cost model's plan of the same model
with every layer recomputed, its attention all-gather (or ring for --cp-rotate alltoall) and
sharded state (`memory` says so); no budget.

Definitions (bench/memory.py's): model FLOPs per step = 6·N·S + 6·L·S²·d (N the multiplying
parameters, LM head counted; causal attention; no recompute counted); tokens/s = S / step;
MFU = model FLOPs / step / (world × 989 TFLOP/s). The summary gives, per system, the longest
length that trained and its tokens/s and MFU.

Loss check (--loss): --loss-steps N (default 100) steps at --loss-seq (128K) on a token stream
from a fixed seed (the GPU machine has no network, so no dataset: a Zipf(1.1) unigram draw over
the vocabulary with copied spans - 25% of each sequence repeats earlier 64-token spans - so that
the loss falls as the model learns frequencies and copying), AdamW lr --lr, three runs from the
same initial weights:
    A  seqshard, its own plan at the world size (as above)
    B  the reference: native FSDP2 + context parallel (all-gather rotate) - a sequence-parallel
       degree of 1 is not possible here: the 8B shape at 128K with fp32 master state does not fit
       one GPU, so the reference is PyTorch's own implementation of the same step, whose
       arithmetic differs from seqshard's only in the order of bf16 operations
    C  the noise floor: native with the other rotate method (all-to-all), the same mathematics
       in another order of summation: how far two correct bf16 runs drift apart (--no-floor
       skips it; the CPU smoke has no CP, so C would equal B and is skipped)
Rule "within bf16 noise" (the accuracy rule of shared/STYLE.md, flash-attention's: at most twice
the error of PyTorch's own at the same precision): max_k |A_k - B_k| <= 2 * max(F, u * median_k
B_k), F = max_k |C_k - B_k| the floor (0 without C) and u the unit roundoff of the compute dtype
(bf16: 2^-8; --smoke's fp32: 1e-5, the tests' tolerance). The three runs share the budget: each
gets a third (half without C) and the comparison covers the steps all of them finished
(`steps_compared`).

Robustness: every configuration runs in a try on every rank, and the ranks agree on its outcome
(all_gather_object) before the next; out of memory is an `oom` row, planning infeasible an
`infeasible` row, another exception an `error` row with its traceback. A hang (a collective one
rank never reaches) trips bench/watchdog.py after 3 × the estimate + 120 s: rank 0 records a
`timeout` row and the process exits. --budget-s counts from the start: a configuration whose
estimate does not fit what is left is `not run`. Results are written by rank 0 after every
configuration as e2e-<stamp>.json and .md under --out (default $OUT, else bench/results/;
--smoke: a temporary folder). Progress lines carry the UTC time.
"""

from __future__ import annotations

import os
import time

_T0 = time.monotonic()  # --budget-s counts from here

NVLS_OFF = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
for _k, _v in NVLS_OFF.items():  # before torch / NCCL load
    if os.environ.setdefault(_k, _v) != _v:
        raise SystemExit(f"bench/e2e.py: {_k}={os.environ[_k]}; the lent machines need {_k}={_v}")
# both systems under the allocator seqshard's long plans need (planner/parallel.py
# _warn_fragmentation); another setting given is kept and recorded
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from memory import (GIB, PEAK_FLOPS, _count, _count_str, _f, build_model,  # noqa: E402
                    flops_per_step, make_optimizer_state, memory_strategies)

SYSTEMS = ("native", "seqshard")
DEFAULT_SEQS = "128K,256K,512K,1M,2M"
SMOKE_SEQS = "64,128"
SMOKE_BUDGET_MIB = {2: 0.8, 4: 0.5}
"""--smoke's planner budget by rank count: below `tiny`'s peak at 128 tokens unsplit, so that the
CPU check runs a plan that splits the sequence (all-gather over s, sharded state)."""
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp32": 1e-5}


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC] {msg}", flush=True)


# ------------------------------------------------------------------ one rank's context
@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    cfg: object              # LlamaConfig
    mesh: object             # DeviceMesh "sp" over every rank
    device: object           # torch.device
    cdtype: object           # compute dtype: bf16 on CUDA, fp32 on --smoke's CPU
    world: int
    rank: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def estimate_s(ctx: Ctx, seq: int) -> float:
    """A rough step time (30% MFU + 33% recompute), only for the budget and the watchdog."""
    if ctx.args.smoke:
        return 1.0
    flops, _ = flops_per_step(ctx.cfg, seq)
    return 1.33 * flops / (0.30 * PEAK_FLOPS * ctx.world)


def tokens(cfg, seq: int, step: int, device, seed: int = 1234):
    """(ids, labels) of `step` of the fixed synthetic stream (module docstring): Zipf(1.1)
    unigrams over the vocabulary, a quarter of each sequence copied from earlier 64-token spans;
    the same on every rank (a CPU generator seeded by (seed, step))."""
    import torch

    gen = torch.Generator().manual_seed(seed * 100003 + step)
    weights = 1.0 / torch.arange(1, cfg.vocab + 1, dtype=torch.float64) ** 1.1
    # the ranks of a random permutation of the vocabulary, so that frequent ids are spread
    order = torch.randperm(cfg.vocab, generator=torch.Generator().manual_seed(seed))
    stream = order[torch.multinomial(weights, seq + 1, replacement=True, generator=gen)]
    span = min(64, max(1, seq // 8))
    for _ in range((seq + 1) // (4 * span)):
        dst = int(torch.randint(span, seq + 1 - span + 1, (1,), generator=gen))
        src = int(torch.randint(0, dst - span + 1, (1,), generator=gen))
        stream[dst:dst + span] = stream[src:src + span].clone()
    stream = stream.to(device)
    return stream[None, :-1].contiguous(), stream[None, 1:].contiguous()


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch_cuda().empty_cache()
        torch_cuda().reset_peak_memory_stats()


def torch_cuda():
    import torch

    return torch.cuda


def peak_max(ctx: Ctx) -> float | None:
    """torch.cuda.max_memory_allocated, the largest over ranks, in GiB (None on CPU)."""
    if not ctx.cuda:
        return None
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(torch.cuda.max_memory_allocated())], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() / GIB


def rotary(inv_freq, seq: int, device, dtype):
    """cos, sin [S, e] of the global positions (Llama.forward's, built outside the model so that
    context parallel can shard them as buffers)."""
    import torch

    pos = torch.arange(seq, device=device)
    freqs = torch.outer(pos.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ------------------------------------------------------------------ native
def native_module(model):
    """The root FSDP2 unit: embedding, checkpointed blocks, norm, LM head, loss; takes the
    rotary cos/sin as inputs (context parallel shards them with the tokens)."""
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Native(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.embed, self.norm, self.lm_head = m.embed, m.norm, m.lm_head
            self.layers = nn.ModuleList(checkpoint_wrapper(layer) for layer in m.layers)

        def forward(self, ids, labels, cos, sin):
            x = self.embed(ids)                                   # [b, s/N, d]
            for layer in self.layers:
                x = layer(x, cos.to(x.dtype), sin.to(x.dtype))
            logits = self.lm_head(self.norm(x))                   # [b, s/N, v]
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return Native(model)


def native_setup(ctx: Ctx, seq: int, rotate: str):
    """The native model (fp32 parameters, FSDP2 in mixed precision), its AdamW and a step
    function step(ids, labels) -> loss (the global mean, detached)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = build_model(ctx.cfg, ctx.device, torch.float32)
    cos_all, sin_all = rotary(model.inv_freq, seq, ctx.device, ctx.cdtype)
    native = native_module(model)
    del model
    policy = MixedPrecisionPolicy(param_dtype=ctx.cdtype, reduce_dtype=torch.float32)
    for layer in native.layers:
        fully_shard(layer, mesh=ctx.mesh, mp_policy=policy)
    fully_shard(native, mesh=ctx.mesh, mp_policy=policy)
    opt = torch.optim.AdamW(native.parameters(), lr=ctx.args.lr, fused=ctx.cuda)

    def step(ids, labels):
        # context parallel shards its buffers in place: fresh copies every step
        ids, labels, cos, sin = (t.clone() for t in (ids, labels, cos_all, sin_all))
        opt.zero_grad(set_to_none=True)
        with _cp(ctx, rotate, [ids, labels, cos, sin]):
            loss = native(ids, labels, cos, sin)
            loss.backward()
        opt.step()
        loss = loss.detach().clone()
        if ctx.cuda:  # the local mean of equal shares: the global mean is their average
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss

    return native, opt, step


def _cp(ctx: Ctx, rotate: str, buffers):
    """PyTorch context parallel over the mesh (CUDA); --smoke's CPU: none (module docstring)."""
    import contextlib

    if not ctx.cuda:
        return contextlib.nullcontext()
    from attention_peers import _restore_sdpa
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(rotate)

    @contextlib.contextmanager
    def cp():
        try:
            with context_parallel(ctx.mesh, buffers=buffers, buffer_seq_dims=[1, 1, 0, 0],
                                  no_restore_buffers=set(buffers)):
                yield
        finally:
            _restore_sdpa()
    return cp()


def native_prediction(ctx: Ctx, seq: int, rotate: str) -> dict:
    """The cost model's figures for native's configuration (module docstring)."""
    import torch

    from seqshard.models import llama
    from seqshard.planner import plan as make_plan

    algorithm = "allgather" if rotate == "allgather" else "ring"
    ov = {"*": f"split:s {algorithm} zigzag", "layers.*": "recompute"}
    with torch.device("meta"):
        meta = llama.Llama(ctx.cfg).to(ctx.cdtype)
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    p = make_plan(meta, (ids, ids), mesh=(("sp", ctx.world),), overrides=ov, memory_budget=1e15,
                  optimizer="adamw", model_state="sharded")
    return dict(predicted_step_s=p.predicted.step_s,
                predicted_peak_gib=p.predicted.peak_memory_bytes / GIB,
                prediction_overrides=ov, memory=memory_strategies(p))


# ------------------------------------------------------------------ seqshard
def seqshard_plan(ctx: Ctx, seq: int):
    """Rank 0 plans the bf16 model on the meta device as `parallelize` would (module docstring);
    every rank gets the plan. A planning error is raised on every rank."""
    import torch
    import torch.distributed as dist

    from seqshard.capture import capture
    from seqshard.dims import analyze
    from seqshard.models import AXES, llama
    from seqshard.planner import Plan, state
    from seqshard.planner.api import plan_captured
    from seqshard.planner.parallel import resolve_auto, runtime_attention_pricing

    msg = [None, None]
    if ctx.rank == 0:
        try:
            with torch.device("meta"):
                meta = llama.Llama(ctx.cfg).to(ctx.cdtype)
            ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
            dims = analyze(capture(meta, (ids, ids)), AXES["llama"])
            priced, note = runtime_attention_pricing(dims, None, ctx.world, ctx.device)
            compile, kernels = resolve_auto(*build_options(ctx), ctx.device.type)
            budget = ctx.args.budget_gib * GIB if ctx.args.budget_gib else None
            p = plan_captured(dims, mesh=(("sp", ctx.world),), cluster=priced,
                              model_state=state.MODEL_STATES, optimizer="adamw", compile=compile, kernels=kernels,
                              memory_budget=budget)
            if note:
                p = dataclasses.replace(p, notes=(*p.notes, note))
            msg[0] = p.with_axes(AXES["llama"]).to_json()
        except Exception as e:  # noqa: BLE001 - sent to every rank
            msg[1] = (type(e).__name__, str(e))
            if ctx.world == 1:
                raise
    dist.broadcast_object_list(msg, src=0)
    if msg[1] is not None:
        from seqshard.solver import Infeasible

        kind, text = msg[1]
        raise (Infeasible if kind == "Infeasible" else RuntimeError)(f"{kind}: {text}")
    return Plan.from_json(msg[0])


def build_options(ctx: Ctx) -> tuple:
    """(compile, kernels) as --compile / --kernels say: "auto" or off."""
    return tuple("auto" if v == "auto" else False for v in (ctx.args.compile, ctx.args.kernels))


def seqshard_setup(ctx: Ctx, seq: int, plan):
    """The model in the plan's state, parallelized with the default compile/kernels; its AdamW
    and step(ids, labels) -> loss."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from seqshard.planner import parallelize

    sharded = plan.model_state == "sharded"
    model = build_model(ctx.cfg, ctx.device, torch.float32 if sharded else ctx.cdtype)
    ids, labels = tokens(ctx.cfg, seq, 0, ctx.device)
    policy = MixedPrecisionPolicy(param_dtype=ctx.cdtype, reduce_dtype=torch.float32) \
        if sharded else None
    compile, kernels = build_options(ctx)
    pm = parallelize(model, (ids, labels), mesh=ctx.mesh, plan=plan, model_state="auto",
                     mixed_precision=policy, compile=compile, kernels=kernels)
    opt = torch.optim.AdamW(model.parameters(), lr=ctx.args.lr, fused=ctx.cuda)

    def step(ids, labels):
        opt.zero_grad(set_to_none=True)
        loss = pm(ids, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return pm, opt, step


def plan_summary(plan) -> dict:
    return dict(plan=plan.hash(), model_state=plan.model_state,
                attention=sorted({f"{n.algorithm} [{n.split_str()}]" for n in plan.attention()}),
                memory=memory_strategies(plan), plan_text=str(plan),
                predicted_step_s=plan.predicted.step_s,
                predicted_peak_gib=plan.predicted.peak_memory_bytes / GIB)


# ------------------------------------------------------------------ one configuration
def measure_config(ctx: Ctx, system: str, seq: int, row: dict) -> None:
    """Build, warm up (or not: --cold-s), time; fills `row` (module docstring)."""
    import torch
    from timing import measure

    flops, n_mul = flops_per_step(ctx.cfg, seq)
    row.update(flops=flops, n_multiplying_params=n_mul)
    t0 = time.perf_counter()
    if system == "native":
        if ctx.rank == 0 and not ctx.args.no_predict:
            try:
                row.update(native_prediction(ctx, seq, ctx.args.cp_rotate))
            except Exception as e:  # noqa: BLE001 - the measurement goes on without it
                row["prediction_error"] = f"{type(e).__name__}: {e}"[:500]
        row.update(cp=f"context_parallel, rotate {ctx.args.cp_rotate}" if ctx.cuda
                   else "none (CPU: no context parallel)")
        model, opt, step = native_setup(ctx, seq, ctx.args.cp_rotate)
    else:
        plan = seqshard_plan(ctx, seq)
        row.update(plan_summary(plan), plan_s=time.perf_counter() - t0)
        _say(f"  plan {row['plan']}: {row['model_state']} state, {row['attention']}, "
             f"{ {k: v for k, v in row['memory'].items() if k != 'notes'} }; predicted step "
             f"{row['predicted_step_s']:.2f} s, peak {row['predicted_peak_gib']:.1f} GiB")
        if ctx.args.plan_only:
            row.update(status="planned")
            return
        if plan.model_state != "sharded":
            row["precision_note"] = (f"the plan chose {plan.model_state} state: parameters and "
                                     "AdamW in the compute dtype (no fp32 master)")
        model, opt, step = seqshard_setup(ctx, seq, plan)
    row["setup_s"] = time.perf_counter() - t0
    ids, labels = tokens(ctx.cfg, seq, 0, ctx.device)
    losses = []

    def one():
        losses.append(step(ids, labels))

    cold = estimate_s(ctx, seq) > ctx.args.cold_s
    row.update(cold=cold, warmup=0 if cold else 1)
    if cold:  # AdamW's state made at lr 0 with zero gradients: the timed step is a steady one
        make_optimizer_state(model, opt)
        repeats = 1
    else:
        t1 = time.perf_counter()
        one()
        if ctx.cuda:
            torch.cuda.synchronize()
        row["first_step_s"] = time.perf_counter() - t1
        _say(f"  warm-up step {row['first_step_s']:.2f} s")
        repeats = 1 if row["first_step_s"] > 20 and system == "native" else ctx.args.repeats
    row["peak_all_gib"] = peak_max(ctx)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    t = measure(one, repeats=repeats, device=ctx.device, slowest="median")
    step_s = t.median_ms / 1e3
    peak = peak_max(ctx)
    row.update(status="ok", repeats=repeats, step_s=step_s, times_ms=t.times_ms,
               tokens_per_s=seq / step_s, tflops_per_gpu=flops / step_s / ctx.world / 1e12,
               mfu=flops / step_s / (ctx.world * PEAK_FLOPS), loss=float(losses[-1]),
               peak_gib=peak, peak_all_gib=max(row["peak_all_gib"] or 0, peak or 0) or None)
    if row.get("predicted_step_s"):
        row["step_ratio"] = step_s / row["predicted_step_s"]
    if peak is not None and row.get("predicted_peak_gib"):
        row["peak_ratio"] = peak / row["predicted_peak_gib"]
    _say(f"  ok: {step_s:.3f} s/step, {seq / step_s:,.0f} tokens/s, MFU {100 * row['mfu']:.1f}%"
         + (f", peak {peak:.1f} GiB" if peak is not None else "")
         + (f" (predicted {row['predicted_step_s']:.2f} s, {row['predicted_peak_gib']:.1f} GiB)"
            if row.get("predicted_step_s") else ""))


def run_guarded(ctx: Ctx, fn, row: dict, dog, label: str, timeout: float) -> dict:
    """fn(row) in a try on every rank; the ranks agree on the outcome (the worst rank's row
    decides: oom/infeasible/error over ok)."""
    import torch
    import torch.distributed as dist

    from seqshard.solver import Infeasible

    t0 = time.perf_counter()
    dog.arm(timeout, label)
    try:
        fn(row)
    except torch.OutOfMemoryError as e:
        row.update(status="oom", reason=(str(e).splitlines() or ["out of memory"])[0][:400],
                   peak_at_oom_gib=torch.cuda.max_memory_allocated() / GIB if ctx.cuda else None)
    except Infeasible as e:
        row.update(status="infeasible", reason=str(e)[:1000])
    except Exception as e:  # noqa: BLE001 - a row, not a crash
        row.update(status="error", reason=f"{type(e).__name__}: {e}"[:2000],
                   traceback=traceback.format_exc()[-4000:])
    free(ctx)
    text = row.pop("plan_text", None)  # rank 0's is kept; not sent around
    every = [None] * ctx.world
    dist.all_gather_object(every, row)
    dog.disarm()
    bad = [r for r in every if r.get("status") not in ("ok", "planned")]
    out = dict(every[0], **({"plan_text": text} if text else {}))
    if bad:  # the first failing rank's account, and which ranks failed
        out.update({k: bad[0][k] for k in ("status", "reason", "traceback", "peak_at_oom_gib")
                    if k in bad[0]})
        out["failed_ranks"] = [i for i, r in enumerate(every) if r in bad]
    out["wall_s"] = time.perf_counter() - t0
    if out["status"] not in ("ok", "planned"):
        _say(f"  {out['status']}: {(out.get('reason') or '')[:300]}")
    return out


# ------------------------------------------------------------------ the loss check
def loss_run(ctx: Ctx, who: str, seq: int, steps: int, deadline: float, row: dict) -> None:
    """`steps` steps of one system on the stream, until `deadline` (monotonic); row["losses"]."""
    import torch
    import torch.distributed as dist

    if who == "seqshard":
        plan = seqshard_plan(ctx, seq)
        row.update({k: v for k, v in plan_summary(plan).items() if k != "plan_text"})
        model, opt, step = seqshard_setup(ctx, seq, plan)
    else:
        rotate = {"reference": ctx.args.cp_rotate, "floor": other_rotate(ctx.args.cp_rotate)}[who]
        row["cp"] = f"rotate {rotate}" if ctx.cuda else "none (CPU)"
        model, opt, step = native_setup(ctx, seq, rotate)
    row["losses"] = []
    for k in range(steps):
        go = torch.tensor([time.monotonic() < deadline], device=ctx.device)
        dist.broadcast(go, src=0)
        if not go.item():
            row["stopped"] = f"the budget, after {k} steps"
            break
        ids, labels = tokens(ctx.cfg, seq, k, ctx.device)
        row["losses"].append(float(step(ids, labels)))
        if k % 10 == 0 or k == steps - 1:
            _say(f"  {who} step {k}: loss {row['losses'][-1]:.5f}")
    row["status"] = "ok"


def other_rotate(rotate: str) -> str:
    return "alltoall" if rotate == "allgather" else "allgather"


def loss_verdict(runs: dict, u: float) -> dict:
    """The rule of the module docstring over the steps every run finished."""
    a = runs.get("seqshard", {}).get("losses") or []
    b = runs.get("reference", {}).get("losses") or []
    c = runs.get("floor", {}).get("losses")
    n = min(len(a), len(b), len(c) if c is not None else len(b))
    if n == 0:
        return dict(steps_compared=0, verdict="no steps to compare")
    diff = max(abs(x - y) for x, y in zip(a[:n], b[:n]))
    floor = max(abs(x - y) for x, y in zip(c[:n], b[:n])) if c is not None else 0.0
    tol = 2 * max(floor, u * statistics.median(b[:n]))
    return dict(steps_compared=n, max_abs_diff=diff, floor=floor, unit_roundoff=u, tolerance=tol,
                first_loss=b[0], last_loss=b[n - 1], matches=diff <= tol,
                verdict=("within" if diff <= tol else "NOT within") + " bf16 noise"
                + ("" if c is not None else " (no floor run: F = 0)"))


# ------------------------------------------------------------------ report
def summary(rows: list[dict]) -> dict:
    """Per system: the longest length that trained, its tokens/s and MFU."""
    out = {}
    for system in SYSTEMS:
        ok = [r for r in rows if r.get("system") == system and r.get("status") == "ok"]
        if ok:
            r = max(ok, key=lambda r: r["seq"])
            out[system] = dict(longest=r["seq"], tokens_per_s=r["tokens_per_s"], mfu=r["mfu"])
    return out


def markdown(doc: dict) -> str:
    md = [f"# End to end: {doc['model']} on {doc['world']}× {doc['device']}", "",
          f"`{doc['command']}`", "",
          f"torch {doc['versions']['torch']}, ortools {doc['versions'].get('ortools')}; allocator "
          f"{doc['versions']['alloc_conf']}; one sequence per step, AdamW. {DEFINITIONS}", ""]
    if doc["summary"]:
        md += ["| system | longest that trains | tokens/s there | MFU there |", "|---|---|---|---|"]
        for s, v in doc["summary"].items():
            md.append(f"| {s} | {_count_str(v['longest'])} | {v['tokens_per_s']:,.0f} | "
                      f"{100 * v['mfu']:.1f}% |")
        md.append("")
    md += ["| system | seq | status | step | tokens/s | TFLOP/s/GPU | MFU | peak (timed / all) | "
           "predicted peak | ratio | predicted step | ratio | warm-up / timed | plan |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        status = r.get("status", "?")
        if r.get("reason"):
            status += f": {r['reason'][:160]}"
        if r.get("peak_at_oom_gib"):
            status += f" ({r['peak_at_oom_gib']:.1f} GiB at failure)"
        if r.get("system") == "seqshard" and r.get("plan"):
            mem = "; ".join(f"{k} {v}" for k, v in (r.get("memory") or {}).items() if k != "notes")
            plan = f"{r['plan']} {r.get('model_state')}: {', '.join(r.get('attention', []))}" + \
                (f"; {mem}" if mem else "")
            plan = plan if len(plan) <= 240 else plan[:240] + "… (the JSON has it all)"
        else:
            plan = r.get("cp", "-")
        md.append(
            f"| {r['system']} | {_count_str(r['seq'])} | {status} | {_f(r.get('step_s'), '.3f', ' s')}"
            f" | {_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('tflops_per_gpu'), '.0f')} | "
            f"{_f(None if r.get('mfu') is None else 100 * r['mfu'], '.1f', '%')} | "
            f"{_f(r.get('peak_gib'), '.1f')} / {_f(r.get('peak_all_gib'), '.1f', ' GiB')} | "
            f"{_f(r.get('predicted_peak_gib'), '.1f', ' GiB')} | {_f(r.get('peak_ratio'), '.3f')} | "
            f"{_f(r.get('predicted_step_s'), '.3f', ' s')} | {_f(r.get('step_ratio'), '.3f')} | "
            f"{'cold' if r.get('cold') else r.get('warmup', '-')} / {r.get('repeats', '-')} | {plan} |")
    notes = [(r["system"], r["seq"], n) for r in doc["rows"] if r["system"] == "seqshard"
             for n in (r.get("memory") or {}).get("notes", [])]
    if notes:
        md += ["", "## Plan notes", ""] + [f"- {s} {_count_str(q)}: {n}" for s, q, n in notes]
    if doc.get("loss"):
        lo = doc["loss"]
        v = lo.get("verdict") or {}
        md += ["", f"## Loss: {lo['steps']} steps at {_count_str(lo['seq'])} (synthetic stream)", "",
               f"{v.get('verdict', '-')}: max |seqshard - reference| {_f(v.get('max_abs_diff'), '.2e')} "
               f"over {v.get('steps_compared', 0)} steps; floor {_f(v.get('floor'), '.2e')}; "
               f"tolerance {_f(v.get('tolerance'), '.2e')}; loss {_f(v.get('first_loss'), '.4f')} → "
               f"{_f(v.get('last_loss'), '.4f')}", "",
               "| run | status | steps | first | last | note |", "|---|---|---|---|---|---|"]
        for who, r in lo["runs"].items():
            ls = r.get("losses") or []
            md.append(f"| {who} | {r.get('status')}{': ' + (r.get('reason') or '')[:160] if r.get('reason') else ''}"
                      f" | {len(ls)} | {_f(ls[0] if ls else None, '.5f')} | "
                      f"{_f(ls[-1] if ls else None, '.5f')} | {r.get('plan') or r.get('cp') or ''} "
                      f"{r.get('stopped') or ''} |")
    if doc.get("not_run"):
        md += ["", "Not run (--budget-s): " + ", ".join(doc["not_run"])]
    return "\n".join(md) + "\n"


DEFINITIONS = ("Model FLOPs 6·N·S + 6·L·S²·d (N: multiplying parameters, the LM head counted; "
               "causal attention; no recompute); MFU of world × 989 TFLOP/s. Step: the slowest "
               "rank's median (CUDA events). Peak: torch.cuda.max_memory_allocated, the largest "
               "rank, timed steps / whole configuration; ratio = timed peak / predicted.")


def versions() -> dict:
    import torch

    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               host=platform.node(), alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"),
               **{k: os.environ[k] for k in NVLS_OFF})
    for mod in ("triton", "ortools"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[mod] = f"not importable ({type(e).__name__})"
    return out


# ------------------------------------------------------------------ the driver
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=None, help="ranks to launch (default 4; --smoke 2)")
    ap.add_argument("--seqs", default=None, help=f"comma-separated lengths (default {DEFAULT_SEQS})")
    ap.add_argument("--systems", default="native,seqshard", help="which systems the sweep runs")
    ap.add_argument("--no-sweep", action="store_true", help="only the loss check")
    ap.add_argument("--loss", action="store_true", help="run the loss check (after the sweep)")
    ap.add_argument("--loss-steps", type=int, default=100)
    ap.add_argument("--loss-seq", default=None, help="the loss check's length (default 128K)")
    ap.add_argument("--no-floor", action="store_true", help="the loss check without run C")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer layers than the model's (a slice; the rows say so)")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="seqshard's memory budget per GPU (default: the planner's, 90%% of the "
                         "GPU; --smoke: SMOKE_BUDGET_MIB, so that `tiny` splits)")
    ap.add_argument("--compile", default="auto", choices=("auto", "off"),
                    help="seqshard's compile= (auto: layers on CUDA); off: eager")
    ap.add_argument("--kernels", default="auto", choices=("auto", "off"),
                    help="seqshard's kernels= (auto: on for CUDA: the fused LM head + loss)")
    ap.add_argument("--plan-only", action="store_true",
                    help="seqshard's plans at every length, no step (CPU, gloo: local attention priced at the "
                         "preset's kernel, not the GPU runtime's)")
    ap.add_argument("--cp-rotate", default="allgather", choices=("allgather", "alltoall"))
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up")
    ap.add_argument("--cold-s", type=float, default=60.0,
                    help="an estimated step longer than this runs one cold timed step")
    ap.add_argument("--budget-s", type=float, default=540.0, help="the whole run's wall clock")
    ap.add_argument("--no-predict", action="store_true", help="no cost-model figures for native")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, `tiny`, 64/128 tokens, 2 loss steps")
    ap.add_argument("--out", default=None, help="folder (default $OUT, else bench/results)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.ranks is None:
        args.ranks = 2 if args.smoke else 4
    if args.smoke and args.budget_gib is None:
        args.budget_gib = SMOKE_BUDGET_MIB.get(args.ranks, 0.8) / 1024
    if "RANK" not in os.environ:
        from state import relaunch
        return relaunch(__file__, args.ranks, argv)

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from report import stamp, write_json_and_markdown
    from seqshard.models import llama
    from watchdog import Watchdog

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = not (args.smoke or args.plan_only)
    if args.plan_only:
        args.systems, args.loss = "seqshard", False
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("bench/e2e.py needs GPUs (or --smoke for the CPU check)")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("sp",))
    cfg = llama.CONFIGS["tiny" if args.smoke else "llama3-8b"]
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    ctx = Ctx(args, cfg, mesh, device, torch.float32 if args.smoke else torch.bfloat16, world, rank)
    seqs = [_count(s) for s in (args.seqs or (SMOKE_SEQS if args.smoke else DEFAULT_SEQS)).split(",")]
    loss_seq = _count(args.loss_seq or ("128" if args.smoke else "128K"))
    loss_steps = 2 if args.smoke and args.loss_steps == 100 else args.loss_steps
    if args.smoke:
        args.loss = True
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: choose from {SYSTEMS}")

    out = Path(args.out or os.environ.get("OUT") or
               (tempfile.mkdtemp(prefix="e2e-smoke-") if args.smoke else HERE / "results"))
    stem = f"e2e-{stamp()}{'-' + args.tag if args.tag else ''}{'-smoke' if args.smoke else ''}"
    doc = dict(benchmark="e2e", command=" ".join(["python bench/e2e.py"] + argv), world=world,
               model=("tiny" if args.smoke else "llama3-8b") + (f" ({cfg.layers} layers)" if args.layers else ""),
               config=dataclasses.asdict(cfg),
               device=torch.cuda.get_device_name() if cuda else "CPU (gloo)", smoke=args.smoke,
               versions=versions(), definitions=DEFINITIONS, budget_s=args.budget_s, rows=[],
               not_run=[], summary={})

    def save():
        if rank == 0:
            doc["summary"] = summary(doc["rows"])
            doc["wall_s"] = time.monotonic() - _T0
            write_json_and_markdown(out, stem, doc, markdown(doc))

    def on_timeout(label):
        if rank == 0:
            system, _, seq = label.partition(":")
            doc["rows"].append(dict(system=system, seq=int(seq) if seq.isdigit() else 0,
                                    status="timeout", reason=f"no progress past the watchdog ({label})"))
            save()

    dog = Watchdog(on_timeout)
    _say(f"e2e: {doc['model']}, {world} ranks on {doc['device']}; → {out}/{stem}.json/.md; "
         f"versions {doc['versions']}")

    def left() -> float:
        t = torch.tensor([args.budget_s - (time.monotonic() - _T0)], dtype=torch.float64)
        if cuda:
            t = t.to(device)
        dist.broadcast(t, src=0)  # rank 0 decides
        return t.item()

    # the sweep: by length, native then seqshard; a system stops at its first oom/infeasible
    stopped: set[str] = set()
    for seq in [] if args.no_sweep else seqs:
        for system in systems:
            name = f"{system}:{seq}"
            if system in stopped:
                continue
            est = estimate_s(ctx, seq)
            steps = 1 if est > args.cold_s else 1 + args.repeats
            # start-up: native's prediction (rank 0 plans) and FSDP2; seqshard's plan,
            # parallelize and the compile of its first step
            need = (60 if system == "native" else 90) * (not args.smoke) + steps * est
            remaining = left()
            if remaining < need and not args.plan_only:
                doc["not_run"].append(f"{system} {_count_str(seq)} (estimate {need:.0f} s)")
                _say(f"{name}: not run (estimate {need:.0f} s, {remaining:.0f} s left)")
                save()
                continue
            _say(f"{system} at {_count_str(seq)} (estimate {need:.0f} s)")
            row = dict(system=system, seq=seq, status="started", layers=cfg.layers)
            row = run_guarded(ctx, lambda r: measure_config(ctx, system, seq, r), row, dog, name,
                              3 * need + 120)
            doc["rows"].append(row)
            if row["status"] in ("oom", "infeasible"):
                stopped.add(system)
            save()

    if args.loss:
        est = estimate_s(ctx, loss_seq)
        runs = ["seqshard", "reference"] + ([] if args.no_floor or not cuda else ["floor"])
        doc["loss"] = dict(seq=loss_seq, steps=loss_steps, lr=args.lr, runs={},
                           stream="synthetic: Zipf(1.1) unigrams + copied 64-token spans, seed 1234")
        for k, who in enumerate(runs):
            share = left() / (len(runs) - k)  # each run an equal share of what is left
            _say(f"loss check: {who}, {loss_steps} steps at {_count_str(loss_seq)} "
                 f"({share:.0f} s of the budget)")
            row = dict(system=who, seq=loss_seq, status="started")
            deadline = time.monotonic() + share - (0 if args.smoke else est + 10)
            row = run_guarded(ctx, lambda r: loss_run(ctx, who, loss_seq, loss_steps, deadline, r),
                              row, dog, f"loss-{who}:{loss_seq}", share + 3 * est + 300)
            doc["loss"]["runs"][who] = row
            u = UNIT_ROUNDOFF["bf16" if cuda else "fp32"]
            doc["loss"]["verdict"] = loss_verdict(doc["loss"]["runs"], u)
            save()
        _say(f"loss check: {doc['loss']['verdict']}")

    save()
    if rank == 0:
        print(markdown(doc), flush=True)
        _say(f"wrote {out}/{stem}.md and .json")
    dist.barrier()  # leave together: a rank that tears gloo down first can abort another's exit
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
