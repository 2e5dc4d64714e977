"""What codegen's compile switch and its own kernels buy on one GPU (issue 15), in one call.

    python bench/codegen.py --out $OUT                 # parts model and loss, ~4 minutes on one H200
    python bench/codegen.py --parts loss --out $OUT    # only the LM head + loss part
    python bench/codegen.py --parts 8b --out $OUT      # the 8B shape at 32K, ~4 minutes
    python bench/codegen.py --smoke --out /tmp/cg      # CPU (gloo), tiny shapes: checks the script
                                                       # (--parts model,loss,8b: all three)

Part "model": the built-in `llama3-1b` (Llama-3.2-1B shape: 16 layers, hidden 2048, vocabulary
128256), bf16, one sequence of --seq tokens (16K), forward + backward of the loss, world size 1:

    plain eager           the model itself
    plain compile         torch.compile(model) (Inductor)
    seqshard eager        parallelize(model, inputs): the per-rank program op by op
    seqshard eager+loss   the same with kernels=True: the fused LM head + loss alone
    seqshard layers       parallelize(..., compile="layers"): each distinct layer template
                          compiled once (codegen/compiled.py)
    seqshard layers warm  the same built again in this process: Inductor's FX graph cache and
                          AOTAutograd's cache hold the template, only Dynamo traces again
    seqshard layers+loss  compile="layers", kernels=True: the LM head + loss through the fused
                          kernel (codegen/kernels/linear_ce.py) in place of the logits; the plan
                          keeps the loss whole, so chunks of up to 1 GiB of logits (4096 tokens)
    seqshard layers+loss chunk=1024
                          the same with the loss forced into 16 chunks (1024 tokens: Liger's
                          size, and what the row above ran before 2026-12-01 20:30)
    seqshard layers+loss cudnn
                          layers+loss with SDPA's cuDNN backend first while the template is
                          traced (the compiled template keeps the kernel it traced; compile
                          caches off): is the compiled template's attention the cuDNN kernel
                          the cost model prices? (the profiles name the kernels either way)
    seqshard program+loss kernels=True and the whole per-rank program (not layer by layer)
                          under one torch.compile: embedding, rotary tables and final norm
                          compiled too, fusion across layer boundaries; the fused loss stays
                          eager (a graph break)
    seqshard layers+loss cdt
                          layers+loss compiled with Inductor's coordinate_descent_tuning (each
                          Triton kernel's launch configuration tuned at compile time)
    plain compile         torch.compile(model) (Inductor)

Each: the first step's wall time (building the ParallelModule and compiling included; then
synchronized), the steady step (timing.measure: 1 warm-up, 5 isolated iterations, median), the
peak memory of a steady step, the loss. Then the cases of INTERLEAVED, still built, timed again in
interleaved rounds (timing.measure with a dict: a drift of the clocks spreads over all of them),
and a profile of one step of each case of PROFILED: the GPU time by kernel (top kernels, and sums
for attention, GEMMs, Triton and the rest), which says where a step's time goes.

Part "loss": the LM head + cross-entropy alone, d 4096, vocabulary 128256, bf16, at 32K and 128K
tokens (x [T, d] and W [V, d] leaves requiring grad; labels with 1% ignored):

    plain                 F.cross_entropy((x @ W.T).float(), y)
    liger                 Liger's fused linear cross-entropy (skipped with the reason when
                          liger_kernel does not import)
    fused                 linear_cross_entropy: default chunk (Liger's rule: 1024 tokens at 32K,
                          4096 at 128K), dW accumulated in bf16 (as Liger)
    fused fp32-acc        the same with an fp32 dW accumulator (accumulate=torch.float32)
    fused chunk=N         the default with N-token chunks (1024, 2048, 4096)

Each: the step (forward + backward; 1 warm-up, 5 isolated iterations, median), the extra peak
memory (the peak during a step minus what was allocated before it: inputs and weights are not
counted, the gradients are), the loss and the relative error of dx and dW against plain at 32K
(at 128K plain runs out of memory: against `fused`). Then the systems of LOSS_INTERLEAVED
(fused and Liger: the issue's "same run" comparison) timed again in interleaved rounds at each
token count (timing.measure with a dict: one fused step, one Liger step, and so on; 1 warm-up,
max(10, --repeats) rounds, medians), so a drift of the GPU clocks does not favour either.

Part "8b": the issue's one-GPU anchor, the Llama-3-8B shape at 32K tokens, trained (AdamW) by
bench/memory.py's systems, each in its own process (bench/memory.py `run_config`: a timeout kills
it, an error is a row): `liger-compiled` (native blocks each checkpointed and torch.compile'd +
Liger's fused linear cross-entropy: the strongest baseline a user would pick), `seqshard`
(eager, the planner's memory plan), `seqshard-compiled` (the same plan, compile="layers",
kernels=True), `liger` (as liger-compiled, blocks eager). Each: step, tokens/s, MFU (bench/memory.py's
definition: 6·N·S + 6·L·S²·d model FLOPs over 989 TFLOP/s), peak memory, the first step
(the warm-up step, compiling included; parallelize's planning is `plan`), the plan's predicted
step (`plan.predicted.step_s` of the plan parallelize made).

Every case runs in its own try: a failure (out of memory, a missing package) is recorded with
its message and the run goes on. Writes codegen-<stamp>.json and .md under --out.
Needs ortools for the planner (as bench/memory.py); liger_kernel is optional.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import stamp, write_json_and_markdown  # noqa: E402
from timing import measure  # noqa: E402

GIB = 2**30
INTERLEAVED = ("seqshard eager", "seqshard layers+loss", "seqshard layers+loss chunk=1024",
               "seqshard program+loss", "seqshard layers+loss cdt", "seqshard layers+loss cudnn")
PROFILED = ("seqshard eager", "seqshard layers+loss", "seqshard layers+loss cudnn")
LOSS_INTERLEAVED = ("fused", "liger")
"""Loss systems timed again in interleaved rounds at each token count (the issue's comparison)."""
CONFIGS_8B = ("8b:32K:liger-compiled", "8b:32K:seqshard-compiled", "8b:32K:seqshard",
              "8b:32K:liger")
"""Most wanted first: a configuration that does not fit the budget left is not started."""


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 600 else text[:600] + "..."


# ------------------------------------------------------------------ part "model"
def model_part(args, device, dtype) -> list[dict]:
    import torch._functorch.config  # noqa: F401 - while_compiling's options
    import torch._inductor.config  # noqa: F401
    from torch._dynamo.utils import counters

    from seqshard.models import AXES, build
    from seqshard.planner import parallelize

    name, seq = ("tiny", 64) if args.smoke else ("llama3-1b", args.seq)
    backend = "aot_eager" if args.smoke else "inductor"
    model, inputs = build("llama", name, device=device, dtype=dtype, batch=1, seq=seq)

    def step_of(fn):
        def step():
            model.zero_grad(set_to_none=True)
            loss = fn(*inputs)
            loss.backward()
            return loss
        return step

    def build_pm(**kw):
        return parallelize(model, inputs, axes=AXES["llama"], **{"compile": False, "kernels": False,
                                                                  **kw})

    def compiled_program(pm):
        """The whole per-rank program under one torch.compile (world size 1: no collectives)."""
        gm = pm.program.gm
        gm.forward = torch.compile(gm.forward, backend=backend, dynamic=False)
        return pm

    chunk16 = {"lm_head": "chunk:16"}  # 1024 tokens a chunk at 16K

    cases = [  # most wanted first: a case past the budget is skipped
        ("plain eager", lambda: model),
        ("seqshard eager", lambda: build_pm()),
        ("seqshard eager+loss", lambda: build_pm(kernels=True)),
        ("seqshard layers", lambda: build_pm(compile="layers", compile_backend=backend)),
        ("seqshard layers warm", lambda: build_pm(compile="layers", compile_backend=backend)),
        ("seqshard layers+loss", lambda: build_pm(compile="layers", compile_backend=backend,
                                                  kernels=True)),
        ("seqshard layers+loss chunk=1024", lambda: build_pm(
            compile="layers", compile_backend=backend, kernels=True, overrides=chunk16)),
        ("seqshard layers+loss cudnn", lambda: build_pm(compile="layers", compile_backend=backend,
                                                        kernels=True)),
        ("seqshard program+loss", lambda: compiled_program(build_pm(kernels=True))),
        ("seqshard layers+loss cdt", lambda: build_pm(compile="layers", compile_backend=backend,
                                                      kernels=True)),
        ("plain compile", lambda: torch.compile(model, backend=backend)),
    ]
    def while_compiling(label):
        """What a case sets while it is built and takes its first step (where its templates
        compile): cdt, an Inductor option (a new FX-graph-cache key: it compiles anew); cudnn,
        SDPA's backends in the order cuDNN, flash, efficient, math (read when the template is
        traced; the compile caches do not key on it, so they are off for this case)."""
        stack = contextlib.ExitStack()
        if label.endswith(" cdt"):
            stack.enter_context(torch._inductor.config.patch(coordinate_descent_tuning=True))
        if label.endswith(" cudnn"):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                     SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            stack.enter_context(sdpa_kernel(order, set_priority=True))
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        return stack
    rows, kept = [], {}  # kept: the built cases of INTERLEAVED

    for label, make in cases:
        if args.only and label not in args.only:
            continue
        row = dict(part="model", case=label, model=name, seq=seq, dtype=str(dtype))
        if time.perf_counter() - args.start > args.budget_s:
            row["error"] = f"skipped: past --budget-s {args.budget_s:.0f} s"
            rows.append(row)
            continue
        print(f"[model] {label} ...", flush=True)
        fn = None
        counters.clear()
        try:
            _free(device)
            _sync(device)
            t0 = time.perf_counter()
            with while_compiling(label):
                fn = make()
                built = time.perf_counter()
                loss = step_of(fn)()
                _sync(device)
            row["first_step_s"] = time.perf_counter() - t0
            row["build_s"] = built - t0
            row["loss"] = loss.item()
            row["dynamo_graphs"] = counters["stats"]["unique_graphs"]
            row["graph_breaks"] = sum(counters["graph_break"].values())
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step_of(fn)()
            _sync(device)
            if device == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            t = measure(step_of(fn), warmup=1, repeats=args.repeats, device=device)
            row["step_ms"] = t.median_ms
            row["times_ms"] = t.times_ms
            code = getattr(fn, "code", None)
            if isinstance(code, str):
                row["templates"] = code.count("torch.compile(backend=")
                row["fused_loss"] = "fused_chunked(" in code
                row["plan"] = fn.plan.hash()
                row["predicted_step_s"] = fn.plan.predicted.step_s
            if label in PROFILED:
                row["profile"] = profile(step_of(fn), device)
            if label in INTERLEAVED:
                kept[label] = fn
        except Exception as e:  # noqa: BLE001 - recorded per case
            row["error"] = _error(e)
            traceback.print_exc()
        del fn
        model.zero_grad(set_to_none=True)
        rows.append(row)
        print(f"[model] {label}: {_short(row)}", flush=True)
    if len(kept) > 1:
        print(f"[model] interleaved: {', '.join(kept)} ...", flush=True)
        try:
            times = measure({k: step_of(f) for k, f in kept.items()}, warmup=1,
                            repeats=args.repeats, device=device)
            for row in rows:
                if row["case"] in times:
                    row["interleaved_ms"] = times[row["case"]].median_ms
                    row["interleaved_times_ms"] = times[row["case"]].times_ms
        except Exception as e:  # noqa: BLE001 - the separate timings stand
            rows.append(dict(part="model", case="interleaved", error=_error(e)))
            traceback.print_exc()
    kept.clear()
    return rows


KINDS = (("triton", ("triton", "ce_rows_kernel", "scale_kernel")),  # Inductor's, linear_ce's
         ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
         ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_")))
"""Kinds of kernels by name, the first that matches (a CPU profile names ops, not kernels)."""


def profile(step, device, top: int = 15) -> dict:
    """One step under torch.profiler: the device time by kernel (CPU: by op), the `top` longest,
    and sums by kind (KINDS: attention, GEMMs, Triton, the rest), in ms."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()  # warm
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        step()
        _sync(device)
    events = []
    for e in prof.key_averages():
        if device == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue  # a CPU op: its kernels are events of their own
        us = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
        if us > 0:
            events.append((e.key, e.count, us / 1e3))
    events.sort(key=lambda x: -x[2])
    kinds = {k: 0.0 for k, _ in KINDS} | {"other": 0.0}
    for name, _, ms in events:
        low = name.lower()
        kind = next((k for k, words in KINDS if any(w in low for w in words)), "other")
        kinds[kind] += ms
    return dict(total_ms=sum(ms for _, _, ms in events), kinds=kinds,
                top=[dict(name=n[:110], count=c, ms=ms) for n, c, ms in events[:top]])


# ------------------------------------------------------------------ part "8b"
def part_8b(args) -> list[dict]:
    """CONFIGS_8B through bench/memory.py, each in its own process (no CUDA in this one)."""
    import memory

    seq = "256" if args.smoke else "32K"
    margs = argparse.Namespace(device="cpu" if args.smoke else "cuda", cluster="h200x1",
                               repeats=args.repeats_8b, smoke=args.smoke, budget_gib=None,
                               no_predict=False)
    rows, t0 = [], time.perf_counter()
    for name in CONFIGS_8B:
        cfg = memory.parse_configs(name.replace(":32K:", f":{seq}:"))[0]
        left = args.budget_8b_s - (time.perf_counter() - t0)
        if left < 60:
            rows.append(dict(part="8b", config=cfg.name, system=cfg.system, status="not run",
                             reason=f"{left:.0f} s left of --budget-8b-s {args.budget_8b_s:.0f}"))
            continue
        print(f"[8b] {cfg.name} (timeout {min(240, left):.0f} s) ...", flush=True)
        row = memory.run_config(cfg, margs, min(240.0, left))
        row["part"] = "8b"
        rows.append(row)
        print(f"[8b] {cfg.name}: {row.get('status')} {row.get('reason', '')[:200]} "
              f"step {row.get('step_s')}, MFU {row.get('mfu')}, first step "
              f"{row.get('first_step_s')}, in {row['wall_s']:.0f} s", flush=True)
    return rows


# ------------------------------------------------------------------ part "loss"
def _liger():
    """Liger's fused linear cross-entropy as fn(x, W, y), or raises ImportError."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        from liger_kernel.transformers.fused_linear_cross_entropy import \
            LigerFusedLinearCrossEntropyLoss
        module = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, y: _first(module(w, x, y))
    return lambda x, w, y: _first(LigerFusedLinearCrossEntropyFunction.apply(x, w, y))


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.loss


def loss_part(args, device, dtype) -> list[dict]:
    from seqshard.codegen.kernels import linear_ce

    d, V = (64, 1000) if args.smoke else (4096, 128256)
    token_counts = [256, 1024] if args.smoke else args.tokens
    systems = {
        "plain": lambda x, w, y: F.cross_entropy((x @ w.T).float(), y),
        "fused": lambda x, w, y: linear_ce.linear_cross_entropy(x, w, y),
        "liger": None,
        "fused fp32-acc": lambda x, w, y: linear_ce.linear_cross_entropy(
            x, w, y, accumulate=torch.float32),
        "fused chunk=1024": lambda x, w, y: linear_ce.linear_cross_entropy(x, w, y, chunk=1024),
        "fused chunk=2048": lambda x, w, y: linear_ce.linear_cross_entropy(x, w, y, chunk=2048),
        "fused chunk=4096": lambda x, w, y: linear_ce.linear_cross_entropy(x, w, y, chunk=4096),
    }
    liger_error = None
    try:
        systems["liger"] = _liger()
    except Exception as e:  # noqa: BLE001 - an optional package
        liger_error = _error(e)
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for T in token_counts:
        _free(device)
        x = (torch.randn(T, d, device=device, generator=gen) * 1.0).to(dtype).requires_grad_()
        w = (torch.randn(V, d, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
        y = torch.randint(0, V, (T,), device=device, generator=gen)
        y[torch.randperm(T, device=device, generator=gen)[: T // 100]] = -100
        ref = None  # (loss, dx, dW) of plain, else of fused
        kept = {}  # the steps of LOSS_INTERLEAVED that ran
        for label, fn in systems.items():
            if args.only and label not in args.only:
                continue
            row = dict(part="loss", case=label, tokens=T, d=d, vocab=V, dtype=str(dtype))
            print(f"[loss] {label} T={T} ...", flush=True)
            if fn is None:
                row["error"] = f"skipped: liger_kernel does not import ({liger_error})"
                rows.append(row)
                continue

            def step(fn=fn):
                x.grad = w.grad = None
                loss = fn(x, w, y)
                loss.backward()
                return loss

            try:
                _free(device)
                _sync(device)
                loss = step()  # warm-up: Triton compiles here
                _sync(device)
                row["loss"] = loss.item()
                x.grad = w.grad = None
                _free(device)
                if device == "cuda":
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                step()
                _sync(device)
                if device == "cuda":
                    row["extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
                got = (loss.detach().float(), x.grad.float(), w.grad.float())
                if ref is None and label in ("plain", "fused"):
                    ref = got
                    row["reference"] = True
                elif ref is not None:
                    row["err_loss"] = (got[0] - ref[0]).abs().item() / ref[0].abs().item()
                    row["err_dx"] = ((got[1] - ref[1]).norm() / ref[1].norm()).item()
                    row["err_dw"] = ((got[2] - ref[2]).norm() / ref[2].norm()).item()
                del got
                t = measure(step, warmup=1, repeats=args.repeats, device=device)
                row["step_ms"] = t.median_ms
                row["times_ms"] = t.times_ms
                if label.startswith("fused"):
                    row["mixed_addmm"] = dict(linear_ce._MIXED_ADDMM)  # fp32-acc: fp32-output GEMM ran
                    row["chunk"] = int(label.split("=")[1]) if "chunk=" in label else \
                        linear_ce.default_chunk(T, V, x.element_size(), d)
                    row["triton"] = linear_ce.triton_usable(x)
                if label in LOSS_INTERLEAVED:
                    kept[label] = (step, row)
            except Exception as e:  # noqa: BLE001 - recorded per case (out of memory, ...)
                row["error"] = _error(e)
                if not isinstance(e, torch.OutOfMemoryError):
                    traceback.print_exc()
            x.grad = w.grad = None
            rows.append(row)
            print(f"[loss] {label} T={T}: {_short(row)}", flush=True)
        if len(kept) > 1:
            print(f"[loss] interleaved T={T}: {', '.join(kept)} ...", flush=True)
            try:
                _free(device)
                timed = measure({k: step for k, (step, _) in kept.items()}, warmup=1,
                                repeats=max(10, args.repeats), device=device)
                for k, (_, row) in kept.items():
                    row["interleaved_ms"] = timed[k].median_ms
                    row["interleaved_times_ms"] = timed[k].times_ms
            except Exception as e:  # noqa: BLE001 - the separate timings stand
                rows.append(dict(part="loss", case="interleaved", tokens=T, error=_error(e)))
                traceback.print_exc()
            x.grad = w.grad = None
        kept.clear()
        del x, w, y, ref
    return rows


def _short(row: dict) -> str:
    keys = ("first_step_s", "step_ms", "peak_gib", "extra_peak_gib", "loss", "err_dw", "error")
    return ", ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                     for k in keys if k in row)


def markdown(doc) -> str:
    md = [f"# codegen: compiled layer templates and the fused LM-head loss ({doc['device']})", "",
          f"`{doc['command']}`; torch {doc['torch']}, triton {doc['triton']}", ""]
    model = [r for r in doc["rows"] if r["part"] == "model"]
    if model:
        md += [f"## {model[0]['model']}, {model[0]['seq']} tokens, {model[0]['dtype']}, fwd + bwd", "",
               "| case | first step (incl. build + compile) | steady step | vs seqshard eager | peak | loss | "
               "predicted step (measured / predicted) | note |",
               "|---|---|---|---|---|---|---|---|"]
        eager = next((r.get("step_ms") for r in model if r["case"] == "seqshard eager"), None)
        for r in model:
            speed = f"{eager / r['step_ms']:.3f}×" if eager and r.get("step_ms") else "-"
            note = r.get("error", "")
            if "templates" in r:
                note = (note + f" {r['templates']} template(s)" + (", fused loss" if r.get("fused_loss") else "")).strip()
            if r.get("dynamo_graphs"):
                note = (note + f"; Dynamo graphs {r['dynamo_graphs']}, breaks {r['graph_breaks']}").strip("; ")
            pred = "-"
            if r.get("predicted_step_s") and r.get("step_ms"):
                pred = f"{1e3 * r['predicted_step_s']:.1f} ms ({r['step_ms'] / 1e3 / r['predicted_step_s']:.3f})"
            md.append(f"| {r['case']} | {_f(r, 'first_step_s', '{:.1f} s')} | {_f(r, 'step_ms', '{:.1f} ms')} | "
                      f"{speed} | {_f(r, 'peak_gib', '{:.1f} GiB')} | {_f(r, 'loss', '{:.5f}')} | {pred} | {note} |")
        md.append("")
    if model and any("interleaved_ms" in r for r in model):
        md += ["Interleaved rounds (the cases still built, timed in turn):", "",
               "| case | step (interleaved) | vs seqshard eager |", "|---|---|---|"]
        base = next((r.get("interleaved_ms") for r in model if r["case"] == "seqshard eager"), None)
        for r in model:
            if "interleaved_ms" in r:
                speed = f"{base / r['interleaved_ms']:.3f}×" if base else "-"
                md.append(f"| {r['case']} | {r['interleaved_ms']:.1f} ms | {speed} |")
        md.append("")
    for r in model:
        if "profile" in r:
            p = r["profile"]
            kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in p["kinds"].items())
            md += [f"Profile of one step, {r['case']}: {p['total_ms']:.1f} ms of kernels ({kinds})", "",
                   "| kernel | calls | ms |", "|---|---|---|"]
            md += [f"| `{t['name']}` | {t['count']} | {t['ms']:.2f} |" for t in p["top"]]
            md.append("")
    rows8 = [r for r in doc["rows"] if r["part"] == "8b"]
    if rows8:
        md += ["## Llama-3-8B shape, 32K tokens, AdamW, one H200 (bench/memory.py's systems)", "",
               "| system | status | step | vs liger-compiled | tokens/s | MFU | peak (all / timed) | "
               "first step | plan | predicted step | step ratio | note |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = next((r.get("step_s") for r in rows8 if r.get("system") == "liger-compiled"), None)
        for r in rows8:
            status = r.get("status", "?")
            if status != "ok":
                status += f": {(r.get('reason') or '')[:160]}"
            note = []
            if "templates" in r:
                note.append(f"{r['templates']} template(s)" + (", fused loss" if r.get("fused_loss") else ""))
            if "compiled_graphs" in r:
                note.append(f"Dynamo graphs {r['compiled_graphs']}, breaks {r.get('graph_breaks')}")
            mem = {k: v for k, v in (r.get("memory") or {}).items() if k != "notes"}
            if mem and r.get("system", "").startswith("seqshard"):
                note.append("; ".join(f"{k} {_brief(v)}" for k, v in mem.items()))
            speed = f"{base / r['step_s']:.3f}×" if base and r.get("step_s") else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            md.append(f"| {r.get('system', r.get('config'))} | {status} | {_f(r, 'step_s', '{:.3f} s')} | {speed} | "
                      f"{_f(r, 'tokens_per_s', '{:,.0f}')} | {mfu} | {_f(r, 'peak_gib', '{:.1f}')} / "
                      f"{_f(r, 'peak_timed_gib', '{:.1f} GiB')} | {_f(r, 'first_step_s', '{:.1f} s')} | "
                      f"{_f(r, 'plan_s', '{:.1f} s')} | {_f(r, 'predicted_step_s', '{:.3f} s')} | "
                      f"{_f(r, 'step_ratio', '{:.3f}')} | {'; '.join(note)} |")
        md.append("")
    loss = [r for r in doc["rows"] if r["part"] == "loss"]
    if loss:
        md += ["## LM head + cross-entropy (d 4096, vocabulary 128256, bf16; fwd + bwd)", "",
               "| tokens | case | step | extra peak | loss | rel. err dx / dW (vs reference) | note |",
               "|---|---|---|---|---|---|---|"]
        for r in loss:
            err = f"{r['err_dx']:.2e} / {r['err_dw']:.2e}" if "err_dw" in r else \
                ("reference" if r.get("reference") else "-")
            note = r.get("error", "")
            if "chunk" in r:
                note = (note + f" chunk {r['chunk']}, triton {r.get('triton')}").strip()
            md.append(f"| {r['tokens']} | {r['case']} | {_f(r, 'step_ms', '{:.1f} ms')} | "
                      f"{_f(r, 'extra_peak_gib', '{:.2f} GiB')} | {_f(r, 'loss', '{:.5f}')} | {err} | {note} |")
        pairs = {}  # tokens -> {case: row} of the interleaved rounds
        for r in loss:
            if "interleaved_ms" in r:
                pairs.setdefault(r["tokens"], {})[r["case"]] = r
        if pairs:
            md += ["", f"Interleaved rounds ({' and '.join(LOSS_INTERLEAVED)} in turn, medians of "
                   f"{max(len(r['interleaved_times_ms']) for p in pairs.values() for r in p.values())} "
                   "rounds; extra peak from the rows above):", "",
                   "| tokens | " + " | ".join(LOSS_INTERLEAVED) + " | fused / liger time | "
                   "fused / liger extra peak |", "|---|" + "---|" * (len(LOSS_INTERLEAVED) + 2)]
            for T, p in pairs.items():
                cells = [_f(p.get(c, {}), "interleaved_ms", "{:.1f} ms") for c in LOSS_INTERLEAVED]
                f, g = p.get("fused", {}), p.get("liger", {})
                ratio = f"{f['interleaved_ms'] / g['interleaved_ms']:.3f}" if f and g else "-"
                mem = f"{f['extra_peak_gib'] / g['extra_peak_gib']:.3f}" if \
                    f.get("extra_peak_gib") and g.get("extra_peak_gib") else "-"
                md.append(f"| {T} | " + " | ".join(cells) + f" | {ratio} | {mem} |")
    return "\n".join(md) + "\n"


def _f(row, key, fmt):
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def _brief(value) -> str:
    """A memory-plan field in a few words: `[['layers.0.mlp', 1], ... 32 of them]` → its count."""
    if isinstance(value, list) and len(value) > 3:
        return f"{value[0]} and {len(value) - 1} more"
    return str(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="model,loss")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, aot_eager")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="start no model case after this many seconds of the run")
    ap.add_argument("--budget-8b-s", type=float, default=330.0,
                    help="part 8b: start no configuration with less than 60 s of this left")
    ap.add_argument("--repeats-8b", type=int, default=2, help="part 8b: timed steps")
    ap.add_argument("--out", default=os.environ.get("OUT") or
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.only = [c for c in args.only.split(",") if c]
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    parts = args.parts.split(",")
    rows = []
    t0 = args.start = time.perf_counter()
    if "8b" in parts:  # first, before this process makes a CUDA context: the children get the GPU
        rows += part_8b(args)
    if parts == ["8b"]:
        return finish(args, device, rows, t0)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29541")
        dist.init_process_group("gloo" if args.smoke else "nccl", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    args.start = time.perf_counter()
    if "loss" in parts:  # first: short, and what the model part's compile could crowd out
        rows += loss_part(args, device, dtype)
    if "model" in parts:
        rows += model_part(args, device, dtype)
    return finish(args, device, rows, t0)


def finish(args, device, rows, t0) -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    doc = dict(benchmark="codegen", command=" ".join(sys.argv), torch=torch.__version__,
               triton=triton_version, python=platform.python_version(),
               device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
               inductor_cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
               wall_s=time.perf_counter() - t0, rows=rows)
    md = markdown(doc)
    path = write_json_and_markdown(args.out, f"codegen-{stamp()}", doc, md)
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
