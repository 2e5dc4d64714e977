"""transformers' LlamaForCausalLM through `parallelize` at world size 1, against the plain model.

    python bench/hf_world1.py [--seq 16384] [--layers 16] [--out bench/results]

One GPU (or CPU with --device cpu for a small smoke run). The model has the Llama-3.2-1B shape
(hidden 2048, 32 query / 8 kv heads, FFN 8192, vocabulary 128256), random init, bf16, one
sequence; a step is forward + backward of the causal-LM loss. Both are timed in the same
process with `timing.measure` (interleaved rounds, isolated iterations), with their peak memory
and their losses. On one rank seqshard's program must be the captured model: the issue's goal
is a step within 3% of plain. Writes hf_world1-<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from report import stamp, write_json_and_markdown
from timing import measure


class CausalLMLoss(nn.Module):
    """What a user writes around a transformers causal LM: its loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels):
        return self.lm(input_ids=input_ids, labels=labels).loss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqshard.planner import parallelize

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cfg = LlamaConfig(vocab_size=128256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=32 if args.hidden >= 2048 else 4,
                      num_key_value_heads=8 if args.hidden >= 2048 else 2,
                      max_position_embeddings=max(args.seq, 2048), use_cache=False,
                      rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = CausalLMLoss(LlamaForCausalLM(cfg).to(dtype))
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(1))

    pm = parallelize(model, (ids, ids), compile=False, kernels=False)
    attention = sorted({f"{n.algorithm} [{n.split_str()}]" for n in pm.plan.attention()})
    print(f"plan {pm.plan.hash()}: attention {attention}; notes: {pm.plan.notes}", flush=True)

    def step(fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss = fn(ids, ids)
            loss.backward()
            return loss
        return run

    losses = {"plain": step(model)().item(), "seqshard": step(pm)().item()}
    peaks = {}
    for name, fn in (("plain", model), ("seqshard", pm)):
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step(fn)()
        if args.device == "cuda":
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    times = measure({"plain": step(model), "seqshard": step(pm)}, warmup=2, repeats=args.repeats,
                    device=args.device)
    ratio = times["seqshard"].median_ms / times["plain"].median_ms
    doc = dict(
        benchmark="hf_world1", command=" ".join(sys.argv), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(),
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        seq=args.seq, layers=args.layers, hidden=args.hidden, dtype=str(dtype),
        plan=pm.plan.hash(), attention=attention, losses=losses, peak_gib=peaks,
        times_ms={k: v.times_ms for k, v in times.items()},
        median_ms={k: v.median_ms for k, v in times.items()}, seqshard_over_plain=ratio)
    md = [f"# transformers LlamaForCausalLM at world size 1 ({doc['device']})", "",
          f"`{doc['command']}`; torch {doc['torch']}, transformers {doc['transformers']}; "
          f"seq {args.seq}, {args.layers} layers, hidden {args.hidden}, {dtype}; fwd + bwd of the loss.",
          "", "| | step (median) | peak memory | loss |", "|---|---|---|---|"]
    for k in ("plain", "seqshard"):
        peak = f"{peaks[k]:.1f} GiB" if k in peaks else "-"
        md.append(f"| {k} | {times[k].median_ms:.1f} ms | {peak} | {losses[k]:.6f} |")
    md += ["", f"seqshard / plain: {ratio:.3f} (goal: ≤ 1.03). Attention in the plan: {attention}."]
    path = write_json_and_markdown(args.out, f"hf_world1-{stamp()}", doc, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
