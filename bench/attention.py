"""Distributed attention on 1, 2 and 4 GPUs: ours against PyTorch context parallel and
DeepSpeed-Ulysses in one run, each against the single-GPU kernel at equal per-GPU work.

    torchrun --nproc-per-node 4 bench/attention.py --out DIR            # everything, by priority
    torchrun --nproc-per-node 4 bench/attention.py --out DIR --quick    # headline + accuracy only
    torchrun --nproc-per-node 4 bench/attention.py --device cpu ...     # gloo: checks the script

Pipeline: plan (ordered configs, headline first) → for each config, while the budget lasts:
build inputs → warm up → time with CUDA events → agree on the result across ranks → append one
JSON line → rewrite the JSON and markdown reports. A config that raises is recorded as an error
and the run goes on; a config that hangs trips a watchdog that records "timeout" and exits, and a
rerun with `--resume` skips every config already in the JSON-lines file.

Definitions (also written into every report):
    FLOPs      FlashAttention's convention: forward 4·B·H·S²·d, halved under the causal mask;
               forward + backward = 3.5 × forward. H counts query heads (GQA costs the same).
    TFLOP/s    per GPU: FLOPs / N / median time.
    ideal      the single-GPU kernel (PyTorch SDPA with the same local backend as ours, MHA shapes,
               no algorithm around it) at equal per-GPU work: N GPUs at length S do S²/N of causal
               work each, as one GPU does at length S/√N (rounded to --ideal-quantum). Above
               --ideal-max-len the kernel's rate is flat (shared/ANCHORS.md: 544 / 535 TFLOP/s at
               32K / 128K), so the rate measured at that length stands in for it.
    efficiency TFLOP/s per GPU / ideal TFLOP/s.
    ×peer      peer's median time / ours (> 1: ours is faster), same N, S, heads and mode.
    fwd        the training forward (inputs require grad); fwdbwd adds the backward of a random
               upstream gradient.
    time       per rank: the median over the repeats of CUDA-event time of one step; a row reports
               the slowest rank's median. Peak memory: torch.cuda.max_memory_allocated (inputs,
               outputs and gradients included), the largest over ranks.
Groups: every config runs on all ranks at once: N=2 runs on both pairs of a 4-GPU machine, N=1 on
every GPU, so all ranks follow one path (collectives match) and the GPUs share one thermal state.
"""

from __future__ import annotations

import os
import time

_T0 = time.monotonic()  # the budget counts from here: imports and process-group start-up included

# NVLink multicast (NVLS) stays off on the lent machines; set before torch/NCCL initialize.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

K = 1024
OURS = ("ulysses", "ulysses-peer", "ring", "allgather", "hybrid", "tokenring")
PEERS = ("cp-allgather", "ds-ulysses", "cp-alltoall")
LOCAL = ("sdpa", "ours-local")  # N = 1: the kernel (also the ideal) and our local wrapper
HEADLINE_ORDER = ("ulysses", "ulysses-peer", "ring", "cp-allgather", "ds-ulysses", "cp-alltoall", "allgather",
                  "hybrid", "tokenring")
# The sequence layout each system's inputs are in ("bshd": DeepSpeed's [b, s, h, e], contiguous).
ORDER = {"ring": "zigzag", "allgather": "zigzag", "hybrid": "zigzag", "tokenring": "zigzag",
         "ulysses": "contig", "ulysses-peer": "contig", "cp-allgather": "zigzag", "cp-alltoall": "zigzag",
         "ds-ulysses": "contig", "sdpa": "contig", "ours-local": "contig"}
MODES = ("fwd", "fwdbwd")
# Targets of issue 6 (4 GPUs, headline config).
TARGETS = {"best_efficiency": 0.97, "ring_efficiency": 0.90, "ulysses_efficiency": 0.95,
           "vs_cp": 1.10, "vs_ds": 1.03}
# Rates the planner's time estimate assumes (a little under the measured cuDNN rates).
EST_RATE = {"fwd": 420e12, "fwdbwd": 450e12}
EST_FIXED_S = 1.5      # per config: inputs, cuDNN plan builds, barriers, empty_cache
ACCURACY_EST_S = 20.0  # per accuracy config (all systems once at a modest length)
JSONL = "attention-rows.jsonl"


# ---------------------------------------------------------------------------------------------
# Definitions (pure: tested on CPU by tests/test_bench_attention.py)
# ---------------------------------------------------------------------------------------------

