"""Model state on one GPU: replicated bf16 against sharded (FSDP2) in mixed precision, measured
peak memory and step time against the plan's predictions.

    python bench/state.py            # one H200: the Llama-3.2-1B shape at 16K tokens, < 2 min
    python bench/state.py --smoke    # CPU, gloo, a toy model: every code path in ~1 min

World size 1: a process group of one (NCCL on the GPU, gloo with --smoke; the script sets
MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE when they are missing) and a 1-rank mesh. Two
configurations, one after the other in the same process, each freed (del, gc, empty_cache)
before the next:

    replicated  bf16 parameters; `torch.optim.AdamW(fused=True)` on them (its moments in bf16,
                no master copy); planned with model_state="replicated", optimizer="adamw-pure"
                (what that keeps: 8 bytes a parameter)
    sharded     fp32 parameters, `parallelize(model_state="sharded", mixed_precision=
                MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))`: FSDP2 over the one
                rank, bf16 compute (parameters cast in each unit's pre-forward, the units'
                inputs cast by cast_forward_inputs), fp32 master parameters, fp32 gradients and
                their reduction, AdamW in fp32; planned on the bf16 model (the compute dtype)
                with model_state="sharded", optimizer="adamw" (fp32 master and moments, bf16
                parameters gathered: 16 bytes a parameter + the gathered units)

Both plans are made by the planner on the meta device (bf16) for --cluster (h200x1), local
attention priced at the kernel the runtime runs here (as `parallelize` does when it plans), and
run with `parallelize(plan=...)`; the row keeps each plan's notes (its model-state share, the
attention kernel priced). For reference, `planner.plan(model_state="auto")` of the same model
and cluster: which state the planner would choose (`auto_choice`).

A step: zero_grad(set_to_none), forward, backward, optimizer step. One untimed warm-up step
(AdamW's state made; the first FSDP all-gathers), `torch.cuda.reset_peak_memory_stats`, then
--repeats timed steps (`timing.measure`, isolated). Measured against predicted:

    peak     torch.cuda.max_memory_allocated over the timed steps  vs  predicted.peak_memory_bytes
    step     the timed steps' median                              vs  predicted.step_s
    state    the bytes of parameters, gradients (before zero_grad) and optimizer state held after
             a step (each storage once; DTensors by their local shard)

A configuration that fails (out of memory, an error) is a row with its status and message; the
other still runs. Results: state-<stamp>.json and .md under --out, else $OUT, else
bench/results/ (--smoke: a temporary folder unless --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

GIB = 2**30
MODES = ("replicated", "sharded")


def model_config(smoke: bool):
    """Llama-3.2-1B (seqshard/models `llama3-1b`: 16 layers, d 2048, tied embedding); --smoke: a
    toy of the same structure."""
    from seqshard.models import llama

    if smoke:
        return llama.LlamaConfig(vocab=384, dim=64, layers=2, heads=4, kv_heads=2, ffn=128,
                                 tie_embeddings=True)
    return llama.CONFIGS["llama3-1b"]


def build_model(cfg, device, dtype, seed: int = 0):
    """Made on the meta device, `to_empty` on `device`, initialized in place (normal(0, 0.02)
    weights, unit norms, the rotary frequencies); a tied embedding tied again."""
    import torch

    from seqshard.models import llama

    with torch.device("meta"):
        model = llama.Llama(cfg).to(dtype)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float()
                                       / cfg.head_dim)
        model.inv_freq.copy_(inv.to(model.inv_freq.dtype))
    return model


def init_world(cuda: bool):
    """A process group of one and a 1-rank mesh "sp"."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    return init_device_mesh("cuda" if cuda else "cpu", (1,), mesh_dim_names=("sp",))


