"""Selective recompute on the GPU: does a layer that keeps its attention's outputs run attention
once per step, and does it save what the planner says it saves?

    python bench/selective_check.py                  # one GPU, ~1 min: JSON + markdown under $OUT
    python bench/selective_check.py --smoke          # CPU, tiny model: the code path only

One GPU, world size 1 (a process group of one, as bench/state.py). The Llama-3.2-1B shape
(seqshard/models `llama3-1b`, bf16, built as bench/memory.py builds it) at `--seq` tokens, two
programs from the same model: every layer recomputed (override `recompute`) and every layer
recomputed keeping attention's outputs (`recompute:selective`). For each: the forward calls of
the runtime's local attention body in one training step (`runtime.local.whole_forward`, which
runs the backend: FlashAttention-4 on an H200 with flash-attn-4, where parallelize builds the
program with local_attention="runtime"; counted by patching the module global the custom op
calls), the step time (`timing.measure`, isolated, after a warm-up) and the peak
allocated memory, against the plan's predicted step and peak. The claim under test: selective
runs attention L times per step and plain recompute 2L; the measured time saved is within 10%
of the predicted saving (the plans' `predicted.step_s` difference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = {"recompute": "recompute", "selective": "recompute:selective"}


def _count_forwards(counter: dict) -> None:
    """Count the forward calls of the attention kernels the runtime's local op runs."""
    from seqshard.runtime import local

    def wrap(mod, name):
        fn = getattr(mod, name)

        def counted(*a, _fn=fn, **k):
            counter[name] = counter.get(name, 0) + 1
            return _fn(*a, **k)
        setattr(mod, name, counted)

    wrap(local, "whole_forward")  # the local op's body; it calls the backend (FA4 on an H200)


def run(args) -> dict:
    import torch

    from memory import build_model
    from state import init_world
    from timing import measure

    from seqshard.models import AXES, config
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    mesh = init_world(cuda)
    cfg = config("llama", "tiny" if args.smoke else "llama3-1b")
    seq = args.seq or (64 if args.smoke else 16384)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(cfg, device, dtype)
    ids = torch.randint(0, cfg.vocab, (1, seq), device=device)
    labels = torch.randint(0, cfg.vocab, (1, seq), device=device)
    counter: dict = {}
    _count_forwards(counter)
    if args.smoke:  # on CPU the captured SDPA runs; force the runtime's local attention, counted
        from seqshard.planner import parallel
        parallel.local_attention_kernel = lambda dims, device: "runtime"
    rows = {}
    for mode, spec in MODES.items():
        from seqshard.planner.parallel import parallelize
        pm = parallelize(model, (ids, labels), mesh=mesh, axes=AXES["llama"],
                         overrides={"layers.*": spec}, optimizer="adamw-pure",
                         compile=False, kernels=False)

        def step():
            for p in model.parameters():
                p.grad = None
            pm(ids, labels).backward()

        step()  # warm-up (kernel compiles)
        counter.clear()
        step()
        calls = dict(counter)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = measure(step, repeats=args.repeats, device=device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rows[mode] = dict(calls=calls, step_s=t.median_ms / 1e3, peak_gib=peak,
                          predicted_step_s=pm.plan.predicted.step_s,
                          predicted_peak_gib=pm.plan.predicted.peak_memory_bytes / 2**30,
                          keep_attention=list(pm.plan.keep_attention),
                          notes=[n for n in pm.plan.notes if "attention" in n])
        print(f"[{mode}] calls {calls}, step {t.median_ms / 1e3:.4f} s (predicted "
              f"{pm.plan.predicted.step_s:.4f}), peak {peak} GiB", flush=True)
        del pm
    saved = rows["recompute"]["step_s"] - rows["selective"]["step_s"]
    predicted = rows["recompute"]["predicted_step_s"] - rows["selective"]["predicted_step_s"]
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                seq=seq, layers=cfg.layers, rows=rows, saved_s=saved, predicted_saved_s=predicted,
                saved_ratio=saved / predicted if predicted else None)


def write(result: dict, out: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"selective-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# Selective recompute on one GPU ({result['device']}, torch {result['torch']})", "",
             f"`bench/selective_check.py`: Llama-3.2-1B shape, {result['seq']} tokens, "
             f"{result['layers']} layers, bf16, world size 1.", "",
             "| program | attention forward calls per step | step | predicted | peak | predicted peak |",
             "|---|---|---|---|---|---|"]
    for mode, r in result["rows"].items():
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        lines.append(f"| {mode} | {r['calls']} | {r['step_s'] * 1e3:.1f} ms | "
                     f"{r['predicted_step_s'] * 1e3:.1f} ms | {peak} | {r['predicted_peak_gib']:.1f} GiB |")
    lines += ["", f"Time saved by keeping attention: {result['saved_s'] * 1e3:.1f} ms measured, "
              f"{result['predicted_saved_s'] * 1e3:.1f} ms predicted (ratio {result['saved_ratio']:.3f})."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny model")
    ap.add_argument("--seq", type=int, help="tokens (default 16384; --smoke 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    result = run(args)
    print(f"results: {write(result, args.out)}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
