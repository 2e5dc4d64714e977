"""seqshard's own runtime kernels against the torch ops they replace, on one GPU (issue 15).

    python bench/kernels.py --out $OUT                 # one H200, ~1 minute
    python bench/kernels.py --smoke --out /tmp/kb      # CPU under TRITON_INTERPRET=1, tiny shapes:
                                                       # checks the script (times mean nothing)

Part "layout" (codegen/kernels/a2a_layout.py): the copies around Ulysses' all-to-alls, batch 1,
bf16, at the shapes of Llama-3-8B (q: 32 heads, K/V: 8, head dim 128) and of the video DiT
stdit-xl (seqshard/models/video_dit.py: 16 heads, head dim 72), s_local = the tokens a rank
holds (--seqs, 8K-128K), P = the Ulysses degree (--worlds 2, 4, 8). One GPU computes one rank's
layout; no collective runs. Tensors as the program has them: q/k/v in the model's layout
([b, s, h, e] storage seen as [b, h, s, e], as models make them), cos/sin [s, e] bf16 (HF's
rotary tables), the all-to-all buffers [P, b, h/P, s, e] contiguous.

    pack+rope      the forward exchange's send buffer with the model's RoPE fused:
                   torch: x·cos + rotate_half(x)·sin (HF), then the head blocks' .contiguous()
                   ours: a2a_layout.pack(x, P, cos, sin)
    pack           the same without RoPE (torch: .contiguous() of the head blocks; ours: the
                   kernel's copy)
    unpack+rope^T  its backward: the gradient's arrivals [P, 1, g, s, e] to d x [1, h, s, e]
                   through RoPE's transpose: torch: what autograd runs for HF's formula,
                   g·cos + rotate_half^T(g·sin) on the arrivals seen as [1, h, s, e]; ours:
                   a2a_layout.unpack(g, cos, sin, inverse=True)
    unpack         the way back's arrivals [P, 1, g, s, e] into the result in the model's layout
                   (runtime/ulysses.py `_start_to_seq`): torch dst.copy_(recv); ours copy_
    to positions   head side: arrivals [P, 1, g, s, e] into position order [1, g, P·s, e]
                   (`_arrivals_to_positions`, contig): torch's strided copy against the kernel
    to arrivals    its inverse, the way back's send buffer (`_positions_to_arrivals`)

Part "accumulate" (codegen/kernels/accumulate.py, moved from runtime/fused.py unchanged): the
ring's merge of a bf16 block output into the fp32 accumulator [1, 32, s, 128] (merge_rows_
against runtime/merge.py's torch formulas) and acc += x (add_rows_ against acc.add_(x)).

Each case: torch and ours timed in interleaved rounds (timing.measure with a dict: 2 warm-ups,
--repeats isolated iterations, median), the largest difference of ours from torch (0 for the
copies; bf16 rounding with RoPE: ours rounds once from fp32, torch after each op), and the
effective bandwidth: the bytes a single pass moves (read the input, write the output, read the
tables once; accumulate: read acc and x, write acc) over the median time. The same bytes for
both, so the ratio of bandwidths is the speedup. Cases run in order while --budget-s lasts; the
rest are listed as not run. A failure (out of memory, a compile error) is recorded for its case.
Writes kernels-<stamp>.json and .md under --out (default $OUT, else bench/results).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import stamp, write_json_and_markdown  # noqa: E402
from timing import measure  # noqa: E402

K = 1024
SHAPES = {"llama3-8b q": (32, 128), "llama3-8b kv": (8, 128), "stdit-xl": (16, 72)}
"""name: (heads, head dim)."""
LAYOUT_OPS = ("pack+rope", "pack", "unpack+rope^T", "unpack", "to positions", "to arrivals")


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def rotate_half_t(x):
    """rotate_half's transpose (what autograd applies to the gradient)."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], -x[..., :h]), -1)


