"""Why the compiled program's FA4 and GEMM kernels ran slower than eager's (issue 15), in one call.

    python bench/attn_layout.py --out $OUT     # < 90 s on one H200 (needs flash-attn-4)
    python bench/attn_layout.py --smoke        # CPU, tiny sizes, aot_eager: checks the script
                                               # (part fa4 skipped; --compile-backend inductor)

bench/results/codegen-20261201-212528.md: in `seqshard layers+loss` the same FA4 kernels took
37.7 ms forward / 89.2 ms backward for 16 calls against eager's 32.4 / 84.8, and the GEMMs 170.0
against 158.5 ms. Two explanations are checked here:

  layouts   the tensors reaching FA4 (and the projection GEMMs) are laid out differently under
            Inductor: q, k, v, out, dout, dq, dk, dv seq-major ([b, s, h, e] in memory, FA4's own
            layout, seen by seqshard as a transposed [b, h, s, e] view) or head-major (dense
            [b, h, s, e]). Before 13f6516 a compiled layer broke at local_attention (three
            graphs; dout made contiguous, head-major, between them), and before 57e8ba6 FA4's
            out and grads were head-major (a copy before o_proj and of dv in backward); since,
            both programs hand FA4 seq-major tensors throughout;
  clocks    the compiled step, without eager's memory-bound pointwise kernels between the
            compute-bound ones, runs the GPU at its power limit, so the SM clock drops and every
            compute-bound kernel runs slower (the GPU's SM clock and power are sampled while
            each case runs: pynvml, else nvidia-smi).

Part "fa4": FlashAttention-4's forward and backward (flash_attn.cute.interface's
`_flash_attn_fwd` / `_flash_attn_bwd`, what runtime/backends.py calls) at the Llama-3.2-1B shape
(b 1, s 16K, h 32, kv heads 8, e 64) and the Llama-3-8B shape (s 32K, h 32, kv 8, e 128), causal,
bf16, with every tensor laid out per LAYOUTS, timed in interleaved rounds (timing.measure with a
dict, isolated iterations); the outputs compared with the all-seq-major ones (the same kernel:
differences should be 0). Order: the 1B shape, parts "power" and "model", then the 8B shape if
the run is still within --budget-s (70 s).

Part "power": a GEMM (the 1B MLP's up projection) and FA4's 1B forward, each timed alone after
PAUSE_MS of near-idle GPU and after PAUSE_MS of back-to-back GEMMs, alternating (20 each): does a
compute-bound kernel run slower when it starts at the power limit? (`power_part`.)

Part "model": the built-in llama3-1b at 16K tokens (bf16, world size 1, forward + backward of
the loss) built by parallelize as `seqshard eager+loss` (kernels=True) and `seqshard
layers+loss` (compile="layers", kernels=True), with runtime/local.py's layout log on
(SEQSHARD_ATTN_LAYOUT_LOG=1): the sizes, strides and layouts of q, k, v, out, lse, dout, dq, dk,
dv entering and leaving the attention op in each program; then both timed in interleaved rounds,
a torch.profiler kernel table of one step of each (bench/codegen.py's `profile`, and the
copy kernels counted), and the SM clock and power during 5 back-to-back steps of each.

First run (bench/results/attn_layout-20261201-231630.md, before 13f6516 and 57e8ba6): FA4's
times are within 1% across the five layouts at both shapes, so layouts do not explain the
slower kernels; in the programs the forward and backward saw identical q, k, v layouts, yet
FA4's forward took 2.30 ms a call compiled against 2.10 eager (= its time alone) - the
question part "power" asks.

Writes attn_layout-<stamp>.json and .md under --out ($OUT, else bench/results). Each case runs
in its own try: a failure is recorded and the run goes on.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
os.environ["SEQSHARD_ATTN_LAYOUT_LOG"] = "1"  # runtime/local.py's layout log, before it loads

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import stamp, write_json_and_markdown  # noqa: E402
from timing import measure  # noqa: E402

K = 1024
SHAPES = {"1b 16K": dict(s=16 * K, h=32, hk=8, e=64), "8b 32K": dict(s=32 * K, h=32, hk=8, e=128)}
LAYOUTS = {  # tensor group -> seq-major (True) or head-major (False)
    "all seq-major": dict(qkv=True, out=True, dout=True, grads=True),
    "all head-major": dict(qkv=False, out=False, dout=False, grads=False),
    "inputs seq-major, out and grads head-major (eager before 57e8ba6)":
        dict(qkv=True, out=False, dout=True, grads=False),
    "as above, dout head-major too (compiled before 13f6516)":
        dict(qkv=True, out=False, dout=False, grads=False),
    "inputs head-major, outputs seq-major": dict(qkv=False, out=True, dout=False, grads=True),
}
COPY_WORDS = ("copy", "clone", "contiguous")


# ------------------------------------------------------------------ GPU clock sampling
class Clocks:
    """SM clock (MHz) and power (W) of GPU 0 sampled every `period` s while the block runs:
    pynvml if importable, else `nvidia-smi`; nothing (and `why`) if neither works."""

    def __init__(self, period: float = 0.02):
        self.period, self.samples, self.why = period, [], None

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

            def read():
                return (pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
        except Exception as e:  # noqa: BLE001 - fall back to nvidia-smi
            self.why = f"pynvml: {type(e).__name__}: {e}"
            read = self._smi
        try:
            read()
        except Exception as e:  # noqa: BLE001 - no sampling
            self.why = f"{self.why}; nvidia-smi: {type(e).__name__}: {e}"
            return self

        def loop():
            while not self._stop.is_set():
                with contextlib.suppress(Exception):
                    self.samples.append(read())
                self._stop.wait(self.period)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _smi():
        out = subprocess.run(["nvidia-smi", "-i", str(torch.cuda.current_device()),
                              "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        clock, power = out.strip().split(",")[:2]
        return float(clock), float(power)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return dict(samples=0, why=self.why)
        clocks, powers = zip(*self.samples)
        return dict(samples=len(clocks), sm_mhz_median=statistics.median(clocks),
                    sm_mhz_min=min(clocks), power_w_median=statistics.median(powers),
                    power_w_max=max(powers))


def _clocked(device, fn):
    """fn() under Clocks on CUDA (synchronized inside), {} and fn() on a CPU."""
    if device != "cuda":
        fn()
        return {}
    with Clocks() as c:
        fn()
        torch.cuda.synchronize()
    return c.summary()


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 800 else text[:800] + "..."


# ------------------------------------------------------------------ part "fa4"
def _laid(shape_bhse, seq_major: bool, device, gen=None):
    """A [b, h, s, e] tensor, bf16, dense in [b, s, h, e] (seq_major) or [b, h, s, e]; random
    when `gen` is given, else empty."""
    b, h, s, e = shape_bhse
    dims = (b, s, h, e) if seq_major else (b, h, s, e)
    x = torch.randn(dims, generator=gen, device=device, dtype=torch.bfloat16) if gen is not None \
        else torch.empty(dims, device=device, dtype=torch.bfloat16)
    return x.transpose(1, 2) if seq_major else x


def fa4_part(args, device, shapes) -> list[dict]:
    from seqshard.runtime import backends

    module, why = backends._fa4_module() if device == "cuda" else (None, "no GPU (--smoke)")
    if module is None:
        return [dict(part="fa4", case=", ".join(shapes), error=f"skipped: {why}")]
    rows = []
    for shape_name in shapes:
        sh = SHAPES[shape_name]
        if time.perf_counter() - args.start > args.budget_s:
            rows.append(dict(part="fa4", case=shape_name,
                             error=f"skipped: past --budget-s {args.budget_s:.0f} s"))
            continue
        b, s, h, hk, e = 1, sh["s"], sh["h"], sh["hk"], sh["e"]
        scale = e ** -0.5
        gen = torch.Generator(device=device).manual_seed(0)
        src = {n: _laid(shp, True, device, gen) for n, shp in
               (("q", (b, h, s, e)), ("k", (b, hk, s, e)), ("v", (b, hk, s, e)),
                ("dout", (b, h, s, e)))}
        fwd_steps, bwd_steps, results = {}, {}, {}
        row = dict(part="fa4", shape=shape_name, b=b, s=s, h=h, hk=hk, e=e, causal=True,
                   ms={}, tflops={}, errors={}, max_abs_diff={})
        for name, lay in LAYOUTS.items():
            try:
                q, k, v = (_laid(src[n].shape, lay["qkv"], device).copy_(src[n]) for n in "qkv")
                dout = _laid(src["dout"].shape, lay["dout"], device).copy_(src["dout"])
                out = _laid(q.shape, lay["out"], device)
                dq, dk, dv = (_laid(x.shape, lay["grads"], device) for x in (q, k, v))
                t = lambda x: x.transpose(1, 2)  # noqa: E731 - FA4 takes [b, s, h, e]
                lse = [None]

                def fwd(q=q, k=k, v=v, out=out, lse=lse):
                    res = backends._fa4_call("_flash_attn_fwd", t(q), t(k), t(v),
                                             softmax_scale=scale, causal=True, return_lse=True,
                                             out=t(out))
                    lse[0] = res[1]

                def bwd(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk, dv=dv, lse=lse):
                    backends._fa4_call("_flash_attn_bwd", t(q), t(k), t(v), t(out), t(dout),
                                       lse[0], softmax_scale=scale, causal=True,
                                       dq=t(dq), dk=t(dk), dv=t(dv))
                fwd()
                bwd()
                torch.cuda.synchronize()
                results[name] = (out, dq, dk, dv)
                fwd_steps[name], bwd_steps[name] = fwd, bwd
            except Exception as e:  # noqa: BLE001 - recorded per layout
                row["errors"][name] = _error(e)
                traceback.print_exc()
        ref = results.get("all seq-major")
        for name, got in results.items():
            if ref is not None and name != "all seq-major":
                row["max_abs_diff"][name] = max((a.float() - r.float()).abs().max().item()
                                                for a, r in zip(got, ref))
        from seqshard.costmodel.compute import attention_flops
        flops_fwd = attention_flops(b, h, s, s, e, causal=True, training=False)
        flops_all = attention_flops(b, h, s, s, e, causal=True, training=True)
        for mode, steps, flops in (("fwd", fwd_steps, flops_fwd),
                                   ("bwd", bwd_steps, flops_all - flops_fwd)):
            if not steps:
                continue
            try:
                timed = {}
                row.setdefault("clocks", {})[mode] = _clocked(device, lambda: timed.update(
                    measure(steps, warmup=2, repeats=args.repeats, device=device)))
                for name, tm in timed.items():
                    row["ms"][f"{name} {mode}"] = tm.median_ms
                    row["tflops"][f"{name} {mode}"] = flops / (tm.median_ms * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001
                row["errors"][mode] = _error(e)
                traceback.print_exc()
        results.clear()
        rows.append(row)
        print(f"[fa4] {shape_name}: {row['ms']} {row['errors'] or ''}", flush=True)
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ part "power"
PAUSE_MS = 8.0
"""What precedes each timed kernel in part "power": this long of near-idle GPU, or of GEMMs."""


def power_part(args, device) -> list[dict]:
    """Is a compute-bound kernel slower when it follows compute-bound work than after a pause?
    Each kernel (a GEMM of the 1B MLP's up projection, 16K x 2048 @ 2048 x 8192; FA4's forward
    at the 1B shape) is timed alone (a CUDA event pair around it) 20 times in each of two
    conditions, alternating: after PAUSE_MS of `torch.cuda._sleep` (one thread spinning: the GPU
    near idle power), and after PAUSE_MS of back-to-back GEMMs (at the power limit). Slower after
    GEMMs, with the same inputs and layouts: the kernel's speed depends on the power state it
    starts in - what the compiled program changes by dropping eager's memory-bound kernels
    between its GEMMs and attention."""
    if device != "cuda":
        return [dict(part="power", case="all", error="skipped: no GPU (--smoke)")]
    from seqshard.runtime import backends

    rows, rounds = [], 20
    x = torch.randn(16 * K, 2048, device=device, dtype=torch.bfloat16)
    w = torch.randn(8192, 2048, device=device, dtype=torch.bfloat16)

    def gemm():
        return x @ w.T
    kernels = {"gemm 16K x 2048 x 8192": gemm}
    module, why = backends._fa4_module()
    if module is not None:
        q = torch.randn(1, 16 * K, 32, 64, device=device, dtype=torch.bfloat16)
        kv = torch.randn(1, 16 * K, 8, 64, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        kernels["fa4 fwd 1B 16K"] = lambda: backends._fa4_call(
            "_flash_attn_fwd", q, kv, kv, softmax_scale=0.125, causal=True, return_lse=True,
            out=out)
    else:
        rows.append(dict(part="power", case="fa4 fwd 1B 16K", error=f"skipped: {why}"))
    per_gemm = measure(gemm, warmup=3, repeats=5, device=device).median_ms
    busy = max(1, round(PAUSE_MS / per_gemm))
    cycles = int(PAUSE_MS * 1e-3 * 1.98e9)  # at the H200's boost clock, 1980 MHz
    before = {"after a pause": lambda: torch.cuda._sleep(cycles),
              "after GEMMs": lambda: [gemm() for _ in range(busy)]}
    for name, fn in kernels.items():
        row = dict(part="power", case=name, rounds=rounds, pause_ms=PAUSE_MS, busy_gemms=busy)
        try:
            fn()
            marks = {cond: [] for cond in before}

            def run():
                for _ in range(rounds):
                    for cond, lead_in in before.items():
                        lead_in()
                        pair = (torch.cuda.Event(enable_timing=True),
                                torch.cuda.Event(enable_timing=True))
                        pair[0].record()
                        fn()
                        pair[1].record()
                        marks[cond].append(pair)
            row["clocks"] = _clocked(device, run)
            row["ms"] = {cond: statistics.median(a.elapsed_time(b) for a, b in pairs)
                         for cond, pairs in marks.items()}
            row["slowdown_after_gemms"] = row["ms"]["after GEMMs"] / row["ms"]["after a pause"]
        except Exception as e:  # noqa: BLE001 - recorded per kernel
            row["error"] = _error(e)
            traceback.print_exc()
        rows.append(row)
        print(f"[power] {name}: {row.get('ms')} {row.get('error', '')}", flush=True)
    return rows


# ------------------------------------------------------------------ part "model"
def model_part(args, device, dtype) -> list[dict]:
    from codegen import profile

    from seqshard.models import AXES, build
    from seqshard.planner import parallel
    from seqshard.runtime import local

    name, seq = ("tiny", 64) if args.smoke else ("llama3-1b", args.seq)
    model, inputs = build("llama", name, device=device, dtype=dtype, batch=1, seq=seq)
    if device != "cuda":  # CPU: no FA4, so parallelize keeps the model's SDPA call; force the
        parallel.local_attention_kernel = lambda dims, dev: "runtime"  # runtime's op, as on FA4
    cases = {"seqshard eager+loss": dict(kernels=True),
             "seqshard layers+loss": dict(compile="layers", compile_backend=args.compile_backend,
                                          kernels=True)}

    def step_of(fn):
        def step():
            model.zero_grad(set_to_none=True)
            loss = fn(*inputs)
            loss.backward()
            return loss
        return step

    from torch._dynamo.utils import counters

    rows, built = [], {}
    for label, kw in cases.items():
        row = dict(part="model", case=label, model=name, seq=seq, dtype=str(dtype))
        print(f"[model] {label} ...", flush=True)
        local.LAYOUTS.clear()
        counters.clear()
        try:
            t0 = time.perf_counter()
            pm = parallel.parallelize(model, inputs, axes=AXES["llama"],
                                      **{"compile": False, "kernels": False, **kw})
            row["loss"] = step_of(pm)().item()
            if device == "cuda":
                torch.cuda.synchronize()
            row["first_step_s"] = time.perf_counter() - t0
            row["layouts"] = [dict(op=key[0], tensors=rec) for key, rec in local.LAYOUTS.items()]
            row["attention_calls_in_code"] = pm.code.count("local_attention(")
            row["dynamo_graphs"] = counters["stats"]["unique_graphs"]
            row["graph_breaks"] = {k: v for k, v in counters["graph_break"].items()}
            built[label] = pm
        except Exception as e:  # noqa: BLE001 - recorded per case
            row["error"] = _error(e)
            traceback.print_exc()
        rows.append(row)
        print(f"[model] {label}: layouts {row.get('layouts')}", flush=True)
    if built:
        try:
            timed = measure({k: step_of(f) for k, f in built.items()}, warmup=1,
                            repeats=args.repeats, device=device)
            for row in rows:
                if row["case"] in timed:
                    row["interleaved_ms"] = timed[row["case"]].median_ms
                    row["interleaved_times_ms"] = timed[row["case"]].times_ms
        except Exception as e:  # noqa: BLE001
            rows.append(dict(part="model", case="interleaved", error=_error(e)))
            traceback.print_exc()
    for row in rows:
        pm = built.get(row["case"])
        if pm is None:
            continue
        try:
            step = step_of(pm)
            row["clocks"] = _clocked(device, lambda: [step() for _ in range(5)])
            row["profile"] = profile(step, device, top=25)
            row["copy_ms"], row["copy_calls"] = _copies(step, device)
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
            traceback.print_exc()
    built.clear()
    return rows


def _copies(step, device) -> tuple[float, int]:
    """Time (ms) and count of copy kernels (CUDA: names with copy, clone, contiguous) or of
    aten::copy_ (CPU) in one step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    ms, calls = 0.0, 0
    for e in prof.key_averages():
        if device == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device != "cuda" and e.key != "aten::copy_":
            continue  # a CPU profile: the op every copy, clone and contiguous runs
        if any(w in e.key.lower() for w in COPY_WORDS):
            ms += (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total) / 1e3
            calls += e.count
    return ms, calls


