"""bench/attention.py's results: the derived numbers (TFLOP/s, the ideal, efficiency, ratios
against the peers), the headline targets, the JSON document and the markdown tables, and the
rows file that a rerun with --resume reads back. The numbers are pure functions of the rows
(tests/test_bench_attention.py checks them on CPU).

Definitions (also written into every report):
    FLOPs      FlashAttention's convention: forward 4·B·H·S²·d, halved under the causal mask;
               forward + backward = 3.5 × forward. H counts query heads (GQA costs the same).
    TFLOP/s    per GPU: FLOPs / N / median time.
    ideal      the single-GPU kernel (PyTorch SDPA with the same local backend as ours, MHA shapes,
               no algorithm around it) at equal per-GPU work: N GPUs at length S do S²/N of causal
               work each, as one GPU does at length S/√N (rounded to --ideal-quantum). Above
               --ideal-max-len the kernel's rate is flat (docs/anchors.md: 544 / 535 TFLOP/s at
               32K / 128K), so the rate measured at that length stands in for it.
    efficiency TFLOP/s per GPU / ideal TFLOP/s.
    ×peer      peer's median time / ours (> 1: ours is faster), same N, S, heads and mode.
    fwd        the training forward (inputs require grad); fwdbwd adds the backward of a random
               upstream gradient.
    time       per rank: the median over the repeats of CUDA-event time of one step; a row reports
               the slowest rank's median. Peak memory: torch.cuda.max_memory_allocated (inputs,
               outputs and gradients included), the largest over ranks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from attention_configs import (K, LOCAL, OURS, PEERS, TARGETS, PlanOptions, Shape, attention_flops,
                               group_sizes, ideal_len)
from report import write_json_and_markdown

DEFINITIONS = __doc__[__doc__.index("Definitions (also"):].strip()
JSONL = "attention-rows.jsonl"


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


def fmt(x, spec=".3g", none="–"):
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
        vs = [fmt(r["vs"].get(p), ".3f") for p in ("cp-allgather", "cp-alltoall", "ds-ulysses")]
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r.get('error') or ''}"
        lines.append(
            f"| {r['system']} | {r['n']} | {_seq_label(r['seq'])} | {r['kv_heads']} | {r['mode']} | "
            f"{r.get('order', '')} | {r.get('backend') or ''} | {fmt(r.get('median_ms'), '.2f')} | "
            f"{fmt(r['tflops_per_gpu'], '.1f')} | {fmt(r['ideal_tflops'], '.1f')} "
            f"({_seq_label(r['ideal_len'])}) | {fmt(r['efficiency'], '.3f')} | "
            f"{fmt(r.get('peak_mem_gib'), '.1f')} | " + " | ".join(vs) + f" | {status[:200]} |")
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




def markdown(meta: dict, rows: list[dict], shape: Shape, opts: PlanOptions, world: int) -> str:
    derived = derive(rows, shape, opts)
    head = headline(derived, shape, opts, world)
    accuracy = [r for r in rows if r.get("kind") == "accuracy"]
    parts = [f"# Distributed attention benchmark {meta.get('date', '')}\n",
             f"{meta.get('device', '?')} × {world}, torch {meta.get('torch', '?')}, cuDNN "
             f"{meta.get('cudnn', '?')}, NCCL {meta.get('nccl', '?')}, DeepSpeed "
             f"{meta.get('deepspeed', 'not imported')}; B=1, H={shape.heads}, d={shape.head_dim}, "
             f"GQA kv heads {shape.gqa_kv_heads}, causal, bf16. "
             f"Elapsed {fmt(meta.get('elapsed_s'), '.0f')} s.\n",
             f"Local kernels: ours {meta.get('local_backend', '?')}, ideal "
             f"{meta.get('kernel_sdpa_backends', '?')}, peers {meta.get('peer_sdpa_backends', '?')}.\n",
             f"`{meta.get('command', '')}`\n",
             f"## Headline: N={head['n']}, S={_seq_label(head['seq'])}, MHA, forward + backward\n"]
    sel = [r for r in derived if (r["n"], r["seq"], r["kv_heads"], r["mode"])
           == (head["n"], head["seq"], head["kv_heads"], "fwdbwd")]
    parts.append(_timing_table(sel) if sel else "not measured\n")
    if head["targets"]:
        lines = [f"- {name}: {fmt(t['value'], '.3f')} (goal ≥ {t['goal']}) — "
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


class Record:
    """The run's files in `out_dir`, written by rank 0 alone (the other ranks' calls do nothing):
    the rows file (a meta line, then a `start` line as each config begins and its rows as it
    ends) and the JSON and markdown reports, rewritten after every config."""

    def __init__(self, out_dir: Path, rank: int, *, keep: bool):
        self.out_dir, self.rows_file, self.writer = out_dir, out_dir / JSONL, rank == 0
        if self.writer:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not keep and self.rows_file.exists():
                self.rows_file.unlink()

    def read(self) -> list[dict]:
        """Every line an earlier run wrote (a line cut by a kill is left out)."""
        if not self.rows_file.exists():
            return []
        rows = []
        for line in self.rows_file.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
        return rows

    def add(self, *lines: dict) -> None:
        if self.writer:
            with open(self.rows_file, "a") as f:
                for line in lines:
                    f.write(json.dumps(line, default=str) + "\n")

    def write_reports(self, meta: dict, rows: list[dict], shape: Shape, opts: PlanOptions,
                      world: int) -> None:
        if self.writer:
            write_json_and_markdown(self.out_dir, f"attention-{meta['date']}",
                                    report(meta, rows, shape, opts, world),
                                    markdown(meta, rows, shape, opts, world))
