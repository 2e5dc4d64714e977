"""The longest sequence that trains on one GPU: seqshard's memory plans against native PyTorch.

    python bench/memory.py --configs 8b:32K:native,8b:32K:liger,8b:32K:seqshard,1b:512K:seqshard:steps=1
    python bench/memory.py --set first          # a named list of configurations (see SETS)
    python bench/memory.py --smoke              # CPU, toy sizes: every code path in ~2 minutes

One GPU. A configuration is MODEL:SEQ:SYSTEM[:steps=1][:timeout=S]: MODEL `8b` (Llama-3-8B
shape, seqshard/models `llama3-8b`) or `1b` (Llama-3.2-1B, `llama3-1b`); SEQ tokens (32K, 1M);
SYSTEM one of

    native    the model's blocks each under torch.utils.checkpoint (full activation
              checkpointing per block), a plain LM head and F.cross_entropy on fp32 logits
    liger     the same, with Liger's fused linear cross-entropy in place of head + loss
              (skipped, with the reason, when liger_kernel does not import)
    seqshard  `planner.parallelize(model, (ids, labels), optimizer="adamw-pure")` at world size
              1: the planner's own memory plan at that length (recompute, chunked loss, ...)
    native-compiled, liger-compiled
              native / liger with each checkpointed block `torch.compile`d (the regional
              compile people use: checkpoint_wrapper(block), then torch.compile; identical
              blocks share one compiled graph); `compiled_graphs` counts Dynamo's graphs
    seqshard-compiled
              seqshard with `compile="layers", kernels=True`: each distinct layer template
              compiled once (codegen/compiled.py), the LM head + loss through the fused kernel
              (codegen/kernels/linear_ce.py) in the plan's chunks or its own
    slice     the issue's capacity check past one timed step: plan the whole model at SEQ on the
              meta device (model_state="auto": the whole model may need its optimizer state on
              the host, which the slice, whose state is small, does not carry; priced at the
              attention kernel the runtime picks here, as parallelize prices the slice),
              then run a 2-layer slice (same width, heads, vocabulary) with the
              per-layer plan of the whole model's first and last layer; measured peak against
              the slice's predicted peak

Every system runs the same step on the same model (bf16 parameters, built on the meta device,
`to_empty` on the GPU, initialized in place; one sequence): zero_grad(set_to_none), forward,
backward, `torch.optim.AdamW(fused=True)` (its state in bf16, no master copy: seqshard plans with
optimizer="adamw-pure" to price the same). Each configuration runs in its own process (a fresh
CUDA context: nothing of one configuration is left for the next; a timeout kills it, an error
in the driver does not take the run down); the process also frees everything it made (del,
gc, empty_cache) before it reports.

Timing: one untimed warm-up step, then `--repeats` timed steps (1 when the warm-up took over
20 s) with `timing.measure` (CUDA events, isolated iterations); `steps=1`: no warm-up, the one
step is timed cold, after AdamW's state was made by a step with zero gradients and lr 0 (results
before 2026-12-01 19:30 UTC lack this: their steps=1 peaks miss the optimizer state). The row
records which (`warmup`, `repeats`).

Definitions (the same for every system):

    model FLOPs per step = 6·N·S + 6·L·S²·d
        N: the parameters that multiply (all but the embedding table; the LM head counted, also
        when tied to the embedding), S tokens, L layers, d the model width. The second term is
        causal attention: forward 4·S²·d per layer halved by the mask = 2·S²·d, ×3 for forward
        + backward. Recomputation is not counted (model FLOPs, not hardware FLOPs).
    tokens/s = S / step time;  MFU = model FLOPs / step time / 989 TFLOP/s (H200 bf16 dense)
    peak     torch.cuda.max_memory_allocated over the whole run of the configuration (model
             init excluded, AdamW's state included: `peak_gib`) and over the timed steps alone
             (`peak_timed_gib`); max reserved likewise (`reserved_gib`)
    predicted  seqshard: the plan's `predicted.peak_memory_bytes` and `predicted.step_s`.
             native / liger: the cost model's figures for the same configuration, planned on
             the meta device with every layer forced to recompute (liger: and the LM head + loss
             chunked, an approximation of Liger's kernel) and an unbounded budget
    ratio    measured / predicted (peak: `peak_timed_gib`, which the prediction models)

Out of memory (torch.OutOfMemoryError; planning: `Infeasible`) is a row with status `oom`
(`infeasible`) and what was known by then; a configuration past its timeout is `timeout`; a
process that died is `crashed` with the end of its output. Results are written after every
configuration as memory-<stamp>.json and .md under $OUT (else bench/results/, or --out), so a
killed run keeps what finished. `--budget-s`: the whole run's wall-clock budget; a configuration
whose rough estimate does not fit what is left is not started ("not run").

Without ortools (the planner's solver) the native and liger rows are still measured, with no
prediction; seqshard and slice rows say why they did not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

PEAK_FLOPS = 989e12  # H200 bf16 dense
GIB = 2**30
SYSTEMS = ("native", "liger", "seqshard", "slice", "native-compiled", "liger-compiled",
           "seqshard-compiled")
MODELS = {"8b": "llama3-8b", "1b": "llama3-1b"}
SLICE_LAYERS = 2
SMOKE_BUDGET = {"1b": 2.5 * 2**20, "8b": 6.5 * 2**20}
"""--smoke's planner budgets for the toy models: small enough for memory plans to appear."""