def relaunch(script: str, ranks: int, argv: list[str]) -> int:
    """Run `script` with `argv` under `torch.distributed.run` with `ranks` ranks (for a bench
    script started without torchrun); returns its exit status."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", os.path.abspath(script), *argv]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


def state_bytes(model, opt) -> dict:
    """Bytes of parameters, gradients and optimizer state held now (each storage once; a DTensor
    by its local shard)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def total(tensors):
        seen, n = set(), 0
        for t in tensors:
            t = local(t)
            if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                n += t.untyped_storage().nbytes()
        return n

    params = list(model.parameters())
    return dict(params=total(params), grads=total(p.grad for p in params),
                optimizer=total(v for s in opt.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor) and v.dim() > 0))


def plan_for(cfg, seq: int, mode: str, cluster: str, device):
    """The plan of `mode` on the bf16 model (meta device), and the planner's own choice; local
    attention priced at the kernel the runtime runs on `device`, as `parallelize` prices it when
    it plans (`planner.parallel.runtime_attention_pricing`)."""
    import torch

    from seqshard.capture import capture
    from seqshard.dims import analyze
    from seqshard.models import AXES, llama
    from seqshard.planner.api import plan_captured
    from seqshard.planner.parallel import runtime_attention_pricing

    with torch.device("meta"):
        meta = llama.Llama(cfg).to(torch.bfloat16)
    dims = analyze(capture(meta, llama.example_inputs(cfg, 1, seq, device="meta")), AXES["llama"])
    priced, note = runtime_attention_pricing(dims, cluster, 1, device)
    kw = dict(cluster=priced, mesh=(("sp", 1),),
              optimizer="adamw-pure" if mode == "replicated" else "adamw")
    p = plan_captured(dims, model_state=mode, **kw).with_axes(AXES["llama"])
    if note:
        p = dataclasses.replace(p, notes=(*p.notes, note))
    return p, plan_captured(dims, model_state="auto", **kw)


