"""bench/attention.py's pure logic on CPU: the FLOP convention, the ideal's length, the plan's
priorities (headline first), the budget cut-off, the derived numbers, and the report writers
(bench/attention_configs.py, bench/attention_report.py, and the command line of bench/attention.py).

The GPU measurements themselves run on the device machine (bench/run_gpu.sh); these tests make
sure the numbers it reports are computed as bench/README.md defines them.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

_BENCH = str(Path(__file__).resolve().parents[1] / "bench")


def _load(*names):
    """bench/'s modules import each other by their plain names, as when a script runs there."""
    sys.path.insert(0, _BENCH)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(_BENCH)


att, rep, cli = _load("attention_configs", "attention_report", "attention")
K = att.K
SHAPE = att.Shape()          # H 32, d 128, GQA 8
OPTS = att.PlanOptions()     # 32K..512K, headline 128K


def test_flops_follow_flashattention_convention():
    """A wrong TFLOP/s (and so every efficiency) if the count drifts from FlashAttention's."""
    s = 128 * K
    fwd_full = 4 * 32 * s * s * 128
    assert att.attention_flops(s, 32, 128, "fwd", causal=False) == fwd_full
    assert att.attention_flops(s, 32, 128, "fwd") == fwd_full / 2
    assert att.attention_flops(s, 32, 128, "fwdbwd") == 3.5 * fwd_full / 2
    assert att.attention_flops(s, 32, 128, "fwd", batch=2) == fwd_full
    with pytest.raises(ValueError, match="mode"):
        att.attention_flops(s, 32, 128, "bwd")


def test_ideal_length_is_equal_per_gpu_work():
    """N GPUs at S do S²/N causal work each: one GPU at S/√N does the same."""
    assert att.ideal_len(128 * K, 4) == 64 * K
    assert att.ideal_len(128 * K, 1) == 128 * K
    two = att.ideal_len(128 * K, 2)
    assert two % 1024 == 0
    assert two ** 2 == pytest.approx((128 * K) ** 2 / 2, rel=0.02)
    assert att.ideal_len(512 * K, 4, cap=128 * K) == 128 * K  # above the cap: the capped rate
    assert att.ideal_len(256, 4, quantum=16) == 128


def test_iterations_have_three_repeats_except_very_long_steps():
    for t in (0.001, 0.05, 0.3, 1.9):
        warmup, reps = att.iterations(t)
        assert warmup >= 1 and reps >= 3
    assert att.iterations(4.0) == (1, 2)  # 512K on 4 GPUs: ~4 s a step


def test_plan_puts_the_headline_first_with_both_peers_and_the_ideal():
    configs = att.plan(OPTS, SHAPE, world=4)
    keys = [c.key for c in configs]
    assert len(keys) == len(set(keys))
    n_head = 1 + len(att.OURS) + len(att.PEERS)
    first = configs[:n_head]
    assert first[0] == att.Config("sdpa", 1, 64 * K, 32, "fwdbwd", "headline")  # the ideal
    head = {c.system for c in first[1:]}
    assert head == set(att.OURS) | set(att.PEERS)
    assert all((c.n, c.seq, c.kv_heads, c.mode) == (4, 128 * K, 32, "fwdbwd") for c in first[1:])
    assert [c.system for c in configs[n_head:n_head + 2]] == ["accuracy", "accuracy"]
    assert {c.kv_heads for c in configs[n_head:n_head + 2]} == {32, 8}


def test_plan_covers_the_grid_and_respects_limits():
    configs = att.plan(OPTS, SHAPE, world=4)
    timing = [c for c in configs if c.system != "accuracy"]
    assert {c.n for c in timing} == {1, 2, 4}
    assert {c.seq for c in timing if c.n == 4} == set(OPTS.seqs)
    assert {c.mode for c in timing} == {"fwd", "fwdbwd"}
    assert not [c for c in timing if c.n == 1 and c.seq > OPTS.ideal_max_len]  # no slow 1-GPU runs
    assert not [c for c in timing if c.system == "hybrid" and c.n != 4]
    assert not [c for c in timing if c.system == "sdpa" and c.kv_heads != SHAPE.heads]
    # every distributed config's ideal comes before it
    seen = set()
    for c in timing:
        if c.n > 1:
            length = att.ideal_len(c.seq, c.n, OPTS.ideal_quantum, OPTS.ideal_max_len)
            assert f"sdpa-n1-s{length}-kv32-{c.mode}" in seen, c.key
        seen.add(c.key)


