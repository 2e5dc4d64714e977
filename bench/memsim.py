"""The memory model checked on the CPU: a training step run on the meta device, every allocation
counted, against the planner's predicted peak and its terms.

    python bench/memsim.py                                   # 1B at 16K and 64K, 8B at 32K
    python bench/memsim.py --configs 8b:32K:seqshard,8b:32K:native --budget-gib 100
    python bench/memsim.py --configs 1b:4K:seqshard --json /tmp/memsim.json

A configuration is MODEL:SEQ:SYSTEM as in bench/memory.py (`native`, `liger` is not simulated,
`seqshard`). The model is the built-in Llama at production size on the meta device (shapes only;
nothing is allocated), in bf16; seqshard's per-rank program comes from `planner.parallelize` at
world size 1 (gloo) with optimizer="adamw-pure", the planner's own memory plan at that length;
native is bench/memory.py's step (every block under torch.utils.checkpoint, plain head + loss).
Two steps run: zero_grad(set_to_none), forward, backward, and fused AdamW's step (simulated:
the first step makes exp_avg and exp_avg_sq, fused AdamW allocates nothing else); the second
step is the steady state that `torch.cuda.max_memory_allocated` measures on the GPU.

`LiveBytes` (a TorchDispatchMode) sees every op's outputs: a storage it has not seen is an
allocation (its bytes, rounded up to the caching allocator's 512-byte blocks), freed when the
storage dies (a weakref finalizer on the storage: PyTorch keeps one Python object per
storage). Each allocation is tagged with what made it:

    params     parameters (and buffers), there before the step
    inputs     token ids and labels
    grads      parameter gradients (storages that end up as `p.grad`)
    host       saved tensors offloaded to host memory (runtime/offload.py): not counted
    optimizer  AdamW's exp_avg and exp_avg_sq
    forward    made in the forward: what is alive of it later was kept for backward
    recompute  made in the backward inside a module's forward: a checkpointed layer (or chunk)
               run again
    backward   made in the backward otherwise: activation gradients and the ops' temporaries
               (`backward_current`: the outputs of the op running at the peak)

What it cannot see: the caching allocator's fragmentation and the slack between allocated and
reserved; cuDNN / cuBLAS workspaces; kernels' internal buffers not allocated through PyTorch
(e.g. Liger's). The report compares, per term, the peak's composition with the plan's
`Memory` (read from its peak-memory note): state, kept activations, one recomputed layer, the
largest node's working set; the end-of-forward live bytes show the kept term apart from where
the peak is.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

GIB = 2**30
BLOCK = 512  # the caching allocator rounds every allocation up to 512 bytes
DEFAULT = "1b:16K:seqshard,1b:64K:seqshard,8b:32K:seqshard,8b:32K:native"


class _Entry:
    __slots__ = ("nbytes", "tag", "op", "shape", "where")

    def __init__(self, nbytes, tag, op, shape, where):
        self.nbytes, self.tag, self.op, self.shape, self.where = nbytes, tag, op, shape, where


class LiveBytes(TorchDispatchMode):
    """Live bytes of every storage made while active (and of those `register`ed), their peak,
    and what was alive at the peak (module docstring)."""

    def __init__(self):
        super().__init__()
        self.entries: dict[int, _Entry] = {}
        self.live = 0
        self.peak = 0
        self.peak_entries: list[_Entry] = []
        self.peak_op = None
        self.peak_phase = None
        self.phase = "setup"
        self.depth = 0          # module forwards running (recompute when in the backward)
        self.module = []        # names of the modules running
        self.op_index = 0
        self.current: set[int] = set()   # storages made by the op running now
        self.marks: dict[str, int] = {}  # live bytes at named points
        self.host = 0           # bytes offloaded to host memory (see `to_host`)
        self.groups: dict[str, list] = {}  # what was alive there, by (tag, op, shape)

    # -- bookkeeping
    def register(self, t: torch.Tensor, tag: str, where: str = "") -> None:
        st = t.untyped_storage()
        if id(st) in self.entries:
            return
        self._add(st, tag, "(existing)", tuple(t.shape), where)

    def _add(self, st, tag, op, shape, where):
        n = -(-st.nbytes() // BLOCK) * BLOCK
        key = id(st)
        self.entries[key] = _Entry(n, tag, op, shape, where)
        weakref.finalize(st, self._free, key)
        self.live += n
        return key

    def _free(self, key):
        e = self.entries.pop(key, None)
        if e is not None:
            self.live -= e.nbytes

    def to_host(self, t: torch.Tensor) -> None:
        """`t` stands for a copy in host memory (an offloaded saved tensor): its bytes leave the
        device count and add to `host`."""
        e = self.entries.get(id(t.untyped_storage()))
        if e is not None and e.tag != "host":
            self.live -= e.nbytes
            self.host += e.nbytes
            e.tag, e.nbytes = "host", 0

    def retag(self, t: torch.Tensor, tag: str) -> None:
        e = self.entries.get(id(t.untyped_storage()))
        if e is not None:
            e.tag = tag

    def mark(self, name: str, groups: bool = False) -> None:
        """Live bytes now; with `groups`, also what is alive grouped by (tag, op, shape)."""
        self.marks[name] = self.live
        if groups:
            g: dict = {}
            for e in self.entries.values():
                k = (e.tag, e.op, e.shape)
                n, b = g.get(k, (0, 0))
                g[k] = (n + 1, b + e.nbytes)
            self.groups[name] = sorted(((b, n, k) for k, (n, b) in g.items()), reverse=True)

    def reset_peak(self) -> None:
        self.peak, self.peak_entries, self.peak_op, self.peak_phase = self.live, [], None, None
        self._snapshot("(reset)")

    def _snapshot(self, op):
        self.peak = self.live
        self.peak_entries = list(self.entries.values())
        self.peak_op, self.peak_phase = op, self.phase
        self.peak_current = set(self.current)
        self.peak_current_entries = [self.entries[k] for k in self.current if k in self.entries]

    # -- the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.op_index += 1
        tag = self.phase
        if self.phase == "backward" and self.depth > 0:
            tag = "recompute"
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        where = self.module[-1] if self.module else ""
        self.current = set()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in self.entries:
                    self.current.add(self._add(st, tag, name, tuple(t.shape), where))
        if self.live > self.peak:
            self._snapshot(name)
        return out

    # -- module hooks: which forwards are running
    def hooks(self, names: dict):
        def pre(module, args):
            self.depth += 1
            self.module.append(names.get(id(module), type(module).__name__))

        def post(module, args, out):
            self.depth -= 1
            self.module.pop()

        return (torch.nn.modules.module.register_module_forward_pre_hook(pre),
                torch.nn.modules.module.register_module_forward_hook(post))

    def composition(self, entries=None) -> dict:
        out: dict[str, int] = {}
        for e in (self.peak_entries if entries is None else entries):
            out[e.tag] = out.get(e.tag, 0) + e.nbytes
        return out


class flash_sdpa:
    """Attention and RMSNorm as the GPU runs them. Scaled dot-product attention: on the meta
    device SDPA picks the math
    backend (S×S scores). Inside this context `aten.scaled_dot_product_attention` on meta
    tensors (a kernel at the AutogradMeta key, ahead of the composite) runs aten's
    FlashAttention op instead (its meta kernels: out and an fp32 lse saved, no scores), as
    cuDNN / flash do on an H200; checkpoint recomputation in backward sees it too (a
    TorchFunctionMode is not active there). `aten.rms_norm` (what nn.RMSNorm calls): on CUDA
    one fused kernel that saves its input and an fp32 rstd; on the meta device the composite
    (fp32 copies kept). A program captured on the meta device has the composite's ops in its
    graph already: this changes nothing there."""

    def __init__(self, rms_norm: bool = True):
        self.rms_norm = rms_norm

    def __enter__(self):
        self.lib = torch.library.Library("aten", "IMPL")
        self.lib.impl("scaled_dot_product_attention", _flash, "AutogradMeta")
        if self.rms_norm:  # as on CUDA (torch >= 2.8): one fused kernel, input and rstd saved
            self.lib.impl("rms_norm", _rms_norm, "AutogradMeta")
        return self

    def __exit__(self, *exc):
        self.lib._destroy()


class _FusedRMSNorm(torch.autograd.Function):
    """CUDA's `_fused_rms_norm` as memory sees it: saves the input and an fp32 rstd [..., 1],
    returns the output in the input's dtype; backward makes dx and dw (shapes only)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, rstd, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        return torch.empty_like(x), None if weight is None else torch.empty_like(weight), None


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    return _FusedRMSNorm.apply(x, weight, eps)


