"""`seqshard` command line: demo | capture | plan | bench | calibrate.

A mistake on the command line (a bad count, an unknown model, config or cluster, a cluster file
that is missing or malformed, a model too big for this machine's memory) is one line on stderr,
`seqshard: error: ...`, naming the fix, and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the command line
        self.exit(2, f"seqshard: error: {message} (see `{self.prog} --help`)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=["llama", "video_dit"], help="built-in model family")
    p.add_argument("--config", default="tiny", help="named configuration (see seqshard/models)")
    p.add_argument("--batch", type=_count, default=1)
    p.add_argument("--seq", type=_count, default=37, help="llama: tokens, e.g. 37, 4K")
    p.add_argument("--frames", type=_count, default=6, help="video_dit: frames T")
    p.add_argument("--patches", type=_count, default=10, help="video_dit: patches per frame P")
    p.add_argument("--meta", action="store_true", help="build on the meta device (no memory)")


def _build(args):
    import torch

    from seqshard.models import build

    sizes = dict(batch=args.batch, seq=args.seq) if args.model == "llama" else \
        dict(batch=args.batch, frames=args.frames, patches=args.patches)
    if not args.meta:  # count the parameters on the meta device before allocating them
        model, _ = build(args.model, args.config, device="meta", **sizes)
        need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        have = _available_memory()
        if need > 0.8 * have:
            n = sum(p.numel() for p in model.parameters())
            count = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
            raise ValueError(f"{args.model} {args.config} has {count} parameters, "
                             f"{_size(need)} in {str(torch.get_default_dtype())[6:]}; this "
                             f"machine has {_size(have)} available: add --meta to capture it on "
                             "the meta device (shapes only, nothing allocated)")
    return build(args.model, args.config, device="meta" if args.meta else "cpu", **sizes)


def _size(b: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b:.0f} B"


def _available_memory() -> int:
    """Bytes of host memory available now (MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cluster(text: str):
    from seqshard.costmodel import Cluster

    if not text.endswith(".json"):
        return Cluster.parse(text)  # its errors name the presets
    if not os.path.exists(text):
        raise ValueError(f"--cluster {text}: no such file; pass a preset such as h200x8 or "
                         "h100x1024, or a file written by `seqshard calibrate --out FILE`")
    try:
        return Cluster.load(text)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        why = str(e) if str(e).startswith("not a seqshard") else f"not a seqshard cluster file: {e}"
        raise ValueError(f"--cluster {text}: {why}; write one with `seqshard calibrate --out "
                         "FILE`") from None


def _priced_at(cluster, backend: str):
    """`cluster` with local attention priced at `backend`'s rates; fa4 at the head dims the
    runtime pads (72 -> 128) at the padded FLOPs, as parallelize prices it on an H200."""
    from dataclasses import replace

    from seqshard.costmodel.attention import padded_head_dims

    cluster = cluster.with_attention_backend(backend)  # its ValueError names the known kernels
    if backend != "fa4":
        return cluster
    from seqshard.runtime.backends import FA4_CHECKED_HEAD_DIMS, FA4_PAD_TO, fa4_head_dim

    runs = {e: fa4_head_dim(e) for e in (*FA4_CHECKED_HEAD_DIMS, *FA4_PAD_TO)}
    return replace(cluster, gpu=padded_head_dims(cluster.gpu, runs))


def _mesh(text: str) -> tuple[tuple[str, int], ...]:
    """'node=128,gpu=8' → (("node", 128), ("gpu", 8))."""
    mesh = []
    for item in text.split(","):
        name, _, size = item.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text}: expected AXIS=SIZE pairs separated by commas, "
                             "such as node=128,gpu=8")
        mesh.append((name.strip(), int(size)))
    return tuple(mesh)


def cmd_capture(args) -> int:
    from seqshard.capture import capture
    from seqshard.dims import analyze
    from seqshard.models import AXES

    t0 = time.perf_counter()
    model, inputs = _build(args)
    cap = capture(model, inputs)
    dims = analyze(cap, axes=AXES[args.model])
    print(dims.summary(show_all=args.all))
    for line in cap.rewrites:
        print("rewrite:", line)
    sizes = ", ".join(f"{k}={v}" for k, v in sorted(dims.sizes().items()))
    print(f"factors: {sizes}")
    if dims.unsupported:
        print(f"{len(dims.unsupported)} op(s) without a rule run on replicated inputs:")
        for n, why in dims.unsupported.items():
            print(f"  {n.name}: {why}  at {cap.source(n)}")
    print(f"captured {sum(1 for _ in cap.nodes())} nodes in {time.perf_counter() - t0:.1f} s")
    return 0


def _count(text) -> int:
    """'1M' → 1048576, '128K' → 131072, '4096' → 4096 (K and M are powers of two, as in 128K
    context lengths)."""
    if isinstance(text, int):  # an argparse default
        return text
    clean = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(clean[-1:], 1)
    try:
        value = float(clean[:-1] if scale > 1 else clean) * scale
    except ValueError:
        value = 0.0
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"expected a positive count such as 4096, 128K or 1M, "
                                         f"got {text!r}")
    return int(value)