def attention_flops(seq: int, heads: int, head_dim: int, mode: str, *, causal: bool = True,
                    batch: int = 1) -> float:
    """FlashAttention's count: forward 4·B·H·S²·d (halved causal); fwd+bwd = 3.5 × forward."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fwd = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)


def ideal_len(seq: int, n: int, quantum: int = 1024, cap: int | None = None) -> int:
    """The single-GPU length with the per-GPU work of N GPUs at length S: S/√N, rounded to a
    multiple of `quantum`, at most `cap` (above it the kernel's rate is taken as flat)."""
    length = seq if n == 1 else max(quantum, round(seq / math.sqrt(n) / quantum) * quantum)
    return length if cap is None else min(length, cap)


@dataclass(frozen=True)
class Config:
    """One measurement: `system` on groups of `n` GPUs at global length `seq`."""

    system: str   # OURS, PEERS, LOCAL, or "accuracy" (every system once at n, against fp32)
    n: int        # GPUs per group
    seq: int      # global sequence length
    kv_heads: int
    mode: str     # "fwd" | "fwdbwd"
    tier: str     # why it is in the plan ("headline", "accuracy", "long", ...); not in the key

    @property
    def key(self) -> str:
        return f"{self.system}-n{self.n}-s{self.seq}-kv{self.kv_heads}-{self.mode}"


@dataclass(frozen=True)
class Shape:
    """The problem dimensions every config shares."""

    heads: int = 32
    head_dim: int = 128
    gqa_kv_heads: int = 8


def systems_at(n: int) -> tuple[str, ...]:
    """Systems measurable on groups of n GPUs, in headline priority order."""
    if n == 1:
        return LOCAL
    return tuple(s for s in HEADLINE_ORDER if s != "hybrid" or n == 4)  # hybrid: 2 × 2


def group_sizes(world: int, wanted=(1, 2, 4)) -> tuple[int, ...]:
    return tuple(n for n in wanted if n <= world and world % n == 0)


def estimate_iter_s(cfg: Config, shape: Shape) -> float:
    flops = attention_flops(cfg.seq, shape.heads, shape.head_dim, cfg.mode) / cfg.n
    return flops / EST_RATE[cfg.mode] + 0.002


def iterations(t_iter: float) -> tuple[int, int]:
    """(warm-up, repeats): ≥ 3 repeats and about a second of timed work; 2 when one step takes
    over 2 s (512K). Warm-ups: 3 for tiny steps, 2 under a second (the first builds cuDNN plans
    and NCCL communicators, and runs under the profiler at the headline), else 1."""
    if t_iter > 2.0:
        return 1, 2
    warmup = 3 if t_iter < 0.02 else 2 if t_iter < 1.0 else 1
    return warmup, min(20, max(3, math.ceil(1.0 / t_iter)))


def estimate_s(cfg: Config, shape: Shape) -> float:
    if cfg.system == "accuracy":
        return ACCURACY_EST_S
    t = estimate_iter_s(cfg, shape)
    return EST_FIXED_S + sum(iterations(t)) * t


def timeout_s(cfg: Config, shape: Shape) -> float:
    """The watchdog's limit for one config: generous, but a hang costs minutes, not the call.
    DeepSpeed is imported at its first use (a config of it, or the accuracy check)."""
    first_use = 120.0 if cfg.system in ("ds-ulysses", "accuracy") else 0.0
    return 60.0 + 3.0 * estimate_s(cfg, shape) + first_use


def should_start(elapsed_s: float, estimate: float, budget_s: float) -> bool:
    return elapsed_s + estimate <= budget_s


def crashed_rows(previous: list[dict], shape: Shape) -> list[dict]:
    """Rows for the configs an earlier run started and never finished (its process died: killed
    by NCCL's timeout, the OOM killer or an outer timeout), so that --resume does not retry them."""
    finished = {r.get("config") for r in previous if r.get("kind") in ("timing", "accuracy")}
    started = {r["config"]: Config(**r["cfg"]) for r in previous if r.get("kind") == "start"}
    return [base_row(cfg, shape, "crashed", "the process died during this config (an earlier run)")
            for key, cfg in started.items() if key not in finished]


def base_row(cfg: Config, shape: Shape, status: str, error: str | None) -> dict:
    """The fields every row of a config has; an accuracy config's timeout stands for all its
    systems (system "all")."""
    accuracy = cfg.system == "accuracy"
    return {"kind": "accuracy" if accuracy else "timing", "key": cfg.key, "config": cfg.key,
            "tier": cfg.tier, "system": "all" if accuracy else cfg.system, "n": cfg.n,
            "seq": cfg.seq, "heads": shape.heads, "kv_heads": cfg.kv_heads,
            "head_dim": shape.head_dim, "mode": cfg.mode, "causal": True,
            "order": ORDER.get(cfg.system, ""), "status": status, "error": error,
            "estimate_s": round(estimate_s(cfg, shape), 2)}


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    seqs: tuple[int, ...] = (32 * K, 128 * K, 256 * K, 512 * K)
    """Global sequence lengths; the largest is the long-context (no-OOM) check."""
    headline_seq: int = 128 * K
    """The headline length (must be one of `seqs`)."""
    accuracy_seq: int = 8 * K
    """Global length of the accuracy check (on the largest group)."""
    ideal_quantum: int = 1024
    """Ideal lengths are rounded to a multiple of this."""
    ideal_max_len: int = 128 * K
    """Longest single-GPU run: ideal lengths above it use its rate; N=1 rows stop here."""
    ns: tuple[int, ...] = (1, 2, 4)
    """Group sizes to measure (those dividing the world size)."""
    quick: bool = False
    """Only the headline config and the accuracy check."""
    systems: tuple[str, ...] | None = None
    """Restrict to these systems (None: all); `sdpa` (the ideal) is always kept."""

    def __post_init__(self):
        if self.headline_seq not in self.seqs:
            raise ValueError(f"headline_seq {self.headline_seq} is not one of seqs {self.seqs}")


def ranked_ours(rows: list[dict], n: int, seq: int, kv_heads: int, mode: str = "fwdbwd") -> list[str]:
    """Our algorithms measured at one (n, seq, kv_heads, mode), fastest first."""
    ok = [r for r in rows if r.get("kind") == "timing" and r["status"] == "ok" and r["system"] in OURS
          and (r["n"], r["seq"], r["kv_heads"], r["mode"]) == (n, seq, kv_heads, mode)]
    return [r["system"] for r in sorted(ok, key=lambda r: r["median_ms"])]


def plan(opts: PlanOptions, shape: Shape, world: int, rows: list[dict] = ()) -> list[Config]:
    """Every config in priority order, headline first. Re-planned after each config: the long
    (512K) tier starts with our fastest algorithm at the headline, once that is measured."""
    ns = group_sizes(world, opts.ns)
    top = max(ns)
    mha, gqa = shape.heads, shape.gqa_kv_heads
    long_seq = max(opts.seqs)
    configs: list[Config] = []

    def allowed(system):
        return system == "sdpa" or opts.systems is None or system in opts.systems

    def ideal(seq, n, mode, tier):
        length = ideal_len(seq, n, opts.ideal_quantum, opts.ideal_max_len)
        configs.append(Config("sdpa", 1, length, mha, mode, tier))

    def block(n, seq, kv, mode, tier, systems=None):
        if n == 1 and seq > opts.ideal_max_len:
            return
        ideal(seq, n, mode, tier)
        systems = systems_at(n) if systems is None else systems
        configs.extend(Config(s, n, seq, kv, mode, tier) for s in systems
                       if allowed(s) and s in systems_at(n) and not (s == "sdpa" and kv != mha))

    hs = opts.headline_seq
    smaller = sorted((n for n in ns if n != top), reverse=True)
    mid = sorted((s for s in opts.seqs if s not in (hs, long_seq)), reverse=True)
    variants = ((mha, "fwdbwd"), (gqa, "fwdbwd"), (mha, "fwd"), (gqa, "fwd"))

    # 1. the headline: ours vs both peers vs the ideal; 2. accuracy against fp32
    block(top, hs, mha, "fwdbwd", "headline")
    if top > 1:
        configs.extend(Config("accuracy", top, opts.accuracy_seq, kv, "fwdbwd", "accuracy")
                       for kv in (mha, gqa))
    if opts.quick:
        return _dedup(configs)
    # 3. the longest sequence (no hang, no out-of-memory): our two best at the headline (before it
    #    is measured: Ulysses and ring), the peers between them
    if top > 1 and long_seq != hs:
        best = [*ranked_ours(list(rows), top, hs, mha), "ulysses", "ring"]
        best = list(dict.fromkeys(best))[:2]
        block(top, long_seq, mha, "fwdbwd", "long", (best[0], "cp-allgather", "ds-ulysses", best[1]))
    # 4. the headline length: GQA, forward only
    for kv, mode in variants[1:]:
        block(top, hs, kv, mode, "headline-seq")
    # 5. scaling over GPUs at the headline length; 6. over lengths, MHA forward + backward
    for n in smaller:
        block(n, hs, mha, "fwdbwd", "gpu-sweep")
    for seq in mid:
        block(top, seq, mha, "fwdbwd", "seq-sweep")
    # 7. the rest of the grid, most GPUs first
    for seq in mid:
        for kv, mode in variants[1:]:
            block(top, seq, kv, mode, "seq-sweep")
    for n in smaller:
        for seq in sorted((s for s in opts.seqs if s <= hs), reverse=True):
            for kv, mode in variants:
                block(n, seq, kv, mode, "gpu-sweep")
    if top > 1 and long_seq != hs:
        for kv, mode in variants:
            block(top, long_seq, kv, mode, "long-rest")
    for n in smaller:
        for seq in sorted(s for s in opts.seqs if s > hs):
            for kv, mode in variants:
                block(n, seq, kv, mode, "gpu-sweep-long")
    return _dedup(configs)


def _dedup(configs: list[Config]) -> list[Config]:
    seen, out = set(), []
    for c in configs:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def next_config(configs: list[Config], done: set[str], passed: set[str]) -> Config | None:
    """The first config neither run nor passed over (for the budget)."""
    return next((c for c in configs if c.key not in done and c.key not in passed), None)


def drive(plan_fn, run_fn, decide_fn) -> tuple[list[dict], list[Config]]:
    """Run configs in plan order: `plan_fn(rows)` re-plans with the rows so far, `decide_fn(cfg)`
    says whether to start it (the budget), `run_fn(cfg)` returns its rows. Returns (new rows,
    configs passed over)."""
    rows, done, passed, skipped = [], set(), set(), []
    while (cfg := next_config(plan_fn(rows), done, passed)) is not None:
        if not decide_fn(cfg):
            passed.add(cfg.key)
            skipped.append(cfg)
            continue
        rows.extend(run_fn(cfg))
        done.add(cfg.key)
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# Derived numbers and reports (pure)
# ---------------------------------------------------------------------------------------------

def _timing(rows):
    return [r for r in rows if r.get("kind") == "timing"]


def derive(rows: list[dict], shape: Shape, opts: PlanOptions) -> list[dict]:
    """Timing rows with TFLOP/s per GPU, the ideal, efficiency and ratios against the peers."""
    timing = _timing(rows)
    ok = {(r["system"], r["n"], r["seq"], r["kv_heads"], r["mode"]): r for r in timing
          if r["status"] == "ok"}
    out = []
    for r in timing:
        d = dict(r)
        d["flops_per_gpu"] = attention_flops(r["seq"], shape.heads, shape.head_dim, r["mode"]) / r["n"]
        d["tflops_per_gpu"] = None
        d["ideal_len"] = ideal_len(r["seq"], r["n"], opts.ideal_quantum, opts.ideal_max_len)
        d["ideal_tflops"] = d["efficiency"] = None
        d["vs"] = {}
        if r["status"] == "ok":
            d["tflops_per_gpu"] = d["flops_per_gpu"] / (r["median_ms"] * 1e-3) / 1e12
            ideal = ok.get(("sdpa", 1, d["ideal_len"], shape.heads, r["mode"]))
            if ideal is not None:
                ideal_flops = attention_flops(ideal["seq"], shape.heads, shape.head_dim, r["mode"])
                d["ideal_tflops"] = ideal_flops / (ideal["median_ms"] * 1e-3) / 1e12
                d["efficiency"] = d["tflops_per_gpu"] / d["ideal_tflops"]
            for peer in PEERS:
                p = ok.get((peer, r["n"], r["seq"], r["kv_heads"], r["mode"]))
                if p is not None and peer != r["system"]:
                    d["vs"][peer] = p["median_ms"] / r["median_ms"]
        out.append(d)
    return out


def headline(derived: list[dict], shape: Shape, opts: PlanOptions, world: int) -> dict:
    """The headline config's systems and the issue's targets, met or missed by how much."""
    top = max(group_sizes(world, opts.ns))
    sel = [r for r in derived if (r["n"], r["seq"], r["kv_heads"], r["mode"])
           == (top, opts.headline_seq, shape.heads, "fwdbwd") and r["system"] != "sdpa"]
    by = {r["system"]: r for r in sel if r["status"] == "ok"}
    ours = [by[s] for s in OURS if s in by]
    best = max(ours, key=lambda r: r["tflops_per_gpu"], default=None)
    cp = [by[s] for s in ("cp-allgather", "cp-alltoall") if s in by]
    cp_best = min(cp, key=lambda r: r["median_ms"], default=None)
    ds = by.get("ds-ulysses")

    def target(value, goal):
        return {"value": value, "goal": goal, "met": None if value is None else value >= goal}

    def eff(system):
        return by[system]["efficiency"] if system in by else None

    targets = {}
    if top == 4:
        targets = {
            "best_efficiency": target(best and best["efficiency"], TARGETS["best_efficiency"]),
            "ring_efficiency": target(eff("ring"), TARGETS["ring_efficiency"]),
            "ulysses_efficiency": target(eff("ulysses"), TARGETS["ulysses_efficiency"]),
            "best_vs_cp": target(best and cp_best and cp_best["median_ms"] / best["median_ms"],
                                 TARGETS["vs_cp"]),
            "best_vs_ds": target(best and ds and ds["median_ms"] / best["median_ms"],
                                 TARGETS["vs_ds"]),
        }
    return {"n": top, "seq": opts.headline_seq, "kv_heads": shape.heads, "mode": "fwdbwd",
            "best_ours": best and best["system"], "best_cp": cp_best and cp_best["system"],
            "systems": [r["system"] for r in sel], "targets": targets}


def _fmt(x, spec=".3g", none="–"):
    return none if x is None else format(x, spec)


def _seq_label(seq: int) -> str:
    return f"{seq // K}K" if seq % K == 0 else str(seq)


def _timing_table(rows: list[dict]) -> str:
    head = ("| system | N | S | kv heads | mode | order | local kernel | ms | TFLOP/s/GPU "
            "| ideal (len) | efficiency | peak GiB | ×cp-allgather | ×cp-alltoall | ×ds-ulysses "
            "| status |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        vs = [_fmt(r["vs"].get(p), ".3f") for p in ("cp-allgather", "cp-alltoall", "ds-ulysses")]
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r.get('error') or ''}"
        lines.append(
            f"| {r['system']} | {r['n']} | {_seq_label(r['seq'])} | {r['kv_heads']} | {r['mode']} | "
            f"{r.get('order', '')} | {r.get('backend') or ''} | {_fmt(r.get('median_ms'), '.2f')} | "
            f"{_fmt(r['tflops_per_gpu'], '.1f')} | {_fmt(r['ideal_tflops'], '.1f')} "
            f"({_seq_label(r['ideal_len'])}) | {_fmt(r['efficiency'], '.3f')} | "
            f"{_fmt(r.get('peak_mem_gib'), '.1f')} | " + " | ".join(vs) + f" | {status[:200]} |")
    return head + "\n".join(lines) + "\n"


def _accuracy_table(rows: list[dict]) -> str:
    head = ("| system | N | S | kv heads | out err (sdpa bf16) | dq | dk | dv | ≤ 2× sdpa "
            "| status |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | {r['n']} | {_seq_label(r['seq'])} | {r['kv_heads']} "
                         f"| | | | | | **{r['status']}**: {(r.get('error') or '')[:200]} |")
            continue
        cells = [f"{r['errors'][t]:.2e} ({r['sdpa_bf16'][t]:.2e})" for t in ("out", "dq", "dk", "dv")]
        lines.append(f"| {r['system']} | {r['n']} | {_seq_label(r['seq'])} | {r['kv_heads']} | "
                     + " | ".join(cells) + f" | {'yes' if r['ok'] else '**NO**'} | ok |")
    return head + "\n".join(lines) + "\n"


DEFINITIONS = __doc__[__doc__.index("Definitions"):__doc__.index("Groups:")].strip()


def markdown(meta: dict, rows: list[dict], shape: Shape, opts: PlanOptions, world: int) -> str:
    derived = derive(rows, shape, opts)
    head = headline(derived, shape, opts, world)
    accuracy = [r for r in rows if r.get("kind") == "accuracy"]
    parts = [f"# Distributed attention benchmark {meta.get('date', '')}\n",
             f"{meta.get('device', '?')} × {world}, torch {meta.get('torch', '?')}, cuDNN "
             f"{meta.get('cudnn', '?')}, NCCL {meta.get('nccl', '?')}, DeepSpeed "
             f"{meta.get('deepspeed', 'not imported')}; B=1, H={shape.heads}, d={shape.head_dim}, "
             f"GQA kv heads {shape.gqa_kv_heads}, causal, bf16. "
             f"Elapsed {_fmt(meta.get('elapsed_s'), '.0f')} s.\n",
             f"Local kernels: ours {meta.get('local_backend', '?')}, ideal "
             f"{meta.get('kernel_sdpa_backends', '?')}, peers {meta.get('peer_sdpa_backends', '?')}.\n",
             f"`{meta.get('command', '')}`\n",
             f"## Headline: N={head['n']}, S={_seq_label(head['seq'])}, MHA, forward + backward\n"]
    sel = [r for r in derived if (r["n"], r["seq"], r["kv_heads"], r["mode"])
           == (head["n"], head["seq"], head["kv_heads"], "fwdbwd")]
    parts.append(_timing_table(sel) if sel else "not measured\n")
    if head["targets"]:
        lines = [f"- {name}: {_fmt(t['value'], '.3f')} (goal ≥ {t['goal']}) — "
                 + ("–" if t["met"] is None else "met" if t["met"] else
                    f"**missed by {t['goal'] - t['value']:.3f}**")
                 for name, t in head["targets"].items()]
        parts.append(f"Best of ours: {head['best_ours']}; faster PyTorch CP variant: "
                     f"{head['best_cp']}.\n\n" + "\n".join(lines) + "\n")
    parts.append("\n## Accuracy (bf16 against an fp32 reference; in brackets: single-GPU bf16 SDPA)\n")
    parts.append(_accuracy_table(accuracy) if accuracy else "not measured\n")
    long_seq = max(opts.seqs)
    long_rows = [r for r in derived if r["seq"] == long_seq and r["system"] != "sdpa"]
    if long_rows:
        parts.append(f"\n## {_seq_label(long_seq)} (no hang, no out-of-memory; peak memory per GPU)\n")
        parts.append(_timing_table(long_rows))
    parts.append("\n## All configs\n")
    order = {s: i for i, s in enumerate((*LOCAL, *OURS, *PEERS))}
    derived.sort(key=lambda r: (-r["n"], r["seq"], -r["kv_heads"], r["mode"],
                                order.get(r["system"], 99)))
    parts.append(_timing_table(derived))
    if meta.get("not_run"):
        parts.append("\n## Not run (budget)\n" + ", ".join(meta["not_run"]) + "\n")
    parts.append("\n## Definitions\n\n```\n" + DEFINITIONS + "\n```\n")
    return "\n".join(parts)


def report(meta: dict, rows: list[dict], shape: Shape, opts: PlanOptions, world: int) -> dict:
    """The JSON document: meta, definitions, the headline and targets, all rows with derived
    numbers, the accuracy rows."""
    derived = derive(rows, shape, opts)
    return {**meta, "shape": asdict(shape), "options": asdict(opts), "definitions": DEFINITIONS,
            "headline": headline(derived, shape, opts, world), "rows": derived,
            "accuracy": [r for r in rows if r.get("kind") == "accuracy"]}


# ---------------------------------------------------------------------------------------------
# Running on the GPUs
# ---------------------------------------------------------------------------------------------

class Watchdog:
    """Exits the process when a config overruns its limit (a hang in a collective cannot be
    interrupted otherwise). `on_fire(label)` runs first, e.g. to record the timeout."""

    def __init__(self, on_fire):
        self._on_fire, self._deadline, self._label = on_fire, None, ""
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def arm(self, seconds: float, label: str) -> None:
        with self._lock:
            self._deadline, self._label = time.monotonic() + seconds, label

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self):
        while True:
            time.sleep(0.5)
            with self._lock:
                fired = self._deadline is not None and time.monotonic() > self._deadline
                label = self._label
            if fired:
                try:
                    self._on_fire(label)
                finally:
                    os._exit(124)


