"""The rotary embedding inside Ulysses' pack (codegen/rope.py, kernels=True) against the model's
own rotation before the call, per attention call, forward + backward, on one GPU (issue 15).

    python bench/rope_pack.py --out $OUT                 # one H200, ~1 minute
    python bench/rope_pack.py --smoke --out /tmp/rp      # CPU (gloo), tiny shapes: checks the
                                                         # script (times mean nothing)

One rank holds the whole exchange (a 1-rank Ulysses group): the all-to-all moves nothing, so
what differs between the two is exactly what the pass changes on every rank of a real group:

    unfused   q' = q·cos + rotate_half(q)·sin, the same for k (torch's ops and their autograd),
              then ulysses_attention(q', k', v): its pack copies q', k' into the send buffers
    fused     ulysses_attention(q, k, v, cos=, sin=): the pack writes the rotated buffers (one
              kernel, codegen/kernels/a2a_layout.py), dq, dk rotated back while unpacked

Shapes: Llama-3-8B's heads (q 32, K/V 8, head dim 128), bf16, batch 1, the tokens a rank holds
after the exchange (--seqs); q, k, v are [b, s, h, e] storage seen as [b, h, s, e] (as the
projections give them), cos/sin [1, 1, s, e] bf16 (HF's tables). Timed in interleaved rounds
(timing.measure: 2 warm-ups, --repeats isolated iterations, median). Accuracy at the first
length: each path's relative error of out, dq, dk, dv against the unfused path in fp32 (the
flash-attention rule: fused's error at most twice the unfused bf16 path's).

Writes rope_pack-<stamp>.json and .md under --out (default $OUT, else bench/results).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import stamp, write_json_and_markdown  # noqa: E402
from timing import measure  # noqa: E402

from seqshard.runtime import ulysses_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


def inputs(s: int, heads: int, kv_heads: int, e: int, dtype, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, s, heads, e, dtype=dtype, device=device, generator=gen)
    k, v = (torch.randn(1, s, kv_heads, e, dtype=dtype, device=device, generator=gen)
            for _ in range(2))
    dout = torch.randn(1, s, heads, e, dtype=dtype, device=device, generator=gen).transpose(1, 2)
    inv = 1.0 / 500000.0 ** (torch.arange(0, e, 2, device=device).float() / e)
    emb = torch.outer(torch.arange(s, device=device).float(), inv).repeat(1, 2)
    cos, sin = (t(emb)[None, None].to(dtype) for t in (torch.cos, torch.sin))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    return leaves, dout, cos, sin


def call(leaves, dout, cos, sin, fused: bool, backend):
    q, k, v = (x.transpose(1, 2) for x in leaves)  # [b, h, s, e] views
    if fused:
        out = ulysses_attention(q, k, v, backend=backend, cos=cos, sin=sin)
    else:
        out = ulysses_attention(rope(q, cos, sin), rope(k, cos, sin), v, backend=backend)
    return (out, *torch.autograd.grad(out, leaves, dout))


def accuracy(s, e, device, backend) -> dict:
    """Relative error of out, dq, dk, dv of each bf16 path against the unfused fp32 one."""
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    ref = call(*inputs(s, HEADS, KV_HEADS, e, torch.float32, device), False, backend)
    errs = {}
    for name, fused in (("unfused", False), ("fused", True)):
        got = call(*inputs(s, HEADS, KV_HEADS, e, torch.bfloat16, device), fused, backend)
        errs[name] = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
    errs["rule_ok"] = all(errs["fused"][n] <= 2 * errs["unfused"][n] + 1e-6 for n in errs["fused"])
    return errs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--seqs", default="8192,16384,32768")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    global HEADS, KV_HEADS, HEAD_DIM
    seqs = [int(x) for x in args.seqs.split(",")]
    backend = None
    if args.smoke:
        HEADS, KV_HEADS, HEAD_DIM, seqs, args.repeats, backend = 4, 2, 16, [64, 128], 2, "math"
    rows = []
    acc = accuracy(min(seqs), HEAD_DIM, device, backend)
    for s in seqs:
        row = dict(seq=s, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        try:
            leaves, dout, cos, sin = inputs(s, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device)
            steps = {name: (lambda fused=fused: call(leaves, dout, cos, sin, fused, backend))
                     for name, fused in (("unfused", False), ("fused", True))}
            t = measure(steps, repeats=args.repeats, warmup=2, device=device)
            row.update(unfused_ms=t["unfused"].median_ms, fused_ms=t["fused"].median_ms,
                       saved_ms=t["unfused"].median_ms - t["fused"].median_ms,
                       speedup=t["unfused"].median_ms / t["fused"].median_ms)
        except Exception as e:  # noqa: BLE001 - recorded for its case
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    doc = dict(benchmark="rope_pack", command=" ".join(sys.argv), torch=torch.__version__,
               python=platform.python_version(),
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
               wall_s=time.perf_counter() - t0, rows=rows, accuracy=acc)
    md = [f"# RoPE in Ulysses' pack: one attention call, forward + backward ({doc['device']})", "",
          f"q {HEADS} heads, K/V {KV_HEADS}, head dim {HEAD_DIM}, bf16, batch 1, a 1-rank "
          "Ulysses group (bench/rope_pack.py)", "",
          "| tokens | unfused ms | fused ms | saved ms | speedup |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['seq']} | error: {r['error']} | | | |" if "error" in r else
                  f"| {r['seq']} | {r['unfused_ms']:.3f} | {r['fused_ms']:.3f} | "
                  f"{r['saved_ms']:.3f} | {r['speedup']:.3f}x |")
    md += ["", f"Accuracy at {min(seqs)} tokens (relative error against the unfused fp32 path; "
           f"rule: fused <= 2x unfused bf16): {'ok' if acc['rule_ok'] else 'VIOLATED'}", "",
           "| path | out | dq | dk | dv |", "|---|---|---|---|---|"]
    for name in ("unfused", "fused"):
        md.append(f"| {name} | " + " | ".join(f"{acc[name][n]:.2e}" for n in
                                              ("out", "dq", "dk", "dv")) + " |")
    text = "\n".join(md) + "\n"
    path = write_json_and_markdown(args.out, f"rope_pack-{stamp()}", doc, text)
    print(text)
    print(f"wrote {path}")
    dist.destroy_process_group()
    return 0 if all("error" not in r for r in rows) and acc["rule_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
