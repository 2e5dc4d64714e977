"""What moving Ulysses' bytes costs, alone and beside attention (4×H200, the headline shape).

    torchrun --nproc-per-node 4 bench/overlap.py --out DIR [--seq 131072] [--tag T]

The question behind it: the Ulysses step at 128K is cuDNN at the ideal's own rate plus an exposed
exchange (bench/results/profile_step-2026-11-21e.md). Either the exchange gets faster, or it hides
behind attention without slowing attention by as much as it hides. This measures both sides.

1. One exchange of a [1, H, S/N, E] bf16 tensor per rank towards heads (256 MB at 128K, 3/4 of it
   to peers), alone, slowest rank's median:
   nccl        all_to_all_single into a rank-major buffer (what Ulysses posts), and the layout copy
               after it into position order; nccl ×3: q, k, v stacked in one call, per tensor
   peer        the runtime's copy-engine exchange (runtime/peer.py: stage, signal, pull in place),
               one at a time and three in a row (q, k, v: consecutive exchanges overlap)
   ce pull     the pulls alone from already staged peers (3 streams; 1 stream): copy-engine rate
   stage       the staging copy alone (cudaMemcpy device to device, 256 MB)
   signal      a round trip of stream-memory-op signals between two GPUs
2. Attention (cuDNN, fwd+bwd at the Ulysses shape, H/N heads × S) alone, in 4 head chunks run one
   after another, and beside traffic started just before it on a side stream: copy-engine copies
   on this GPU, copy-engine pulls from the peers, NCCL all-to-alls. For each: attention's time
   beside the traffic, the traffic's time alone, and the cost = (attention beside − attention
   alone) / traffic alone: below 1, hiding that traffic behind attention pays; 1 or more, it
   doesn't.
Writes overlap-<date><tag>.json and .md.
"""

from __future__ import annotations