def cmd_plan(args) -> int:
    import torch

    from seqshard.models import AXES, build
    from seqshard.planner import plan
    from seqshard.solver import Infeasible

    cluster = _cluster(args.cluster)
    if args.attention_backend:
        cluster = _priced_at(cluster, args.attention_backend)
    if args.mesh:
        mesh = _mesh(args.mesh)
    elif cluster.nodes > 1:
        mesh = (("node", cluster.nodes), ("gpu", cluster.gpus_per_node))
    else:
        mesh = (("sp", cluster.gpus),)
    sizes = dict(batch=args.batch, seq=args.seq) if args.model == "llama" else \
        dict(batch=args.batch, frames=args.frames, patches=args.patches)
    model, inputs = build(args.model, args.config, device="meta", dtype=torch.bfloat16, **sizes)
    inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs)
    budget = args.budget * 2**30 if args.budget else None
    t0 = time.perf_counter()
    try:
        p = plan(model, inputs, cluster=cluster, mesh=mesh, axes=AXES[args.model],
                 memory_budget=budget, training=not args.inference, model_state=args.state,
                 optimizer=args.optimizer,
                 verbose=args.verbose)
    except Infeasible as e:
        print(f"infeasible: {e}")
        return 2
    print(p)
    print(f"planned in {time.perf_counter() - t0:.1f} s\n")
    for name in args.explain or [p.attention()[0].module] if p.attention() else []:
        print(p.explain(name), "\n")
    if args.json:
        with open(args.json, "w") as f:
            f.write(p.to_json())
        print(f"plan written to {args.json}")
    if args.html:
        with open(args.html, "w") as f:
            f.write(p.to_html())
        print(f"plan page written to {args.html}")
    return 0


def cmd_demo(args) -> int:
    from seqshard import demo

    return demo.main(ranks=args.ranks, models=args.models)


def cmd_calibrate(args) -> int:
    from seqshard.codegen.kernels.linear_ce import linear_cross_entropy
    from seqshard.costmodel import calibrate

    return calibrate.main(args.rest, fused_loss=linear_cross_entropy)


def cmd_bench(args) -> int:
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "bench")
    script = os.path.join(bench, f"{args.name.replace('-', '_')}.py")

    def runnable(path):  # a benchmark has a main; its helper modules (timing.py, ...) don't
        with open(path) as f:
            return 'if __name__ == "__main__"' in f.read()

    if not os.path.exists(script) or not runnable(script):
        names = sorted(f[:-3] for f in os.listdir(bench)
                       if f.endswith(".py") and runnable(os.path.join(bench, f)))
        raise SystemExit(f"no benchmark {args.name!r} in {root}/bench; there are: {', '.join(names)}")
    cmd = [sys.executable, script, *args.rest]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
               script, *args.rest]
    return subprocess.call(cmd)


def main(argv=None) -> int:
    parser = _Parser(prog="seqshard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("capture", help="print every node with its factor signature and source line")
    _model_args(p)
    p.add_argument("--all", action="store_true", help="also list parameters and buffers")
    p.set_defaults(fn=cmd_capture)

    p = sub.add_parser("plan", help="plan a built-in model for a cluster (no GPU needed)")
    p.add_argument("--model", choices=["llama", "video_dit"], default="llama")
    p.add_argument("--config", default="llama3-8b")
    p.add_argument("--seq", type=_count, default="128K", help="llama: tokens, e.g. 1M, 128K, 4096")
    p.add_argument("--batch", type=_count, default=1)
    p.add_argument("--frames", type=_count, default=64)
    p.add_argument("--patches", type=_count, default=1024)
    p.add_argument("--cluster", default="h200x8", help="h200x8, h100x1024, a100x64, or a JSON file")
    p.add_argument("--mesh", help="axis sizes, e.g. node=128,gpu=8 (default: one axis per level)")
    p.add_argument("--budget", type=float, help="memory per GPU in GiB (default 90%% of the GPU)")
    p.add_argument("--attention-backend",
                   help="price local attention at this kernel's rates: fa4 (FlashAttention-4, what "
                        "the runtime runs on an H200 with flash-attn-4 installed; head dim 72 "
                        "padded to 128) or cudnn (default: the cluster's, cudnn for the presets)")
    p.add_argument("--state", choices=["auto", "replicated", "sharded", "offload"], default="auto",
                   help="parameters/gradients/optimizer state: replicated, sharded over all GPUs "
                        "(FSDP2/ZeRO-3; both run by parallelize) or offload (optimizer state in host "
                        "memory; priced, not run by seqshard); auto plans each that applies and "
                        "keeps the feasible one of least predicted step time (a plan note compares "
                        "them)")
    p.add_argument("--optimizer", choices=["adamw", "adamw-pure"], default="adamw",
                   help="adamw: mixed precision (fp32 master weights and moments, 16 bytes a bf16 "
                        "parameter); adamw-pure: moments in bf16, no master copy (8 bytes), what "
                        "torch.optim.AdamW keeps for bf16 parameters")
    p.add_argument("--inference", action="store_true", help="forward only")
    p.add_argument("--explain", action="append", help="a layer to explain (repeatable)")
    p.add_argument("--json", help="write the plan as JSON")
    p.add_argument("--html", help="write the plan as a self-contained HTML page")
    p.add_argument("--verbose", action="store_true", help="progress of the planner")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("demo", help="plan both built-in models and run them on local ranks")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--models", nargs="+", default=["llama", "video_dit"],
                   choices=["llama", "video_dit"])
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("calibrate", help="measure this machine into a cluster JSON (options: "
                       "seqshard calibrate --out FILE [--quick] [--links-from PRESET] [--fused])", add_help=False)
    p.set_defaults(fn=cmd_calibrate, passes_rest=True)

    p = sub.add_parser("bench", help="run a script of bench/ (GPU ones under torchrun)")
    p.add_argument("name", help="attention | plan_time | predict_vs_measure | gpu_smoke")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) for GPU benchmarks")
    p.set_defaults(fn=cmd_bench, passes_rest=True)
    # calibrate and bench hand their remaining options to the script they run
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # a mistake in what was asked: its message says the fix
        print(f"seqshard: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