SETS = {
    # ~5 minutes on one H200, most important first: the 32K anchor for all three systems, 1B at
    # 64K (native's limit) and 16K
    "first": "8b:32K:seqshard,8b:32K:native,1b:64K:seqshard,8b:32K:liger,1b:64K:native,"
             "1b:16K:seqshard,1b:16K:native",
    # the issue's targets, one device call (<= 10 minutes) each, most important first
    "8b-256k": "8b:256K:seqshard:steps=1",                       # ~6 min
    "1b-512k": "1b:512K:seqshard:steps=1",                       # ~5.5 min
    "slice": "8b:1M:slice:steps=1",                              # ~6 min
    # the rest of the picture: where native and Liger stop, seqshard between
    "8b-long": "8b:64K:native:steps=1,8b:128K:liger:steps=1,8b:128K:seqshard:steps=1,"
               "8b:192K:liger:steps=1",                          # ~6 min
    "1b-long": "1b:128K:native:steps=1,1b:128K:seqshard,1b:256K:seqshard:steps=1",  # ~4.5 min
    # the CPU check of this script (--smoke picks it): toy models, every system and mode
    "smoke": "1b:128:native,1b:128:liger,1b:128:seqshard,8b:256:native:steps=1,"
             "8b:256:seqshard,8b:256:slice:steps=1,1b:128:native-compiled,8b:256:seqshard-compiled",
}


# ------------------------------------------------------------------ configurations
@dataclasses.dataclass
class Config:
    model: str           # "8b" | "1b"
    seq: int
    system: str
    steps1: bool = False  # no warm-up: one cold, timed step
    timeout: float | None = None

    @property
    def name(self) -> str:
        extra = ":steps=1" if self.steps1 else ""
        return f"{self.model}:{_count_str(self.seq)}:{self.system}{extra}"


def _count(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KkMm]?)", text.strip())
    if not m:
        raise ValueError(f"expected a token count such as 4096, 32K or 1M, got {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]


def _count_str(n: int) -> str:
    if n % 1024**2 == 0:
        return f"{n // 1024**2}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def parse_configs(text: str) -> list[Config]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) < 3:
            raise ValueError(f"configuration {item!r}: write MODEL:SEQ:SYSTEM[:steps=1][:timeout=S]")
        model, seq, system = parts[0].lower(), _count(parts[1]), parts[2].lower()
        if model not in MODELS:
            raise ValueError(f"configuration {item!r}: model must be one of {sorted(MODELS)}")
        if system not in SYSTEMS:
            raise ValueError(f"configuration {item!r}: system must be one of {SYSTEMS}")
        cfg = Config(model, seq, system)
        for opt in parts[3:]:
            key, _, value = opt.partition("=")
            if key == "steps" and value == "1":
                cfg.steps1 = True
            elif key == "timeout":
                cfg.timeout = float(value)
            else:
                raise ValueError(f"configuration {item!r}: unknown option {opt!r} (steps=1, timeout=S)")
        out.append(cfg)
    return out


def model_config(model: str, smoke: bool, layers: int | None = None):
    """The LlamaConfig of a model key; --smoke: toy shapes with the same structure (the 1B ties
    its embedding)."""
    from seqshard.models import llama

    if smoke:
        cfg = {"8b": llama.LlamaConfig(vocab=512, dim=64, layers=4, heads=4, kv_heads=2, ffn=160),
               "1b": llama.LlamaConfig(vocab=384, dim=64, layers=2, heads=4, kv_heads=2, ffn=128,
                                       tie_embeddings=True)}[model]
    else:
        cfg = llama.CONFIGS[MODELS[model]]
    return cfg if layers is None else dataclasses.replace(cfg, layers=layers)


def flops_per_step(cfg, seq: int) -> tuple[float, int]:
    """Model FLOPs of one training step (module docstring) and N, the multiplying parameters."""
    d, f, h, g, e = cfg.dim, cfg.ffn, cfg.heads, cfg.kv_heads, cfg.head_dim
    per_layer = d * h * e + 2 * d * g * e + h * e * d + 3 * d * f + 2 * d  # q k v o, MLP, norms
    n = cfg.layers * per_layer + d + cfg.vocab * d  # + final norm + LM head (not the embedding)
    return 6 * n * seq + 6 * cfg.layers * seq**2 * d, n


def estimate_s(cfg: Config, smoke: bool) -> float:
    """A rough wall-clock estimate of a configuration (at 30% MFU, +recompute, +start-up), only to
    decide whether it can start within --budget-s."""
    if smoke:
        return 20.0
    layers = SLICE_LAYERS if cfg.system == "slice" else None
    flops, _ = flops_per_step(model_config(cfg.model, False, layers), cfg.seq)
    step = 1.33 * flops / (0.30 * PEAK_FLOPS)
    steps = 1 if cfg.steps1 else (2 if step > 20 else 3)
    startup = {"native": 25, "liger": 25, "seqshard": 45, "slice": 60, "native-compiled": 70,
               "liger-compiled": 70, "seqshard-compiled": 70}[cfg.system]
    return startup + steps * step


# ------------------------------------------------------------------ one configuration (child)
class Row(dict):
    """The result of one configuration, saved to `path` after every stage, so that what was
    known survives a timeout."""

    def __init__(self, path: str, **kw):
        super().__init__(**kw)
        self.path = path
        self.save()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self, f, default=str)
        os.replace(tmp, self.path)

    def set(self, **kw):
        self.update(kw)
        self.save()