# ------------------------------------------------------------------ report
def markdown(doc) -> str:
    md = [f"# attention layouts and clocks, eager vs compiled ({doc['device']})", "",
          f"`{doc['command']}`; torch {doc['torch']}", ""]
    for r in (r for r in doc["rows"] if r["part"] == "fa4"):
        if "error" in r:
            md += [f"FA4 part ({r['case']}): {r['error']}", ""]
            continue
        md += [f"## FA4 at the {r['shape']} shape (b {r['b']}, s {r['s']}, h {r['h']}, kv {r['hk']}, "
               f"e {r['e']}, causal, bf16)", "",
               "| layout | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | max diff vs seq-major |",
               "|---|---|---|---|---|---|"]
        for name in LAYOUTS:
            ms, tf = r["ms"], r["tflops"]
            cell = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
            md.append(f"| {name} | {cell(ms, name + ' fwd')} | {cell(tf, name + ' fwd')} | "
                      f"{cell(ms, name + ' bwd')} | {cell(tf, name + ' bwd')} | "
                      f"{r['max_abs_diff'].get(name, '-')} |")
        for mode, c in r.get("clocks", {}).items():
            md.append(f"\nclocks during {mode}: {c}")
        for name, err in r["errors"].items():
            md.append(f"\nerror {name}: {err}")
        md.append("")
    power = [r for r in doc["rows"] if r["part"] == "power"]
    if power:
        md += ["## A kernel after a pause vs after GEMMs (part power)", "",
               "| kernel | after a pause | after GEMMs | slowdown | SM clock median / min | "
               "power median / max | note |", "|---|---|---|---|---|---|---|"]
        for r in power:
            ms, c = r.get("ms") or {}, r.get("clocks") or {}
            clock = f"{c['sm_mhz_median']:.0f} / {c['sm_mhz_min']:.0f} MHz" \
                if "sm_mhz_median" in c else c.get("why", "-")
            watts = f"{c['power_w_median']:.0f} / {c['power_w_max']:.0f} W" \
                if "power_w_median" in c else "-"
            cell = lambda k: f"{ms[k]:.3f} ms" if k in ms else "-"  # noqa: E731
            md.append(f"| {r['case']} | {cell('after a pause')} | {cell('after GEMMs')} | "
                      f"{_f(r, 'slowdown_after_gemms', '{:.3f}')} | {clock} | {watts} | "
                      f"{r.get('error', '')} |")
        md.append("")
    model = [r for r in doc["rows"] if r["part"] == "model"]
    if model:
        md += ["## llama3-1b program, eager vs compiled", "",
               "| case | first step | interleaved step | copy kernels (ms, calls) | SM clock median / min "
               "| power median / max | note |", "|---|---|---|---|---|---|---|"]
        for r in model:
            c = r.get("clocks") or {}
            clock = f"{c['sm_mhz_median']:.0f} / {c['sm_mhz_min']:.0f} MHz" if "sm_mhz_median" in c \
                else c.get("why", "-")
            power = f"{c['power_w_median']:.0f} / {c['power_w_max']:.0f} W" if "power_w_median" in c \
                else "-"
            copies = f"{r['copy_ms']:.2f} ms, {r['copy_calls']}" if "copy_ms" in r else "-"
            note = r.get("error", "")
            if r.get("dynamo_graphs"):
                note += f"Dynamo graphs {r['dynamo_graphs']}, breaks: " + (
                    "; ".join(f"{k.splitlines()[0][:120]} ({v})" for k, v in r["graph_breaks"].items()) or "none")
            md.append(f"| {r['case']} | {_f(r, 'first_step_s', '{:.1f} s')} | "
                      f"{_f(r, 'interleaved_ms', '{:.1f} ms')} | {copies} | {clock} | {power} | "
                      f"{note} |")
        md.append("")
        for r in model:
            for entry in r.get("layouts", []):
                md.append(f"- {r['case']}, `{entry['op']}`: " + "; ".join(
                    f"{n} {t['shape']} stride {t['stride']} ({t['layout']})"
                    for n, t in entry["tensors"].items()))
        md.append("")
        for r in model:
            if "profile" in r:
                p = r["profile"]
                kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in p["kinds"].items())
                md += [f"Profile of one step, {r['case']}: {p['total_ms']:.1f} ms ({kinds})", "",
                       "| kernel | calls | ms |", "|---|---|---|"]
                md += [f"| `{t['name']}` | {t['count']} | {t['ms']:.2f} |" for t in p["top"]]
                md.append("")
    return "\n".join(md) + "\n"


