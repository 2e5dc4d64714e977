"""Distributed attention on 1, 2 and 4 GPUs: ours against PyTorch context parallel and
DeepSpeed-Ulysses in one run, each against the single-GPU kernel at equal per-GPU work.

    torchrun --nproc-per-node 4 bench/attention.py --out DIR            # everything, by priority
    torchrun --nproc-per-node 4 bench/attention.py --out DIR --quick    # headline + accuracy only
    torchrun --nproc-per-node 4 bench/attention.py --device cpu ...     # gloo: checks the script

Pipeline: plan (ordered configs, headline first) → for each config, while the budget lasts:
build inputs → warm up → time with CUDA events → agree on the result across ranks → append one
JSON line → rewrite the JSON and markdown reports. A config that raises is recorded as an error
and the run goes on; a config that hangs trips a watchdog that records "timeout" and exits, and a
rerun with `--resume` skips every config already in the JSON-lines file.

    attention_configs.py  the systems, configs, FLOPs, the ideal, estimates and the plan (pure)
    attention_bench.py    one rank: groups, every system's callable, timing, accuracy, agreement
    attention_peers.py    PyTorch context parallel and DeepSpeed-Ulysses, set up as their users do
    attention_report.py   derived numbers, the JSON and markdown reports, the rows file;
                          its docstring has the definitions written into every report
    timing.py, watchdog.py, report.py   shared by the benchmarks of bench/
    this file             the driver: process group, resume, budget, watchdog, command line

Groups: every config runs on all ranks at once: N=2 runs on both pairs of a 4-GPU machine, N=1 on
every GPU, so all ranks follow one path (collectives match) and the GPUs share one thermal state.
"""

from __future__ import annotations

import os
import time

_T0 = time.monotonic()  # the budget counts from here: imports and process-group start-up included

# NVLink multicast (NVLS) stays off on the lent machines; set before torch/NCCL initialize.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import report  # noqa: E402
from attention_bench import Bench  # noqa: E402
from attention_configs import (K, LOCAL, OURS, PEERS, Config, PlanOptions, Shape,  # noqa: E402
                               base_row, crashed_rows, drive, estimate_s, plan, should_start,
                               timeout_s)
from attention_peers import sdpa_label  # noqa: E402
from attention_report import Record, fmt  # noqa: E402
from watchdog import Watchdog  # noqa: E402


def main(args) -> int:
    run = Run(args)
    run.start()       # process group and meshes, under the watchdog
    run.resume()      # what an earlier run recorded (--resume), the same on every rank
    drive(run.remaining, run.run_and_record, run.decide)
    run.finish()
    return 0


