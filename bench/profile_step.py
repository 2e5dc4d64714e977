"""Where the time of one distributed attention step goes (4×H200, the headline shape).

    torchrun --nproc-per-node 4 bench/profile_step.py --out DIR [--seq 131072]

1. The local kernel alone at the shapes the algorithms hand it: cuDNN causal fwd+bwd at the
   Ulysses shape (full S, H/N heads), the ring's block shape (S/N, H heads) and the ideal
   (S/√N, H heads), in TFLOP/s: the ceiling each algorithm can reach.
2. Ulysses over NCCL's all-to-all and over copy engines (transport 'peer', chunks ∈ {1, 2, 4, 8}), and ring: median step time
   (CUDA events), TFLOP/s; the other transports' results against the all-to-all's.
3. One profiled step of each (rank 0, torch.profiler): GPU kernel time by category
   (attention, NCCL, copies/elementwise, other), their sum against the step's wall time (the
   difference is overlap, or idle GPU when negative).
Writes profile_step-<date>.json and .md.
"""

from __future__ import annotations

import os

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import report  # noqa: E402
import timing  # noqa: E402


def flops(b, h, s, e, causal=True, n=1):
    return 3.5 * 4 * b * h * s * s * e * (0.5 if causal else 1.0) / n


def category(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "nccl"
    if any(k in n for k in ("fmha", "flash", "cudnn", "attention", "sm90_xmma", "cutlass", "gemm")):
        return "attention"
    if any(k in n for k in ("copy", "elementwise", "memcpy", "memset", "cat", "index", "fill", "reduce",
                            "merge_kernel", "add_kernel")):
        return "copies/elementwise"
    return "other"


def timeline(p) -> dict:
    """GPU activity of a profiled step from the profiler's trace: per stream, (start µs, duration
    µs, name) of every kernel and copy, and the gaps of the busiest (compute) stream longer than
    50 µs with what the other streams ran meanwhile."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"
              and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not events:
        return {}
    t0 = min(e["ts"] for e in events)
    streams: dict[str, list] = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        streams.setdefault(str(e.get("args", {}).get("stream", e.get("tid"))), []).append(
            (round(e["ts"] - t0, 1), round(e["dur"], 1), e["name"][:48]))
    compute = max(streams, key=lambda k: sum(d for _, d, _ in streams[k]))
    gaps = []
    runs = streams[compute]
    for (s0, d0, n0), (s1, _, n1) in zip(runs, runs[1:]):
        if s1 - (s0 + d0) > 50:
            lo, hi = s0 + d0, s1
            other = {k: round(sum(min(hi, s + d) - max(lo, s) for s, d, _ in v
                                  if s < hi and s + d > lo), 1)
                     for k, v in streams.items() if k != compute}
            gaps.append(dict(at_us=round(lo, 1), us=round(hi - lo, 1), after=n0, before=n1,
                             other_streams_busy_us={k: x for k, x in other.items() if x > 0}))
    return dict(compute_stream=compute, gaps=gaps, idle_us=round(sum(g["us"] for g in gaps), 1),
                streams={k: v[:400] for k, v in streams.items()})


def profile(fn, with_timeline=False) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof

    fn()  # the warm-up stays outside the profile
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        wall = timing.measure(fn, repeats=1).median_ms / 1e3
    cats: dict[str, float] = {}
    top: dict[str, float] = {}
    for ev in p.events():
        if ev.device_type.name != "CUDA":
            continue
        t = ev.device_time_total / 1e6 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e6
        cats[category(ev.name)] = cats.get(category(ev.name), 0.0) + t
        top[ev.name[:90]] = top.get(ev.name[:90], 0.0) + t
    biggest = sorted(top.items(), key=lambda x: -x[1])[:8]
    out = dict(wall_s=wall, kernels_s=cats, sum_s=sum(cats.values()), top=biggest)
    if with_timeline:
        try:
            out["timeline"] = timeline(p)
        except Exception as e:  # noqa: BLE001 - the rest of the profile stands
            out["timeline"] = dict(error=f"{type(e).__name__}: {e}"[:200])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--seq", type=int, default=128 * 1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--systems", default="", help="comma-separated prefixes of the systems to run "
                    "(default: all); skips the kernel table")
    ap.add_argument("--tag", default="", help="appended to the result file names")
    ap.add_argument("--timeline", action="store_true", help="keep each profiled step's GPU "
                    "timeline (per stream) and the compute stream's gaps in the JSON")
    args = ap.parse_args(argv)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    from seqshard.runtime import ring_attention, ulysses_attention
    from seqshard.runtime.backends import attention_backward, attention_forward

    S, H, E = args.seq, args.heads, args.head_dim
    dev = "cuda"
    rows = {"kernel": [], "steps": [], "profiles": {}}

    # 1. the local kernel at each algorithm's shape (every rank runs the same; rank 0 reports)
    only = [x.replace("_", " ") for x in args.systems.split(",") if x]  # '_' for a space
    for label, h, s in (("ulysses shape (S, H/N)", H // n, S), ("ideal (S/sqrt N, H)", H, int(S / n ** 0.5)),
                        ("ring block (S/N, H)", H, S // n)) if not only else ():
        q, k, v, do = (torch.randn(1, h, s, E, device=dev, dtype=torch.bfloat16) for _ in range(4))

        def step():
            out, lse = attention_forward(q, k, v, causal=True, backend="cudnn")
            attention_backward(do, q, k, v, out, lse, causal=True, backend="cudnn")
        t = timing.measure(step, warmup=2, repeats=5).median_ms / 1e3  # this rank's
        rows["kernel"].append(dict(shape=label, heads=h, seq=s, ms=t * 1e3,
                                   tflops=flops(1, h, s, E) / t / 1e12))
        del q, k, v, do
        torch.cuda.empty_cache()

    # 2. and 3. the algorithms at the headline shape
    gen = torch.Generator(dev).manual_seed(rank)
    q, k, v, do = (torch.randn(1, H, S // n, E, device=dev, dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    systems = {"ulysses nccl chunks=1": lambda: ulysses_attention(q, k, v, causal=True, chunks=1,
                                                                  transport="nccl")}
    systems.update({f"ulysses peer chunks={c}": (lambda c=c: ulysses_attention(
        q, k, v, causal=True, chunks=c, transport="peer")) for c in (1, 2, 4, 8)})
    systems["ring zigzag"] = lambda: ring_attention(q, k, v, causal=True, order="zigzag")
    profiled = ("ulysses nccl chunks=1", "ulysses peer chunks=2", "ulysses peer chunks=4",
                "ring zigzag")

    # the copy-engine exchange gives the NCCL one's result (same kernels per head: bit for bit)
    def result(fn):
        for x in (q, k, v):
            x.grad = None
        out = fn()
        out.backward(do)
        return [t.detach().clone() for t in (out, q.grad, k.grad, v.grad)]
    ref = result(systems["ulysses nccl chunks=1"])
    for name in ("ulysses peer chunks=1", "ulysses peer chunks=4"):
        if only and not any(name.startswith(p) for p in only):
            continue
        got = result(systems[name])
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
        rows.setdefault("peer_vs_nccl", {})[name] = diff
        if rank == 0:
            print(f"{name}: max |difference| from nccl chunks=1 over out, dq, dk, dv: {diff:.3g}",
                  flush=True)
    del ref
    if only:
        systems = {k: f for k, f in systems.items() if any(k.startswith(p) for p in only)}

    for name, fn in systems.items():
        def step(fn=fn):
            out = fn()
            out.backward(do)
        try:
            t = timing.measure(step, warmup=2, repeats=5, slowest="median").median_ms / 1e3
            rows["steps"].append(dict(system=name, ms=t * 1e3, tflops=flops(1, H, S, E, n=n) / t / 1e12))
            if name in profiled:
                pr = profile(step, with_timeline=args.timeline)
                if rank == 0:
                    rows["profiles"][name] = pr
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            rows["steps"].append(dict(system=name, error=f"{type(e).__name__}: {e}"[:300]))
        torch.cuda.empty_cache()
        dist.barrier()

    if rank == 0:
        date = report.stamp()
        env = {k: os.environ[k] for k in ("NCCL_MAX_CTAS", "NCCL_MAX_P2P_NCHANNELS",
                                          "CUDA_DEVICE_MAX_CONNECTIONS") if k in os.environ}
        meta = dict(date=date, device=f"{n}x {torch.cuda.get_device_name()}", torch=torch.__version__,
                    env=env,
                    command=" ".join(["torchrun", f"--nproc-per-node={n}"] + sys.argv), seq=S, heads=H,
                    head_dim=E)
        lines = [f"# One step of distributed attention, profiled ({meta['device']}, torch {meta['torch']})",
                 "", f"`{' '.join(f'{k}={v}' for k, v in env.items())} {meta['command']}`; causal, bf16, B=1, H={H}, E={E}, S={S}; fwd+bwd; cuDNN; "
                 "FLOPs as FlashAttention counts them (3.5 × 4·B·H·S²·E/2 per step, over N).", "",
                 "## The local kernel at each algorithm's shape (one GPU)", "",
                 "| shape | heads | length | ms | TFLOP/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['heads']} | {r['seq']} | {r['ms']:.2f} | {r['tflops']:.1f} |"
                  for r in rows["kernel"]]
        lines += ["", f"## Algorithms on {n} GPUs (slowest rank's median)", "",
                  "| system | ms | TFLOP/s per GPU |", "|---|---|---|"]
        lines += [f"| {r['system']} | {r.get('ms', float('nan')):.2f} | {r.get('tflops', float('nan')):.1f} |"
                  if "error" not in r else f"| {r['system']} | failed: {r['error'][:100]} | |"
                  for r in rows["steps"]]
        lines += ["", "Ulysses over other transports against the all-to-all (max |difference| over out, "
                  "dq, dk, dv): "
                  + ", ".join(f"{k}: {v:.3g}" for k, v in rows.get("peer_vs_nccl", {}).items())]
        lines += ["", "## Profile of one step (rank 0): GPU kernel time by category", "",
                  "| system | wall ms | attention | NCCL | copies/elementwise | other | sum of kernels |",
                  "|---|---|---|---|---|---|---|"]
        for name, pr in rows["profiles"].items():
            c = pr["kernels_s"]
            lines.append(f"| {name} | {pr['wall_s'] * 1e3:.2f} | {c.get('attention', 0) * 1e3:.2f} | "
                         f"{c.get('nccl', 0) * 1e3:.2f} | {c.get('copies/elementwise', 0) * 1e3:.2f} | "
                         f"{c.get('other', 0) * 1e3:.2f} | {pr['sum_s'] * 1e3:.2f} |")
        for name, pr in rows["profiles"].items():
            lines += ["", f"Largest kernels, {name}:", ""]
            lines += [f"- {t * 1e3:.2f} ms  `{k}`" for k, t in pr["top"]]
            tl = pr.get("timeline")
            if tl and "gaps" in tl:
                lines += ["", f"Compute stream idle (gaps > 50 µs): {tl['idle_us'] / 1e3:.2f} ms in "
                          f"{len(tl['gaps'])} gaps; the longest:", ""]
                for gap in sorted(tl["gaps"], key=lambda g: -g["us"])[:6]:
                    lines.append(f"- {gap['us'] / 1e3:.2f} ms at {gap['at_us'] / 1e3:.1f} ms, after "
                                 f"`{gap['after']}`, before `{gap['before']}`; other streams busy "
                                 f"{gap['other_streams_busy_us']} µs")
        text = "\n".join(lines) + "\n"
        report.write_json_and_markdown(args.out, f"profile_step-{date}{args.tag}",
                                       dict(meta=meta, **rows), text)
        print(text)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