class Bench:
    """Process groups, meshes and the systems' callables for one rank."""

    def __init__(self, args, shape: Shape, opts: PlanOptions):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.args, self.shape, self.opts = args, shape, opts
        self.dist = dist
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
        from seqshard.runtime import select_backend
        self.backend = select_backend(self.device, torch.bfloat16, shape.head_dim)
        self.kernel_backends = _sdpa_backends(self.backend, self.device)  # the ideal, the yardstick
        self.peer_backends = (_sdpa_backends_named(args.peer_sdpa) if args.peer_sdpa
                              else self.kernel_backends)
        self.deepspeed = self.deepspeed_error = None  # imported at the first DeepSpeed config

    # -- inputs ----------------------------------------------------------------------------

    def local_shapes(self, system: str, n: int, seq: int, kv: int):
        h, e, s = self.shape.heads, self.shape.head_dim, seq // n
        if system == "ds-ulysses":
            return (1, s, h, e), (1, s, kv, e)
        return (1, h, s, e), (1, kv, s, e)

    def random_inputs(self, system, n, seq, kv, seed):
        """Local shards (random, not zeros) in the system's layout, leaves requiring grad."""
        gen = torch.Generator(self.device).manual_seed(seed)
        q_shape, kv_shape = self.local_shapes(system, n, seq, kv)

        def randn(shape):
            return torch.randn(shape, generator=gen, device=self.device, dtype=torch.bfloat16)

        q, k, v, dout = randn(q_shape), randn(kv_shape), randn(kv_shape), randn(q_shape)
        return [x.requires_grad_() for x in (q, k, v)], dout

    # -- the systems -------------------------------------------------------------------------

    def attention_fn(self, system: str, n: int):
        """fn(q, k, v) -> out in the system's layout, and a context to run it in."""
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

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
                    return F.scaled_dot_product_attention(q, _expand(k, rep), _expand(v, rep),
                                                          is_causal=True)
            return sdpa, contextlib.nullcontext()
        if system in ("cp-allgather", "cp-alltoall"):
            def cp(q, k, v):
                # torchtitan's GQA: repeat K/V to the query heads before SDPA (CP moves them so)
                rep = q.shape[1] // k.shape[1]
                k, v = _expand(k, rep), _expand(v, rep)
                with sdpa_kernel(self.peer_backends, set_priority=True):
                    # looked up at call time: context_parallel patches F.scaled_dot_product_attention
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            rotate = system.split("-")[1]
            return cp, _cp_context(self.meshes[n], rotate, self.device)
        if system == "ds-ulysses":
            from deepspeed.sequence.layer import DistributedAttention

            backends = self.peer_backends

            def local_attn(q, k, v):  # [b, s, h/N, e] after the exchange; GQA: expand it here
                rep = q.shape[2] // k.shape[2]
                # dense [b, h, s, e] for SDPA (a copy of ~1/500 of the attention's time at 128K)
                qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                with sdpa_kernel(backends, set_priority=True):
                    out = F.scaled_dot_product_attention(qt, _expand(kt, rep), _expand(vt, rep),
                                                         is_causal=True)
                # cuDNN's SDPA backward returns wrong gradients for a non-contiguous output
                # gradient (seen on H200, torch 2.11: dq error 1.4); the transpose below would
                # hand it one, so its gradient is made contiguous first (as our runtime does)
                return _ContiguousGrad.apply(out).transpose(1, 2)

            # [b, s, h, e]: scatter heads (dim 2), gather the sequence (dim 1); batch dim 0
            dist_attn = DistributedAttention(local_attn, group, scatter_idx=2, gather_idx=1)
            return (lambda q, k, v: dist_attn(q, k, v, 0)), contextlib.nullcontext()
        raise ValueError(f"unknown system {system!r}")

    def ensure_deepspeed(self):
        """Import DeepSpeed and initialize deepspeed.comm on top of our process group (once; a
        failure is remembered, so later DeepSpeed configs fail fast with the same message)."""
        if self.deepspeed_error is not None:
            raise RuntimeError(self.deepspeed_error)
        if self.deepspeed is None:
            try:
                if self.device.type == "cpu":  # CPU script check only: the CPU accelerator
                    import deepspeed.comm.torch  # noqa: F401  JIT-builds a shared-memory op
                    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # from csrc
                import deepspeed
                deepspeed.init_distributed(dist_backend=self.dist.get_backend(), verbose=False)
                self.deepspeed = deepspeed.__version__
            except Exception as exc:
                self.deepspeed_error = f"DeepSpeed unavailable: {_describe(exc)}"
                raise RuntimeError(self.deepspeed_error) from exc
        return self.deepspeed

    # -- one timing config -------------------------------------------------------------------

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
        ops = None
        with ctx:
            if self.args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self._barrier()
            for i in range(warmup):
                if i == 0 and cfg.tier == "headline":
                    ops = _sdpa_ops_of(step)
                else:
                    step()
            times = _timed(step, reps, self.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.args.device == "cuda" else None
        return {"median_ms": statistics.median(times), "times_ms": times, "peak_mem_gib": peak,
                "warmup": warmup, "reps": reps, "sdpa_ops": ops}

    def _barrier(self):
        if self.device.type == "cuda":
            self.dist.barrier(device_ids=[self.device.index])
        else:
            self.dist.barrier()

    # -- the accuracy check ------------------------------------------------------------------

    def accuracy(self, cfg: Config, agree) -> list[dict]:
        """Every system at n, bf16, on one set of global inputs: errors of out, dq, dk, dv against
        an fp32 reference, next to those of single-GPU bf16 SDPA (the yardstick)."""
        h, e, s, kv, n = self.shape.heads, self.shape.head_dim, cfg.seq, cfg.kv_heads, cfg.n
        gen = torch.Generator(self.device).manual_seed(self.args.seed + kv)  # same on every rank
        q, k, v, dout = (torch.randn(shape, generator=gen, device=self.device)
                         for shape in ((1, h, s, e), (1, kv, s, e), (1, kv, s, e), (1, h, s, e)))
        ref = _reference_fp32(q, k, v, dout)
        yard = [_rel(a, b) for a, b in zip(_sdpa_bf16(q, k, v, dout, self.kernel_backends), ref)]
        rows = []
        for system in systems_at(n):
            if self.opts.systems is not None and system not in self.opts.systems:
                continue
            start = time.monotonic()
            try:
                if system == "ds-ulysses":
                    self.ensure_deepspeed()
                got = self._run_global(system, n, q, k, v, dout)
                errors, err = [_rel(a, b) for a, b in zip(got, ref)], None
                del got
            except Exception as exc:  # recorded; every rank reaches `agree` below
                errors, err = None, _describe(exc)
            _free()
            status, error, per_rank = agree(err, errors)
            row = {**base_row(cfg, self.shape, status, error), "key": f"{cfg.key}-{system}",
                   "system": system, "order": ORDER[system], "backend": self.backend,
                   "wall_s": round(time.monotonic() - start, 2)}
            if status == "ok":
                errs = per_rank[0]
                row["errors"] = dict(zip(("out", "dq", "dk", "dv"), errs))
                row["sdpa_bf16"] = dict(zip(("out", "dq", "dk", "dv"), yard))
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
                return _gather(x.contiguous(), 1, group).transpose(1, 2)
            return layout.unshard(_gather(x.contiguous(), 2, group), 2, order, n)

        fn, ctx = self.attention_fn(system, n)
        ql, kl, vl = (shard(x).to(torch.bfloat16).requires_grad_() for x in (q, k, v))
        with ctx:
            out = fn(ql, kl, vl)
            out.backward(shard(dout).to(torch.bfloat16))
        with torch.no_grad():
            return [unshard(t.detach()).float() for t in (out, ql.grad, kl.grad, vl.grad)]


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; the gradient is made contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _expand(x, rep: int):
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _sdpa_backends(backend: str, device):
    """PyTorch SDPA backends in priority order, ours first (the peers and the ideal use the same
    local kernel as ours where SDPA has it)."""
    from torch.nn.attention import SDPBackend

    if device.type == "cpu":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend, SDPBackend.CUDNN_ATTENTION)
    rest = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return [first, *(b for b in rest if b != first)]