def run_mode(mode: str, cfg, seq: int, args, mesh, device) -> dict:
    """One configuration: plan, build, parallelize, warm up, time; the row."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from timing import measure

    from seqshard.planner import parallelize

    cuda = device.type == "cuda"
    row = dict(mode=mode, status="ok")
    model = pm = opt = None
    try:
        t0 = time.perf_counter()
        p, auto = plan_for(cfg, seq, mode, args.cluster, device)
        row.update(plan=p.hash(), plan_s=time.perf_counter() - t0, model_state=p.model_state,
                   predicted_peak_gib=p.predicted.peak_memory_bytes / GIB,
                   predicted_step_s=p.predicted.step_s, notes=list(p.notes),
                   auto_choice=auto.model_state,
                   auto_note=next((n for n in auto.notes if "(auto:" in n), None))
        dtype = torch.bfloat16 if mode == "replicated" else torch.float32
        model = build_model(cfg, device, dtype)
        gen = torch.Generator(device).manual_seed(1)
        ids = torch.randint(0, cfg.vocab, (1, seq), device=device, generator=gen)
        labels = torch.randint(0, cfg.vocab, (1, seq), device=device, generator=gen)
        row["params"] = sum(q.numel() for q in model.parameters())
        t0 = time.perf_counter()
        if mode == "replicated":
            pm = parallelize(model, (ids, labels), mesh=mesh, plan=p, model_state="replicated",
                             compile=False, kernels=False)
        else:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            pm = parallelize(model, (ids, labels), mesh=mesh, plan=p, model_state="sharded",
                             mixed_precision=policy, compile=False, kernels=False)
        row["parallelize_s"] = time.perf_counter() - t0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = pm(ids, labels)
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        t0 = time.perf_counter()
        step()  # warm-up: AdamW's state, the first gathers
        if cuda:
            torch.cuda.synchronize()
        row["first_step_s"] = time.perf_counter() - t0
        row.update({f"{k}_gib": v / GIB for k, v in state_bytes(model, opt).items()})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = measure(step, repeats=args.repeats, device=device)
        row.update(step_s=t.median_ms / 1e3, times_ms=t.times_ms,
                   losses=[float(x) for x in losses])
        if cuda:
            row.update(peak_gib=torch.cuda.max_memory_allocated() / GIB,
                       reserved_gib=torch.cuda.max_memory_reserved() / GIB)
            row["peak_ratio"] = row["peak_gib"] / row["predicted_peak_gib"]
        row["step_ratio"] = row["step_s"] / row["predicted_step_s"]
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - the row says what failed; the other mode still runs
        row.update(status="error", error=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc()[-3000:])
    finally:
        model = pm = opt = None  # noqa: F841 - freed before the next mode
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def markdown(doc: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"# Model state on one GPU: {doc['model']} at {doc['seq']} tokens ({doc['device']})",
             "", f"torch {doc['torch']}; cluster {doc['cluster']}; {doc['repeats']} timed steps "
             "after one warm-up (bench/state.py docstring)", "",
             "| state | status | params | state GiB (p/g/opt) | peak GiB | predicted | ratio "
             "| step s | predicted | ratio | auto chooses |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        state = "/".join(f(r.get(f"{k}_gib"), ".2f") for k in ("params", "grads", "optimizer"))
        lines.append(
            f"| {r['mode']} | {r['status']} | {f(r.get('params'), ',')} | {state} | "
            f"{f(r.get('peak_gib'), '.2f')} | {f(r.get('predicted_peak_gib'), '.2f')} | "
            f"{f(r.get('peak_ratio'), '.2f')} | {f(r.get('step_s'), '.3f')} | "
            f"{f(r.get('predicted_step_s'), '.3f')} | {f(r.get('step_ratio'), '.2f')} | "
            f"{r.get('auto_choice', '-')} |")
    for r in doc["rows"]:
        if r.get("error"):
            lines += ["", f"{r['mode']}: {r['error']}"]
        lines += ["", f"{r['mode']} plan notes:"] + [f"- {n}" for n in r.get("notes", [])[:4]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, a toy model")
    ap.add_argument("--seq", type=int, help="tokens (default 16384; --smoke 128)")
    ap.add_argument("--modes", default=",".join(MODES), help="replicated,sharded")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cluster", default="h200x1")
    ap.add_argument("--out", help="folder for the results (default $OUT, else bench/results)")
    args = ap.parse_args(argv)

    import torch

    from report import stamp, write_json_and_markdown

    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench/state.py needs a GPU (or --smoke for the CPU check)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    seq = args.seq or (128 if args.smoke else 16384)
    cfg = model_config(args.smoke)
    mesh = init_world(cuda)
    doc = dict(model="toy" if args.smoke else "llama3-1b", seq=seq, cluster=args.cluster,
               repeats=args.repeats, torch=torch.__version__, python=platform.python_version(),
               device=torch.cuda.get_device_name(0) if cuda else "cpu", rows=[])
    out = args.out or os.environ.get("OUT") or \
        (tempfile.mkdtemp(prefix="state-smoke-") if args.smoke else str(HERE / "results"))
    name = f"state-{'smoke-' if args.smoke else ''}{stamp()}"
    t0 = time.perf_counter()
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: {mode!r} is not one of {MODES}")
        row = run_mode(mode, cfg, seq, args, mesh, device)
        doc["rows"].append(row)
        print(f"[{time.perf_counter() - t0:5.1f}s] {mode}: {row['status']}, peak "
              f"{row.get('peak_gib')} GiB (predicted {row.get('predicted_peak_gib')}), step "
              f"{row.get('step_s')} s (predicted {row.get('predicted_step_s')})"
              + (f"; {row['error']}" if row.get("error") else ""), flush=True)
        path = write_json_and_markdown(out, name, doc, markdown(doc))
    doc["total_s"] = time.perf_counter() - t0
    path = write_json_and_markdown(out, name, doc, markdown(doc))
    print(f"results: {path} and .json")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0 if all(r["status"] == "ok" for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
