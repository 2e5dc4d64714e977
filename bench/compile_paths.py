"""Does compile="layers" + kernels=True pay on every memory-plan path? One GPU, one call (issue 15's
default switch).

    python bench/compile_paths.py --out $OUT          # ~4 minutes on one H200
    python bench/compile_paths.py --smoke --out /tmp/cp   # CPU (gloo), tiny, aot_eager: checks the script

The Llama-3.2-1B shape cut to --layers layers (4: enough for groups of 2 and a class of several
layers), bf16, one sequence of --seq tokens (16K), world size 1. For each PATH (a set of
overrides: the memory strategies the planner can choose, alone and combined) two programs of the
same plan:

    eager      parallelize(..., overrides=path)                     compile=False, kernels=False
    compiled   parallelize(..., overrides=path, compile="layers", kernels=True)

Each: the first step (building and compiling included), the steady step (interleaved with the
other: timing.measure with a dict, 1 warm-up, --repeats rounds, medians), the peak of a steady
step, and the error of the loss and of every gradient against one fp32 reference (the plain model
in fp32 from the same weights, run once): `err` = max over parameters of |g - g_ref| / |g_ref|
(norms). A path passes when the compiled program's error is at most 2x the eager program's (both
run bf16; the compiled one rounds in other places) - the bf16 rule bench/attention.py uses.

Writes compile_paths-<stamp>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codegen import _free, _sync  # noqa: E402
from report import stamp, write_json_and_markdown  # noqa: E402
from timing import measure  # noqa: E402

GIB = 2**30
QKV = "layers.*.attn_norm+attn.q_proj+attn.k_proj+attn.v_proj"
MLP = "layers.*.attn.o_proj+add+mlp_norm+mlp"
PATHS = {  # name -> overrides (on top of the planner's own choices)
    "plan's own": {},
    "recompute": {"layers.*": "recompute"},
    "selective": {"layers.*": "recompute:selective"},
    "offload": {"layers.*": "offload recompute"},
    "group:2": {"layers.*": "recompute group:2"},
    "group:2 offload selective": {"layers.*": "offload recompute:selective group:2"},
    "chunked loss + chains": {"layers.*": "recompute", "lm_head": "chunk:8", QKV: "chunk:4",
                              MLP: "chunk:4"},
}


def grads_error(model, ref: dict) -> tuple[float, str, float]:
    """(the largest relative error of a parameter's gradient, that parameter, the median)."""
    errs = {}
    for name, p in model.named_parameters():
        g, r = p.grad, ref[name]
        if g is None:
            return float("inf"), name, float("inf")
        errs[name] = ((g.float() - r).norm() / r.norm().clamp_min(1e-30)).item()
    worst = max(errs, key=errs.get)
    return errs[worst], worst, sorted(errs.values())[len(errs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated path names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, aot_eager")
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no path after this")
    ap.add_argument("--out", default=os.environ.get("OUT") or
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    from seqshard.models import AXES, llama
    from seqshard.planner import parallelize

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    backend = "aot_eager" if args.smoke else "inductor"
    seq = 64 if args.smoke else args.seq
    cfg = dataclasses.replace(llama.CONFIGS["tiny" if args.smoke else "llama3-1b"], layers=args.layers)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29543")
    dist.init_process_group("gloo" if args.smoke else "nccl", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    t_start = time.perf_counter()

    torch.manual_seed(0)
    with torch.device(device):
        model = llama.Llama(cfg)  # fp32 first: the reference
    gen = torch.Generator(device).manual_seed(1)
    inputs = llama.example_inputs(cfg, 1, seq, labels=True, device=device, generator=gen)
    loss = model(*inputs)
    loss.backward()
    ref_loss = loss.item()
    ref = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.to(dtype)
    del loss
    _free(device)

    def step_of(fn):
        def step():
            model.zero_grad(set_to_none=True)
            loss = fn(*inputs)
            loss.backward()
            return loss
        return step

    rows = []
    only = [p for p in args.only.split(",") if p]
    for path, ov in PATHS.items():
        if only and path not in only:
            continue
        if time.perf_counter() - t_start > args.budget_s:
            rows.append(dict(path=path, overrides=ov, error=f"skipped: past --budget-s {args.budget_s:.0f}"))
            continue
        built = {}
        for kind, kw in (("eager", dict(compile=False, kernels=False)), ("compiled", dict(compile="layers", kernels=True,
                                                          compile_backend=backend))):
            row = dict(path=path, overrides=ov, program=kind)
            print(f"[{path}] {kind} ...", flush=True)
            try:
                _free(device)
                _sync(device)
                t0 = time.perf_counter()
                pm = parallelize(model, inputs, axes=AXES["llama"], overrides=ov or None, **kw)
                loss = step_of(pm)()
                _sync(device)
                row["first_step_s"] = time.perf_counter() - t0
                row["err_loss"] = abs(loss.item() - ref_loss) / abs(ref_loss)
                row["err_grads"], row["worst_param"], row["err_median"] = grads_error(model, ref)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step_of(pm)()
                _sync(device)
                if device == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
                row["plan"] = pm.plan.hash()
                row["templates"] = pm.code.count("torch.compile(backend=")
                row["fused_loss"] = "fused_chunked(" in pm.code
                row["predicted_step_s"] = pm.plan.predicted.step_s
                built[kind] = pm
            except Exception as e:  # noqa: BLE001 - recorded per path
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                traceback.print_exc()
            model.zero_grad(set_to_none=True)
            rows.append(row)
        if len(built) == 2:
            try:
                t = measure({k: step_of(f) for k, f in built.items()}, warmup=1,
                            repeats=args.repeats, device=device)
                for r in rows[-2:]:
                    r["step_ms"] = t[r["program"]].median_ms
                    r["times_ms"] = t[r["program"]].times_ms
            except Exception as e:  # noqa: BLE001
                rows[-1]["error"] = f"timing: {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
        built.clear()
        model.zero_grad(set_to_none=True)
        print(f"[{path}] " + "; ".join(f"{r['program']}: {r.get('step_ms')} ms err {r.get('err_grads')} "
                                       f"{r.get('error', '')[:200]}" for r in rows[-2:]), flush=True)

    doc = dict(benchmark="compile_paths", command=" ".join(sys.argv), torch=torch.__version__,
               python=platform.python_version(), seq=seq, layers=args.layers, dtype=str(dtype),
               device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
               ref_loss=ref_loss, wall_s=time.perf_counter() - t_start, rows=rows)
    md = markdown(doc)
    print(md)
    print(f"wrote {write_json_and_markdown(args.out, f'compile_paths-{stamp()}', doc, md)}")
    dist.destroy_process_group()
    return 0


def markdown(doc) -> str:
    md = [f"# compile=\"layers\" + kernels=True against eager on every memory-plan path ({doc['device']})", "",
          f"`{doc['command']}`; torch {doc['torch']}; Llama-3.2-1B shape, {doc['layers']} layers, "
          f"{doc['seq']} tokens, {doc['dtype']}, world size 1. err: max over parameters of the "
          "gradient's relative error (norms) against the fp32 plain model; pass: compiled err <= 2x "
          "eager err. Steps interleaved (medians).", "",
          "| path | eager step | compiled step | speedup | first step (eager / compiled) | "
          "peak (eager / compiled) | err eager / compiled (parameter) | median err | pass | note |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in doc["rows"]:
        by.setdefault(r["path"], {})[r.get("program", "-")] = r
    for path, p in by.items():
        e, c = p.get("eager", {}), p.get("compiled", {})
        f = lambda r, k, fmt: fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        speed = f"{e['step_ms'] / c['step_ms']:.3f}x" if e.get("step_ms") and c.get("step_ms") else "-"
        ok = "-"
        if e.get("err_grads") is not None and c.get("err_grads") is not None:
            ok = "yes" if c["err_grads"] <= 2 * e["err_grads"] else "**no**"
        note = "; ".join(x for x in (e.get("error", ""), c.get("error", ""),
                                     f"{c.get('templates')} template(s)" if c.get("templates") else "",
                                     "fused loss" if c.get("fused_loss") else "") if x)
        md.append(f"| {path} | {f(e, 'step_ms', '{:.1f} ms')} | {f(c, 'step_ms', '{:.1f} ms')} | {speed} | "
                  f"{f(e, 'first_step_s', '{:.1f}')} / {f(c, 'first_step_s', '{:.1f} s')} | "
                  f"{f(e, 'peak_gib', '{:.1f}')} / {f(c, 'peak_gib', '{:.1f} GiB')} | "
                  f"{f(e, 'err_grads', '{:.2e}')} / {f(c, 'err_grads', '{:.2e}')} ({c.get('worst_param')}) | "
                  f"{f(e, 'err_median', '{:.2e}')} / {f(c, 'err_median', '{:.2e}')} | {ok} | {note} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
