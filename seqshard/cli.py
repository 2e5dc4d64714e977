"""`seqshard` command line: capture | demo | plan | bench | calibrate."""

from __future__ import annotations

import argparse
import sys
import time


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=["llama", "video_dit"], help="built-in model family")
    p.add_argument("--config", default="tiny", help="named configuration (see seqshard/models)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=37, help="llama: sequence length")
    p.add_argument("--frames", type=int, default=6, help="video_dit: frames T")
    p.add_argument("--patches", type=int, default=10, help="video_dit: patches per frame P")
    p.add_argument("--meta", action="store_true", help="build on the meta device (no memory)")


def _build(args):
    from seqshard.models import build

    sizes = dict(batch=args.batch, seq=args.seq) if args.model == "llama" else \
        dict(batch=args.batch, frames=args.frames, patches=args.patches)
    return build(args.model, args.config, device="meta" if args.meta else "cpu", **sizes)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="seqshard", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("capture", help="print every node with its factor signature and source line")
    _model_args(p)
    p.add_argument("--all", action="store_true", help="also list parameters and buffers")
    p.set_defaults(fn=cmd_capture)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