GQA_EXPAND = False
"""How SDPA with enable_gqa runs on the GPU: FlashAttention-2 (what aten SDPA dispatches to on
an H200 for bf16 GQA: cuDNN and memory-efficient attention do not take enable_gqa) reads the kv
heads in place and saves q, k, v unexpanded; True: the kv heads repeated first and the
expanded copies saved (aten's math path, or `--gqa-expand`). The measured 1B at 16K (53.1 GiB)
agrees with False (memsim 53.1), not True (54.6)."""


class _FlashGQA(torch.autograd.Function):
    """FlashAttention-2 with kv heads fewer than q heads, as memory sees it: saves q, k, v,
    the output (made [b, s, h, e] and returned transposed, so that o_proj's reshape is a view)
    and the fp32 lse; backward makes dq, dk, dv, and the expanded dk, dv it sums."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, s, e = q.shape
        out = torch.empty(b, s, h, e, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dk_expanded, dv_expanded = torch.empty_like(q), torch.empty_like(q)  # noqa: F841
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None:
        raise NotImplementedError("memsim's flash attention takes no mask")
    if k.shape[-3] != q.shape[-3]:  # GQA
        if not GQA_EXPAND:
            return _FlashGQA.apply(q, k, v)
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                              scale=scale)[0]


# ------------------------------------------------------------------ the plan's terms
_TERMS = {
    "state": r"([\d.]+) (GiB|MiB) parameters and optimizer state",
    "grads": r"([\d.]+) (GiB|MiB) gradients",
    "kept": r"([\d.]+) (GiB|MiB) activations kept for backward",
    "recompute": r"([\d.]+) (GiB|MiB) of one [^+;]* made again",
    "transient": r"([\d.]+) (GiB|MiB) working set",
}


def plan_terms(plan) -> dict:
    """The predicted peak's terms, read from the plan's peak-memory note (bytes)."""
    note = next((n for n in plan.notes if n.startswith("peak memory")), "")
    out = {"peak": plan.predicted.peak_memory_bytes, "note": note}
    for k, pat in _TERMS.items():
        m = re.search(pat, note)
        out[k] = float(m.group(1)) * (GIB if m.group(2) == "GiB" else 2**20) if m else 0.0
    out["state"] += out.pop("grads")  # params, optimizer state and the gradients made by then
    out["recompute"] = out["recompute"] or (lambda m: float(m.group(1)) * (
        GIB if m.group(2) == "GiB" else 2**20) if m else 0.0)(
        re.search(r"([\d.]+) (GiB|MiB) of one layer's activations", note))
    m = re.search(r"peak memory [\d.]+ \w+ per GPU (.*?):", note)
    out["where"] = m.group(1) if m else ""
    return out


# ------------------------------------------------------------------ one configuration
def simulate(model_key: str, seq: int, system: str, *, budget=None, cluster="h200x1",
             layers: int | None = None, overrides=None, cfg=None) -> dict:
    """One configuration; `cfg`: a LlamaConfig instead of the model key's (tests)."""
    import torch.distributed as dist

    from memory import model_config, native_loss
    from seqshard.models import llama

    cfg = cfg if cfg is not None else model_config(model_key, False, layers)
    with torch.device("meta"):
        model = llama.Llama(cfg).to(torch.bfloat16)
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    labels = torch.zeros(1, seq, dtype=torch.long, device="meta")
    row = dict(config=f"{model_key}:{seq}:{system}", layers=cfg.layers)
    t0 = time.perf_counter()
    if system == "seqshard":
        from seqshard.planner import parallelize

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 1000))
            dist.init_process_group("gloo", rank=0, world_size=1)
        pm = parallelize(model, (ids, labels), cluster=cluster, memory_budget=budget,
                         optimizer="adamw-pure", check_inputs=False, overrides=overrides,
                         compile=False, kernels=False)
        pm._check_indices = lambda inputs: None  # reads token values: none on the meta device
        plan = pm.plan
        fn = pm
    elif system == "native":
        from seqshard.planner import plan as make_plan

        plan = make_plan(model, (ids, labels), cluster=cluster, memory_budget=1e15,
                         overrides={"layers.*": "recompute"}, optimizer="adamw-pure")
        fn = lambda a, b: native_loss(model, a, b)  # noqa: E731
    else:
        raise ValueError(f"system {system!r}: memsim runs native or seqshard")
    row["plan_s"] = time.perf_counter() - t0
    row["plan"] = plan.hash()
    row["predicted"] = plan_terms(plan)
    row["memory_plan"] = {k: v for k, v in (("recompute", plan.recompute), ("chunks", plan.chunks),
                                             ("chunked_modules", getattr(plan, "chunked_modules", ())))
                          if v}

    params = list(model.parameters())
    names = {id(m): n for n, m in model.named_modules()}
    if system == "seqshard":
        names.update({id(m): f"program.{n}" for n, m in pm.program.gm.named_modules()})
    tracker = LiveBytes()
    for p in params:
        tracker.register(p, "params")
    for b in model.buffers():
        tracker.register(b, "params")
    tracker.register(ids, "inputs")
    tracker.register(labels, "inputs")
    handles = tracker.hooks(names)
    # offloaded saved tensors: on a CUDA device a pinned host copy; on the meta device the
    # runtime keeps a clone on the device, which this counts as host memory instead
    from seqshard.runtime import offload as _offload

    pack = _offload._pack

    def host_pack(*args):  # (moved, layer, t): the runtime's signature, passed through
        out = pack(*args)
        if isinstance(out, _offload._OnHost):
            tracker.to_host(out.host)
        return out

    _offload._pack = host_pack
    states = []
    t0 = time.perf_counter()
    try:
        # no early stop: a checkpoint's recomputation runs its modules to their end, so that
        # the module hooks pair up (an early stop raises out of them)
        with flash_sdpa(), torch.utils.checkpoint.set_checkpoint_early_stop(False), tracker:
            for step in range(2):
                for p in params:
                    p.grad = None
                if step == 1:
                    tracker.reset_peak()
                tracker.phase = "forward"
                loss = fn(ids, labels)
                tracker.mark(f"end of forward {step}", groups=step == 1)
                tracker.phase = "backward"
                loss.backward()
                del loss
                for p in params:
                    if p.grad is not None:
                        tracker.retag(p.grad, "grads")
                tracker.mark(f"end of backward {step}")
                tracker.phase = "optimizer"
                if not states:  # fused AdamW: exp_avg, exp_avg_sq per parameter, nothing else
                    for p in params:
                        states.append((torch.zeros_like(p), torch.zeros_like(p)))
                tracker.mark(f"after step {step}")
    finally:
        _offload._pack = pack
        for h in handles:
            h.remove()
    row["sim_s"] = time.perf_counter() - t0
    comp = tracker.composition()
    state_bytes = sum(v for k, v in comp.items() if k in ("params", "grads", "optimizer"))
    n = sum(p.numel() for p in params)
    current = tracker.composition(tracker.peak_current_entries)
    comp["backward_current"] = current.get("backward", 0) + current.get("recompute", 0)
    biggest = sorted(tracker.peak_entries, key=lambda e: -e.nbytes)[:12]
    fwd_end = tracker.marks["end of forward 1"] - tracker.marks["after step 0"] + \
        0  # what the forward added: kept activations (and the loss)
    kept = [dict(gib=b / GIB, count=n, tag=k[0], op=k[1], shape=list(k[2]))
            for b, n, k in tracker.groups["end of forward 1"] if b >= 2**20]
    row.update(
        kept_groups=kept, peak=tracker.peak, host_offloaded=tracker.host, peak_op=tracker.peak_op, peak_phase=tracker.peak_phase,
        composition=comp, state_at_peak=state_bytes, full_state=n * 2 * 4,  # p, g, m, v in bf16
        kept_end_of_forward=fwd_end, marks=tracker.marks,
        biggest=[dict(gib=e.nbytes / GIB, tag=e.tag, op=e.op, shape=list(e.shape), module=e.where)
                 for e in biggest])
    pr = row["predicted"]
    row["ratio"] = tracker.peak / pr["peak"] if pr["peak"] else None
    if system == "seqshard":
        del pm
    del model, fn, states, tracker
    gc.collect()
    return row