def _sdpa_backends_named(names: list[str]):
    from torch.nn.attention import SDPBackend

    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"--peer-sdpa: unknown SDPA backends {unknown}; choose from {list(table)}")
    return [table[n] for n in names]


def _sdpa_label(backends) -> str:
    """'sdpa:cudnn>flash>efficient': SDPA with these backends in priority order."""
    return "sdpa:" + ">".join(b.name.split("_")[0].lower() for b in backends)


@contextlib.contextmanager
def _cp_context(mesh, rotate: str, device):
    """PyTorch context parallel over `mesh` with `rotate` ('allgather' | 'alltoall') and causal load
    balancing (head-tail = our zigzag). The inputs are sharded by us, zigzag (the head-tail order
    of its default load balancer), so the one buffer handed over is a placeholder of 2N positions.
    `context_parallel` does not restore SDPA when its body raises: do it here."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(rotate)
    placeholder = torch.zeros(2 * mesh.size(), device=device)
    try:
        with context_parallel(mesh, buffers=[placeholder], buffer_seq_dims=[0],
                              no_restore_buffers={placeholder}):
            yield
    finally:
        _restore_sdpa()


_ORIGINAL_SDPA = torch.nn.functional.scaled_dot_product_attention


def _restore_sdpa():
    import torch.nn.functional as F

    if F.scaled_dot_product_attention is not _ORIGINAL_SDPA:
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp_impl

        cp_impl._disable_context_parallel_dispatcher_impl()
        F.scaled_dot_product_attention = _ORIGINAL_SDPA


def _sdpa_ops_of(step) -> list[str]:
    """Run `step` under the CPU profiler; the attention kernels (aten ops) it called."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "flash_attn" in n
                  or n.startswith(("aten::_flash_attention", "aten::_efficient_attention")))


