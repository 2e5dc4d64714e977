"""What bench/attention.py measures and in which order: the systems, the configs, the FLOP count,
the ideal's length, the time estimates behind the budget, and the plan (headline first).

Pure: no torch, no GPU; tests/test_bench_attention.py checks it on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
