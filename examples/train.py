"""Train a Llama with seqshard under torchrun: a dataset read from disk in token chunks, AdamW
with warmup, sharded or replicated model state, checkpoints with torch.distributed.checkpoint.

    torchrun --nproc-per-node 2 examples/train.py                         # CPU (gloo) or GPUs
    torchrun --nproc-per-node 4 examples/train.py --model-state sharded --seq 512 --steps 300
    torchrun --nproc-per-node 4 examples/train.py --resume runs/ckpt       # continue a run

Data: a file of uint8 tokens (bytes: a byte-level tokenizer, vocabulary 256); the bundled
examples/data/pytext.u8 is Python's licence and standard-library docstrings
(examples/data/make_pytext.py). Each step reads `batch` random windows of seq+1 tokens from a
memory map, the same on every rank (seeded by the step): the module shards them.

Every rank builds the same model (same seed) and passes the same global batch. With replicated
state every rank holds the single-device gradients after backward; with `--model-state sharded`
each rank holds 1/N of the parameters, gradients and AdamW state (FSDP2, see
seqshard/planner/state.py) and the optimizer steps its shard. Either way the plain
torch.optim.AdamW works, and the checkpoint (model, optimizer, step) is saved and loaded by
torch.distributed.checkpoint, each rank writing its own shard.

Output: a progress line every --log-every steps (loss, learning rate, tokens/s), and at the end
the loss curve as a PNG (--plot; needs matplotlib, skipped with a message without it) and its
numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from seqshard import planner
from seqshard.models import llama

DATA = Path(__file__).parent / "data" / "pytext.u8"
CONFIGS = {  # byte-level vocabulary
    "bytes-tiny": llama.LlamaConfig(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, ffn=176),
    "bytes-small": llama.LlamaConfig(vocab=256, dim=384, layers=6, heads=6, kv_heads=2, ffn=1024),
}
PLANS = {  # named plans (default: the planner decides)
    "ring": {"*": "split:s ring zigzag"},
    "ulysses": {"*": "split:s ulysses"},
    "allgather": {"*": "split:s allgather zigzag"},
}


class Chunks:
    """Random windows of seq+1 tokens from a uint8 token file (a memory map: nothing is read
    until a window is)."""

    def __init__(self, path: Path, seq: int, batch: int):
        self.tokens = np.memmap(path, dtype=np.uint8, mode="r")
        if len(self.tokens) < seq + 2:
            raise ValueError(f"{path} has {len(self.tokens)} tokens, fewer than --seq {seq} + 2")
        self.seq, self.batch = seq, batch

    def get(self, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step`: the same on every rank, and on a resumed run."""
        gen = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (self.batch,), generator=gen)
        rows = np.stack([self.tokens[s: s + self.seq + 1] for s in starts.tolist()])
        window = torch.from_numpy(rows.astype(np.int64)).to(device)
        return window[:, :-1], window[:, 1:]


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr over --warmup steps, then cosine decay to 10% at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def save(path: str, model, opt, step: int) -> None:
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": torch.tensor(step)}, checkpoint_id=path)


def load(path: str, model, opt) -> int:
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


def plot(losses: list[tuple[int, float]], path: Path) -> None:
    path.with_suffix(".json").write_text(json.dumps({"step_loss": losses}))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"loss curve: matplotlib is not installed, no PNG (pip install matplotlib); "
              f"the numbers are in {path.with_suffix('.json')}")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"loss curve: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="uint8 token file")
    p.add_argument("--config", default="bytes-tiny", choices=sorted(CONFIGS))
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (global)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--model-state", default="replicated", choices=["replicated", "sharded"])
    p.add_argument("--plan", default=None, choices=sorted(PLANS),
                   help="a named plan; default: the planner decides")
    p.add_argument("--out", type=Path, default=Path("runs"), help="checkpoints and the plot")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", default=None, help="a checkpoint directory to continue from")
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                           ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(var, value)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    owns_group = not dist.is_initialized()  # tests call main() in ranks that have one
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = "cuda" if cuda else "cpu"
    say = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(0)
    with torch.device(device):
        model = llama.Llama(CONFIGS[args.config])
    if cuda:
        model = model.to(torch.bfloat16)
    data = Chunks(args.data, args.seq, args.batch)
    ids, labels = data.get(0, device)
    pm = planner.parallelize(model, (ids, labels), overrides=PLANS.get(args.plan),
                             model_state=args.model_state)
    say(pm.plan)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = load(args.resume, model, opt) if args.resume else 0
    if args.resume:
        say(f"resumed from {args.resume} at step {start}")

    args.out.mkdir(parents=True, exist_ok=True)
    losses, tokens, t0 = [], 0, time.perf_counter()
    for step in range(start, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ids, labels = data.get(step, device)
        loss = pm(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((step, loss.item()))
        tokens += ids.numel()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            recent = [v for _, v in losses[-args.log_every:]]
            say(f"step {step + 1:5d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {lr_at(step, args):.2e}  {tokens / dt:,.0f} tokens/s", flush=True)
            tokens, t0 = 0, time.perf_counter()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            path = str(args.out / f"step{step + 1}")
            save(path, model, opt, step + 1)
            say(f"checkpoint: {path}")
    if rank == 0 and losses:
        plot(losses, args.out / "loss.png")
    if owns_group:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