def _timed(step, reps: int, device) -> list[float]:
    if device.type == "cuda":
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def _gather(x, dim: int, group):
    import torch.distributed as dist

    n = group.size()
    buf = x.new_empty((n * x.shape[0], *x.shape[1:]))  # rank-major along dim 0 (gloo wants this)
    dist.all_gather_into_tensor(buf, x.contiguous(), group=group)
    return buf.unflatten(0, (n, x.shape[0])).movedim(0, dim).flatten(dim, dim + 1)


def _reference_fp32(q, k, v, dout):
    """fp32 attention forward + backward (SDPA math kernel), a few heads at a time."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, kv = q.shape[1], k.shape[1]
    rep = h // kv
    step = max(1, 8 // rep)  # kv heads per chunk: 8 query heads
    outs = [[], [], [], []]
    for j in range(0, kv, step):
        qs = slice(j * rep, (j + step) * rep)
        kvs = slice(j, j + step)
        qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q[:, qs], k[:, kvs], v[:, kvs]))
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qc, _expand(kc, rep), _expand(vc, rep), is_causal=True)
        o.backward(dout[:, qs])
        for acc, t in zip(outs, (o, qc.grad, kc.grad, vc.grad)):
            acc.append(t.detach())
    return [torch.cat(acc, dim=1) for acc in outs]


def _sdpa_bf16(q, k, v, dout, backends):
    """Single-GPU bf16 SDPA (the best kernel, as a user calls it) forward + backward."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    rep = q.shape[1] // k.shape[1]
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    with sdpa_kernel(backends, set_priority=True):
        o = F.scaled_dot_product_attention(qb, _expand(kb, rep), _expand(vb, rep), is_causal=True)
    o.backward(dout.to(torch.bfloat16))
    return [t.detach().float() for t in (o, qb.grad, kb.grad, vb.grad)]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:600]