def _g(b):
    return f"{b / GIB:.2f}"


def report(rows: list[dict]) -> str:
    md = ["# Memory model vs a meta-device step (bench/memsim.py)", "",
          "Simulated: live bytes of every storage (512-byte blocks) over two steps, the second's "
          "peak. GiB. `recompute`/`backward` are what was made in backward and alive at the "
          "peak (backward = activation gradients + temporaries; `cur` = the outputs of the op "
          "running at the peak).", "",
          "| config | plan | predicted peak (state + kept + recompute + transient) | simulated peak "
          "| ratio | at | params + grads + optimizer at peak | forward-made alive | recompute | "
          "backward (cur) | end-of-forward kept |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['config']} | error: {r['error'][:200]} |" + " |" * 9)
            continue
        p, c = r["predicted"], r["composition"]
        md.append(
            f"| {r['config']} | {r['memory_plan'] or '-'} | {_g(p['peak'])} ({_g(p['state'])} + "
            f"{_g(p['kept'])} + {_g(p['recompute'])} + {_g(p['transient'])}) | {_g(r['peak'])} | "
            f"{r['ratio']:.3f} | {r['peak_phase']}, {r['peak_op']} | "
            f"{_g(c.get('params', 0))} + {_g(c.get('grads', 0))} + {_g(c.get('optimizer', 0))} | "
            f"{_g(c.get('forward', 0))} | {_g(c.get('recompute', 0))} | "
            f"{_g(c.get('backward', 0))} ({_g(c.get('backward_current', 0))}) | "
            f"{_g(r['kept_end_of_forward'])} |")
    for r in rows:
        if "biggest" not in r:
            continue
        md += ["", f"## {r['config']}: the largest tensors alive at the peak", "",
               "| GiB | made | op | shape | module |", "|---|---|---|---|---|"]
        md += [f"| {b['gib']:.2f} | {b['tag']} | {b['op']} | {b['shape']} | {b['module']} |"
               for b in r["biggest"]]
        md += ["", f"Plan note: {r['predicted']['note']}", "",
               "Alive at the end of the forward (the second step), by what made it:", "",
               "| GiB | count | made | op | shape |", "|---|---|---|---|---|"]
        md += [f"| {k['gib']:.2f} | {k['count']} | {k['tag']} | {k['op']} | {k['shape']} |"
               for k in r["kept_groups"]]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT)
    ap.add_argument("--budget-gib", type=float, help="the planner's budget (default 90%% of an H200)")
    ap.add_argument("--cluster", default="h200x1")
    ap.add_argument("--gqa-expand", action="store_true",
                    help="GQA's kv heads repeated and the copies saved (GQA_EXPAND)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--md", help="write the markdown here")
    args = ap.parse_args(argv)
    global GQA_EXPAND
    GQA_EXPAND = args.gqa_expand
    from memory import parse_configs

    rows = []
    for cfg in parse_configs(args.configs):
        print(f"{cfg.name} ...", flush=True)
        try:
            row = simulate(cfg.model, cfg.seq, cfg.system, cluster=args.cluster,
                           budget=args.budget_gib * GIB if args.budget_gib else None)
        except Exception as e:  # noqa: BLE001 - a row, not a crash
            import traceback

            row = dict(config=cfg.name, error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc()[-3000:])
            print(row["traceback"], flush=True)
        else:
            print(f"  predicted {_g(row['predicted']['peak'])} GiB, simulated {_g(row['peak'])} GiB "
                  f"({row['peak_phase']}, {row['peak_op']}); composition "
                  f"{ {k: _g(v) for k, v in row['composition'].items()} }; plan {row['plan_s']:.1f} s, "
                  f"simulation {row['sim_s']:.1f} s", flush=True)
        rows.append(row)
    md = report(rows)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if args.md:
        Path(args.md).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
