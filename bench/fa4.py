"""FlashAttention-4 as seqshard's local attention kernel, on one GPU (issue 16).

    python bench/fa4.py [--out DIR] [--budget-s 330]
    python bench/fa4.py --device cpu --seqs 256 --ours flash_cpu --cudnn math --out /tmp/fa4  # plumbing

For each case (B = 1, bf16, S in 32K / 128K / 512K, causal and full, MHA 32 heads and GQA 32:8 at
d128, MHA at d64 and d72 (the DiT's); 512K causal only and with 8 heads, to stay in time), in
one process and interleaved rounds (`timing.measure` with a dict of steps, isolated iterations):

    seqshard  seqshard.runtime.local_attention(q, k, v, backend="fa4"): the custom op, its
              autograd, the backend wrapper (our [b, h, s, e] layout handed to FA4 as views)
    bare      flash_attn.cute.flash_attn_func on FA4's own [b, s, h, e] layout, dense
    bare_view (d128 MHA causal only) flash_attn_func on transposed views of [b, h, s, e]
              tensors: the layout seqshard hands over, without seqshard
    cudnn     local_attention(..., backend="cudnn"): the previous default (K/V heads expanded)

each forward (no grad) and forward + backward. Reported: median ms, TFLOP/s (FlashAttention's
FLOP count: 4·B·H·S²·E forward, causal half, backward 2.5×), the speed ratio seqshard/bare
(bare ms / seqshard ms; issue 16's goal: >= 0.98) and fa4/cuDNN, and the largest difference of
seqshard's forward output from bare FA4's and from cuDNN's. A failure (an API mismatch, out of
memory, a head dim FA4 does not compile) is recorded for its case and step; the run goes on.
Cases run by priority while `--budget-s` lasts; the rest are listed as skipped.

Writes fa4-<stamp>.json and .md into --out (default: $OUT, else bench/results). Kernels compile
on first use (CuTe DSL JIT, in the warm-up); FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 (set here
unless set) keeps them on disk for later processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402

from report import stamp, write_json_and_markdown  # noqa: E402
from timing import measure  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from seqshard.costmodel.compute import attention_flops  # noqa: E402
from seqshard.runtime import backends, local_attention  # noqa: E402

K = 1024


@dataclass(frozen=True)
class Case:
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    repeats: int
    view: bool = False  # also time bare FA4 on seqshard's layout

    @property
    def name(self) -> str:
        kind = "MHA" if self.heads == self.kv_heads else f"GQA {self.heads}:{self.kv_heads}"
        return (f"S={self.seq / K:g}K {kind} H{self.heads} d{self.head_dim} "
                f"{'causal' if self.causal else 'full'}")

    def flops(self, training: bool) -> float:
        return attention_flops(1, self.heads, self.seq, self.seq, self.head_dim, causal=self.causal,
                               training=training)


def cases(seqs: list[int]) -> list[Case]:
    """By priority: every shape at the shortest length first, then longer ones."""
    out = []
    for s in seqs:
        reps = 5 if s <= 32 * K else (3 if s <= 128 * K else 2)
        if s >= 512 * K:  # one causal case, 8 heads: ~3 s per fwd+bwd on an H200
            out.append(Case(s, 8, 8, 128, True, reps))
            continue
        for causal in (True, False):
            out.append(Case(s, 32, 32, 128, causal, reps, view=causal))
            out.append(Case(s, 32, 8, 128, causal, reps))
        for d in (64, 72):
            for causal in (True, False):
                out.append(Case(s, 32, 32, d, causal, reps))
    return out


def estimate_s(case: Case, rate: float) -> float:
    """Seconds a case takes: every impl's warm-up and repeats, fwd and fwd+bwd, at `rate`."""
    impls = 4 if case.view else 3
    per_round = case.flops(True) / rate + case.flops(False) / rate
    return impls * (1 + case.repeats) * per_round