def _free():
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return rows


def _versions(bench: Bench | None, args) -> dict:
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if args.device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
        meta["cudnn"] = torch.backends.cudnn.version()
        try:
            meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:
            meta["nccl"] = f"unknown ({exc})"
    else:
        meta["device"] = "cpu (script check only)"
    if bench is not None:
        meta["local_backend"] = bench.backend
        meta["kernel_sdpa_backends"] = _sdpa_label(bench.kernel_backends)
        meta["peer_sdpa_backends"] = _sdpa_label(bench.peer_backends)
        meta["deepspeed"] = bench.deepspeed
    return meta


def main(args) -> int:
    import torch.distributed as dist

    started = _T0
    shape = Shape(heads=args.heads, head_dim=args.head_dim, gqa_kv_heads=args.gqa_kv_heads)
    opts = PlanOptions(seqs=tuple(args.seqs), headline_seq=args.headline_seq,
                       accuracy_seq=args.accuracy_seq, ideal_quantum=args.ideal_quantum,
                       ideal_max_len=args.ideal_max_len, ns=tuple(args.ns), quick=args.quick,
                       systems=tuple(args.systems) if args.systems else None)
    out_dir = Path(args.out)
    jsonl = out_dir / JSONL
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume and jsonl.exists():
            jsonl.unlink()
    current: dict = {"cfg": None}

    def on_timeout(label):
        cfg = current["cfg"]
        if rank == 0 and cfg is not None:
            row = base_row(cfg, shape, "timeout",
                           f"no progress within the watchdog's {timeout_s(cfg, shape):.0f} s")
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"[attention] rank {rank}: watchdog fired in {label}; exiting", file=sys.stderr,
              flush=True)

    # rank 0 records the timeout: its limit is the shortest, the others wait a little longer
    grace = 0.0 if rank == 0 else 20.0
    watchdog = Watchdog(on_timeout)
    watchdog.arm(args.startup_timeout_s + grace, "startup")
    if args.device == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local,
                                timeout=datetime.timedelta(seconds=args.nccl_timeout_s))
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.nccl_timeout_s))
    world = dist.get_world_size()
    bench = Bench(args, shape, opts)
    dist.barrier()
    watchdog.disarm()

    # rank 0 reads what an earlier run recorded and sends it to all: every rank must see the same
    # file (rank 0 appends to it as soon as it starts the next config)
    shared = [_read_rows(jsonl) if args.resume and rank == 0 else []]
    dist.broadcast_object_list(shared, src=0)
    previous = shared[0]
    meta_row = next((r for r in previous if r.get("kind") == "meta"), None)
    stamp = meta_row["date"] if meta_row else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TORCH_NCCL_HIGH_PRIORITY", "NCCL_NVLS_ENABLE")
                   if k in os.environ)
    command = " ".join([env, "torchrun", f"--nproc-per-node {world}", *sys.argv]).strip()
    if meta_row is None and rank == 0:
        with open(jsonl, "a") as f:
            f.write(json.dumps({"kind": "meta", "date": stamp, "command": command}) + "\n")
    rows = [r for r in previous if r.get("kind") in ("timing", "accuracy")]
    rows += crashed_rows(previous, shape)
    done = {r["config"] for r in rows}  # timed-out and crashed configs too: a hang is not retried
    not_run: list[str] = []
    if rank == 0:
        configs = plan(opts, shape, world, rows)
        total = sum(estimate_s(c, shape) for c in configs if c.key not in done)
        print(f"[attention] world {world}, local backend {bench.backend}, ideal "
              f"{_sdpa_label(bench.kernel_backends)}, peers {_sdpa_label(bench.peer_backends)}; "
              f"{len(configs)} configs planned, "
              f"estimated {total:.0f} s of work for a budget of {args.budget_s:.0f} s", flush=True)

    def write_reports():
        if rank != 0:
            return
        meta = {"date": stamp, "command": command, "args": vars(args), "gpus": world,
                "elapsed_s": time.monotonic() - started, "not_run": not_run, **_versions(bench, args)}
        doc = report(meta, rows, shape, opts, world)
        (out_dir / f"attention-{stamp}.json").write_text(json.dumps(doc, indent=1, default=str))
        (out_dir / f"attention-{stamp}.md").write_text(markdown(meta, rows, shape, opts, world))

    def append(new_rows):
        rows.extend(new_rows)
        if rank == 0:
            with open(jsonl, "a") as f:
                for r in new_rows:
                    f.write(json.dumps(r, default=str) + "\n")
                f.flush()
            for r in new_rows:
                tail = (f"{r['median_ms']:.2f} ms, peak {_fmt(r.get('peak_mem_gib'), '.1f')} GiB"
                        if r["kind"] == "timing" and r["status"] == "ok" else
                        (f"ok={r.get('ok')} errors={r.get('errors')}" if r["status"] == "ok" else
                         f"{r['status']}: {r.get('error')}"))
                print(f"[attention] {r['key']}: {tail}", flush=True)
        write_reports()

    def agree(err: str | None, payload):
        """Every rank's outcome → one status: ok only if all ranks are ok."""
        gathered = [None] * world
        dist.all_gather_object(gathered, (err, payload))
        errors = [e for e, _ in gathered if e]
        if errors:
            return "error", errors[0], None
        return "ok", None, [p for _, p in gathered]

    def decide(cfg: Config) -> bool:
        """Rank 0's clock decides whether `cfg` still fits the budget; every rank follows."""
        watchdog.arm(120.0 + grace, f"deciding on {cfg.key}")
        go = torch.tensor([0], device=bench.device)
        if rank == 0:
            elapsed = time.monotonic() - started
            go[0] = int(should_start(elapsed, estimate_s(cfg, shape), args.budget_s))
        dist.broadcast(go, 0)
        start = bool(go.item())
        watchdog.disarm()
        if not start:
            not_run.append(cfg.key)
        return start

    def run_one(cfg: Config) -> list[dict]:
        current["cfg"] = cfg
        if rank == 0:  # a config that starts and never ends is a crash (see crashed_rows)
            with open(jsonl, "a") as f:
                f.write(json.dumps({"kind": "start", "config": cfg.key, "cfg": asdict(cfg)}) + "\n")
        watchdog.arm(timeout_s(cfg, shape) + grace, cfg.key)
        start = time.monotonic()
        try:
            if cfg.system == "accuracy":
                try:
                    new = bench.accuracy(cfg, agree)
                except Exception as exc:  # the shared part (reference, yardstick): no collectives
                    _free()
                    _, error, _ = agree(_describe(exc), None)
                    new = [base_row(cfg, shape, "error", error)]
                for r in new:
                    r["config"] = cfg.key
                return new
            try:
                result, err = bench.measure(cfg), None
            except Exception as exc:
                result, err = None, _describe(exc)
                if args.verbose:
                    traceback.print_exc()
            _free()
            status, error, per_rank = agree(err, result)
            row = base_row(cfg, shape, status, error)
            row["backend"] = (bench.backend if cfg.system in (*OURS, "ours-local")
                              else _sdpa_label(bench.kernel_backends) if cfg.system == "sdpa"
                              else _sdpa_label(bench.peer_backends))
            if status == "ok":
                slowest = max(per_rank, key=lambda p: p["median_ms"])
                row.update(median_ms=slowest["median_ms"], times_ms=slowest["times_ms"],
                           median_ms_ranks=[p["median_ms"] for p in per_rank],
                           peak_mem_gib=max((p["peak_mem_gib"] or 0) for p in per_rank) or None,
                           warmup=slowest["warmup"], reps=slowest["reps"],
                           sdpa_ops=per_rank[0]["sdpa_ops"])
            row["wall_s"] = round(time.monotonic() - start, 2)
            return [row]
        finally:
            watchdog.disarm()
            current["cfg"] = None

    def plan_fn(_new_rows):
        return [c for c in plan(opts, shape, world, rows) if c.key not in done]

    def run_and_record(cfg):
        new = run_one(cfg)
        append(new)
        return new

    drive(plan_fn, run_and_record, decide)
    write_reports()
    if rank == 0:
        print(f"[attention] finished in {time.monotonic() - started:.0f} s; not run (budget): "
              f"{len(not_run)}; reports in {out_dir}/attention-{stamp}.md/.json", flush=True)
    watchdog.arm(120.0 + grace, "finishing")
    dist.barrier()
    dist.destroy_process_group()
    watchdog.disarm()
    return 0