def _f(row, key, fmt):
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="fa4,power,model")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile-backend", default=None,
                    help="inductor (default; --smoke: aot_eager, as Inductor compiles C++ for "
                         "~70 s on a small CPU)")
    ap.add_argument("--budget-s", type=float, default=70.0,
                    help="start no FA4 shape after this many seconds of the run")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (part fa4 skipped)")
    ap.add_argument("--out", default=os.environ.get("OUT") or
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29543")
        dist.init_process_group("gloo" if args.smoke else "nccl", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    rows, args.start = [], t0
    if "fa4" in parts:  # the 1B shape, power, the program, the 8B shape while --budget-s lasts
        rows += fa4_part(args, device, ["1b 16K"])
    if "power" in parts:
        rows += power_part(args, device)
    if "model" in parts:
        rows += model_part(args, device, dtype)
    if "fa4" in parts and not args.smoke:
        rows += fa4_part(args, device, ["8b 32K"])
    doc = dict(benchmark="attn_layout", command=" ".join(sys.argv), torch=torch.__version__,
               python=platform.python_version(),
               device=torch.cuda.get_device_name() if device == "cuda" else "CPU",
               wall_s=time.perf_counter() - t0, rows=rows)
    md = markdown(doc)
    path = write_json_and_markdown(args.out, f"attn_layout-{stamp()}", doc, md)
    print(md)
    print(f"wrote {path} in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