def _fa4_func():
    from flash_attn.cute import flash_attn_func
    return flash_attn_func


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def steps_for(case: Case, device, ours: str, cudnn: str):
    """{impl: (forward step, forward+backward step, forward output for the comparison)}; an impl
    whose setup fails is {impl: error string}."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16

    def rand(h):
        return torch.randn(1, h, case.seq, case.head_dim, generator=gen, device=device, dtype=dtype)

    q, k, v, dout = rand(case.heads), rand(case.kv_heads), rand(case.kv_heads), rand(case.heads)
    out = {}

    def ours_impl(backend):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

        def fwd():
            with torch.no_grad():
                return local_attention(*leaves, causal=case.causal, backend=backend)

        def train():
            out = local_attention(*leaves, causal=case.causal, backend=backend)
            torch.autograd.grad(out, leaves, dout)
        return fwd, train, fwd

    def bare_impl(view: bool):
        func = _fa4_func()
        if view:  # transposed views of [b, h, s, e] tensors
            base = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            leaves = None
            grad = dout.transpose(1, 2)
        else:
            base = None
            leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
            grad = dout.transpose(1, 2).contiguous()

        def args():
            return [x.transpose(1, 2) for x in base] if view else leaves

        def fwd():
            with torch.no_grad():
                return _first(func(*args(), causal=case.causal))

        def train():
            inputs = args()
            torch.autograd.grad(_first(func(*inputs, causal=case.causal)), inputs, grad)

        return fwd, train, lambda: fwd().transpose(1, 2)

    makers = {"seqshard": lambda: ours_impl(ours), "bare": lambda: bare_impl(False),
              "cudnn": lambda: ours_impl(cudnn)}
    if case.view:
        makers["bare_view"] = lambda: bare_impl(True)
    for name, make in makers.items():
        try:
            out[name] = make()
        except Exception as e:  # noqa: BLE001 - recorded per case
            out[name] = f"setup: {type(e).__name__}: {e}"
    return out


def run_case(case: Case, device, ours: str, cudnn: str) -> dict:
    row = {"case": case.name, **asdict(case), "ms": {}, "tflops": {}, "errors": {}}
    impls = steps_for(case, device, ours, cudnn)
    good = {}
    for name, impl in impls.items():
        if isinstance(impl, str):
            row["errors"][name] = impl
            continue
        try:  # one forward outside the timing: the output comparison, and a first failure
            good[name] = (impl, impl[2]().float())
        except Exception as e:  # noqa: BLE001
            row["errors"][name] = f"forward: {type(e).__name__}: {str(e)[:2000]}"
            _free()
    if "seqshard" in good:
        mine = good["seqshard"][1]
        for other in ("bare", "cudnn"):
            if other in good:
                row[f"max_abs_diff_vs_{other}"] = (mine - good[other][1]).abs().max().item()
    for mode, index, training in (("fwd", 0, False), ("fwd+bwd", 1, True)):
        steps = {name: impl[index] for name, (impl, _) in good.items()
                 if f"{name} {mode}" not in row["errors"]}
        while steps:
            try:
                timed = measure(steps, warmup=1, repeats=case.repeats, device=device)
                break
            except Exception as e:  # noqa: BLE001 - find the step that fails, drop it, go on
                culprit = _culprit(steps)
                row["errors"][f"{culprit} {mode}"] = f"{type(e).__name__}: {str(e)[:2000]}"
                steps.pop(culprit)
                _free()
        else:
            timed = {}
        for name, t in timed.items():
            row["ms"][f"{name} {mode}"] = t.median_ms
            row["tflops"][f"{name} {mode}"] = case.flops(training) / (t.median_ms * 1e-3) / 1e12
        ms = row["ms"]
        if f"seqshard {mode}" in ms and f"bare {mode}" in ms:
            row[f"ratio_seqshard_over_bare {mode}"] = ms[f"bare {mode}"] / ms[f"seqshard {mode}"]
        if f"seqshard {mode}" in ms and f"cudnn {mode}" in ms:
            row[f"speedup_over_cudnn {mode}"] = ms[f"cudnn {mode}"] / ms[f"seqshard {mode}"]
    good.clear()
    impls.clear()
    _free()
    return row


def _culprit(steps) -> str:
    """The first step that raises when run alone (the last one if none does)."""
    for name, step in steps.items():
        try:
            step()
            _sync()
        except Exception:  # noqa: BLE001
            return name
    return list(steps)[-1]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(device, ours: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "command": " ".join(sys.argv), "flash-attn-4": backends._fa4_version(),
           "fa4_tested": backends.FA4_TESTED,
           "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability(device)
    env["backend_report"] = {d: backends.backend_report(device, torch.bfloat16, d) for d in (64, 72, 128)}
    try:
        env["automatic_choice_d128"] = backends.select_backend(device, torch.bfloat16, 128)
    except Exception as e:  # noqa: BLE001
        env["automatic_choice_d128"] = f"{type(e).__name__}: {e}"
    return env


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# FlashAttention-4 through seqshard, one GPU ({doc['stamp']})", "",
             f"{env.get('device', 'cpu')} {env.get('capability', '')}, torch {env['torch']}, "
             f"flash-attn-4 {env['flash-attn-4']}; automatic backend at d128: "
             f"{env['automatic_choice_d128']}. Command: `{env['command']}`.", "",
             "Forward + backward (and forward alone), B = 1, bf16, median ms of interleaved "
             "rounds; TFLOP/s by FlashAttention's count. ratio = bare FA4 ms / seqshard ms "
             "(goal >= 0.98); vs cuDNN = cuDNN ms / seqshard ms.", "",
             "| case | mode | seqshard ms | bare ms | seqshard TFLOP/s | bare TFLOP/s | cuDNN TFLOP/s "
             "| bare on views TFLOP/s | ratio | vs cuDNN |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key, fmt):
        return format(row[key], fmt) if key in row else "—"

    for row in doc["rows"]:
        for mode in ("fwd+bwd", "fwd"):
            ms, tf = row["ms"], row["tflops"]
            lines.append(
                f"| {row['case']} | {mode} | {cell(ms, f'seqshard {mode}', '.2f')} | "
                f"{cell(ms, f'bare {mode}', '.2f')} | {cell(tf, f'seqshard {mode}', '.0f')} | "
                f"{cell(tf, f'bare {mode}', '.0f')} | {cell(tf, f'cudnn {mode}', '.0f')} | "
                f"{cell(tf, f'bare_view {mode}', '.0f')} | "
                f"{cell(row, f'ratio_seqshard_over_bare {mode}', '.3f')} | "
                f"{cell(row, f'speedup_over_cudnn {mode}', '.2f')} |")
    lines += ["", "Output differences (seqshard's forward, max |difference|):", "",
              "| case | vs bare FA4 | vs cuDNN |", "|---|---|---|"]
    for row in doc["rows"]:
        lines.append(f"| {row['case']} | {cell(row, 'max_abs_diff_vs_bare', '.2e')} | "
                     f"{cell(row, 'max_abs_diff_vs_cudnn', '.2e')} |")
    failures = [(row["case"], k, v) for row in doc["rows"] for k, v in row["errors"].items()]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {c}, {k}: `{v[:300]}`" for c, k, v in failures]
    if doc["skipped"]:
        lines += ["", f"Skipped for the time budget ({doc['budget_s']} s): " + "; ".join(doc["skipped"])]
    lines += ["", "Backend report (bf16): " + "; ".join(
        f"d{d}: " + ", ".join(f"{n} {r}" for n, r in rep.items() if n in ("fa4", "cudnn"))
        for d, rep in env["backend_report"].items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting cases after this")
    ap.add_argument("--seqs", default="32768,131072,524288", help="sequence lengths")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ours", default="fa4", help="seqshard backend timed as 'seqshard'")
    ap.add_argument("--cudnn", default="cudnn", help="seqshard backend timed as 'cudnn'")
    ap.add_argument("--rate", type=float, default=500e12, help="FLOP/s for the time estimates")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    doc = {"stamp": stamp(), "budget_s": args.budget_s, "environment": environment(device, args.ours),
           "rows": [], "skipped": []}
    print(f"[fa4] {doc['environment']}", flush=True)
    compiled = set()
    for case in cases([int(s) for s in args.seqs.split(",")]):
        new_kernels = (case.head_dim, case.causal, case.heads // case.kv_heads) not in compiled
        need = estimate_s(case, args.rate) + (60.0 if new_kernels and device.type == "cuda" else 0.0)
        if time.perf_counter() - t0 + need > args.budget_s:
            doc["skipped"].append(f"{case.name} (~{need:.0f} s)")
            continue
        start = time.perf_counter()
        try:
            row = run_case(case, device, args.ours, args.cudnn)
        except Exception as e:  # noqa: BLE001 - a case that fails outside its steps
            row = {"case": case.name, **asdict(case), "ms": {}, "tflops": {},
                   "errors": {"case": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"}}
            _free()
        compiled.add((case.head_dim, case.causal, case.heads // case.kv_heads))
        row["seconds"] = time.perf_counter() - start
        doc["rows"].append(row)
        print(f"[fa4] {case.name}: {row['seconds']:.1f} s; ms {row['ms']}; errors {list(row['errors'])}",
              flush=True)
        # keep what is done if a later case hangs or the machine goes
        write_json_and_markdown(args.out, f"fa4-{doc['stamp']}", doc, markdown(doc))
    doc["seconds"] = time.perf_counter() - t0
    path = write_json_and_markdown(args.out, f"fa4-{doc['stamp']}", doc, markdown(doc))
    print(path.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
