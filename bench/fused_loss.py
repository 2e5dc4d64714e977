"""The fused LM-head loss against Liger's, by how many tokens are ignored, with its GEMMs timed
alone, in one run on one GPU.

    python bench/fused_loss.py --out $OUT          # one H200, ~4 minutes (Liger when it imports)
    python bench/fused_loss.py --smoke             # CPU under TRITON_INTERPRET=1: every path, tiny

Why: `linear_ce` and Liger run the same three GEMMs a token at the same chunk (the chunk is fixed
by equal memory) and the same two-pass row kernel, so with every token counted their times tie
(bench/results/codegen-20261202-*). What is left to win, measured here:
tokens whose label is ignored (prompt tokens under SFT masking, padding) need no logits:
`linear_ce` gathers the kept tokens into the GEMMs (skip_ignored, the default), Liger computes
every row. And whether any GEMM runs faster formulated or dispatched otherwise (part "gemms").
The row kernel itself is at the copy bandwidth with three passes over the logits: launch variants
(one program per SM, pass 2 walking the row backwards for L2 reuse, 8K/16K tiles) were none
faster (bench/results/ce_rows-20261202-031256: 0.807 ms a 4096-row chunk by default, 0.820-0.855
for the variants; they were a temporary parameter of the kernel, not kept).

Part "gemms": each GEMM of a chunk (forward, dh, dW accumulated and first, and the transposed
formulations) under cuBLAS and cuBLASLt, and dh with and without reduced-precision reduction,
timed alone by CUDA events (c 1024: the chunk at 32K tokens; 4096: at 128K).

Part "loss": the fused loss at 32K and 128K tokens (d 4096, V 128256, bf16), forward + backward,
for three label patterns: none ignored, 1% ignored at random (bench/codegen.py's), and half the
tokens ignored as prompt spans (the first 2048 of every 4096, SFT-style). Systems: `linear_ce` as
it is, `linear_ce` with every token through the GEMMs (skip_ignored=False: the loop before this
change), and Liger's; interleaved for --rounds rounds
(`timing.measure`; --orders 2: half the rounds in reverse order); extra peak memory; loss and gradient differences against the first system;
then one chunk loop's phases timed by events (forward GEMM, rows, dh GEMM, dW GEMM).

Part "step": a whole training step of seqshard's program on the Llama-3.2-1B shape at --seq
tokens (world size 1, eager, kernels=True: the fused loss in the program) with half the labels
ignored as prompt spans, the loss skipping them against the same program running every row;
interleaved, with the loss and gradient differences between the two.

Results: fused_loss-<stamp>.json and .md under --out, else $OUT, else bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

from timing import measure  # noqa: E402

GIB = 1 << 30


def _events(fn, prepare, repeats, cuda):
    """Median ms of fn() over `repeats` calls, prepare() untimed before each."""
    times = []
    for _ in range(repeats):
        prepare()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def gemms_part(args, device) -> list[dict]:
    """Each GEMM of a chunk, formulated and dispatched in the ways torch allows, timed by events."""
    cuda = device == "cuda"
    d, V = (64, 1000) if args.smoke else (4096, 128256)
    out = []
    gen = torch.Generator(device).manual_seed(0)
    w = (torch.randn(V, d, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    libs = ("cublas", "cublaslt") if cuda else ("default",)
    for c in ([16] if args.smoke else [1024, 4096]):
        h = torch.randn(c, d, device=device, generator=gen).to(torch.bfloat16)
        x = (torch.randn(c, V, device=device, generator=gen) * 1e-3).to(torch.bfloat16)
        dh = torch.empty(c, d, device=device, dtype=torch.bfloat16)
        dw = torch.zeros(V, d, device=device, dtype=torch.bfloat16)
        dwt = torch.zeros(d, V, device=device, dtype=torch.bfloat16)
        xt = torch.empty(V, c, device=device, dtype=torch.bfloat16)
        cases = {
            "forward mm(h, W.T)": lambda: torch.mm(h, w.t(), out=x),
            "forward mm(W, h.T) [V, c]": lambda: torch.mm(w, h.t(), out=xt),
            "dh mm(x, W)": lambda: torch.mm(x, w, out=dh),
            "dW addmm_(x.T, h)": lambda: dw.addmm_(x.t(), h),
            "dW first mm(x.T, h)": lambda: torch.mm(x.t(), h, out=dw),
            "dW.T addmm_(h.T, x) [d, V]": lambda: dwt.addmm_(h.t(), x),
        }
        flops = 2 * c * V * d
        for lib in libs:
            if cuda:
                torch.backends.cuda.preferred_blas_library(lib)
            for name, fn in cases.items():
                for rr in ((True, False) if name.startswith("dh") and cuda else (None,)):
                    label = name + ("" if rr is None else f" reduced-precision-reduction={rr}")
                    if rr is not None:
                        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = rr
                    try:
                        fn()
                        ms, times = _events(fn, lambda: None, max(5, args.repeats // 2), cuda)
                        out.append(dict(part="gemms", chunk=c, case=label, lib=lib, ms=ms,
                                        tflops=flops / ms / 1e9))
                    except Exception as e:  # noqa: BLE001
                        out.append(dict(part="gemms", chunk=c, case=label, lib=lib,
                                        error=f"{type(e).__name__}: {str(e)[:200]}"))
                    print(f"[gemms] c={c} {lib} {label}: {out[-1].get('ms', out[-1].get('error'))}",
                          flush=True)
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        if cuda:
            torch.backends.cuda.preferred_blas_library("default")
    return out


def _liger():
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    return lambda x, w, y: LigerFusedLinearCrossEntropyFunction.apply(x, w, y)[0]


PATTERNS = ("none ignored", "1% ignored at random", "half ignored as prompt spans")


def labels_for(pattern: str, T: int, V: int, device, gen) -> torch.Tensor:
    y = torch.randint(0, V, (T,), device=device, generator=gen)
    if pattern == "1% ignored at random":
        y[torch.randperm(T, device=device, generator=gen)[: T // 100]] = -100
    elif pattern == "half ignored as prompt spans":
        span = min(4096, T)
        y.view(-1, span)[:, : span // 2] = -100
    return y


def phases(lce, x, w, y, chunk, cuda) -> dict:
    """The chunk loop of the fused forward (every token, no autograd), each phase bracketed by
    events: ms summed over chunks."""
    T = x.shape[0]
    rows = torch.empty(T, dtype=torch.float32, device=x.device)
    scale = torch.ones(1, dtype=torch.float32, device=x.device)
    dh = torch.empty_like(x)
    dw = torch.empty_like(w)
    total = {"forward GEMM": 0.0, "rows": 0.0, "dW GEMM": 0.0, "dh GEMM": 0.0}
    marks = []
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        h = x[start:end]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)] if cuda else None
        if cuda:
            ev[0].record()
        z = torch.mm(h, w.t())
        if cuda:
            ev[1].record()
        lce._rows(z, y[start:end], rows[start:end], scale, -100, True, None)
        if cuda:
            ev[2].record()
        if start == 0:
            torch.mm(z.t(), h, out=dw)
        else:
            dw.addmm_(z.t(), h)
        if cuda:
            ev[3].record()
        torch.mm(z, w, out=dh[start:end])
        if cuda:
            ev[4].record()
            marks.append(ev)
    if cuda:
        torch.cuda.synchronize()
        for ev in marks:
            for k, name in enumerate(total):
                total[name] += ev[k].elapsed_time(ev[k + 1])
    return total


def loss_part(args, device, lce) -> list[dict]:
    cuda = device == "cuda"
    d, V = (64, 1000) if args.smoke else (4096, 128256)
    out = []
    gen = torch.Generator(device).manual_seed(0)
    try:
        liger = _liger()
        liger_error = None
    except Exception as e:  # noqa: BLE001 - an optional package
        liger, liger_error = None, f"{type(e).__name__}: {e}"

    def fused(x, w, y):
        return lce.linear_cross_entropy(x, w, y)

    def every_token(x, w, y):  # the loop before skip_ignored
        return lce.linear_cross_entropy(x, w, y, skip_ignored=False)

    systems = {"fused": fused, "fused, every token": every_token}
    if liger is not None:
        systems["liger"] = liger
    for T in ([64, 256] if args.smoke else [32768, 131072]):
        x = torch.randn(T, d, device=device, generator=gen).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(V, d, device=device, generator=gen) * 0.02).to(torch.bfloat16).requires_grad_()
        chunk = lce.default_chunk(T, V, 2, d)
        for pattern in args.patterns:
            y = labels_for(pattern, T, V, device, gen)
            steps, refs = {}, None
            for name, fn in systems.items():
                row = dict(part="loss", tokens=T, chunk=chunk, labels=pattern, system=name,
                           kept=int((y != -100).sum()))

                def step(fn=fn, x=x, w=w, y=y):
                    x.grad = w.grad = None
                    loss = fn(x, w, y)
                    loss.backward()
                    return loss

                try:
                    step()
                    if cuda:
                        torch.cuda.synchronize()
                    x.grad = w.grad = None
                    if cuda:
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    loss = step()
                    if cuda:
                        torch.cuda.synchronize()
                        row["extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
                        row["extra_peak_bytes"] = torch.cuda.max_memory_allocated() - base
                    got = (loss.detach().float(), x.grad.float(), w.grad.float())
                    row["loss"] = got[0].item()
                    if refs is None:
                        refs = got
                    else:
                        row["diff_loss"] = (got[0] - refs[0]).abs().item()
                        row["rel_dx"] = ((got[1] - refs[1]).norm() / refs[1].norm()).item()
                        row["rel_dw"] = ((got[2] - refs[2]).norm() / refs[2].norm()).item()
                    del got
                    steps[name] = (step, row)
                except Exception as e:  # noqa: BLE001 - recorded per system
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                out.append(row)
            if liger is None:
                out.append(dict(part="loss", tokens=T, labels=pattern, system="liger",
                                error=f"skipped: {liger_error}"))
            x.grad = w.grad = None
            refs = None
            # --orders 2: half the rounds in the systems' order, half reversed, so that a cost
            # of coming first (or last) in a round falls on every system alike
            times = {k: [] for k in steps}
            names = list(steps)
            for o in range(args.orders):
                order = names if o % 2 == 0 else names[::-1]
                timed = measure({k: steps[k][0] for k in order}, warmup=1,
                                repeats=max(1, args.rounds // args.orders), device=device)
                for k in order:
                    times[k] += timed[k].times_ms
            for k, (_, row) in steps.items():
                row["interleaved_ms"] = statistics.median(times[k])
                row["times_ms"] = times[k]
                row["orders"] = args.orders
                print(f"[loss] T={T} {pattern} {k}: {row['interleaved_ms']:.2f} ms", flush=True)
            if "liger" in times:
                for k, (_, row) in steps.items():
                    pairs = [a / b for a, b in zip(times[k], times["liger"])]
                    row["vs_liger"] = row["interleaved_ms"] / statistics.median(times["liger"])
                    row["vs_liger_paired"] = statistics.median(pairs)
            del steps
        y = labels_for("none ignored", T, V, device, gen)
        with torch.no_grad():
            phases(lce, x, w, y, chunk, cuda)
            out.append(dict(part="phases", tokens=T, chunk=chunk, ms=phases(lce, x, w, y, chunk, cuda)))
        del x, w, y
        if cuda:
            torch.cuda.empty_cache()
    return out


def step_part(args, device, lce) -> list[dict]:
    """A whole training step of seqshard's program (world size 1, eager, kernels=True) with
    half the labels ignored as prompt spans: the fused loss skipping them against the same loss
    running every row (linear_ce.SKIP_SHARE 0: no share of ignored tokens is enough), interleaved.
    Each row counts the loss calls that gathered (`gathered`): the skipping system's, not the
    other's, or the comparison is void."""
    import torch.distributed as dist

    from seqshard.models import AXES, build
    from seqshard.planner import parallelize

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29543")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    name, seq = ("tiny", 64) if args.smoke else ("llama3-1b", args.seq)
    model, inputs = build("llama", name, device=device, dtype=torch.bfloat16, batch=1, seq=seq)
    ids, labels = inputs
    masked = labels.clone()
    span = min(4096, seq)
    masked.view(-1, span)[:, : span // 2] = -100
    pm = parallelize(model, (ids, masked), axes=AXES["llama"], compile=False, kernels=True)
    share, spread, gathered = lce.SKIP_SHARE, lce._spread_rows_, {}

    def step_of(skip: bool):
        def counted(*a, **k):  # a loss call that gathered the kept tokens spreads them back
            gathered[skip] = gathered.get(skip, 0) + 1
            return spread(*a, **k)

        def step():
            lce.SKIP_SHARE, lce._spread_rows_ = (share if skip else 0), counted
            try:
                model.zero_grad(set_to_none=True)
                loss = pm(ids, masked)
                loss.backward()
                return loss
            finally:
                lce.SKIP_SHARE, lce._spread_rows_ = share, spread
        return step

    steps = {"half ignored, skipped": step_of(True), "half ignored, every row": step_of(False)}
    rows, grads = [], {}
    for k, fn in steps.items():
        loss = fn()
        grads[k] = (loss.detach().float(), [p.grad.detach().float().clone() for p in model.parameters()])
        rows.append(dict(part="step", model=name, seq=seq, system=k, loss=loss.item(),
                         fused_loss="fused_chunked(" in pm.code,
                         gathered=gathered.get(k.endswith("skipped"), 0)))
    (la, ga), (lb, gb) = grads.values()
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(ga, gb))
    rows[0]["rel_diff_loss"] = ((la - lb).abs() / lb.abs()).item()
    rows[0]["worst_rel_diff_grad"] = worst
    del grads
    timed = measure(steps, warmup=1, repeats=args.rounds, device=device)
    for r in rows:
        r["median_ms"] = timed[r["system"]].median_ms
        r["times_ms"] = timed[r["system"]].times_ms
        print(f"[step] {r['system']}: {r['median_ms']:.1f} ms", flush=True)
    rows[0]["vs_every_row"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    if not (rows[0]["gathered"] and not rows[1]["gathered"] and rows[0]["fused_loss"]):
        raise RuntimeError(f"void comparison: the fused loss gathered {rows[0]['gathered']} and "
                           f"{rows[1]['gathered']} times in the first step of each system")
    return rows


def report(doc) -> str:
    md = [f"# fused_loss: the fused LM-head loss against Liger, by ignored tokens ({doc['device']})",
          "", f"{doc['stamp']}, torch {doc['torch']}, triton {doc.get('triton')}; d 4096, "
          "V 128256, bf16, forward + backward", ""]
    loss = [r for r in doc["rows"] if r["part"] == "loss"]
    if loss:
        md += ["## Interleaved", "",
               "| tokens | labels | kept | system | median ms | vs Liger (medians; paired) | "
               "extra peak | diff vs fused (loss; rel dx, dW) |", "|---|---|---|---|---|---|---|---|"]
        for r in loss:
            if "error" in r:
                md.append(f"| {r['tokens']} | {r['labels']} | | {r['system']} | error: {r['error']} | | | |")
                continue
            vs = f"{r['vs_liger']:.4f}; {r['vs_liger_paired']:.4f}" if "vs_liger" in r else ""
            diff = f"{r['diff_loss']:.1e}; {r['rel_dx']:.1e}, {r['rel_dw']:.1e}" if "rel_dx" in r else ""
            md.append(f"| {r['tokens']} | {r['labels']} | {r['kept']} | {r['system']} | "
                      f"{r.get('interleaved_ms', 0):.2f} | {vs} | {r.get('extra_peak_gib', 0):.4f} GiB | {diff} |")
    step = [r for r in doc["rows"] if r["part"] == "step"]
    if step:
        md += ["", f"## A training step of seqshard's program ({step[0]['model']}, {step[0]['seq']} "
               "tokens, world size 1, eager, kernels=True), interleaved", "",
               "| labels | median ms | vs every row | loss | differences (loss; worst gradient) | "
               "loss calls that gathered (first step) |", "|---|---|---|---|---|---|"]
        for r in step:
            vs = f"{r['vs_every_row']:.4f}" if "vs_every_row" in r else ""
            diff = f"{r['rel_diff_loss']:.1e}; {r['worst_rel_diff_grad']:.1e}" if "rel_diff_loss" in r else ""
            md.append(f"| {r['system']} | {r['median_ms']:.1f} | {vs} | {r['loss']:.5f} | {diff} | "
                      f"{r['gathered']} |")
    gem = [r for r in doc["rows"] if r["part"] == "gemms"]
    if gem:
        md += ["", "## Each GEMM of a chunk, alone (events, median)", "",
               "| chunk | GEMM | library | ms | TFLOP/s |", "|---|---|---|---|---|"]
        for r in gem:
            md.append(f"| {r['chunk']} | {r['case']} | {r['lib']} | " + (
                f"error: {r['error']} | |" if "error" in r else f"{r['ms']:.3f} | {r['tflops']:.0f} |"))
    ph = [r for r in doc["rows"] if r["part"] == "phases"]
    if ph:
        md += ["", "## One chunk loop's phases (every token, no autograd; ms summed over chunks)", "",
               "| tokens | chunk | forward GEMM | rows | dW GEMM | dh GEMM |", "|---|---|---|---|---|---|"]
        for r in ph:
            m = r["ms"]
            md.append(f"| {r['tokens']} | {r['chunk']} | {m['forward GEMM']:.2f} | {m['rows']:.2f} | "
                      f"{m['dW GEMM']:.2f} | {m['dh GEMM']:.2f} |")
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each GEMM")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds of the loss")
    p.add_argument("--parts", default="loss", help="loss,gemms,step")
    p.add_argument("--seq", type=int, default=16384, help="part step: tokens")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="label patterns, comma-separated")
    p.add_argument("--orders", type=int, default=1,
                   help="2: half the rounds with the systems in reverse order")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.patterns = [x.strip() for x in args.patterns.split(",")]
    unknown = set(args.patterns) - set(PATTERNS)
    if unknown:
        p.error(f"unknown --patterns {sorted(unknown)}; choose from {PATTERNS}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.repeats, args.rounds = 2, 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    from seqshard.codegen.kernels import linear_ce as lce
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    doc = dict(stamp=stamp, torch=torch.__version__, triton=tv, host=platform.node(),
               device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", rows=[])
    parts = args.parts.split(",")
    if "loss" in parts:
        doc["rows"] += loss_part(args, device, lce)
    if "gemms" in parts:
        doc["rows"] += gemms_part(args, device)
    if "step" in parts:
        doc["rows"] += step_part(args, device, lce)
    out = Path(args.out or os.environ.get("OUT") or HERE / "results")
    if args.smoke and not args.out:
        import tempfile
        out = Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fused_loss-{stamp}.json").write_text(json.dumps(doc, indent=1))
    (out / f"fused_loss-{stamp}.md").write_text(report(doc))
    print(report(doc))
    print(f"wrote {out}/fused_loss-{stamp}.json and .md")


if __name__ == "__main__":
    main()
