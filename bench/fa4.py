"""FlashAttention-4 as seqshard's local attention kernel, on one GPU (issue 16).

    python bench/fa4.py [--set all|remaining] [--out DIR] [--budget-s S]
    python bench/fa4.py --set remaining --out $OUT     # ~4-5 min on an H200 (printed first)
    python bench/fa4.py --set remaining --shrink 1024 --device cpu --ours flash_cpu --cudnn math \
        --out /tmp/fa4                                 # plumbing on a CPU

Systems, in one process and interleaved rounds (`timing.measure` with a dict of steps, isolated
iterations):

    seqshard  seqshard.runtime.local_attention(q, k, v, backend="fa4"): the custom op, its
              autograd, the backend wrapper (our [b, h, s, e] layout handed to FA4 as views)
    bare      flash_attn.cute.flash_attn_func on FA4's own [b, s, h, e] layout, dense (at
              d72 FA4 at 72 itself, while seqshard pads: --set all's d72 ratio is padded/bare)
    bare_view (d128 MHA causal only) flash_attn_func on transposed views of [b, h, s, e]
              tensors: the layout seqshard hands over, without seqshard
    cudnn     local_attention(..., backend="cudnn"): the previous default (K/V heads expanded)
    fa4 pad N (head dim 72) local_attention(..., backend="fa4") with 72 zero-padded to N
              (backends.FA4_PAD_TO = {72: N} for the call); `bare` is then FA4 at 72 itself,
              whose dq is wrong (time only)

each forward (no grad) and forward + backward. Reported: median ms, TFLOP/s (FlashAttention's
FLOP count at the model's head dim: 4·B·H·S²·E forward, causal half, backward 2.5×), the speed
ratio seqshard/bare (bare ms / seqshard ms; issue 16's goal: >= 0.98) and x cuDNN, and the
largest difference of each forward output from bare FA4's and cuDNN's.

Sets. `all`: B = 1, bf16, S in --seqs, causal and full, MHA 32 heads and GQA 32:8 at d128, MHA
at d64 and d72. `remaining` (what issue 16 lacked after the run of 2026-12-01 18:18):
  - d72 accuracy at 1 x 1024 through the fa4 backend, FA4 run at 72 (bare), 80, 96, 128: out
    and every gradient against fp32 math, the bf16 rule (<= 2x SDPA's error + 1e-4);
  - d72 timing, MHA, causal and full, 32K and 128K: cuDNN, fa4 padded to 80, 96, 128, bare;
  - 256K and 512K causal d128, MHA and GQA 32:8, fwd+bwd: per system a warm-up at 4K tokens and
    ONE timed iteration (~13 s for FA4 at 512K MHA), one system at a time in memory;
  - a re-run of 32K d128 (MHA, GQA), 32K d64 and 128K d128 causal for a same-run comparison.
The time of each case is estimated from its FLOPs at the H200 rates below plus COMPILE_S per new
FA4 kernel configuration and printed before the run; cases run by priority while `--budget-s`
lasts (290 s for remaining), the rest are listed as skipped. A failure (an API mismatch, out of
memory, a head dim FA4 does not compile) is recorded for its case and system; the run goes on.

Writes fa4-<stamp>.json and .md into --out (default: $OUT, else bench/results) after every case.
Kernels compile on first use (CuTe DSL JIT, in the warm-up); FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
(set here unless set) keeps them on disk for later processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
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

FA4_RATE = {64: 540e12, 72: 450e12, 80: 460e12, 96: 500e12, 128: 620e12}
"""FlashAttention-4 fwd+bwd FLOP/s on an H200 by the head dim it runs at, for time estimates:
64, 72, 128 from fa4-20261201-181805; 80 and 96 guessed (the tiles of 72)."""
CUDNN_RATE = {64: 420e12, 72: 310e12, 128: 530e12}
"""cuDNN fwd+bwd FLOP/s on an H200 by head dim (the same run), for time estimates."""
COMPILE_S = 8.0
"""Seconds to compile one new FA4 kernel configuration (head dim, causal, q heads per kv head;
forward and backward): the first cases of new configurations in fa4-20261201-181805 took 4-6 s
more than their timed rounds; 8 to be safe."""
SMALL = 4096
"""Sequence length of the warm-up before the 256K and 512K cases (their one timed iteration)."""


@dataclass(frozen=True)
class Case:
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    repeats: int
    view: bool = False  # also time bare FA4 on seqshard's layout
    pads: tuple = ()  # head dim 72: time fa4 padded to each (no 'seqshard' row: it is one of them)
    fwd: bool = True  # also time the forward alone
    long: bool = False  # 256K/512K: warm-up at SMALL, one system at a time, no output comparison

    @property
    def name(self) -> str:
        kind = "MHA" if self.heads == self.kv_heads else f"GQA {self.heads}:{self.kv_heads}"
        return (f"S={self.seq / K:g}K {kind} H{self.heads} d{self.head_dim} "
                f"{'causal' if self.causal else 'full'}")

    def flops(self, training: bool, head_dim: int | None = None) -> float:
        return attention_flops(1, self.heads, self.seq, self.seq, head_dim or self.head_dim,
                               causal=self.causal, training=training)

    def impls(self) -> list[str]:
        if self.pads:
            return ["cudnn", *(f"fa4 pad {t}" for t in self.pads), "bare"]
        return ["seqshard", "bare", "cudnn"] + (["bare_view"] if self.view else [])

    def kernels(self) -> set:
        """The FA4 kernel configurations it compiles: (head dim run, causal, q heads per kv head)."""
        dims = {self.head_dim, *self.pads, backends.fa4_head_dim(self.head_dim)}
        return {(d, self.causal, self.heads // self.kv_heads) for d in dims}


def cases(seqs: list[int]) -> list[Case]:
    """--set all, by priority: every shape at the shortest length first, then longer ones."""
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


PAD_TARGETS = (80, 96, 128)
"""Head dims 72 is padded to in --set remaining: 96 and 128 match FA4's sm90 backward rounding;
80 is predicted to give 72's wrong dq (its kernel rounds to 80, its dQ accumulator to 96)."""