def _lengths(text: str) -> list[int]:
    """'32K,128K,8192' -> [32768, 131072, 8192]."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        out.append(int(part[:-1]) * K if part.endswith("K") else int(part))
    return out


def _length(text: str) -> int:
    (value,) = _lengths(text)
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for attention-rows.jsonl and attention-<date>.json/.md")
    p.add_argument("--quick", action="store_true",
                   help="only the headline config and the accuracy check")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no config that would end after this many seconds since start")
    p.add_argument("--resume", action="store_true",
                   help="keep attention-rows.jsonl and skip the configs already in it")
    p.add_argument("--seqs", type=_lengths, default=[32 * K, 128 * K, 256 * K, 512 * K])
    p.add_argument("--headline-seq", type=_length, default=128 * K)
    p.add_argument("--accuracy-seq", type=_length, default=8 * K)
    p.add_argument("--ideal-quantum", type=int, default=1024)
    p.add_argument("--ideal-max-len", type=_length, default=128 * K)
    p.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--systems", type=lambda s: s.split(","), default=None,
                   help=f"comma list of systems to run (default all: {LOCAL + OURS + PEERS})")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--gqa-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--allgather-head-stride", type=int, default=0,
                   help="kv heads per all-gather step of allgather attention (0: runtime default)")
    p.add_argument("--peer-sdpa", type=lambda s: s.split(","), default=None,
                   help="the peers' SDPA backends in priority order, e.g. flash,efficient (default: "
                        "ours first: cudnn,flash,efficient on Hopper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout-s", type=float, default=240.0)
    p.add_argument("--nccl-timeout-s", type=float, default=600.0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: gloo on CPU with tiny sizes, only to check this script")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing configs")
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    for _key, _default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(_key, _default)  # plain `python bench/attention.py`: one process
    sys.exit(main(_args))
