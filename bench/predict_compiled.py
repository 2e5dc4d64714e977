"""Predicted step of bench/codegen.py's seqshard cases under a calibrated cluster, on a CPU.

    python3 bench/predict_compiled.py --cluster h200-fused.json \
        --results bench/results/codegen-20261201-212528.json [--out DIR]

Plans the Llama-3.2-1B shape (`llama3-1b`, bf16, one sequence of the results' length, 16K) on
the meta device for each seqshard case of part "model" (eager, eager+loss, layers, layers+loss,
layers+loss chunk=1024, ...: compile="layers" where the case compiles layers, kernels=True where
it runs the fused loss) under three clusters:

    preset        h200x1 with attention at FlashAttention-4 (what `parallelize` prices on an
                  H200 with flash-attn-4 installed and no cluster given: bench/codegen.py's
                  predictions); fused fields 1.0
    preset+fused  the same with the two fields `seqshard calibrate --fused` measured
                  (`GPU.fused_bandwidth_efficiency`, `GPU.fused_loss_efficiency`) from --cluster
    calibrated    --cluster as it is (`parallelize(cluster=FILE)` prices it so)

and prints each against the step the results measured (its own and the interleaved one), as
measured / predicted. No GPU: a calibration file and a results file from one are enough.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIELDS = ("fused_bandwidth_efficiency", "fused_loss_efficiency")


def options(case: str) -> dict:
    """plan() options of a bench/codegen.py case (its build_pm arguments)."""
    return dict(compile="layers" if " layers" in case else False, kernels="loss" in case,
                overrides={"lm_head": "chunk:16"} if "chunk=1024" in case else None)


def clusters(path: str) -> dict:
    from seqshard.costmodel import Cluster
    from seqshard.costmodel.attention import padded_head_dims
    from seqshard.runtime.backends import fa4_head_dim

    preset = Cluster.preset("h200", gpus=1).with_attention_backend("fa4")
    preset = replace(preset, gpu=padded_head_dims(preset.gpu, {64: fa4_head_dim(64)}))
    calibrated = Cluster.load(path)
    fused = {k: getattr(calibrated.gpu, k) for k in FIELDS}
    return {"preset": preset, "preset+fused": replace(preset, gpu=replace(preset.gpu, **fused)),
            "calibrated": calibrated}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", required=True, help="a cluster JSON from `seqshard calibrate`")
    ap.add_argument("--results", default=None, help="bench/codegen.py's JSON (measured steps)")
    ap.add_argument("--seq", type=int, default=None, help="tokens (default: the results', or 16384)")
    ap.add_argument("--out", default=None, help="folder for predict_compiled.{json,md}")
    args = ap.parse_args(argv)

    from seqshard.capture import capture
    from seqshard.dims import analyze
    from seqshard.models import AXES, build
    from seqshard.planner.api import plan_captured

    rows = []
    if args.results:
        rows = [r for r in json.loads(Path(args.results).read_text())["rows"]
                if r.get("part") == "model" and r.get("predicted_step_s") and r.get("step_ms")]
    seq = args.seq or (rows[0]["seq"] if rows else 16384)
    cases = [r["case"] for r in rows] or ["seqshard eager", "seqshard eager+loss",
                                          "seqshard layers", "seqshard layers+loss",
                                          "seqshard layers+loss chunk=1024"]
    measured = {r["case"]: r for r in rows}
    named = clusters(args.cluster)
    print("fused fields: " + ", ".join(f"{k} {getattr(named['calibrated'].gpu, k):.4g}"
                                       for k in FIELDS), flush=True)
    t0 = time.perf_counter()
    model, inputs = build("llama", "llama3-1b", device="meta", dtype=torch.bfloat16, batch=1,
                          seq=seq)
    dims = analyze(capture(model, inputs), AXES["llama"])
    cache, out = {}, []
    for case in cases:
        opts = options(case)
        key = (opts["compile"], opts["kernels"], bool(opts["overrides"]))
        if key not in cache:
            cache[key] = {name: plan_captured(dims, cluster=c, **opts).predicted.step_s
                          for name, c in named.items()}
            print(f"[{time.perf_counter() - t0:5.1f}s] {case}: " + ", ".join(
                f"{k} {1e3 * v:.1f} ms" for k, v in cache[key].items()), flush=True)
        row = dict(case=case, **{f"predicted_{k}_s": v for k, v in cache[key].items()})
        if case in measured:
            m = measured[case]
            row.update(step_ms=m["step_ms"], interleaved_ms=m.get("interleaved_ms"),
                       bench_predicted_s=m["predicted_step_s"])
        out.append(row)

    names = list(named)
    lines = [f"# bench/codegen.py's cases predicted under `{args.cluster}` (llama3-1b, {seq} tokens)",
             "", "fused fields measured: " + ", ".join(
                 f"`{k}` {getattr(named['calibrated'].gpu, k):.4g}" for k in FIELDS),
             "", "| case | measured step | " + " | ".join(f"{n}: predicted (measured / predicted)"
                                                        for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in out:
        step = r.get("step_ms")
        cells = []
        for n in names:
            p = 1e3 * r[f"predicted_{n}_s"]
            cells.append(f"{p:.1f} ms" + (f" ({step / p:.3f})" if step else ""))
        meas = f"{step:.1f} ms" if step else "-"
        if r.get("interleaved_ms"):
            meas += f" (interleaved {r['interleaved_ms']:.1f})"
        lines.append(f"| {r['case']} | {meas} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "predict_compiled.json").write_text(json.dumps(out, indent=1))
        Path(args.out, "predict_compiled.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