def remaining(shrink: int = 1) -> list[Case]:
    """--set remaining (issue 16 after 2026-12-01 18:18): d72 (cuDNN, fa4 padded to 80, 96, 128,
    bare FA4 at 72: MHA, causal and full, 32K and 128K), 256K and 512K causal d128 MHA and GQA
    32:8 fwd+bwd (one timed iteration per system), and a re-run of 32K/128K d64/d128 cases for a
    same-run comparison. By priority; `shrink` divides every length (CPU plumbing)."""
    def c(seq, *args, **kw):
        return Case(seq // shrink, *args, **kw)

    return [
        *(c(32 * K, 32, 32, 72, causal, 5, pads=PAD_TARGETS) for causal in (True, False)),
        c(32 * K, 32, 32, 128, True, 5, view=True),
        c(32 * K, 32, 8, 128, True, 5),
        c(512 * K, 32, 32, 128, True, 1, fwd=False, long=True),
        c(512 * K, 32, 8, 128, True, 1, fwd=False, long=True),
        c(256 * K, 32, 32, 128, True, 1, fwd=False, long=True),
        c(256 * K, 32, 8, 128, True, 1, fwd=False, long=True),
        c(32 * K, 32, 32, 64, True, 5),
        *(c(128 * K, 32, 32, 72, causal, 2, pads=PAD_TARGETS, fwd=False) for causal in (True, False)),
        c(128 * K, 32, 32, 128, True, 3),
    ]


def _run_dim(impl: str, case: Case) -> int:
    if impl.startswith("fa4 pad "):
        return int(impl.split()[-1])
    if impl == "seqshard":
        return backends.fa4_head_dim(case.head_dim)
    return case.head_dim


def estimate_s(case: Case, scale: float = 1.0) -> float:
    """Seconds a case's timed and warm-up rounds take on an H200 (rates above, x `scale`): every
    impl, fwd+bwd (and fwd), plus a SMALL warm-up for a long case; compiles not counted."""
    total = 0.0
    for impl in case.impls():
        d = _run_dim(impl, case)
        table = CUDNN_RATE if impl == "cudnn" else FA4_RATE
        rate = table.get(d, min(table.values())) * scale
        per_round = case.flops(True, d) / rate + (case.flops(False, d) / rate if case.fwd else 0.0)
        rounds = case.repeats if case.long else 1 + case.repeats
        warm = min(SMALL, case.seq // 64) / case.seq if case.long else 0.0
        total += rounds * per_round + per_round * warm ** 2
    return total


def accuracy_plan() -> list[tuple]:
    """(target or None for bare FA4 at 72, causal, (heads, kv heads)) checked at 1 x 1024, d72."""
    plan = [(t, causal, (8, 8)) for t in (None, *PAD_TARGETS) for causal in (True, False)]
    return plan + [(t, True, (8, 2)) for t in (96, 128)]


def _fa4_func():
    from flash_attn.cute import flash_attn_func
    return flash_attn_func


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@contextlib.contextmanager
def fa4_padded_to(target: int | None, head_dim: int = 72):
    """The fa4 backend running `head_dim` zero-padded to `target` (None: FA4 at `head_dim` itself,
    bare, its wrong dq included) while the block runs: backends.FA4_PAD_TO and, so that
    select_backend accepts it, FA4_CHECKED_HEAD_DIMS."""
    saved = backends.FA4_PAD_TO, backends.FA4_CHECKED_HEAD_DIMS
    run = head_dim if target is None else target
    backends.FA4_PAD_TO = {} if target is None else {head_dim: target}
    backends.FA4_CHECKED_HEAD_DIMS = tuple(sorted({*saved[1], run}))
    try:
        yield
    finally:
        backends.FA4_PAD_TO, backends.FA4_CHECKED_HEAD_DIMS = saved


def make_impl(name: str, case: Case, device, ours: str, cudnn: str, seq: int | None = None):
    """(forward step, forward+backward step, forward output in [b, h, s, e] for the comparison)
    of impl `name` on fresh inputs of `case` (at length `seq` if given)."""
    seq = seq or case.seq
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16

    def rand(h):
        return torch.randn(1, h, seq, case.head_dim, generator=gen, device=device, dtype=dtype)

    q, k, v, dout = rand(case.heads), rand(case.kv_heads), rand(case.kv_heads), rand(case.heads)

    def ours_impl(backend, pad=contextlib.nullcontext):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

        def fwd():
            with torch.no_grad(), pad():
                return local_attention(*leaves, causal=case.causal, backend=backend)

        def train():
            with pad():
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

    if name.startswith("fa4 pad "):
        target = int(name.split()[-1])
        return ours_impl("fa4", lambda: fa4_padded_to(target, case.head_dim))
    makers = {"seqshard": lambda: ours_impl(ours), "bare": lambda: bare_impl(False),
              "bare_view": lambda: bare_impl(True), "cudnn": lambda: ours_impl(cudnn)}
    return makers[name]()


def _record(row, name, mode, t, case):
    row["ms"][f"{name} {mode}"] = t.median_ms
    row["tflops"][f"{name} {mode}"] = case.flops(mode == "fwd+bwd") / (t.median_ms * 1e-3) / 1e12


def _ratios(row, modes):
    ms = row["ms"]
    for mode in modes:
        if f"seqshard {mode}" in ms and f"bare {mode}" in ms:
            row[f"ratio_seqshard_over_bare {mode}"] = ms[f"bare {mode}"] / ms[f"seqshard {mode}"]
        for name in [n.split(f" {mode}")[0] for n in ms if n.endswith(f" {mode}")]:
            if name != "cudnn" and f"cudnn {mode}" in ms and f"{name} {mode}" in ms:
                row.setdefault("speedup_over_cudnn", {})[f"{name} {mode}"] = \
                    ms[f"cudnn {mode}"] / ms[f"{name} {mode}"]


def run_case(case: Case, device, ours: str, cudnn: str) -> dict:
    """All impls of a case interleaved (timing.measure with a dict of steps)."""
    row = {"case": case.name, **asdict(case), "ms": {}, "tflops": {}, "errors": {}}
    good = {}
    for name in case.impls():
        try:  # one forward outside the timing: the output comparison, and a first failure
            impl = make_impl(name, case, device, ours, cudnn)
            good[name] = (impl, impl[2]().float())
        except Exception as e:  # noqa: BLE001 - recorded per case
            row["errors"][name] = f"setup/forward: {type(e).__name__}: {str(e)[:2000]}"
            _free()
    for ref in ("cudnn", "bare"):
        if ref in good:
            row[f"max_abs_diff_vs_{ref}"] = {name: (out - good[ref][1]).abs().max().item()
                                             for name, (_, out) in good.items() if name != ref}
    modes = (("fwd+bwd", 1), ("fwd", 0)) if case.fwd else (("fwd+bwd", 1),)
    for mode, index in modes:
        steps = {name: impl[index] for name, (impl, _) in good.items()}
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
            _record(row, name, mode, t, case)
    _ratios(row, [m for m, _ in modes])
    good.clear()
    _free()
    return row


def run_long_case(case: Case, device, ours: str, cudnn: str) -> dict:
    """One system at a time (its inputs alone in memory): a warm-up at SMALL tokens (at most
    1/64 of the case's), then
    `case.repeats` timed forward+backward at the case's length; no output comparison."""
    row = {"case": case.name, **asdict(case), "ms": {}, "tflops": {}, "errors": {}}
    for name in case.impls():
        try:
            make_impl(name, case, device, ours, cudnn, seq=min(SMALL, case.seq // 64))[1]()
            _sync()
            _free()
            impl = make_impl(name, case, device, ours, cudnn)
            t = measure({name: impl[1]}, warmup=0, repeats=case.repeats, device=device)[name]
            _record(row, name, "fwd+bwd", t, case)
        except Exception as e:  # noqa: BLE001 - recorded per system
            row["errors"][f"{name} fwd+bwd"] = f"{type(e).__name__}: {str(e)[:2000]}"
        impl = None
        _free()
    _ratios(row, ["fwd+bwd"])
    return row


def accuracy(device) -> list[dict]:
    """Head dim 72 at 1 x 1024, bf16, through the fa4 backend padded to each target (and bare, at
    72): relative error of out, dq, dk, dv against fp32 math, and the rule's limit (2x PyTorch
    SDPA's bf16 error + 1e-4, as tests/test_fa4.py)."""
    rows = []
    for target, causal, (h, hk) in accuracy_plan():
        row = {"target": target, "causal": causal, "heads": h, "kv_heads": hk}
        try:
            gen = torch.Generator(device=device).manual_seed(11)
            q, k, v, dout = (torch.randn(1, n, 1024, 72, generator=gen, device=device)
                             for n in (h, hk, hk, h))
            yard = _sdpa_bf16_error(q, k, v, dout, causal)
            ref_out, ref_lse = backends.attention_forward(q, k, v, causal=causal, backend="math")
            ref = (ref_out, *backends.attention_backward(dout, q, k, v, ref_out, ref_lse,
                                                         causal=causal, backend="math"))
            low = [x.bfloat16() for x in (q, k, v, dout)]
            with fa4_padded_to(target):
                out, lse = backends.attention_forward(*low[:3], causal=causal, backend="fa4")
                grads = backends.attention_backward(low[3], *low[:3], out, lse, causal=causal,
                                                    backend="fa4")
            errors = [_rel(a, b) for a, b in zip((out, *grads), ref)]
            limits = [2 * yard[0] + 1e-4, 2 * yard[1] + 1e-4] + [2 * max(yard[2:]) + 1e-4] * 2
            row.update(errors=dict(zip(("out", "dq", "dk", "dv"), errors)),
                       limits=dict(zip(("out", "dq", "dk", "dv"), limits)),
                       ok=all(e <= lim for e, lim in zip(errors, limits)),
                       lse_max_abs_diff=(lse - ref_lse).abs().max().item())
        except Exception as e:  # noqa: BLE001 - recorded per case
            row["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
        rows.append(row)
        print(f"[fa4] accuracy d72 -> {target or 'bare 72'} {'causal' if causal else 'full'} "
              f"H{h}:{hk}: {row.get('errors', row.get('error'))}", flush=True)
    _free()
    return rows


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _sdpa_bf16_error(q, k, v, dout, causal):
    """PyTorch SDPA's bf16 error against fp32 (out, dq, dk, dv; K/V expanded): the yardstick."""
    rep = q.shape[1] // k.shape[1]

    def run(dtype):
        xs = [x.to(dtype).detach().requires_grad_()
              for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))]
        out = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=causal)
        out.backward(dout.to(dtype))
        return [out] + [x.grad for x in xs]

    return [_rel(a, b) for a, b in zip(run(torch.bfloat16), run(torch.float32))]


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


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "command": " ".join(sys.argv), "flash-attn-4": backends._fa4_version(),
           "fa4_tested": backends.FA4_TESTED, "fa4_pad_to": dict(backends.FA4_PAD_TO),
           "fa4_checked_head_dims": list(backends.FA4_CHECKED_HEAD_DIMS),
           "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability(device)
    env["backend_report"] = {d: backends.backend_report(device, torch.bfloat16, d) for d in (64, 72, 128)}
    for d in (72, 128):
        try:
            env[f"automatic_choice_d{d}"] = backends.describe(
                backends.select_backend(device, torch.bfloat16, d), d)
        except Exception as e:  # noqa: BLE001
            env[f"automatic_choice_d{d}"] = f"{type(e).__name__}: {e}"
    return env


def _cell(row, key, fmt):
    return format(row[key], fmt) if key in row else "—"


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# FlashAttention-4 through seqshard, one GPU ({doc['stamp']}, set {doc['set']})", "",
             f"{env.get('device', 'cpu')} {env.get('capability', '')}, torch {env['torch']}, "
             f"flash-attn-4 {env['flash-attn-4']}; automatic backend at d128: "
             f"{env['automatic_choice_d128']}, at d72: {env['automatic_choice_d72']}. Command: "
             f"`{env['command']}`. Estimated {doc['estimate_s']:.0f} s (+ compiles), took "
             f"{doc.get('seconds', float('nan')):.0f} s.", "",
             "Forward + backward (and forward alone), B = 1, bf16, median ms of interleaved "
             "rounds (256K/512K: one system at a time, warm-up at 4K, then the timed iterations); "
             "TFLOP/s by FlashAttention's count at the model's head dim. ratio = bare FA4 ms / "
             "seqshard ms (goal >= 0.98); vs cuDNN = cuDNN ms / seqshard ms.", ""]
    plain = [r for r in doc["rows"] if not r.get("pads")]
    if plain:
        lines += ["| case | mode | seqshard ms | bare ms | seqshard TFLOP/s | bare TFLOP/s | cuDNN TFLOP/s "
                  "| bare on views TFLOP/s | ratio | vs cuDNN |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in plain:
            for mode in ("fwd+bwd", "fwd"):
                ms, tf = row["ms"], row["tflops"]
                if not any(k.endswith(f" {mode}") for k in ms):
                    continue
                lines.append(
                    f"| {row['case']} | {mode} | {_cell(ms, f'seqshard {mode}', '.2f')} | "
                    f"{_cell(ms, f'bare {mode}', '.2f')} | {_cell(tf, f'seqshard {mode}', '.0f')} | "
                    f"{_cell(tf, f'bare {mode}', '.0f')} | {_cell(tf, f'cudnn {mode}', '.0f')} | "
                    f"{_cell(tf, f'bare_view {mode}', '.0f')} | "
                    f"{_cell(row, f'ratio_seqshard_over_bare {mode}', '.3f')} | "
                    f"{_cell(row.get('speedup_over_cudnn', {}), f'seqshard {mode}', '.2f')} |")
    padded = [r for r in doc["rows"] if r.get("pads")]
    if padded:
        impls = padded[0]["pads"]
        names = ["cudnn", *(f"fa4 pad {t}" for t in impls), "bare"]
        lines += ["", "Head dim 72: cuDNN, FA4 zero-padded to each head dim (through seqshard's "
                  "fa4 backend), bare FA4 at 72 (its dq is wrong: time only). TFLOP/s at d72's "
                  f"FLOPs (useful work); x cuDNN in brackets. Default pad: {env['fa4_pad_to']}.", "",
                  "| case | mode | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for row in padded:
            for mode in ("fwd+bwd", "fwd"):
                if not any(k.endswith(f" {mode}") for k in row["ms"]):
                    continue
                cells = []
                for n in names:
                    key = f"{n} {mode}"
                    up = row.get("speedup_over_cudnn", {}).get(key)
                    cells.append(_cell(row["tflops"], key, ".0f") + (f" ({up:.2f}x)" if up else ""))
                lines.append(f"| {row['case']} | {mode} | " + " | ".join(cells) + " |")
    if doc.get("accuracy"):
        lines += ["", "Head dim 72 accuracy (1 x 1024, bf16, fa4 backend): relative error against "
                  "fp32 math / the limit (2x SDPA's bf16 error + 1e-4).", "",
                  "| FA4 runs at | mask | heads | out | dq | dk | dv | within the rule |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in doc["accuracy"]:
            if "error" in r:
                cells = [f"`{r['error'][:120]}`", "", "", "", "—"]
            else:
                cells = [f"{r['errors'][g]:.2e} / {r['limits'][g]:.1e}" for g in ("out", "dq", "dk", "dv")]
                cells.append("yes" if r["ok"] else "**no**")
            lines.append(f"| {r['target'] or '72 (bare)'} | {'causal' if r['causal'] else 'full'} | "
                         f"{r['heads']}:{r['kv_heads']} | " + " | ".join(cells) + " |")
    lines += ["", "Output differences (each forward, max |difference|):", "",
              "| case | vs bare FA4 | vs cuDNN |", "|---|---|---|"]
    for row in doc["rows"]:
        if "max_abs_diff_vs_cudnn" in row or "max_abs_diff_vs_bare" in row:
            lines.append(f"| {row['case']} | " + " | ".join(
                ", ".join(f"{n} {x:.2e}" for n, x in row.get(f"max_abs_diff_vs_{ref}", {}).items()) or "—"
                for ref in ("bare", "cudnn")) + " |")
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
    ap.add_argument("--set", default="all", choices=["all", "remaining"],
                    help="all: --seqs x every shape; remaining: what issue 16 still lacked after "
                         "2026-12-01 18:18 (see `remaining`), ~5 min on an H200")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting cases after this (default: 330 for all, 290 for remaining)")
    ap.add_argument("--seqs", default="32768,131072,524288", help="sequence lengths (--set all)")
    ap.add_argument("--shrink", type=int, default=1, help="divide --set remaining's lengths (CPU plumbing)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ours", default="fa4", help="seqshard backend timed as 'seqshard'")
    ap.add_argument("--cudnn", default="cudnn", help="seqshard backend timed as 'cudnn'")
    ap.add_argument("--rate-scale", type=float, default=1.0, help="x the rates of the time estimates")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    budget = args.budget_s or (290.0 if args.set == "remaining" else 330.0)
    todo = remaining(args.shrink) if args.set == "remaining" else \
        cases([int(s) for s in args.seqs.split(",")])
    doc = {"stamp": stamp(), "set": args.set, "budget_s": budget, "environment": environment(device),
           "rows": [], "skipped": [], "accuracy": []}
    first = {(t or 72, c, h // hk) for t, c, (h, hk) in accuracy_plan()} if args.set == "remaining" \
        else set()  # compiled by the accuracy checks
    compiled = set(first)
    planned = []
    for case in todo:
        planned.append((case, estimate_s(case, args.rate_scale), len(case.kernels() - compiled)))
        compiled |= case.kernels()
    compiles = len(compiled) * COMPILE_S if device.type == "cuda" else 0.0
    doc["estimate_s"] = sum(e for _, e, _ in planned)
    print(f"[fa4] {doc['environment']}", flush=True)
    print(f"[fa4] set {args.set}: {len(planned)} cases, estimated {doc['estimate_s']:.0f} s of "
          f"attention + {compiles:.0f} s for {len(compiled)} kernel compiles (~{COMPILE_S:.0f} s "
          f"each, empty cache) = {doc['estimate_s'] + compiles:.0f} s; budget {budget:.0f} s", flush=True)
    for case, est, new in planned:
        print(f"[fa4]   {case.name}{' pads ' + str(case.pads) if case.pads else ''}: ~{est:.1f} s"
              f"{f' + {new} new kernels' if new else ''}", flush=True)
    if args.set == "remaining":
        doc["accuracy"] = accuracy(device)
    compiled = set(first)
    for case, est, _ in planned:
        need = est + len(case.kernels() - compiled) * (COMPILE_S if device.type == "cuda" else 0.0)
        if time.perf_counter() - t0 + need > budget:
            doc["skipped"].append(f"{case.name} (~{need:.0f} s)")
            continue
        start = time.perf_counter()
        try:
            row = (run_long_case if case.long else run_case)(case, device, args.ours, args.cudnn)
        except Exception as e:  # noqa: BLE001 - a case that fails outside its steps
            row = {"case": case.name, **asdict(case), "ms": {}, "tflops": {},
                   "errors": {"case": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"}}
            _free()
        compiled |= case.kernels()
        row["seconds"], row["estimate_s"] = time.perf_counter() - start, est
        doc["rows"].append(row)
        print(f"[fa4] {case.name}: {row['seconds']:.1f} s (estimated {est:.1f}); ms {row['ms']}; "
              f"errors {list(row['errors'])}", flush=True)
        # keep what is done if a later case hangs or the machine goes
        write_json_and_markdown(args.out, f"fa4-{doc['stamp']}", doc, markdown(doc))
    doc["seconds"] = time.perf_counter() - t0
    path = write_json_and_markdown(args.out, f"fa4-{doc['stamp']}", doc, markdown(doc))
    print(path.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