def _say(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(cfg, device, dtype, seed: int = 0):
    """The built-in Llama on `device`: made on the meta device, `to_empty`, initialized in place
    (normal(0, 0.02) weights, unit norms, the rotary frequencies); tied weights tied again."""
    import torch

    from seqshard.models import llama

    with torch.device("meta"):
        model = llama.Llama(cfg).to(dtype)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
        model.inv_freq.copy_(inv.to(model.inv_freq.dtype))
    return model


def _liger():
    """Liger's fused linear cross-entropy as loss(weight, hidden [T, d], labels [T]), and which
    form: the module (`liger_kernel.transformers`, which may pull in transformers), else the
    autograd function of `liger_kernel.ops` (its first three arguments: input, weight, target)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import \
            LigerFusedLinearCrossEntropyLoss
        module = LigerFusedLinearCrossEntropyLoss()
        return (lambda w, h, y: _first(module(w, h, y))), "LigerFusedLinearCrossEntropyLoss"
    except ImportError as e:
        first_error = e
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        raise first_error from None
    return (lambda w, h, y: _first(LigerFusedLinearCrossEntropyFunction.apply(h, w, y))), \
        "LigerFusedLinearCrossEntropyFunction"


def _first(out):
    """The loss of a Liger call: a tensor, a tuple (loss, z_loss, ...) or an output object."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.loss


def compiled_blocks(model, backend: str):
    """Each block checkpointed and compiled, the way regional compilation is done (torchtitan's
    apply_ac then apply_compile): `torch.compile(checkpoint_wrapper(block))`. Dynamo traces the
    checkpoint as a higher-order op, AOTAutograd recomputes inside the compiled backward; the
    blocks share one compiled graph (parameters are graph inputs, not guarded by identity)."""
    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return [torch.compile(checkpoint_wrapper(layer), backend=backend) for layer in model.layers]


def native_loss(model, ids, labels, liger=None, blocks=None):
    """The native step's loss: each block under torch.utils.checkpoint (non-reentrant; or
    `blocks`, the compiled checkpointed blocks), then the head + cross-entropy on fp32 logits, or
    Liger's fused linear cross-entropy."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    S = ids.shape[1]
    pos = torch.arange(S, device=ids.device)
    freqs = torch.outer(pos.float(), model.inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    x = model.embed(ids)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    if blocks is not None:
        for block in blocks:
            x = block(x, cos, sin)
    else:
        for layer in model.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False)
    h = model.norm(x)
    if liger is not None:
        return liger(model.lm_head.weight, h.flatten(0, 1), labels.flatten())
    logits = model.lm_head(h)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def memory_strategies(plan) -> dict:
    """What a plan does about memory: its recomputed layers, chunked losses, and any other
    per-layer field a newer planner adds (offload, tiles, ...), plus its memory notes."""
    out = {}
    skip = {"mesh", "nodes", "orders", "predicted", "notes", "explanations", "axes"}
    for f in dataclasses.fields(plan):
        if f.name in skip:
            continue
        value = getattr(plan, f.name)
        if value:
            out[f.name] = _short(value)
    out["notes"] = [n for n in plan.notes if not n.startswith("cluster ")]
    return out


def _short(value):
    """Layer lists as ranges: ('layers.0', ..., 'layers.31') → 'layers.0-31 (32)'."""
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
        idx = [re.fullmatch(r"layers\.(\d+)", v) for v in value]
        if all(idx):
            nums = [int(m.group(1)) for m in idx]
            if nums == list(range(nums[0], nums[0] + len(nums))):
                return f"layers.{nums[0]}-{nums[-1]} ({len(nums)})"
        return list(value)
    if isinstance(value, (tuple, list)):
        return [list(v) if isinstance(v, tuple) else v for v in value]
    return value


def slice_overrides(full_plan, slice_layers: int, full_layers: int) -> tuple[dict, list]:
    """Overrides that give a `slice_layers`-layer model the per-layer memory plan of the whole
    model: slice layer 0 takes full layer 0's choices, the others full layer `full_layers - 1`'s
    (the last layer, whose backward comes first): recompute / offload of the layer (keeping its
    attention's outputs: `recompute:selective`; in nested groups, every slice layer takes the
    last layer's and `group:G`, G the last group's size, at most the slice's), a region
    inside it run in k chunks (`layers.31.mlp` k → `layers.1.mlp: chunk:k`; a chain across
    modules alike, `layers.31.attn.o_proj+add+mlp_norm+mlp`); the chunked loss
    keeps its chunk count. Returns (overrides, what of the plan could not be carried)."""
    per_layer: dict = {}  # full layer → set of terms
    inner: dict = {}      # full layer → {module suffix: chunk count}
    lost = []
    term_of = {"recompute": "recompute", "offload": "offload", "offloaded": "offload",
               "keep_attention": "selective"}
    skip = {"mesh", "nodes", "orders", "predicted", "notes", "explanations", "axes", "chunks",
            "recompute_groups"}
    for f in dataclasses.fields(full_plan):
        value = getattr(full_plan, f.name)
        if f.name in skip or not value:
            continue
        if f.name in term_of and all(isinstance(v, str) for v in value):
            for layer in value:
                per_layer.setdefault(layer, set()).add(term_of[f.name])
        elif all(isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], str)
                 and isinstance(v[1], int) for v in value):
            for module, k in value:  # (module, chunk count): a region inside a layer in chunks
                m = re.fullmatch(r"(layers\.\d+)\.(.+)", module)
                if m is None:
                    lost.append(f"{f.name}: {module} {k}")
                else:
                    inner.setdefault(m.group(1), {})[m.group(2)] = k
        else:
            lost.append(f"{f.name}={_short(value)}")
    ov = {}
    # nested groups (`recompute_groups`): the slice is the whole model's last group (its
    # backward runs first, at the peak), its layers alike (one class: a group is one class's
    # layers) with the last layer's choices, e.g. layers.30-31 → layers.0-1: offload group:2
    groups = getattr(full_plan, "recompute_groups", ())
    g = min(len(groups[-1]), slice_layers) if groups else 1
    for i in range(slice_layers):
        src = f"layers.{full_layers - 1 if g > 1 or i else 0}"
        terms = per_layer.get(src, set())
        if terms:
            ov[f"layers.{i}"] = ("offload" if "offload" in terms else "recompute") + \
                (" recompute:selective" if "selective" in terms else "") + \
                (f" group:{g}" if g > 1 else "")
        for suffix, k in inner.get(src, {}).items():
            ov[f"layers.{i}.{suffix}"] = f"chunk:{k}"
    for node, k in full_plan.chunks:
        ov["lm_head"] = f"chunk:{k}"
    return ov, lost


def run_child(cfg: Config, row_path: str, args) -> int:
    """One configuration in this process: build, plan, warm up, time, record (module docstring)."""
    row = Row(row_path, config=cfg.name, model=cfg.model, seq=cfg.seq, system=cfg.system,
              status="started", warmup=0 if cfg.steps1 else 1)
    t_start = time.perf_counter()
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        row.set(status="error", reason=f"import torch: {e}")
        return 0
    device = args.device
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = SLICE_LAYERS if cfg.system == "slice" else None
    mcfg = model_config(cfg.model, args.smoke, layers)
    flops, n_mul = flops_per_step(mcfg, cfg.seq)
    row.set(flops=flops, n_multiplying_params=n_mul, layers=mcfg.layers, dtype=str(dtype))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        row.set(device=props.name, device_memory_gib=props.total_memory / GIB)
    budget = args.budget_gib * GIB if args.budget_gib else SMOKE_BUDGET[cfg.model] if args.smoke else None

    def gib(b):
        return None if b is None else b / GIB

    # what the system needs to import
    liger = None
    base = cfg.system.removesuffix("-compiled")  # the system a compiled one compiles
    backend = "inductor" if cuda else "aot_eager"  # CPU (--smoke): Inductor would build C++
    if base == "liger":
        try:
            liger, how = _liger()
            row.set(liger=how)
        except Exception as e:  # noqa: BLE001
            row.set(status="skipped", reason=f"liger_kernel does not import: {type(e).__name__}: {e}")
            return 0
        if not cuda:
            row.set(status="skipped", reason="Liger's kernels are Triton: GPU only")
            return 0
    have_solver, why = True, None
    try:
        import ortools  # noqa: F401
    except Exception as e:  # noqa: BLE001
        have_solver, why = False, f"ortools does not import ({type(e).__name__}: {e}): no planner"
    if base in ("seqshard", "slice") and not have_solver:
        row.set(status="skipped", reason=why)
        return 0

    import torch.distributed as dist

    from seqshard.models import llama

    # predictions: planned on the meta device
    overrides = None
    if cfg.system == "slice":
        from seqshard.planner import plan as make_plan
        from seqshard.solver import Infeasible

        full_cfg = model_config(cfg.model, args.smoke)
        _say(f"planning the whole {full_cfg.layers}-layer model at {_count_str(cfg.seq)} (meta)")
        with torch.device("meta"):
            full = llama.Llama(full_cfg).to(dtype)
        ids_m = torch.zeros(1, cfg.seq, dtype=torch.long, device="meta")
        try:
            t0 = time.perf_counter()
            fp = make_plan(full, (ids_m, ids_m), cluster=_slice_cluster(args.cluster, device, dtype,
                                                                         full_cfg),
                           memory_budget=budget, optimizer="adamw-pure", model_state="auto")
        except Infeasible as e:
            row.set(status="infeasible", reason=f"the whole model's plan: {e}")
            return 0
        except Exception as e:  # noqa: BLE001 - a row, not a crash
            row.set(status="error", reason=f"planning the whole model: {type(e).__name__}: {e}"[:2000],
                    traceback=traceback.format_exc()[-4000:])
            return 0
        overrides, lost = slice_overrides(fp, mcfg.layers, full_cfg.layers)
        row.set(full_plan=dict(hash=fp.hash(), layers=full_cfg.layers,
                               predicted_peak_gib=gib(fp.predicted.peak_memory_bytes),
                               predicted_step_s=fp.predicted.step_s,
                               fits=fp.predicted.peak_memory_bytes <= (
                                   budget or 0.9 * _cluster(args.cluster).gpu.hbm_capacity),
                               memory=memory_strategies(fp), plan_s=time.perf_counter() - t0),
                slice_overrides=overrides, not_carried=lost)
        _say(f"whole model: predicted peak {gib(fp.predicted.peak_memory_bytes):.1f} GiB, step "
             f"{fp.predicted.step_s:.1f} s; slice overrides {overrides}")
        del full, fp
    elif base in ("native", "liger") and have_solver and not args.no_predict:
        from seqshard.planner import plan as make_plan

        ov = {"layers.*": "recompute"}
        if base == "liger":
            ov["lm_head"] = "chunk"
        try:
            t0 = time.perf_counter()
            with torch.device("meta"):
                meta = llama.Llama(mcfg).to(dtype)
            ids_m = torch.zeros(1, cfg.seq, dtype=torch.long, device="meta")
            p = make_plan(meta, (ids_m, ids_m), cluster=args.cluster, overrides=ov,
                          memory_budget=1e15, optimizer="adamw-pure")
            row.set(predicted_peak_gib=gib(p.predicted.peak_memory_bytes),
                    predicted_step_s=p.predicted.step_s, prediction_overrides=ov,
                    memory=memory_strategies(p), plan_s=time.perf_counter() - t0)
            _say(f"cost model for {cfg.system}: peak {gib(p.predicted.peak_memory_bytes):.1f} GiB, "
                 f"step {p.predicted.step_s:.2f} s")
            del meta, p
        except Exception as e:  # noqa: BLE001 - the measurement goes on without it
            row.set(prediction_error=f"{type(e).__name__}: {e}")
    elif base in ("native", "liger"):
        row.set(prediction_error=why or "--no-predict")

    # the model, the inputs, the step
    model = pm = opt = ids = labels = None
    try:
        if cuda:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model = build_model(mcfg, device, dtype)
        gen = torch.Generator(device).manual_seed(1)
        ids = torch.randint(0, mcfg.vocab, (1, cfg.seq), device=device, generator=gen)
        labels = torch.randint(0, mcfg.vocab, (1, cfg.seq), device=device, generator=gen)
        if cuda:
            torch.cuda.synchronize()
        row.set(init_s=time.perf_counter() - t0,
                params_gib=gib(sum(p.numel() * p.element_size() for p in model.parameters())))
        _say(f"model built in {row['init_s']:.1f} s ({row['params_gib']:.2f} GiB of parameters)")

        if base in ("seqshard", "slice"):
            from seqshard.planner import parallelize
            from seqshard.solver import Infeasible

            if not dist.is_initialized():
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
                dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
            t0 = time.perf_counter()
            try:
                if cfg.system == "slice":
                    pm = parallelize(model, (ids, labels), cluster=args.cluster, overrides=overrides,
                                     memory_budget=1e15, optimizer="adamw-pure",
                                     compile=False, kernels=False)
                else:
                    compiled = dict(compile="layers", kernels=True, compile_backend=backend) \
                        if cfg.system == "seqshard-compiled" else dict(compile=False, kernels=False)
                    pm = parallelize(model, (ids, labels), cluster=args.cluster,
                                     memory_budget=budget, optimizer="adamw-pure", **compiled)
            except Infeasible as e:
                row.set(status="infeasible", reason=str(e), plan_s=time.perf_counter() - t0)
                return 0
            p = pm.plan
            row.set(plan=p.hash(), plan_s=time.perf_counter() - t0,
                    predicted_peak_gib=gib(p.predicted.peak_memory_bytes),
                    predicted_step_s=p.predicted.step_s, memory=memory_strategies(p))
            _say(f"plan {p.hash()} in {row['plan_s']:.1f} s: predicted peak "
                 f"{row['predicted_peak_gib']:.1f} GiB, step {p.predicted.step_s:.2f} s; "
                 f"{ {k: v for k, v in row['memory'].items() if k != 'notes'} }")
            if cfg.system == "seqshard-compiled":
                code = pm.code
                row.set(templates=code.count("torch.compile(backend="),
                        fused_loss="fused_chunked(" in code)
            fn = pm
        else:
            blocks = compiled_blocks(model, backend) if cfg.system.endswith("-compiled") else None
            fn = lambda a, b: native_loss(model, a, b, liger, blocks)  # noqa: E731

        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = fn(ids, labels)
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        from timing import measure

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row.set(stage="first step")
        if not cfg.steps1:
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            row.set(first_step_s=first,
                    peak_first_gib=gib(torch.cuda.max_memory_allocated()) if cuda else None)
            _say(f"warm-up step {first:.2f} s" + (f", peak {row['peak_first_gib']:.1f} GiB" if cuda else ""))
            # a long first step means long steps - unless it was the compiler's
            repeats = 1 if first > 20 and not cfg.system.endswith("-compiled") else args.repeats
        else:
            repeats = 1
            make_optimizer_state(model, opt)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        peak_all = torch.cuda.max_memory_allocated() if cuda else None
        reserved_all = torch.cuda.max_memory_reserved() if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row.set(stage="timed steps", repeats=repeats)
        t = measure(step, warmup=0, repeats=repeats, device=device)
        step_s = t.median_ms / 1e3
        peak_timed = torch.cuda.max_memory_allocated() if cuda else None
        reserved_timed = torch.cuda.max_memory_reserved() if cuda else None
        peak = max(peak_all or 0, peak_timed or 0) if cuda else None
        reserved = max(reserved_all or 0, reserved_timed or 0) if cuda else None
        row.set(status="ok", stage=None, step_s=step_s, times_ms=t.times_ms,
                tokens_per_s=cfg.seq / step_s, tflops=flops / step_s / 1e12,
                mfu=flops / step_s / PEAK_FLOPS, loss=float(losses[-1].float().item()),
                peak_gib=gib(peak), peak_timed_gib=gib(peak_timed),
                reserved_gib=gib(reserved), reserved_timed_gib=gib(reserved_timed))
        if cfg.system.endswith("-compiled"):
            from torch._dynamo.utils import counters
            row.set(compiled_graphs=counters["stats"]["unique_graphs"],
                    graph_breaks=sum(counters["graph_break"].values()))
        if row.get("predicted_step_s"):
            row.set(step_ratio=step_s / row["predicted_step_s"])
        if cuda and row.get("predicted_peak_gib"):
            row.set(peak_ratio=row["peak_timed_gib"] / row["predicted_peak_gib"])
        _say(f"ok: {step_s:.3f} s/step, {cfg.seq / step_s:,.0f} tokens/s, MFU "
             f"{100 * flops / step_s / PEAK_FLOPS:.1f}%" +
             (f", peak {row['peak_gib']:.1f} GiB (reserved {row['reserved_gib']:.1f})" if cuda else ""))
    except torch.OutOfMemoryError as e:
        msg = str(e).splitlines()[0] if str(e) else "out of memory"
        row.set(status="oom", reason=msg[:400],
                peak_at_oom_gib=gib(torch.cuda.max_memory_allocated()) if cuda else None)
        _say(f"out of memory: {msg[:200]}")
    except Exception as e:  # noqa: BLE001 - a row, not a crash
        row.set(status="error", reason=f"{type(e).__name__}: {e}"[:2000],
                traceback=traceback.format_exc()[-4000:])
        _say(f"error: {type(e).__name__}: {str(e)[:300]}")
    finally:
        model = pm = opt = ids = labels = fn = None  # noqa: F841
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row.set(wall_s=time.perf_counter() - t_start)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def make_optimizer_state(model, opt) -> None:
    """AdamW makes its state in its first step: make it now (zero gradients, lr 0: no parameter
    moves), so that a cold timed step's peak is a steady step's, with the optimizer state alive
    through backward as the planner counts it."""
    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lr = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, x in zip(opt.param_groups, lr):
        g["lr"] = x
    opt.zero_grad(set_to_none=True)


def _slice_cluster(name: str, device: str, dtype, cfg):
    """The cluster the whole model's plan behind a slice is priced on: the one `parallelize`
    prices the slice on (local attention at the kernel the runtime picks on this device: fa4 on
    an H200 with flash-attn-4), so that both plans see the same per-layer costs."""
    cluster = _cluster(name)
    if device != "cuda":
        return cluster
    import torch

    from seqshard.runtime import backends

    e = cfg.dim // cfg.heads
    kernel = backends.select_backend(torch.device("cuda"), dtype, e)
    known = {cluster.gpu.attention_backend, *(k[0] for k in cluster.gpu.attention_kernels)}
    if kernel in known and kernel != cluster.gpu.attention_backend and backends.fa4_head_dim(e) == e:
        cluster = cluster.with_attention_backend(kernel)
    return cluster


def _cluster(name):
    from seqshard.costmodel import Cluster

    return Cluster.parse(name) if isinstance(name, str) else name


# ------------------------------------------------------------------ the driver (parent)
def run_config(cfg: Config, args, timeout: float) -> dict:
    """Run one configuration in a child process; its row, or a timeout / crash row."""
    fd, row_path = tempfile.mkstemp(prefix="memory-row-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", cfg.name, "--row", row_path,
           "--device", args.device, "--cluster", args.cluster, "--repeats", str(args.repeats)]
    if args.smoke:
        cmd.append("--smoke")
    if args.budget_gib:
        cmd += ["--budget-gib", str(args.budget_gib)]
    if args.no_predict:
        cmd.append("--no-predict")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip())
            del tail[:-40]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, 9)  # the child's own session: only what this run started
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=5)
    try:
        with open(row_path) as f:
            row = json.load(f)
    except (OSError, json.JSONDecodeError):
        row = dict(config=cfg.name, model=cfg.model, seq=cfg.seq, system=cfg.system)
    for p in (row_path, row_path + ".tmp"):
        if os.path.exists(p):
            os.remove(p)
    row["wall_s"] = time.perf_counter() - t0
    if timed_out:
        row["status"] = "timeout"
        row["reason"] = f"past its timeout of {timeout:.0f} s (during: {row.get('stage') or 'setup'})"
    elif row.get("status") in (None, "started"):
        row["status"] = "crashed"
        row["reason"] = f"exit status {proc.returncode}; last output: " + " | ".join(tail[-8:])
    return row


def versions() -> dict:
    import torch

    # no CUDA call here: a context in this process would take GPU memory from the children
    out = dict(python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, host=platform.node(),
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"))
    for mod in ("triton", "liger_kernel", "ortools"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[mod] = f"not importable ({type(e).__name__})"
    return out


def _f(x, spec=".2f", unit=""):
    if x is None:
        return "-"
    if unit == " GiB" and 0 < x < 0.5:  # the toy models of --smoke
        return f"{x * 1024:.2f} MiB"
    return f"{x:{spec}}{unit}"


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    device = next((r["device"] for r in rows if r.get("device")), doc["device"])
    md = [f"# Memory plans on one GPU ({device})", "",
          f"`{doc['command']}`", "",
          f"torch {doc['versions']['torch']}, liger {doc['versions']['liger_kernel']}, ortools "
          f"{doc['versions']['ortools']}; allocator {doc['versions'].get('alloc_conf', '?')}; "
          "bf16 parameters, one sequence, fused AdamW (bf16 state). "
          f"{doc['definitions']}", "",
          "| config | status | step | warm-up / timed | tokens/s | MFU | peak (all / timed) | "
          "reserved | predicted peak | peak ratio | predicted step | step ratio | memory plan |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r.get("memory") or {}
        plan = "; ".join(f"{k} {v}" for k, v in mem.items() if k != "notes") or "-"
        if r.get("system") == "slice" and r.get("slice_overrides") is not None:
            plan = f"slice of the whole plan: {r['slice_overrides']}"
        status = r.get("status", "?")
        if status not in ("ok",):
            status += f": {(r.get('reason') or '')[:160]}"
        md.append(
            f"| {r['config']} | {status} | {_f(r.get('step_s'), '.3f', ' s')} | "
            f"{r.get('warmup', '-')} / {r.get('repeats', '-')} | {_f(r.get('tokens_per_s'), ',.0f')} | "
            f"{_f(None if r.get('mfu') is None else 100 * r['mfu'], '.1f', '%')} | "
            f"{_f(r.get('peak_gib'), '.1f', ' GiB')} / {_f(r.get('peak_timed_gib'), '.1f', ' GiB')} | "
            f"{_f(r.get('reserved_gib'), '.1f', ' GiB')} | {_f(r.get('predicted_peak_gib'), '.1f', ' GiB')} | "
            f"{_f(r.get('peak_ratio'), '.3f')} | {_f(r.get('predicted_step_s'), '.3f', ' s')} | "
            f"{_f(r.get('step_ratio'), '.3f')} | {plan} |")
    slices = [r for r in rows if r.get("full_plan")]
    if slices:
        md += ["", "## The whole model's plan behind each slice", ""]
        for r in slices:
            fp = r["full_plan"]
            md.append(f"- {r['config']}: the {fp['layers']}-layer plan {fp['hash']} predicts "
                      f"{_f(fp['predicted_peak_gib'], '.1f', ' GiB')} ({'fits' if fp['fits'] else 'does NOT fit'}), "
                      f"step {_f(fp['predicted_step_s'], '.1f', ' s')}; memory plan "
                      f"{ {k: v for k, v in fp['memory'].items() if k != 'notes'} }; not carried to the "
                      f"slice: {r.get('not_carried') or 'nothing'}")
    notes = [(r["config"], n) for r in rows for n in (r.get("memory") or {}).get("notes", [])]
    if notes:
        md += ["", "## Plan notes", ""] + [f"- {c}: {n}" for c, n in notes]
    if doc.get("not_run"):
        md += ["", f"Not run (the budget of {doc['budget_s']:.0f} s): " + ", ".join(doc["not_run"])]
    return "\n".join(md) + "\n"


DEFINITIONS = ("Model FLOPs 6·N·S + 6·L·S²·d (N: multiplying parameters, the LM head counted; "
               "causal attention fwd 2·S²·d per layer ×3 with backward); MFU of 989 TFLOP/s. Peak: "
               "torch.cuda.max_memory_allocated, all steps / timed steps; the ratio is timed peak / "
               "predicted. native/liger predictions: the cost model with every layer recomputed "
               "(liger: and the loss chunked) and no budget.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", help="MODEL:SEQ:SYSTEM[:steps=1][:timeout=S], comma-separated")
    ap.add_argument("--set", action="append", choices=sorted(SETS),
                    help="a named list of configurations (repeatable)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, toy models (the same structure), the 'smoke' set unless --configs")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke's)")
    ap.add_argument("--cluster", default="h200x1", help="the cluster the planner prices")
    ap.add_argument("--budget-gib", type=float, help="the planner's memory budget (default 90%% of the GPU)")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up")
    ap.add_argument("--timeout", type=float, default=540, help="seconds per configuration")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole run's seconds; configurations that cannot fit are not started")
    ap.add_argument("--no-predict", action="store_true", help="skip the cost model's native figures")
    ap.add_argument("--out", default=None, help="folder (default $OUT, else bench/results)")
    ap.add_argument("--tag", default="", help="appended to the file names")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")

    if args.child:
        return run_child(parse_configs(args.child)[0], args.row, args)

    text = args.configs or ""
    for name in args.set or ([] if args.configs else ["smoke" if args.smoke else "first"]):
        text += "," + SETS[name]
    configs = parse_configs(text)
    out = Path(args.out or os.environ.get("OUT") or HERE / "results")
    from report import stamp, write_json_and_markdown

    stem = f"memory-{stamp()}{'-' + args.tag if args.tag else ''}{'-smoke' if args.smoke else ''}"
    doc = dict(benchmark="memory", command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
               device=args.device, smoke=args.smoke, versions=versions(), definitions=DEFINITIONS,
               budget_s=args.budget_s, configs=[c.name for c in configs], rows=[], not_run=[])
    t_run = time.perf_counter()
    print(f"memory bench: {len(configs)} configurations → {out}/{stem}.json/.md\n"
          f"versions: {doc['versions']}", flush=True)
    for k, cfg in enumerate(configs):
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_run)
        est = estimate_s(cfg, args.smoke)
        if left is not None and (left < 20 or est > left):
            print(f"[{k + 1}/{len(configs)}] {cfg.name}: not run (estimate {est:.0f} s, {left:.0f} s left)",
                  flush=True)
            doc["not_run"].append(cfg.name)
            continue
        timeout = cfg.timeout or args.timeout
        if left is not None:
            timeout = min(timeout, left - 5)
        print(f"[{k + 1}/{len(configs)}] {cfg.name} (estimate {est:.0f} s, timeout {timeout:.0f} s)",
              flush=True)
        row = run_config(cfg, args, timeout)
        doc["rows"].append(row)
        print(f"[{k + 1}/{len(configs)}] {cfg.name}: {row.get('status')}"
              + (f" ({row.get('reason', '')[:200]})" if row.get("status") != "ok" else "")
              + f" in {row['wall_s']:.0f} s", flush=True)
        doc["wall_s"] = time.perf_counter() - t_run
        write_json_and_markdown(out, stem, doc, markdown(doc))
    doc["wall_s"] = time.perf_counter() - t_run
    path = write_json_and_markdown(out, stem, doc, markdown(doc))
    print(markdown(doc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
