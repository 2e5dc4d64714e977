"""Video diffusion transformers on 4 GPUs against one (issue #20): a training step of the
planner's own plan, forced Ulysses and forced DSP, their scaling efficiency, their ratios, and
each plan's predicted step time and peak memory against the measured ones, in one run.

    # one call each on the lent 4×H200 (< 600 s each), the headline first
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \\
        python bench/video.py --ranks 4 --models stdit-xl --shapes 128x2304 --budget-s 540 --out $OUT
    ... python bench/video.py --ranks 4 --models latte --shapes 128x2304 --budget-s 540 --out $OUT
    ... python bench/video.py --ranks 4 --shapes 64x1024 --budget-s 540 --out $OUT   # both models
    python bench/video.py --smoke                # CPU, gloo, 4 ranks, tiny models: every path

Defaults: --models stdit-xl,latte, --shapes 128x2304,64x1024 (more than one call holds: a
configuration is parallelize + a compiling first step + 6 steps, estimated - not yet measured -
at about a minute on 4 GPUs),
--systems 1gpu,planner,ulysses,dsp, --repeats 5.

Not under torchrun, the script launches itself under `torch.distributed.run --standalone` with
--ranks ranks (`torchrun --nproc-per-node 4 bench/video.py ...` works too). It sets the four
variables above when they are missing (before torch loads); the lent machines keep NVLink
multicast off, and the plans near the GPU's size want expandable segments (parallelize warns).

Models (training step at T frames × P patches, one video, bf16; --models):

    stdit-xl  the built-in `video_dit` config `stdit-xl` (seqshard/models/video_dit.py: 14
              spatial + 14 temporal blocks alternating, hidden 1152, 16 heads of 72, adaLN;
              input axes `AXES["video_dit"]`, x "b t p c")
    latte     diffusers' `LatteTransformer3DModel` from a config, random init (nothing
              downloaded), in tests/real_models.py's `DiffusionLoss` (MSE against a target):
              chosen because it has STDiT's spatial-temporal structure (spatial blocks attend
              over the patches of each frame and cross-attend to the caption, temporal blocks
              over the frames of each patch position), so Ulysses and DSP mean the same on it as
              on stdit-xl; sized as stdit-xl: hidden 1152 = 16 heads × 72 (Latte-XL's width),
              14 spatial + 14 temporal blocks (the released Latte-1 has 28 + 28),
              gelu-approximate MLP, adaLN-single, 120 caption tokens of 4096 channels (T5-XXL),
              patch 2 on 4-channel latents (P = 2304 is a 96 × 96 latent, `video_length` = T);
              axes "b c t h w". CogVideoX and Wan (the other diffusers models that run under
              seqshard) attend over all T·P tokens at once (full 3-D attention, 295K tokens at
              128 × 2304): another problem, not the DSP comparison this issue asks for.
    Any other `video_dit` config by name: `dit-bench` (4 block pairs) is the model of
    ANCHORS.md's DiT rows (hand-written DSP 171 ms, Ulysses 185 ms, 1 GPU 640 ms at 128 × 2304).

Systems:

    1gpu      world size 1, the same model through `parallelize` (the planner's plan for one
              GPU: it recomputes layers where memory needs it): the scaling denominator. Run
              in a child process per (model, shape) before the ranks meet, one per GPU at a
              time (rank r runs jobs r, r + N, ...: the jobs of one call run side by side on
              separate GPUs, which share only the host). `--systems 1gpu` runs only these;
              `--baseline FILE` takes them from an earlier run's JSON where this run has none
    planner   `parallelize(model, inputs, axes=...)`: no overrides, default compile/kernels
    ulysses   the planner with overrides {"*": "split:t ulysses"}: frames split throughout,
              temporal attention by all-to-all to heads (ANCHORS.md's Ulysses column)
    dsp       the planner with DSP's splits forced: frames t split in spatial blocks, patches
              in temporal blocks, an all-to-all at each switch: the DSP paper's scheme, so no
              hand-written DSP is needed. stdit-xl: `named_plans("video_dit", "stdit-xl")
              ["dsp"]`; latte: {"*": "split:t", "net.temporal_transformer_blocks.*": "split:s"}
              (Latte's factor names under its axes: t frames, s patches - the 48 patch rows in
              the first temporal block, all P after it)
    Latte's forced plans also say "net.pos_embed.proj": "replicate": its conv2d patch
    embedding has no op rule and runs on the whole video (the planner's own plan does so too).

Every system runs with the default compile/kernels ("auto": compiled layers and seqshard's
kernels on CUDA, off on CPU) and optimizer="adamw-pure", the optimizer the step runs.

A step: zero_grad(set_to_none), forward, backward, `torch.optim.AdamW` step (fused on CUDA; bf16
moments, no master copy: what "adamw-pure" prices). The planner's predicted step
(`pm.plan.predicted.step_s`) is that step: forward, backward, the gradient all-reduce and
AdamW. Per configuration: parallelize (capture, plan, build), one untimed step (compile and
AdamW's state: `first_step_s`), one more, `torch.cuda.reset_peak_memory_stats`, then --repeats
timed steps (`timing.measure`, isolated, on each rank); the ranks then agree (over a gloo group):
the step is the slowest rank's median (`timing`'s slowest="median", combined here so that a
rank's failure does not leave the others in a collective), the peak the largest rank's
`max_memory_allocated` over the timed steps, against `pm.plan.predicted.peak_memory_bytes`.

Derived, per (model, shape): scaling efficiency t(1gpu) / (N · t(system)); "vs Ulysses"
t(ulysses) / t(system); "vs DSP" t(dsp) / t(system); prediction error predicted / measured - 1.
The issue's goals are checked in the markdown: the planner's plan at ≥ 0.97 efficiency, ≥ 1.10×
Ulysses, ≥ 1.03× DSP, every plan's prediction within 10%.

Every configuration runs in its own try: out of memory or an error is a row (status oom/error)
and the run goes on. A hang (one rank failed inside a collective) trips a watchdog that records
a "timeout" row, writes the report and exits 124. A configuration starts only while the budget
(--budget-s from the process's start) leaves room for the longest one so far; the rest are
"skipped" rows. Results: video-<stamp>.json and .md under --out (else $OUT, else bench/results;
--smoke: a temporary folder), rewritten after each configuration.
"""