def test_plan_long_tier_starts_with_our_best_at_the_headline():
    rows = [{"kind": "timing", "status": "ok", "system": s, "n": 4, "seq": 128 * K, "kv_heads": 32,
             "mode": "fwdbwd", "median_ms": ms} for s, ms in (("ulysses", 260.0), ("ring", 250.0))]
    before = [c.system for c in att.plan(OPTS, SHAPE, world=4) if c.tier == "long"]
    assert before == ["sdpa", "ulysses", "cp-allgather", "ds-ulysses", "ring"]
    configs = att.plan(OPTS, SHAPE, world=4, rows=rows)
    long = [c for c in configs if c.tier == "long" and c.system != "sdpa"]
    assert [c.system for c in long] == ["ring", "cp-allgather", "ds-ulysses", "ulysses"]
    assert all(c.seq == 512 * K and c.n == 4 for c in long)


def test_plan_quick_and_small_worlds():
    quick = att.plan(att.PlanOptions(quick=True), SHAPE, world=4)
    n_head = 1 + len(att.OURS) + len(att.PEERS)
    assert [c.tier for c in quick] == ["headline"] * n_head + ["accuracy"] * 2
    two = att.plan(OPTS, SHAPE, world=2)
    assert max(c.n for c in two) == 2 and two[1].n == 2 and two[1].seq == 128 * K
    one = att.plan(OPTS, SHAPE, world=1)
    assert {c.n for c in one} == {1} and not [c for c in one if c.system == "accuracy"]
    with pytest.raises(ValueError, match="headline_seq"):
        att.PlanOptions(headline_seq=64 * K)


def test_budget_cut_off_starts_nothing_that_would_overrun():
    """Configs run in plan order while their estimate fits; the rest are reported as not run."""
    clock = {"t": 30.0}  # start-up already spent
    budget = 200.0

    def run(cfg):
        clock["t"] += att.estimate_s(cfg, SHAPE)
        return [{"key": cfg.key}]

    def decide(cfg):
        return att.should_start(clock["t"], att.estimate_s(cfg, SHAPE), budget)

    rows, skipped = att.drive(lambda rows: att.plan(OPTS, SHAPE, 4), run, decide)
    ran = [r["key"] for r in rows]
    assert clock["t"] <= budget
    assert ran[0] == "sdpa-n1-s65536-kv32-fwdbwd" and ran[1].startswith("ulysses-n4-s131072")
    assert skipped and not set(ran) & {c.key for c in skipped}
    assert len(ran) + len(skipped) == len(att.plan(OPTS, SHAPE, 4))
    assert att.timeout_s(skipped[0], SHAPE) > att.estimate_s(skipped[0], SHAPE)


def _row(system, n, seq, ms, kv=32, mode="fwdbwd", **extra):
    return {"kind": "timing", "key": f"{system}-n{n}-s{seq}-kv{kv}-{mode}", "status": "ok",
            "system": system, "n": n, "seq": seq, "kv_heads": kv, "mode": mode, "median_ms": ms,
            "peak_mem_gib": 10.0, "order": att.ORDER[system], "backend": "cudnn", **extra}


def _flops_ms(seq, n, tflops):
    """The median (ms) that gives `tflops` per GPU at (seq, n), fwd+bwd."""
    return att.attention_flops(seq, 32, 128, "fwdbwd") / n / (tflops * 1e12) * 1e3


def _headline_rows():
    s = 128 * K
    return [
        _row("sdpa", 1, 64 * K, _flops_ms(64 * K, 1, 535.0)),
        _row("ulysses", 4, s, _flops_ms(s, 4, 525.0)),
        _row("ring", 4, s, _flops_ms(s, 4, 470.0)),
        _row("cp-allgather", 4, s, _flops_ms(s, 4, 480.0)),
        _row("cp-alltoall", 4, s, _flops_ms(s, 4, 450.0)),
        _row("ds-ulysses", 4, s, _flops_ms(s, 4, 500.0)),
        {**_row("tokenring", 4, s, 0.0), "status": "error", "error": "RuntimeError: boom",
         "median_ms": None},
    ]


def test_derived_numbers_efficiency_and_peer_ratios():
    derived = {r["system"]: r for r in rep.derive(_headline_rows(), SHAPE, OPTS)}
    uly = derived["ulysses"]
    assert uly["tflops_per_gpu"] == pytest.approx(525.0)
    assert uly["ideal_len"] == 64 * K and uly["ideal_tflops"] == pytest.approx(535.0)
    assert uly["efficiency"] == pytest.approx(525 / 535)
    assert uly["vs"]["cp-allgather"] == pytest.approx(525 / 480)  # time ratio = rate ratio
    assert uly["vs"]["ds-ulysses"] == pytest.approx(525 / 500)
    assert "ds-ulysses" not in derived["ds-ulysses"]["vs"]
    assert derived["tokenring"]["efficiency"] is None and derived["tokenring"]["vs"] == {}
    assert derived["sdpa"]["efficiency"] == pytest.approx(1.0)