import os

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import report  # noqa: E402
import timing  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--seq", type=int, default=128 * 1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tag", default="")
    ap.add_argument("--exchange-only", action="store_true", help="part 1 only")
    args = ap.parse_args(argv)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    from torch.distributed import _symmetric_memory as symm_mem

    from seqshard.runtime import ulysses
    from seqshard.runtime.local import whole_backward, whole_forward
    from seqshard.runtime.peer import stream_wait, stream_write

    S, H, E, R = args.seq, args.heads, args.head_dim, args.repeats
    s, g = S // n, H // n
    dev, bf = "cuda", torch.bfloat16
    nbytes = H * s * E * 2
    exchange, overlap = {}, {}

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    def event_ms(fn):
        """Isolated iterations, all ranks meeting before each; the slowest rank's median."""
        return timing.measure(fn, warmup=2, repeats=R, barrier=True, slowest="median").median_ms

    # 1. one exchange alone
    x = torch.randn(1, H, s, E, device=dev, dtype=bf)
    blocks = x.view(1, n, g, s, E).movedim(1, 0)  # [N, 1, g, s, E]: block j to rank j (contiguous)
    recv = torch.empty_like(blocks)
    dest = torch.empty(1, g, S, E, device=dev, dtype=bf)
    ex = ulysses._plan_exchange(group, None, 1, H, H, "contig", s, x.device, 1, "nccl")
    exchange["nccl"] = event_ms(lambda: dist.all_to_all_single(recv, blocks))
    exchange["layout copy"] = event_ms(lambda: ulysses._arrivals_to_positions(recv, dest, ex.runs))
    x3 = torch.randn(n, 3, 1, g, s, E, device=dev, dtype=bf)
    recv3 = torch.empty_like(x3)
    exchange["nccl ×3 stacked, per tensor"] = event_ms(
        lambda: dist.all_to_all_single(recv3, x3)) / 3
    x3 = recv3 = None
    sends = [torch.randn_like(blocks) for _ in range(3)]
    recvs = [torch.empty_like(blocks) for _ in range(3)]

    def batched():  # one batch of point-to-point sends and receives
        ops = []
        for a, b in zip(sends, recvs):
            b[rank].copy_(a[rank])
            for step in range(1, n):
                to, frm = (rank + step) % n, (rank - step) % n
                ops += [dist.P2POp(dist.isend, a[to], group=group, group_peer=to),
                        dist.P2POp(dist.irecv, b[frm], group=group, group_peer=frm)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    exchange["nccl ×3 as one batch of sends and receives, per tensor"] = event_ms(batched) / 3

    def coalesced():
        with dist._coalescing_manager(group, x.device, async_ops=True) as cm:
            for a, b in zip(sends, recvs):
                dist.all_to_all_single(b, a, group=group)
        cm.wait()
    try:
        exchange["nccl ×3 coalesced, per tensor"] = event_ms(coalesced) / 3
    except Exception as error:  # noqa: BLE001 - a variant torch may not support
        log(f"[overlap] coalesced all-to-alls failed: {error}")
    sends = recvs = None
    log(f"[overlap] nccl {exchange['nccl']:.3f} ms, layout copy {exchange['layout copy']:.3f}, "
        f"stacked per tensor {exchange['nccl ×3 stacked, per tensor']:.3f}")

    exp = ulysses._plan_exchange(group, None, 1, H, H, "contig", s, x.device, 1, "peer")
    ref = dest.clone()  # NCCL's arrivals in position order (the layout copy above)
    dest.fill_(float("nan"))
    ulysses._start_to_heads(blocks, dest, exp).wait()
    exchange["peer matches nccl"] = bool(torch.equal(dest, ref))
    exchange["peer"] = event_ms(lambda: ulysses._start_to_heads(blocks, dest, exp).wait())
    dests = [torch.empty_like(dest) for _ in range(3)]

    def three():
        pending = [ulysses._start_to_heads(blocks, d, exp) for d in dests]
        for p in pending:
            p.wait()
    exchange["peer ×3 in a row, per tensor"] = event_ms(three) / 3
    log(f"[overlap] peer {exchange['peer']:.3f} ms (matches nccl: {exchange['peer matches nccl']}), "
        f"×3 per tensor {exchange['peer ×3 in a row, per tensor']:.3f}")

    # the copy engines alone: pulls from staged peers, and the staging copy
    staged = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
    handle = symm_mem.rendezvous(staged, group.group_name)
    handle.get_buffer(rank, blocks.shape, bf).copy_(blocks)
    torch.cuda.synchronize()
    dist.barrier()
    peers = [(rank + i) % n for i in range(1, n)]
    streams = [torch.cuda.Stream(priority=-1) for _ in peers]

    def pulls(streams, join=True):
        cur = torch.cuda.current_stream()
        for i, p in enumerate(peers):
            st = streams[i % len(streams)]
            st.wait_stream(cur)
            src = handle.get_buffer(p, blocks.shape, bf)[rank]  # [1, g, s, E]
            with torch.cuda.stream(st):
                for h in range(g):
                    dest[0, h, p * s:(p + 1) * s].copy_(src[0, h])
        if join:
            for st in set(streams):
                cur.wait_stream(st)
    exchange["ce pull, 3 streams"] = event_ms(lambda: pulls(streams))
    exchange["ce pull, 1 stream"] = event_ms(lambda: pulls(streams[:1]))
    slot = handle.get_buffer(rank, blocks.shape, bf)
    exchange["stage (memcpy)"] = event_ms(lambda: slot.copy_(blocks))
    gbs = 3 / 4 * nbytes / 1e9
    log(f"[overlap] ce pull {exchange['ce pull, 3 streams']:.3f} ms "
        f"({gbs / exchange['ce pull, 3 streams'] * 1e3:.0f} GB/s in), 1 stream "
        f"{exchange['ce pull, 1 stream']:.3f}, stage {exchange['stage (memcpy)']:.3f}")

    # a signal round trip between ranks 0 and 1 (the others wait at the barrier)
    flags = symm_mem.empty(4, dtype=torch.int32, device=dev)
    flags.zero_()
    ptrs = list(symm_mem.rendezvous(flags, group.group_name).buffer_ptrs)
    torch.cuda.synchronize()
    dist.barrier()
    trips = 200
    if rank in (0, 1):
        st = torch.cuda.current_stream()

        def round_trips():
            for i in range(1, trips + 1):
                if rank == 0:
                    stream_write(st, ptrs[1], i)
                    stream_wait(st, ptrs[0], i)
                else:
                    stream_wait(st, ptrs[1], i)
                    stream_write(st, ptrs[0], i)
        # once, no warm-up (the flags count up), on two ranks: this rank's time
        ms = timing.measure(round_trips, repeats=1).median_ms
        exchange["signal round trip (us)"] = ms * 1e3 / trips
        exchange["signal values ok"] = int(flags[rank].item()) == trips
    dist.barrier()
    if rank == 0:
        log(f"[overlap] signal round trip {exchange['signal round trip (us)']:.1f} us, "
            f"ok {exchange['signal values ok']}")

    # 2. attention beside traffic (every rank on its own GPU at once)
    if args.exchange_only:
        return finish(args, rank, n, exchange, overlap)
    qh, kh, vh, do = (torch.randn(1, g, S, E, device=dev, dtype=bf) for _ in range(4))
    scale = E ** -0.5

    def attention(q=qh, k=kh, v=vh, d=do):
        out, lse = whole_forward(q, k, v, causal=True, seq_len=None, scale=scale, backend="cudnn")
        whole_backward(d, q, k, v, out, lse, causal=True, seq_len=None, scale=scale,
                       backend="cudnn")

    def in_chunks(count):
        parts = [tuple(t[:, c * g // count:(c + 1) * g // count].contiguous()
                       for t in (qh, kh, vh, do)) for c in range(count)]
        return lambda: [attention(*p) for p in parts]

    side = torch.cuda.Stream(priority=-1)
    big = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)
    n_exchanges = 8  # Ulysses' exchanges in one fwd+bwd step

    # each starts its traffic on side streams and returns what makes the current stream wait for it
    def ce_local():
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            for _ in range(n_exchanges):
                big2.copy_(big)
        return lambda: cur.wait_stream(side)

    def ce_pulls():
        cur = torch.cuda.current_stream()
        for _ in range(n_exchanges):
            pulls(streams, join=False)
        return lambda: [cur.wait_stream(st) for st in streams]

    def nccl_a2a():
        works = [dist.all_to_all_single(recv, blocks, async_op=True) for _ in range(n_exchanges)]
        return lambda: [w.wait() for w in works]

    traffic = {"copy engine, local copies": ce_local, "copy engine, pulls from peers": ce_pulls,
               "NCCL all-to-all": nccl_a2a}

    def beside(start):
        def run():
            join = start()
            attention()
            join()
        return run
    # GPU clocks drift over minutes of full load: every variant is timed once per round, in turn
    variants = {"attention alone": attention, "attention in 2 head chunks": in_chunks(2),
                "attention in 4 head chunks": in_chunks(4),
                **{f"traffic alone: {k}": (lambda f=f: f()()) for k, f in traffic.items()},
                **{f"attention beside: {k}": beside(f) for k, f in traffic.items()}}
    timed = timing.measure(variants, warmup=2, repeats=R, barrier=True, slowest="each")
    rounds = {k: t.times_ms for k, t in timed.items()}
    med = {k: t.median_ms for k, t in timed.items()}
    alone = med["attention alone"]
    overlap.update({k: med[k] for k in ("attention alone", "attention in 2 head chunks",
                                         "attention in 4 head chunks")})
    overlap["rounds"] = rounds
    for name in traffic:
        t_alone, t_beside = med[f"traffic alone: {name}"], med[f"attention beside: {name}"]
        cost = (t_beside - alone) / t_alone
        overlap[name] = dict(traffic_alone_ms=t_alone, attention_beside_ms=t_beside, cost=cost)
        log(f"[overlap] {name}: alone {t_alone:.2f} ms, attention beside it {t_beside:.2f} ms "
            f"(alone {alone:.2f}), cost {cost:.2f}")

    return finish(args, rank, n, exchange, overlap, n_exchanges)


def finish(args, rank, n, exchange, overlap, n_exchanges=0) -> int:
    S, H, E = args.seq, args.heads, args.head_dim
    s, g = S // n, H // n
    nbytes, gbs = H * s * E * 2, 3 / 4 * H * s * E * 2 / 1e9
    if rank == 0:
        date = report.stamp()
        meta = dict(date=date, device=f"{n}x {torch.cuda.get_device_name()}", torch=torch.__version__,
                    nccl=".".join(map(str, torch.cuda.nccl.version())), seq=S, heads=H, head_dim=E,
                    command=" ".join(["torchrun", f"--nproc-per-node={n}", *sys.argv]))
        mb = nbytes / 2 ** 20
        lines = [f"# Moving Ulysses' bytes, alone and beside attention ({meta['device']}, torch "
                 f"{meta['torch']}, NCCL {meta['nccl']})", "", f"`{meta['command']}`", "",
                 f"## One exchange towards heads: [1, {H}, {s}, {E}] bf16 per rank ({mb:.0f} MB, "
                 "3/4 to peers); slowest rank's median", "", "| what | ms | GB/s per GPU out |",
                 "|---|---|---|"]
        for k, v in exchange.items():
            if isinstance(v, float) and "(us)" not in k:
                rate = f"{gbs / v * 1e3:.0f}" if k not in ("layout copy", "stage (memcpy)") else ""
                lines.append(f"| {k} | {v:.3f} | {rate} |")
        lines += ["", f"Signal round trip (stream memory ops, GPU 0 ↔ 1): "
                  f"{exchange.get('signal round trip (us)', float('nan')):.1f} µs; values ok: "
                  f"{exchange.get('signal values ok')}. Copy-engine exchange equals NCCL's bit for "
                  f"bit: {exchange['peer matches nccl']}.", "",
                 ]
        if overlap:
            lines += [
                 f"## Attention ({g} heads × {S}, cuDNN fwd+bwd) beside {n_exchanges} exchanges' "
                 "traffic", "",
                 f"Alone {overlap['attention alone']:.2f} ms; in 2 head chunks one after another "
                 f"{overlap['attention in 2 head chunks']:.2f} ms, in 4 "
                 f"{overlap['attention in 4 head chunks']:.2f} ms. Medians of {args.repeats} rounds; "
                 "each round times every variant once, in turn (the slowest rank's time per "
                 "variant and round).", "",
                 "| traffic | traffic alone ms | attention beside it ms | cost |", "|---|---|---|---|"]
        for k, v in overlap.items():
            if isinstance(v, dict) and "cost" in v:
                lines.append(f"| {k} | {v['traffic_alone_ms']:.2f} | {v['attention_beside_ms']:.2f} "
                             f"| {v['cost']:.2f} |")
        lines += ["", "cost = (attention beside − attention alone) / traffic alone: the share of "
                  "the traffic's own time that overlapping still costs (< 1: hiding it pays)."]
        text = "\n".join(lines) + "\n"
        report.write_json_and_markdown(args.out, f"overlap-{date}{args.tag}",
                                       dict(meta=meta, exchange=exchange, overlap=overlap), text)
        print(text)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