from __future__ import annotations

import os
import time

_T0 = time.monotonic()  # the budget counts from here

for _var, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1"),
                     ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")):
    os.environ.setdefault(_var, _value)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
sys.path.insert(2, str(HERE.parent / "tests"))  # real_models: the wrapper the exactness tests use

GIB = 2**30
MODELS = ("stdit-xl", "latte")
SYSTEMS = ("planner", "ulysses", "dsp")  # on N ranks; "1gpu" runs in child processes
LATTE = dict(heads=16, head_dim=72, layers=14, caption=4096, text=120)
LATTE_SMOKE = dict(heads=4, head_dim=8, layers=2, caption=32, text=8)
LATTE_AXES = {"hidden_states": "b c t h w", "timestep": "b", "encoder_hidden_states": "b n e",
              "target": "b c t h w"}
GOALS = dict(efficiency=0.97, vs_ulysses=1.10, vs_dsp=1.03, prediction=0.10)  # issue #20
NOT_A_RANK = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def parse_shape(text: str) -> tuple[int, int]:
    frames, patches = (int(x) for x in text.lower().split("x"))
    return frames, patches


def latte(frames: int, patches: int, smoke: bool, device, dtype):
    """(model, inputs): Latte (module docstring) at `frames` × `patches` (a square latent)."""
    import diffusers
    import torch
    from real_models import DiffusionLoss

    side = 2 * math.isqrt(patches)
    if (side // 2) ** 2 != patches:
        raise ValueError(f"latte: {patches} patches is not a square (patch 2 on a square latent)")
    c = LATTE_SMOKE if smoke else LATTE
    torch.manual_seed(0)
    with torch.device(device):
        net = diffusers.LatteTransformer3DModel(
            num_attention_heads=c["heads"], attention_head_dim=c["head_dim"], in_channels=4,
            out_channels=4, num_layers=c["layers"], sample_size=side, patch_size=2,
            cross_attention_dim=c["heads"] * c["head_dim"], caption_channels=c["caption"],
            video_length=frames, norm_type="ada_norm_single", activation_fn="gelu-approximate")
        model = DiffusionLoss(net).to(dtype)
    gen = torch.Generator(device).manual_seed(1)
    x = (1, 4, frames, side, side)
    inputs = (torch.randn(x, device=device, generator=gen).to(dtype),
              torch.tensor([3], device=device),
              torch.randn(1, c["text"], c["caption"], device=device, generator=gen).to(dtype),
              torch.randn(x, device=device, generator=gen).to(dtype))
    return model, inputs


def build_case(name: str, frames: int, patches: int, smoke: bool, device, dtype):
    """(model, inputs, axes, {system: overrides}) of one model at one shape."""
    from seqshard.models import AXES, build, named_plans, video_dit

    if name in video_dit.CONFIGS:
        config = "tiny" if smoke else name
        model, inputs = build("video_dit", config, device=device, dtype=dtype, batch=1,
                              frames=frames, patches=patches)
        plans = named_plans("video_dit", config)
        return model, inputs, AXES["video_dit"], {s: plans[s][0] for s in ("ulysses", "dsp")}
    if name == "latte":
        model, inputs = latte(frames, patches, smoke, device, dtype)
        conv = {"net.pos_embed.proj": "replicate"}
        forced = {"ulysses": {"*": "split:t ulysses", **conv},
                  "dsp": {"*": "split:t", "net.temporal_transformer_blocks.*": "split:s", **conv}}
        return model, inputs, LATTE_AXES, forced
    raise ValueError(f"unknown model {name!r}; choose latte or a video_dit config "
                     f"{sorted(video_dit.CONFIGS)}")


def run_config(name: str, shape: str, system: str, device, args) -> dict:
    """One configuration on this rank: build, parallelize, warm up, time. Its row (this rank's
    figures; `agree` combines the ranks')."""
    import torch
    import torch.distributed as dist
    from timing import measure

    from seqshard.planner import parallelize

    cuda = device.type == "cuda"
    row = dict(model=name, config=("tiny" if args.smoke else name), shape=shape, system=system,
               world=dist.get_world_size(), status="ok")
    model = pm = opt = inputs = None
    try:
        frames, patches = parse_shape(shape)
        dtype = torch.bfloat16 if cuda else torch.float32
        model, inputs, axes, forced = build_case(name, frames, patches, args.smoke, device, dtype)
        row["params"] = sum(q.numel() for q in model.parameters())
        t0 = time.perf_counter()
        pm = parallelize(model, inputs, axes=axes, overrides=forced.get(system),
                         optimizer="adamw-pure")
        row["parallelize_s"] = time.perf_counter() - t0
        p = pm.plan
        row.update(plan=p.hash(), model_state=p.model_state,
                   attention=sorted({f"{n.algorithm} [{n.split_str()}]" for n in p.attention()}),
                   recompute=len(p.recompute), offload=len(p.offload),
                   chunked=[m for m, _ in p.chunked_modules],
                   predicted_step_s=p.predicted.step_s,
                   predicted_compute_s=p.predicted.compute_s, predicted_comm_s=p.predicted.comm_s,
                   predicted_peak_gib=p.predicted.peak_memory_bytes / GIB,
                   notes=list(p.notes), plan_table=str(p))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = pm(*inputs)
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        t0 = time.perf_counter()
        step()  # compiles; AdamW's state
        if cuda:
            torch.cuda.synchronize()
        row["first_step_s"] = time.perf_counter() - t0
        step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = measure(step, repeats=args.repeats, device=device)
        row.update(step_s=t.median_ms / 1e3, times_ms=t.times_ms,
                   loss=float(losses[-1]), loss_finite=all(bool(torch.isfinite(x)) for x in losses))
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - the row says what failed; the next config runs
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                   traceback=traceback.format_exc()[-3000:])
    finally:
        model = pm = opt = inputs = None  # noqa: F841 - freed before the next configuration
        gc.collect()
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return row