def test_headline_targets_met_and_missed():
    derived = rep.derive(_headline_rows(), SHAPE, OPTS)
    head = rep.headline(derived, SHAPE, OPTS, world=4)
    t = head["targets"]
    assert head["best_ours"] == "ulysses" and head["best_cp"] == "cp-allgather"
    assert t["best_efficiency"]["met"] is True          # 525/535 = 0.981
    assert t["ulysses_efficiency"]["met"] is True
    assert t["ring_efficiency"]["met"] is False         # 470/535 = 0.879
    assert t["best_vs_cp"]["value"] == pytest.approx(525 / 480) and t["best_vs_cp"]["met"] is False
    assert t["best_vs_ds"]["met"] is True               # 1.05


def _accuracy_row(system, err, yard):
    names = ("out", "dq", "dk", "dv")
    return {"kind": "accuracy", "key": f"accuracy-n4-s8192-kv32-fwdbwd-{system}", "status": "ok",
            "system": system, "n": 4, "seq": 8 * K, "kv_heads": 32, "errors": dict.fromkeys(names, err),
            "sdpa_bf16": dict.fromkeys(names, yard), "ok": err <= 2 * yard}


def test_markdown_has_the_headline_first_and_every_section():
    rows = _headline_rows() + [_accuracy_row("ring", 5e-3, 4e-3), _accuracy_row("ulysses", 9e-3, 4e-3)]
    meta = {"date": "20261121-120000", "device": "NVIDIA H200", "torch": "2.11.0", "command": "x",
            "elapsed_s": 300.0, "not_run": ["ring-n2-s32768-kv8-fwd"]}
    md = rep.markdown(meta, rows, SHAPE, OPTS, world=4)
    order = [md.index(h) for h in ("## Headline", "## Accuracy", "## All configs", "## Not run",
                                   "## Definitions")]
    assert order == sorted(order)
    headline = md[md.index("## Headline"):md.index("## Accuracy")]
    assert "| ulysses | 4 | 128K | 32 | fwdbwd | contig | cudnn |" in headline
    assert "0.981" in headline                      # ulysses' efficiency
    assert "**missed by" in headline                # ring's 0.879 < 0.90
    assert "RuntimeError: boom" in headline
    accuracy = md[md.index("## Accuracy"):md.index("## All configs")]
    assert "**NO**" in accuracy and "yes" in accuracy
    assert "3.5 × forward" in md                    # the definitions travel with the numbers


def test_json_report_schema_round_trips():
    rows = _headline_rows() + [_accuracy_row("ring", 5e-3, 4e-3)]
    meta = {"date": "20261121-120000", "device": "NVIDIA H200", "torch": "2.11.0",
            "command": "torchrun --nproc-per-node 4 bench/attention.py", "elapsed_s": 1.0}
    doc = json.loads(json.dumps(rep.report(meta, rows, SHAPE, OPTS, world=4)))
    for key in ("date", "device", "torch", "command", "definitions", "headline", "rows", "accuracy",
                "shape", "options"):
        assert key in doc, key
    for r in doc["rows"]:
        for key in ("system", "n", "seq", "kv_heads", "mode", "status", "median_ms",
                    "tflops_per_gpu", "ideal_len", "ideal_tflops", "efficiency", "peak_mem_gib", "vs"):
            assert key in r, (r["system"], key)
    assert doc["accuracy"][0]["errors"]["dq"] == 5e-3
    assert doc["headline"]["targets"]["best_efficiency"]["goal"] == 0.97


def test_base_row_and_command_line():
    cfg = att.Config("accuracy", 4, 8 * K, 8, "fwdbwd", "accuracy")
    row = att.base_row(cfg, SHAPE, "timeout", "no progress")
    assert row["kind"] == "accuracy" and row["system"] == "all" and row["config"] == cfg.key
    args = cli.parse_args(["--out", "/tmp/x", "--seqs", "8K,16384", "--headline-seq", "8K"])
    assert args.seqs == [8 * K, 16384] and args.headline_seq == 8 * K and args.budget_s == 420.0
    default = cli.parse_args([])
    assert default.seqs == [32 * K, 128 * K, 256 * K, 512 * K] and not default.quick
    assert math.isclose(att.estimate_s(att.Config("accuracy", 4, 8 * K, 32, "fwdbwd", "a"), SHAPE),
                        att.ACCURACY_EST_S)


def test_resume_marks_started_but_unfinished_configs_as_crashed():
    """A config whose process died leaves only its start line: --resume must skip, not retry it."""
    ok = att.Config("ring", 4, 128 * K, 32, "fwdbwd", "headline")
    dead = att.Config("ulysses", 4, 512 * K, 32, "fwdbwd", "long")
    lines = [{"kind": "meta", "date": "x", "command": "y"},
             {"kind": "start", "config": ok.key, "cfg": asdict(ok)},
             att.base_row(ok, SHAPE, "ok", None),
             {"kind": "start", "config": dead.key, "cfg": asdict(dead)}]
    lines = [json.loads(json.dumps(r)) for r in lines]  # as read back from the JSON-lines file
    crashed = att.crashed_rows(lines, SHAPE)
    assert [(r["config"], r["status"], r["system"]) for r in crashed] == [(dead.key, "crashed", "ulysses")]