def layout_cases(heads, e, s, P, device, dtype):
    """{op: (torch step, our step, bytes)} for one shape; the tensors live in the closures."""
    from seqshard.codegen.kernels import a2a_layout as L

    g = heads // P
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, s, heads, e, device=device, dtype=dtype, generator=gen).transpose(1, 2)
    ang = torch.rand(s, e // 2, device=device, generator=gen) * 6.28
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    recv = torch.randn(P, 1, g, s, e, device=device, dtype=dtype, generator=gen)
    out = torch.empty(1, s, heads, e, device=device, dtype=dtype).transpose(1, 2)
    dest = torch.empty(1, g, P * s, e, device=device, dtype=dtype)
    send = torch.empty(P, 1, g, s, e, device=device, dtype=dtype)

    def blocks(t):  # [1, h, s, e] -> [P, 1, g, s, e] (a view)
        return t.unflatten(1, (P, -1)).movedim(1, 0)

    def positions(t):  # [1, g, P·s, e] -> [P, 1, g, s, e] (a view)
        return t.unflatten(2, (P, -1)).movedim(2, 0)

    item = x.element_size()
    n = x.numel() * item
    tables = 2 * cos.numel() * item
    return {
        "pack+rope": (lambda: blocks(x * cos + rotate_half(x) * sin).contiguous(),
                      lambda: L.pack(x, P, cos, sin), 2 * n + tables),
        "pack": (lambda: blocks(x).contiguous(), lambda: L.contiguous(blocks(x)), 2 * n),
        "unpack+rope^T": (lambda: (lambda gv: gv * cos + rotate_half_t(gv * sin))(
                              recv.movedim(0, 1).flatten(1, 2)),
                          lambda: L.unpack(recv, cos, sin, inverse=True), 2 * n + tables),
        "unpack": (lambda: blocks(out).copy_(recv), lambda: L.copy_(blocks(out), recv), 2 * n),
        "to positions": (lambda: positions(dest).copy_(recv),
                         lambda: L.copy_(positions(dest), recv), 2 * n),
        "to arrivals": (lambda: send.copy_(positions(dest)),
                        lambda: L.copy_(send, positions(dest)), 2 * n),
    }


def accumulate_cases(s, device, dtype):
    from seqshard.codegen.kernels import accumulate
    from seqshard.runtime import merge

    gen = torch.Generator(device).manual_seed(1)
    heads, e = 32, 128
    acc = torch.randn(1, heads, s, e, device=device, generator=gen)
    acc_lse = torch.randn(1, heads, s, device=device, generator=gen) * 10
    out = torch.randn(1, heads, s, e, device=device, generator=gen).to(dtype)
    lse = torch.randn(1, heads, s, device=device, generator=gen) * 10

    def torch_merge():  # merge.merge_'s torch path
        w_acc, w_new = merge._sigmoid_weights(acc_lse, lse)
        acc.mul_(w_acc).add_(w_new * out)
        acc_lse.copy_(torch.logaddexp(acc_lse, lse))
        return acc

    def ours_merge():
        accumulate.merge_rows_(acc, acc_lse, out, lse)
        return acc

    nbytes = acc.numel() * (4 + out.element_size() + 4) + 3 * lse.numel() * 4
    return {"merge": (torch_merge, ours_merge, nbytes),
            "add": (lambda: acc.add_(out), lambda: accumulate.add_rows_(acc, out) or acc,
                    acc.numel() * (4 + out.element_size() + 4))}


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run_case(row, cases, op, args, device) -> None:
    torch_fn, ours_fn, nbytes = cases[op]
    if op in ("merge", "add"):  # in place: compare one call from the same state
        row["max_diff"] = None
    else:
        row["max_diff"] = _difference(ours_fn(), torch_fn())
    t = measure({"torch": torch_fn, "ours": ours_fn}, warmup=2, repeats=args.repeats,
                device=device)
    row.update(torch_ms=t["torch"].median_ms, ours_ms=t["ours"].median_ms, bytes=nbytes,
               torch_times_ms=t["torch"].times_ms, ours_times_ms=t["ours"].times_ms)
    row["speedup"] = row["torch_ms"] / row["ours_ms"]
    row["torch_gbps"] = nbytes / row["torch_ms"] / 1e6
    row["ours_gbps"] = nbytes / row["ours_ms"] / 1e6


def _free(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,16384,32768,65536,131072")
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="start no case after this many seconds of the run")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU under TRITON_INTERPRET=1, s_local 16, P 2 and 8, 1 repeat")
    ap.add_argument("--out", default=os.environ.get("OUT") or
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.smoke:  # before the kernels' modules load: Triton reads it when a kernel is defined
        os.environ["TRITON_INTERPRET"] = "1"
        args.seqs, args.worlds, args.repeats = "16", "2,8", 1
    seqs = [int(s) for s in args.seqs.split(",")]
    worlds = [int(p) for p in args.worlds.split(",")]
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    rows, not_run = [], []

    # the lengths in order of interest (32K, the longest, the shortest, then the rest), so that
    # a budget cut drops the least wanted
    order = sorted(seqs, key=lambda s: (s != 32 * K, s != max(seqs), s != min(seqs), s))
    plan = []
    for s in order:
        plan += [("layout", name, s, P) for name in SHAPES for P in worlds
                 if SHAPES[name][0] % P == 0]
        if s in (32 * K, max(seqs), min(seqs)):
            plan.append(("accumulate", "llama3-8b q", s, None))
    for part, name, s, P in plan:
        ops = LAYOUT_OPS if part == "layout" else ("merge", "add")
        if time.perf_counter() - t0 > args.budget_s:
            not_run += [dict(part=part, shape=name, seq=s, world=P, op=op) for op in ops]
            continue
        _free(device)
        heads, e = SHAPES[name]
        try:
            cases = (layout_cases(heads, e, s, P, device, dtype) if part == "layout"
                     else accumulate_cases(s, device, dtype))
        except Exception as err:  # noqa: BLE001 - recorded (out of memory, ...)
            rows += [dict(part=part, shape=name, seq=s, world=P, op=op, error=_error(err))
                     for op in ops]
            continue
        for op in ops:
            row = dict(part=part, shape=name, heads=heads, e=e, seq=s, world=P, op=op,
                       dtype=str(dtype))
            try:
                run_case(row, cases, op, args, device)
            except Exception as err:  # noqa: BLE001 - recorded per case
                row["error"] = _error(err)
                traceback.print_exc()
            rows.append(row)
            print(_short(row), flush=True)
        del cases
    return finish(args, device, rows, not_run, t0)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _short(row) -> str:
    head = f"[{row['part']}] {row['shape']} s={row['seq']} P={row['world']} {row['op']}"
    if "error" in row:
        return f"{head}: {row['error']}"
    return (f"{head}: torch {row['torch_ms']:.3f} ms, ours {row['ours_ms']:.3f} ms, "
            f"{row['speedup']:.2f}x, {row['ours_gbps']:.0f} GB/s")


def _seq(s: int) -> str:
    return f"{s // K}K" if s % K == 0 else str(s)


def markdown(doc) -> str:
    md = [f"# seqshard's runtime kernels against torch ({doc['device']})", "",
          f"`{doc['command']}`; torch {doc['torch']}, triton {doc['triton']}; "
          f"wall {doc['wall_s']:.0f} s. bf16, batch 1; GB/s: one pass's bytes over the median "
          "time (the same bytes for both: their ratio is the speedup); diff: max |ours - torch| "
          "/ max |torch|.", ""]
    ok = [r for r in doc["rows"] if "error" not in r]
    md += ["## Summary: speedup over torch (geometric mean, min, max over shapes, s_local, P)",
           "", "| op | cases | geomean | min | max | ours GB/s (median) |", "|---|---|---|---|---|---|"]
    for op in (*LAYOUT_OPS, "merge", "add"):
        sel = [r for r in ok if r["op"] == op]
        if not sel:
            continue
        sp = [r["speedup"] for r in sel]
        bw = sorted(r["ours_gbps"] for r in sel)[len(sel) // 2]
        md.append(f"| {op} | {len(sel)} | {math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x | "
                  f"{min(sp):.2f}x | {max(sp):.2f}x | {bw:.0f} |")
    for part, shapes in (("layout", SHAPES), ("accumulate", ("llama3-8b q",))):
        for name in shapes:
            sel = sorted((r for r in doc["rows"] if r["part"] == part and r["shape"] == name),
                         key=lambda r: (r["seq"], r["world"] or 0))
            if not sel:
                continue
            h, e = SHAPES[name]
            md += ["", f"## {part}: {name} ({h} heads, head dim {e})", "",
                   "| op | s_local | P | torch ms | ours ms | speedup | torch GB/s | ours GB/s | diff |",
                   "|---|---|---|---|---|---|---|---|---|"]
            for r in sel:
                where = f"| {r['op']} | {_seq(r['seq'])} | {r['world'] or '-'} |"
                if "error" in r:
                    md.append(f"{where} {r['error']} | | | | | |")
                    continue
                diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
                md.append(f"{where} {r['torch_ms']:.3f} | {r['ours_ms']:.3f} | "
                          f"{r['speedup']:.2f}x | {r['torch_gbps']:.0f} | {r['ours_gbps']:.0f} | "
                          f"{diff} |")
    if doc["not_run"]:
        md += ["", "## Not run (budget)", "",
               ", ".join(f"{r['op']} {r['shape']} {_seq(r['seq'])} P={r['world']}"
                         for r in doc["not_run"])]
    return "\n".join(md) + "\n"


def finish(args, device, rows, not_run, t0) -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    doc = dict(benchmark="kernels", command=" ".join(sys.argv), torch=torch.__version__,
               triton=triton_version, python=platform.python_version(),
               device=torch.cuda.get_device_name() if device == "cuda" else
               f"{platform.processor() or 'cpu'} (TRITON_INTERPRET=1)",
               wall_s=time.perf_counter() - t0, rows=rows, not_run=not_run)
    md = markdown(doc)
    path = write_json_and_markdown(args.out, f"kernels-{stamp()}", doc, md)
    print(md)
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