class Run:
    """One benchmark run as this rank sees it: the rows so far, the budget, the watchdog. Rank 0
    decides (the budget) and writes (the rows file, the reports); every rank runs every config."""

    def __init__(self, args):
        self.args = args
        self.shape = Shape(heads=args.heads, head_dim=args.head_dim, gqa_kv_heads=args.gqa_kv_heads)
        self.opts = PlanOptions(seqs=tuple(args.seqs), headline_seq=args.headline_seq,
                                accuracy_seq=args.accuracy_seq, ideal_quantum=args.ideal_quantum,
                                ideal_max_len=args.ideal_max_len, ns=tuple(args.ns),
                                quick=args.quick,
                                systems=tuple(args.systems) if args.systems else None)
        self.rank = int(os.environ.get("RANK", "0"))
        self.record = Record(Path(args.out), self.rank, keep=args.resume)
        self.current: Config | None = None  # the config in progress (for the watchdog)
        # rank 0 records the timeout: its limit is the shortest, the others wait a little longer
        self.grace = 0.0 if self.rank == 0 else 20.0
        self.watchdog = Watchdog(self.on_timeout)
        self.rows: list[dict] = []
        self.done: set[str] = set()
        self.not_run: list[str] = []

    def on_timeout(self, label: str) -> None:
        cfg = self.current
        if cfg is not None:
            self.record.add(base_row(cfg, self.shape, "timeout",
                                     f"no progress within the watchdog's {timeout_s(cfg, self.shape):.0f} s"))
        print(f"[attention] rank {self.rank}: watchdog fired in {label}; exiting", file=sys.stderr,
              flush=True)

    def start(self) -> None:
        args = self.args
        self.watchdog.arm(args.startup_timeout_s + self.grace, "startup")
        timeout = datetime.timedelta(seconds=args.nccl_timeout_s)
        if args.device == "cuda":
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=local, timeout=timeout)
        else:
            torch.set_num_threads(1)
            dist.init_process_group("gloo", timeout=timeout)
        self.world = dist.get_world_size()
        self.bench = Bench(args, self.shape, self.opts)
        dist.barrier()
        self.watchdog.disarm()

    def resume(self) -> None:
        """Rank 0 reads what an earlier run recorded and sends it to all: every rank must see the
        same rows (rank 0 appends to the file as soon as it starts the next config)."""
        shared = [self.record.read() if self.args.resume and self.rank == 0 else []]
        dist.broadcast_object_list(shared, src=0)
        previous = shared[0]
        meta_row = next((r for r in previous if r.get("kind") == "meta"), None)
        self.stamp = meta_row["date"] if meta_row else report.stamp()
        env = " ".join(f"{k}={os.environ[k]}" for k in ("TORCH_NCCL_HIGH_PRIORITY", "NCCL_NVLS_ENABLE")
                       if k in os.environ)
        self.command = " ".join([env, "torchrun", f"--nproc-per-node {self.world}", *sys.argv]).strip()
        if meta_row is None:
            self.record.add({"kind": "meta", "date": self.stamp, "command": self.command})
        self.rows = [r for r in previous if r.get("kind") in ("timing", "accuracy")]
        self.rows += crashed_rows(previous, self.shape)
        self.done = {r["config"] for r in self.rows}  # timed-out and crashed ones too: a hang is not retried
        if self.rank == 0:
            configs = plan(self.opts, self.shape, self.world, self.rows)
            total = sum(estimate_s(c, self.shape) for c in configs if c.key not in self.done)
            b = self.bench
            print(f"[attention] world {self.world}, local backend {b.backend}, ideal "
                  f"{sdpa_label(b.kernel_backends)}, peers {sdpa_label(b.peer_backends)}; "
                  f"{len(configs)} configs planned, estimated {total:.0f} s of work for a budget "
                  f"of {self.args.budget_s:.0f} s", flush=True)

    def remaining(self, _new_rows) -> list[Config]:
        """The plan, re-made with every row so far (the long tier follows the headline's best)."""
        return [c for c in plan(self.opts, self.shape, self.world, self.rows) if c.key not in self.done]

    def decide(self, cfg: Config) -> bool:
        """Rank 0's clock decides whether `cfg` still fits the budget; every rank follows."""
        self.watchdog.arm(120.0 + self.grace, f"deciding on {cfg.key}")
        go = torch.tensor([0], device=self.bench.device)
        if self.rank == 0:
            elapsed = time.monotonic() - _T0
            go[0] = int(should_start(elapsed, estimate_s(cfg, self.shape), self.args.budget_s))
        dist.broadcast(go, 0)
        start = bool(go.item())
        self.watchdog.disarm()
        if not start:
            self.not_run.append(cfg.key)
        return start

    def run_and_record(self, cfg: Config) -> list[dict]:
        self.current = cfg
        # a config that starts and never ends is a crash (see crashed_rows)
        self.record.add({"kind": "start", "config": cfg.key, "cfg": asdict(cfg)})
        self.watchdog.arm(timeout_s(cfg, self.shape) + self.grace, cfg.key)
        try:
            new = self.bench.run(cfg)
        finally:
            self.watchdog.disarm()
            self.current = None
        self.rows.extend(new)
        self.record.add(*new)
        if self.rank == 0:
            for r in new:
                tail = (f"{r['median_ms']:.2f} ms, peak {fmt(r.get('peak_mem_gib'), '.1f')} GiB"
                        if r["kind"] == "timing" and r["status"] == "ok" else
                        (f"ok={r.get('ok')} errors={r.get('errors')}" if r["status"] == "ok" else
                         f"{r['status']}: {r.get('error')}"))
                print(f"[attention] {r['key']}: {tail}", flush=True)
        self.write_reports()
        return new

    def write_reports(self) -> None:
        if self.rank != 0:
            return
        meta = {"date": self.stamp, "command": self.command, "args": vars(self.args),
                "gpus": self.world, "elapsed_s": time.monotonic() - _T0, "not_run": self.not_run,
                **self.bench.versions()}
        self.record.write_reports(meta, self.rows, self.shape, self.opts, self.world)

    def finish(self) -> None:
        self.write_reports()
        if self.rank == 0:
            print(f"[attention] finished in {time.monotonic() - _T0:.0f} s; not run (budget): "
                  f"{len(self.not_run)}; reports in {Path(self.args.out)}/attention-{self.stamp}.md/.json",
                  flush=True)
        self.watchdog.arm(120.0 + self.grace, "finishing")
        dist.barrier()
        dist.destroy_process_group()
        self.watchdog.disarm()


def _lengths(text: str) -> list[int]:
    """'32K,128K,8192' -> [32768, 131072, 8192]."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        out.append(int(part[:-1]) * K if part.endswith("K") else int(part))
    return out


def _length(text: str) -> int:
    (value,) = _lengths(text)
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for attention-rows.jsonl and attention-<date>.json/.md")
    p.add_argument("--quick", action="store_true",
                   help="only the headline config and the accuracy check")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no config that would end after this many seconds since start")
    p.add_argument("--resume", action="store_true",
                   help="keep attention-rows.jsonl and skip the configs already in it")
    p.add_argument("--seqs", type=_lengths, default=[32 * K, 128 * K, 256 * K, 512 * K])
    p.add_argument("--headline-seq", type=_length, default=128 * K)
    p.add_argument("--accuracy-seq", type=_length, default=8 * K)
    p.add_argument("--ideal-quantum", type=int, default=1024)
    p.add_argument("--ideal-max-len", type=_length, default=128 * K)
    p.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--systems", type=lambda s: s.split(","), default=None,
                   help=f"comma list of systems to run (default all: {LOCAL + OURS + PEERS})")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--gqa-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--allgather-head-stride", type=int, default=0,
                   help="kv heads per all-gather step of allgather attention (0: runtime default)")
    p.add_argument("--peer-sdpa", type=lambda s: s.split(","), default=None,
                   help="the peers' SDPA backends in priority order, e.g. flash,efficient (default: "
                        "ours first: cudnn,flash,efficient on Hopper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout-s", type=float, default=240.0)
    p.add_argument("--nccl-timeout-s", type=float, default=600.0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: gloo on CPU with tiny sizes, only to check this script")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing configs")
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    for _key, _default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(_key, _default)  # plain `python bench/attention.py`: one process
    sys.exit(main(_args))