def agree(rows: list[dict]) -> dict:
    """The ranks' rows of one configuration as one: rank 0's plan, the first failure, the slowest
    rank's median step (and its times), the largest peak and first step."""
    out = dict(rows[0])
    bad = [(r, row) for r, row in enumerate(rows) if row["status"] != "ok"]
    if bad:
        r, row = bad[0]
        out.update(status=row["status"], error=f"rank {r}: {row.get('error')}",
                   traceback=row.get("traceback"))
        return out
    slowest = max(rows, key=lambda row: row["step_s"])
    out.update(step_s=slowest["step_s"], times_ms=slowest["times_ms"],
               slowest_rank=rows.index(slowest),
               first_step_s=max(row["first_step_s"] for row in rows),
               parallelize_s=max(row["parallelize_s"] for row in rows))
    if "peak_gib" in rows[0]:
        out["peak_gib"] = max(row["peak_gib"] for row in rows)
    return out


# ------------------------------------------------------------------ world size 1, in children
def child_env(local_rank: int) -> dict:
    """This rank's environment for a world-size-1 child on this rank's GPU."""
    env = {k: v for k, v in os.environ.items()
           if k not in NOT_A_RANK and not k.startswith("TORCHELASTIC")}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local_rank] if visible else str(local_rank)
    return env


def one_gpu_rows(jobs: list[tuple[str, str]], args, rank: int, world: int, local_rank: int):
    """Rank r runs jobs r, r + world, ... each in a child process at world size 1; its rows."""
    rows = []
    for name, shape in jobs[rank::world]:
        row = dict(model=name, config=("tiny" if args.smoke else name), shape=shape,
                   system="1gpu", world=1)
        left = args.budget_s - (time.monotonic() - _T0)
        if left < 30:
            rows.append({**row, "status": "skipped", "error": "budget"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name}:{shape}",
                   "--child-out", str(out), "--repeats", str(args.repeats)]
            cmd += ["--smoke"] if args.smoke else []
            try:
                subprocess.run(cmd, env=child_env(local_rank), timeout=left, check=False)
                rows.append(json.loads(out.read_text()) if out.exists() else
                            {**row, "status": "error", "error": "the child wrote no row"})
            except subprocess.TimeoutExpired:
                rows.append({**row, "status": "timeout",
                             "error": f"past the budget ({left:.0f} s)"})
        print(progress(rows[-1]), flush=True)
    return rows


def child_main(args) -> int:
    """A world-size-1 configuration (`--child MODEL:SHAPE`): its row to --child-out."""
    import torch
    import torch.distributed as dist
    from state import init_world

    cuda = not args.smoke
    init_world(cuda)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    name, shape = args.child.split(":")
    row = run_config(name, shape, "1gpu", device, args)
    Path(args.child_out).write_text(json.dumps(row, default=str))
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------ the report
def progress(row: dict) -> str:
    def f(key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    return (f"[{time.monotonic() - _T0:6.1f}s] {row['model']} {row['shape']} {row['system']} "
            f"(world {row['world']}): {row['status']}, step {f('step_s', '.4f')} s (predicted "
            f"{f('predicted_step_s', '.4f')}), peak {f('peak_gib', '.1f')} GiB (predicted "
            f"{f('predicted_peak_gib', '.1f')}), first step {f('first_step_s', '.1f')} s"
            + (f"; {row['error'][:300]}" if row.get("error") else ""))


def derive(rows: list[dict], world: int) -> list[dict]:
    """Each row's derived figures (module docstring), and per (model, shape) the issue's goals."""
    ok = {(r["model"], r["shape"], r["system"]): r for r in rows if r["status"] == "ok"}
    goals = []
    for r in rows:
        if r["status"] != "ok":
            continue
        r["prediction_error"] = r["predicted_step_s"] / r["step_s"] - 1
        key = (r["model"], r["shape"])
        if r["system"] == "1gpu":
            continue
        one = ok.get((*key, "1gpu"))
        r["efficiency"] = one["step_s"] / (world * r["step_s"]) if one else None
        for other in ("ulysses", "dsp"):
            base = ok.get((*key, other))
            r[f"vs_{other}"] = base["step_s"] / r["step_s"] if base else None
    for model, shape in dict.fromkeys((r["model"], r["shape"]) for r in rows):
        planner = ok.get((model, shape, "planner"))
        if planner is None:
            continue
        checks = {k: planner.get(k) for k in ("efficiency", "vs_ulysses", "vs_dsp")}
        met = {k: (v >= GOALS[k] if v is not None else None) for k, v in checks.items()}
        errors = {r["system"]: r["prediction_error"] for r in rows
                  if r["status"] == "ok" and (r["model"], r["shape"]) == (model, shape)}
        met["prediction"] = all(abs(e) <= GOALS["prediction"] for e in errors.values())
        goals.append(dict(model=model, shape=shape, **checks, prediction_errors=errors, met=met))
    return goals


def markdown(doc: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    m = doc["meta"]
    lines = [f"# Video DiT training step: {m['world']} ranks against one ({m['device']})", "",
             f"`{m['command']}`; torch {m['torch']}; {m['dtype']}; {m['repeats']} timed steps "
             "after two untimed (bench/video.py docstring); step = zero_grad + forward + backward "
             "+ AdamW; the slowest rank's median. Efficiency t(1gpu) / (N·t); vs Ulysses "
             "t(ulysses)/t; vs DSP t(dsp)/t; pred. error predicted/measured - 1.", "",
             "| model | T×P | system | attention | recompute | predicted | measured | pred. error "
             "| efficiency | vs Ulysses | vs DSP | peak GiB | pred. peak | first step | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(
            f"| {r['model']} ({r['config']}) | {r['shape']} | {r['system']} | "
            f"{', '.join(r.get('attention', [])) or '-'} | {f(r.get('recompute'), 'd')} | "
            f"{f(r.get('predicted_step_s'), '.4f')} s | {f(r.get('step_s'), '.4f')} s | "
            f"{f(r.get('prediction_error'), '+.1%')} | {f(r.get('efficiency'), '.3f')} | "
            f"{f(r.get('vs_ulysses'), '.3f')} | {f(r.get('vs_dsp'), '.3f')} | "
            f"{f(r.get('peak_gib'), '.1f')} | {f(r.get('predicted_peak_gib'), '.1f')} | "
            f"{f(r.get('first_step_s'), '.1f')} s | {r['status']}"
            f"{' (--baseline)' if r.get('from') else ''} |")
    if doc["goals"]:
        lines += ["", "Issue #20's goals for the planner's plan (efficiency ≥ "
                  f"{GOALS['efficiency']}, ≥ {GOALS['vs_ulysses']}× Ulysses, ≥ "
                  f"{GOALS['vs_dsp']}× DSP, every plan's prediction within "
                  f"{GOALS['prediction']:.0%}):", ""]
        for g in doc["goals"]:
            met = ", ".join(f"{k} {'met' if v else 'not met' if v is not None else 'not measured'}"
                            for k, v in g["met"].items())
            lines.append(f"- {g['model']} {g['shape']}: efficiency {f(g['efficiency'], '.3f')}, "
                         f"{f(g['vs_ulysses'], '.3f')}× Ulysses, {f(g['vs_dsp'], '.3f')}× DSP; "
                         f"{met}")
    for r in doc["rows"]:
        if r.get("error"):
            lines += ["", f"{r['model']} {r['shape']} {r['system']}: {r['status']}: "
                          f"{r['error'][:500]}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the driver
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4, help="ranks to launch when not under torchrun")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shapes", default=None, help="frames x patches, comma-separated "
                    "(default 128x2304,64x1024; --smoke 8x16)")
    ap.add_argument("--systems", default="1gpu," + ",".join(SYSTEMS))
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 5; --smoke 2)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no configuration past this (seconds from the start)")
    ap.add_argument("--baseline", default=None, help="JSON of an earlier run: its 1gpu rows "
                    "serve where this run measured none (e.g. after --systems 1gpu in a call)")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny models")
    ap.add_argument("--out", default=None, help="folder (default $OUT, else bench/results)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)      # MODEL:SHAPE, world 1
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.shapes = args.shapes or ("8x16" if args.smoke else "128x2304,64x1024")
    if args.child:
        return child_main(args)
    if "RANK" not in os.environ:
        from state import relaunch
        return relaunch(__file__, args.ranks, argv)

    import torch
    import torch.distributed as dist

    from report import stamp, write_json_and_markdown
    from watchdog import Watchdog

    cuda = not args.smoke
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    # no CUDA before the children ran: they have this rank's GPU to themselves
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    cpu = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))
    models, systems = args.models.split(","), args.systems.split(",")
    shapes = args.shapes.split(",")
    for s in systems:
        if s not in ("1gpu", *SYSTEMS):
            raise SystemExit(f"--systems: {s!r} is not one of {('1gpu', *SYSTEMS)}")
    out = args.out or os.environ.get("OUT") or \
        (tempfile.mkdtemp(prefix="video-smoke-") if args.smoke else str(HERE / "results"))
    name = [f"video-{'smoke-' if args.smoke else ''}{stamp()}"]
    dist.broadcast_object_list(name, src=0, group=cpu)
    doc = dict(meta=dict(world=world, torch=torch.__version__, python=platform.python_version(),
                         dtype="float32 (CPU)" if args.smoke else "bf16", repeats=args.repeats,
                         command=" ".join(["python bench/video.py", *argv]),
                         env={k: os.environ.get(k) for k in (
                             "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                             "NVSHMEM_DISABLE_NVLS", "PYTORCH_CUDA_ALLOC_CONF")},
                         latte=LATTE_SMOKE if args.smoke else LATTE),
               rows=[], goals=[])

    def write():
        if rank == 0:
            doc["goals"] = derive(doc["rows"], world)
            doc["meta"]["elapsed_s"] = time.monotonic() - _T0
            write_json_and_markdown(out, name[0], doc, markdown(doc))

    # 1. world size 1: children, before this rank touches its GPU
    jobs = [(m, s) for s in shapes for m in models] if "1gpu" in systems else []
    mine = one_gpu_rows(jobs, args, rank, world, local_rank)
    every = [None] * world
    dist.all_gather_object(every, mine, group=cpu)
    for r in range(world):  # in job order
        doc["rows"] += every[r]
    doc["rows"].sort(key=lambda row: jobs.index((row["model"], row["shape"])))
    if args.baseline:
        have = {(r["model"], r["shape"]) for r in doc["rows"] if r["status"] == "ok"}
        doc["rows"] += [{**r, "from": args.baseline}
                        for r in json.loads(Path(args.baseline).read_text())["rows"]
                        if r["system"] == "1gpu" and r["status"] == "ok"
                        and (r["model"], r["shape"]) not in have]
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    doc["meta"]["device"] = f"{world}x " + (torch.cuda.get_device_name() if cuda else "CPU")
    write()

    # 2. the systems on every rank
    current = [None]

    def on_fire(label):
        if rank == 0 and current[0] is not None:
            doc["rows"].append({**current[0], "status": "timeout",
                                "error": f"no progress in {label}: a rank failed in a collective?"})
            write()

    watchdog = Watchdog(on_fire)
    longest = 0.0
    for shape in shapes:
        for model in models:
            for system in [s for s in SYSTEMS if s in systems]:
                base = dict(model=model, config=("tiny" if args.smoke else model), shape=shape,
                            system=system, world=world)
                go = [time.monotonic() - _T0 + longest <= args.budget_s]
                dist.broadcast_object_list(go, src=0, group=cpu)
                if not go[0]:
                    doc["rows"].append({**base, "status": "skipped", "error": "budget"})
                    write()
                    continue
                current[0] = base
                left = args.budget_s + 30 - (time.monotonic() - _T0)
                watchdog.arm(max(60.0, min(600.0, left)), f"{model} {shape} {system}")
                t0 = time.monotonic()
                row = run_config(model, shape, system, device, args)
                every = [None] * world
                dist.all_gather_object(every, row, group=cpu)
                watchdog.disarm()
                longest = max(longest, time.monotonic() - t0)
                doc["rows"].append(agree(every))
                write()
                if rank == 0:
                    print(progress(doc["rows"][-1]), flush=True)
    current[0] = None
    write()
    if rank == 0:
        print(markdown(doc), flush=True)
        print(f"results: {Path(out) / name[0]}.md and .json", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
