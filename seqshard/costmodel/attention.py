"""Time, traffic and memory of each distributed attention algorithm, per GPU of one group.

Every algorithm is a function

    algo(shape, *, training, group_size, link, gpu, **options) -> AttentionCost

mirroring the runtime's `<algo>_attention` (runtime/*.py) and its options: `order` ("contig" or
"zigzag", the sequence layout; default "contig" as in the runtime), `head_stride` (allgather).

over an `AttentionShape` (B, H, Hk, S global, E, dtype bytes, causal) whose sizes may be sympy
expressions. N is the group size, S_l = S/N the local sequence, d the dtype bytes, A = 4 the
bytes of fp32 partials (outputs, lse, accumulated gradients stay in fp32), and

    overlap(c, t) = max(t, c + slowdown·t)

the time of a step that computes for c while a transfer of t runs beside it (`GPU.overlap_slowdown`:
NCCL's kernels take SMs). Kernel time is FLOPs / rate(local length the kernel sees, causal), and
for algorithms that compute attention block by block and merge partials (ring, tokenring) the
rate is scaled by `GPU.attention_block_efficiency`.

ring       K/V blocks travel around the ring (send/recv, `link`). Zigzag order gives each rank
           chunks i and 2N-1-i, so the causal work is balanced: step 0 is a causal S_l block,
           every other step half a full block (S_l × S_l/2). Forward:
               overlap(c0, t_kv) + (N-2)·overlap(c1 + m, t_kv) + (c1 + m) + α
           with t_kv = send_recv(2·B·Hk·S_l·E·d) and m the fp32 merge of a block's (out, lse).
           Backward also passes the fp32 dK/dV accumulators one hop per step and returns them
           to their owner at the end (exposed): per step t_kv + t_dkv, plus t_dkv + α.
           In contig order a causal ring waits every step for the rank with a full block.
allgather  all-gather K and V (at kv heads) over the group, then attend local queries to all
           keys (the kernel sees the local query length: S/2N per zigzag chunk); the backward
           gathers again and reduce-scatters fp32 dK/dV. With head_chunks=G the gather of head
           group g+1 overlaps the compute of group g (G = ⌈Hk / head_stride⌉):
               t_ag/G + (G-1)·overlap(c/G, t_ag/G) + c/G
ulysses    all-to-all q and packed k, v from sequence- to head-split, local attention over the
           full S with H/N heads, all-to-all o back; backward: dO in, dQ and packed dK, dV out.
           Each all-to-all copies its buffer in and out. Needs H % N == 0. K/V move at kv heads
           when N divides Hk; otherwise (GQA/MQA with Hk < N) they are all-gathered at Hk heads
           and each rank keeps the heads it needs (backward: a reduce-scatter), as the runtime.
hybrid     Ulysses over one axis (N_u) × ring over another (N_r), with group_size=(N_u, N_r) and
           link=(link_u, link_r): the Ulysses exchange on the S/N_r tokens of a ring rank, then
           a ring over N_r on H/N_u heads.
tokenring  queries travel and partial (out, lse) return to their owners (both directions of
           the link at once): per step max(t_q, t_o); backward moves (q, dO, out) and lse forward
           and fp32 dQ partials back, dK/dV stay local.
local      heads already split over the group: attention over the full S with H/N heads, no
           communication.

The costs of a result stay apart: `compute` (kernels, merges, copies: seconds if nothing
overlapped), `comm` (all transfers back to back, seconds), `forward`/`backward` (predicted
seconds with overlap), `comm_bytes` (bytes one GPU sends), `extra_memory` (peak bytes held beyond
the local shards of q, k, v, o while the op runs). Inference has backward = 0.

Checked against docs/anchors.md (4×H200, causal B1 H32 d128, fwd+bwd, per GPU): at 128K the model
predicts ring 474 / Ulysses 517 TFLOP/s against 477 / 517 measured; at 256K 486 / 526 against
475 / 513 (tests/test_costmodel_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from seqshard.costmodel.cluster import GPU, Link
from seqshard.costmodel.collectives import all_gather, all_to_all, bytes_sent, reduce_scatter, send_recv
from seqshard.costmodel.compute import ATTENTION_BACKWARD, attention_flops, attention_time
from seqshard.costmodel.symbolic import Num, fmt, is_symbolic, log_interp, smax

__all__ = ["ACC_BYTES", "AttentionShape", "AttentionCost", "ring", "allgather", "ulysses", "hybrid",
           "tokenring", "local", "ulysses_kv_route", "ulysses_kv_heads", "padded_head_dims",
           "ALGORITHMS"]

ACC_BYTES = 4
"""Bytes per element of partial outputs, lse and accumulated gradients (fp32)."""


@dataclass(frozen=True, kw_only=True)
class AttentionShape:
    """One attention op, globally: q [B, H, S, E], k and v [B, Hk, S, E]."""

    batch: Num
    """B (int or sympy expression)."""
    heads: Num
    """H, query heads."""
    kv_heads: Num
    """Hk, key/value heads (GQA: H % Hk == 0; MQA: 1)."""
    seq: Num
    """S, the global sequence length."""
    head_dim: Num
    """E, the head dimension."""
    dtype_bytes: int = 2
    """Bytes per element of q, k, v, o (2: bf16)."""
    causal: bool = True
    """Causal mask."""

    def __post_init__(self):
        sizes = {"batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads,
                 "seq": self.seq, "head_dim": self.head_dim}
        for name, value in sizes.items():
            if not is_symbolic(value) and not value > 0:
                raise ValueError(f"AttentionShape.{name} must be positive, got {value!r}")
        if not is_symbolic(self.heads, self.kv_heads) and self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.dtype_bytes not in (1, 2, 4):
            raise ValueError(f"dtype_bytes must be 1, 2 or 4, got {self.dtype_bytes!r}")

    def flops(self, training: bool):
        """FLOPs of the whole op over all GPUs (FlashAttention's count)."""
        return attention_flops(self.batch, self.heads, self.seq, self.seq, self.head_dim,
                               causal=self.causal, training=training)

    def __str__(self):
        kind = "causal" if self.causal else "full"
        return (f"B{self.batch} H{self.heads}/{self.kv_heads} S{self.seq} E{self.head_dim} "
                f"{kind} {8 * self.dtype_bytes}-bit")


@dataclass(frozen=True, kw_only=True)
class AttentionCost:
    """Predicted cost per GPU of one distributed attention op (seconds and bytes)."""

    algorithm: str
    """Which algorithm, with its options, e.g. "ring(zigzag)"."""
    forward: Num
    """Seconds of the forward, overlap included."""
    backward: Num
    """Seconds of the backward, overlap included (0 for inference)."""
    compute: Num
    """Seconds of kernels, merges and copies, as if nothing overlapped."""
    comm: Num
    """Seconds of all transfers back to back."""
    comm_bytes: Num
    """Bytes one GPU sends."""
    extra_memory: Num
    """Peak bytes held beyond the local shards of q, k, v, o while the op runs."""

    @property
    def time(self):
        """Seconds, forward + backward."""
        return self.forward + self.backward

    def __str__(self):
        return (f"{self.algorithm}: {fmt(self.time, 1e3, '.2f')} ms "
                f"(compute {fmt(self.compute, 1e3, '.2f')} ms, comm {fmt(self.comm, 1e3, '.2f')} ms, "
                f"{fmt(self.comm_bytes, 1e-9, '.3g')} GB sent, "
                f"+{fmt(self.extra_memory, 2**-30, '.3g')} GiB)")


def _chain(algorithm: str, *parts: AttentionCost) -> AttentionCost:
    """Costs of steps that run one after another (their buffers live together)."""
    return AttentionCost(
        algorithm=algorithm,
        forward=sum(p.forward for p in parts), backward=sum(p.backward for p in parts),
        compute=sum(p.compute for p in parts), comm=sum(p.comm for p in parts),
        comm_bytes=sum(p.comm_bytes for p in parts), extra_memory=sum(p.extra_memory for p in parts))


def _div(a, b):
    """a / b, kept an int when both are ints and b divides a (head counts print as heads)."""
    return a // b if isinstance(a, int) and isinstance(b, int) and a % b == 0 else a / b


def _alone(n) -> bool:
    return not is_symbolic(n) and n == 1


def _overlap(c, t, gpu: GPU):
    """A step computing for c while a transfer of t runs: max(t, c + slowdown·t)."""
    return smax(t, c + gpu.overlap_slowdown * t)


def _hbm(nbytes, gpu: GPU):
    return nbytes / gpu.hbm_bandwidth


def _merge_bytes(elements, dtype_bytes: int):
    """Memory traffic of merging a block's output into the fp32 accumulator per element, as
    codegen/kernels/accumulate.py's one-pass kernel does it on a GPU: read the accumulator and
    the block output, write the accumulator; the lse is E times smaller. (The torch fallback on CPUs makes
    ~3 passes over the fp32 accumulator.)"""
    return elements * (2 * ACC_BYTES + dtype_bytes)


def _accumulate_bytes(elements, dtype_bytes: int):
    """Memory traffic of acc(fp32) += block gradient: read both, write the accumulator."""
    return elements * (2 * ACC_BYTES + dtype_bytes)


def _check_order(order: str) -> None:
    if order not in ("contig", "zigzag"):
        raise ValueError(f"order must be 'contig' or 'zigzag', got {order!r}")


def _kernel_times(shape: AttentionShape, n, gpu: GPU, order: str):
    """Forward seconds per rank of the diagonal step and of every other ring step, at the
    GPU's block-wise attention efficiency."""
    B, H, E = shape.batch, shape.heads, shape.head_dim
    sl = shape.seq / n
    eff = gpu.attention_block_efficiency
    diag = attention_time(B, H, sl, sl, E, causal=shape.causal, gpu=gpu)
    if shape.causal and order == "zigzag":  # half a block: all q × the early kv chunk, or vice versa
        off = attention_time(B, H, sl, sl / 2, E, causal=False, gpu=gpu, length=sl / 2)
    else:  # a full block (causal and contig: some rank has one every step, the rest wait)
        off = attention_time(B, H, sl, sl, E, causal=False, gpu=gpu)
    return diag / eff, off / eff


def _single(shape: AttentionShape, training: bool, gpu: GPU, algorithm: str, heads_split=1):
    B, H, S, E = shape.batch, shape.heads, shape.seq, shape.head_dim
    fwd = attention_time(B, H / heads_split, S, S, E, causal=shape.causal, gpu=gpu)
    bwd = ATTENTION_BACKWARD * fwd if training else 0
    return AttentionCost(algorithm=algorithm, forward=fwd, backward=bwd, compute=fwd + bwd,
                         comm=0, comm_bytes=0, extra_memory=0)


# --- algorithms --------------------------------------------------------------------------------

def local(shape: AttentionShape, *, training: bool, group_size, gpu: GPU, link: Link | None = None):
    """Heads already split over the group: full-length attention on H/N heads, no communication.
    (`link` is accepted, and unused, so that every algorithm takes the same keywords.)"""
    n = group_size
    if not is_symbolic(shape.heads, n) and shape.heads % n:
        raise ValueError(f"local attention over {n} ranks needs heads ({shape.heads}) divisible by {n}")
    return _single(shape, training, gpu, "local", heads_split=n)


def _block_terms(shape: AttentionShape, n, gpu: GPU, order: str):
    """What the block-by-block algorithms (ring, tokenring) share: elements of a local q and of
    a local K (or V), lse rows, dtype bytes, the first and later step's kernel time, and the
    fp32 merge of one block's partial (out, lse)."""
    B, H, Hk, E, d = shape.batch, shape.heads, shape.kv_heads, shape.head_dim, shape.dtype_bytes
    sl = shape.seq / n
    q_el, kv_el, rows = B * H * sl * E, B * Hk * sl * E, B * H * sl
    c0, c1 = _kernel_times(shape, n, gpu, order)
    return q_el, kv_el, rows, d, c0, c1, _hbm(_merge_bytes(q_el, d), gpu)


def ring(shape: AttentionShape, *, training: bool, group_size, link: Link, gpu: GPU,
         order: str = "contig") -> AttentionCost:
    """Ring attention (runtime/ring.py): K/V blocks pass around the group; see the module
    docstring for the schedule. `order` is the sequence layout, as in the runtime."""
    _check_order(order)
    n = group_size
    name = f"ring({order})"
    if _alone(n):
        return _single(shape, training, gpu, name)
    q_el, kv_el, rows, d, c0, c1, m = _block_terms(shape, n, gpu, order)
    kv_bytes = 2 * kv_el * d
    t_kv = send_recv(kv_bytes, n, link)
    forward = _overlap(c0, t_kv, gpu) + (n - 2) * _overlap(c1 + m, t_kv, gpu) + c1 + m + link.latency
    cost = AttentionCost(
        algorithm=name, forward=forward, backward=0,
        compute=c0 + (n - 1) * (c1 + m), comm=(n - 1) * t_kv, comm_bytes=(n - 1) * kv_bytes,
        extra_memory=kv_bytes + (q_el + rows) * ACC_BYTES)  # next K/V block; fp32 out and lse
    if not training:
        return cost
    b0, b1 = ATTENTION_BACKWARD * c0, ATTENTION_BACKWARD * c1
    mb = _hbm(_accumulate_bytes(q_el + 2 * kv_el, d), gpu)  # dQ += ; dK, dV = received + block
    dkv_bytes = 2 * kv_el * ACC_BYTES
    t_dkv = send_recv(dkv_bytes, n, link)
    backward = (_overlap(b0, t_kv, gpu) + (n - 2) * _overlap(b1 + mb, t_kv + t_dkv, gpu)
                + _overlap(b1 + mb, t_dkv, gpu) + t_dkv + link.latency)
    return replace(
        cost, backward=backward,
        compute=cost.compute + b0 + (n - 1) * (b1 + mb),
        comm=cost.comm + (n - 1) * t_kv + n * t_dkv,
        comm_bytes=cost.comm_bytes + (n - 1) * kv_bytes + n * dkv_bytes,
        # next K/V block, dK/dV being sent and received, fp32 dQ
        extra_memory=smax(cost.extra_memory, kv_bytes + 2 * dkv_bytes + q_el * ACC_BYTES))


def allgather(shape: AttentionShape, *, training: bool, group_size, link: Link, gpu: GPU,
              order: str = "contig", head_stride: int | None = None) -> AttentionCost:
    """All-gather K/V (runtime/allgather.py): gather K/V at kv heads, attend local queries to all
    keys; the backward gathers again and reduce-scatters fp32 dK/dV. `head_stride` kv heads at a
    time (None: all at once): G = ⌈Hk / head_stride⌉ groups, the next group's gather (and the
    previous group's reduce-scatter) overlapping this group's compute."""
    _check_order(order)
    n, Hk = group_size, shape.kv_heads
    if head_stride is None:
        g = 1
    elif not (isinstance(head_stride, int) and head_stride >= 1) or is_symbolic(Hk):
        raise ValueError(f"head_stride must be a positive int with numeric kv_heads, got {head_stride!r}")
    else:
        g = -(-Hk // head_stride)
    name = "allgather" + (f"({order}, head_stride={head_stride})" if g > 1 else f"({order})")
    if _alone(n):
        return _single(shape, training, gpu, name)
    B, S, E, d = shape.batch, shape.seq, shape.head_dim, shape.dtype_bytes
    zigzag = shape.causal and order == "zigzag"
    q_len = S / (2 * n) if zigzag else S / n              # one kernel call per zigzag chunk
    imbalance = (2 * n - 1) / n if shape.causal and not zigzag else 1  # the last rank's share
    c = imbalance * shape.flops(training=False) / n / gpu.attention_rate(q_len, shape.causal,
                                                                         shape.head_dim)
    kv_full = 2 * B * Hk * S * E * d
    t_ag = all_gather(kv_full / g, n, link)
    buffers = 2 if g > 1 else 1  # the next group's gather in flight
    cost = AttentionCost(
        algorithm=name, forward=t_ag + (g - 1) * _overlap(c / g, t_ag, gpu) + c / g, backward=0,
        compute=c, comm=g * t_ag, comm_bytes=bytes_sent("all_gather", kv_full, n),
        extra_memory=buffers * kv_full / g)
    if not training:
        return cost
    b = ATTENTION_BACKWARD * c
    dkv_full = 2 * B * Hk * S * E * ACC_BYTES
    t_rs = reduce_scatter(dkv_full / g, n, link)
    backward = t_ag + (g - 1) * _overlap(b / g, t_ag + t_rs, gpu) + b / g + t_rs
    return replace(
        cost, backward=backward, compute=c + b, comm=cost.comm + g * (t_ag + t_rs),
        comm_bytes=2 * cost.comm_bytes + bytes_sent("reduce_scatter", dkv_full, n),
        extra_memory=buffers * (kv_full + dkv_full) / g)


def ulysses_kv_route(shape: AttentionShape, group_size) -> str:
    """How Ulysses over `group_size` ranks brings K/V to the head layout, as the runtime does
    (runtime/ulysses.py `kv_route`): "scatter" (all-to-all at kv heads) when N divides Hk, else
    an all-gather of K/V keeping one kv head ("one") or one per query head ("replicate")."""
    n, H, Hk = group_size, shape.heads, shape.kv_heads
    if is_symbolic(n, H, Hk):
        return "scatter"
    if H % n:
        raise ValueError(f"Ulysses over {n} ranks needs heads ({H}) divisible by {n}; "
                         "use ring, allgather or a hybrid with a smaller Ulysses degree")
    if Hk % n == 0:
        return "scatter"
    return "one" if (H // Hk) % (H // n) == 0 else "replicate"


def ulysses_kv_heads(shape: AttentionShape, group_size) -> Num:
    """K/V heads each rank holds after the Ulysses exchange (what a hybrid's ring then moves)."""
    n = group_size
    route = ulysses_kv_route(shape, n)
    if route == "scatter":
        return _div(shape.kv_heads, n)
    return 1 if route == "one" else _div(shape.heads, n)


def _head_exchange(shape: AttentionShape, training: bool, n, link: Link, gpu: GPU,
                   order: str) -> AttentionCost:
    """Ulysses' exchanges and their copies, without the attention itself.

    q and o: one all-to-all each at H heads; k, v packed: an all-to-all at Hk heads ("scatter"),
    or an all-gather of all Hk heads of the group's sequence ("one"/"replicate"; backward: a
    reduce-scatter). Every all-to-all copies its buffer in and out (runtime all_to_all_tensor),
    and zigzag adds one reordering copy of each exchanged tensor.
    """
    if _alone(n):
        return AttentionCost(algorithm="a2a", forward=0, backward=0, compute=0, comm=0,
                             comm_bytes=0, extra_memory=0)
    route = ulysses_kv_route(shape, n)
    per_head = shape.batch * shape.seq / n * shape.head_dim * shape.dtype_bytes  # [b, 1, s/N, e]
    q = shape.heads * per_head                      # q (or o) per rank: [b, h, s/N, e]
    kv_held = 2 * ulysses_kv_heads(shape, n) * n * per_head   # packed k, v after: [2, b, m, s, e]
    passes = 2 if training else 1                   # backward: dO, dQ; dK and dV packed
    # bytes copied (each copy reads and writes them): q and o in and out of their all-to-alls
    copied = 2 * 2 * q + (1 if order == "zigzag" else 0) * (2 * q + kv_held)
    if route == "scatter":
        kv = 2 * shape.kv_heads * per_head          # packed k, v per rank: [2, b, hk, s/N, e]
        t_kv = all_to_all(kv, n, link)
        sent_kv = bytes_sent("all_to_all", kv, n)
        copied += 2 * kv
        gathered = 0
    else:
        gathered = 2 * shape.kv_heads * n * per_head  # [2, b, hk, s, e] on every rank
        t_kv = all_gather(gathered, n, link)
        sent_kv = bytes_sent("all_gather", gathered, n)
        copied += kv_held                           # keep this rank's heads (index_select)
    t = 2 * all_to_all(q, n, link) + t_kv
    sent = 2 * bytes_sent("all_to_all", q, n) + sent_kv
    copy_time = _hbm(2 * copied, gpu)
    return AttentionCost(
        algorithm="a2a", forward=t + copy_time, backward=(passes - 1) * (t + copy_time),
        compute=passes * copy_time, comm=passes * t, comm_bytes=passes * sent,
        # head-layout q, k, v, o, and one exchange's staging copy of the largest of them
        extra_memory=2 * q + kv_held + smax(q, kv_held) + gathered)


def ulysses(shape: AttentionShape, *, training: bool, group_size, link: Link, gpu: GPU,
            order: str = "contig") -> AttentionCost:
    """DeepSpeed-Ulysses (runtime/ulysses.py): exchange to heads, full-length local attention over
    H/N heads, exchange back."""
    _check_order(order)
    n = group_size
    if _alone(n):
        return _single(shape, training, gpu, "ulysses")
    return _chain("ulysses", _head_exchange(shape, training, n, link, gpu, order),
                  _single(shape, training, gpu, "", heads_split=n))


def hybrid(shape: AttentionShape, *, training: bool, group_size: tuple, link: tuple, gpu: GPU,
           order: str = "contig") -> AttentionCost:
    """Ulysses over `group_size[0]` ranks (on `link[0]`) × ring over `group_size[1]` (`link[1]`),
    as runtime/ulysses.py `hybrid_attention`: the exchange on the S/N_r tokens of a ring rank,
    then a ring over N_r on H/N_u heads and the kv heads the exchange left."""
    _check_order(order)
    (nu, nr), (link_u, link_r) = group_size, link
    exchange = _head_exchange(replace(shape, seq=shape.seq / nr), training, nu, link_u, gpu, order)
    inner = replace(shape, heads=_div(shape.heads, nu), kv_heads=ulysses_kv_heads(shape, nu))
    ring_part = ring(inner, training=training, group_size=nr, link=link_r, gpu=gpu, order=order)
    return _chain(f"hybrid(ulysses {nu} × {ring_part.algorithm} {nr})", exchange, ring_part)


def tokenring(shape: AttentionShape, *, training: bool, group_size, link: Link, gpu: GPU,
              order: str = "contig") -> AttentionCost:
    """TokenRing (runtime/tokenring.py): q blocks travel one way while partial (out, lse) return
    straight to their owners, both directions of the link at once; K/V never move."""
    _check_order(order)
    n = group_size
    name = f"tokenring({order})"
    if _alone(n):
        return _single(shape, training, gpu, name)
    q_el, kv_el, rows, d, c0, c1, m = _block_terms(shape, n, gpu, order)
    q_bytes, o_bytes = q_el * d, q_el * d + rows * ACC_BYTES  # partial out in q's dtype, fp32 lse
    t_q, t_o = send_recv(q_bytes, n, link), send_recv(o_bytes, n, link)
    forward = (_overlap(c0, t_q, gpu) + (n - 2) * _overlap(c1 + m, smax(t_q, t_o), gpu)
               + _overlap(c1 + m, t_o, gpu) + t_o + link.latency)
    cost = AttentionCost(
        algorithm=name, forward=forward, backward=0,
        compute=c0 + (n - 1) * (c1 + m), comm=(n - 1) * (t_q + t_o),
        comm_bytes=(n - 1) * (q_bytes + o_bytes),
        extra_memory=q_bytes + 2 * o_bytes + (q_el + rows) * ACC_BYTES)  # q in; partials out, in; acc
    if not training:
        return cost
    b0, b1 = ATTENTION_BACKWARD * c0, ATTENTION_BACKWARD * c1
    # dK, dV accumulate at home; the owner adds each returning fp32 dQ partial
    mb = _hbm(_accumulate_bytes(2 * kv_el, d) + 3 * ACC_BYTES * q_el, gpu)
    bundle, dq_bytes = 3 * q_el * d + rows * ACC_BYTES, q_el * ACC_BYTES  # (q, dO, out), lse; dQ
    t_bundle, t_dq = send_recv(bundle, n, link), send_recv(dq_bytes, n, link)
    backward = (_overlap(b0, t_bundle, gpu) + (n - 2) * _overlap(b1 + mb, smax(t_bundle, t_dq), gpu)
                + _overlap(b1 + mb, t_dq, gpu) + t_dq + link.latency)
    return replace(
        cost, backward=backward,
        compute=cost.compute + b0 + (n - 1) * (b1 + mb),
        comm=cost.comm + (n - 1) * (t_bundle + t_dq),
        comm_bytes=cost.comm_bytes + (n - 1) * (bundle + dq_bytes),
        extra_memory=smax(cost.extra_memory, 2 * bundle + 2 * dq_bytes + 2 * kv_el * ACC_BYTES))


def padded_head_dims(gpu: GPU, runs: dict[int, int]) -> GPU:
    """`gpu` with attention at head dim d priced as its kernel running at head dim runs[d] (zero
    padding, as the runtime's fa4 backend does at head dims it was not checked at): FLOPs counted
    at d take the time of the padded FLOPs at runs[d]'s rate, so the head-dim factor at d becomes
    factor(runs[d]) · d / runs[d]. Give every head dim the model has (runs[d] = d when not
    padded): each becomes a point of `attention_head_dim`, so all of them stay priced exactly."""
    if all(d == r for d, r in runs.items()):
        return gpu
    table = gpu.attention_head_dim

    def factor(d):  # as GPU.attention_rate: a one-point table is no head-dim factor
        return log_interp(table, d, "") if len(table) > 1 else 1.0

    # the old knots and the run head dims' (on the old curve: no change there), then the padded
    points = {float(x): factor(x) for x, _ in table} | {float(r): factor(r) for r in runs.values()}
    points.update({float(d): factor(r) * d / r for d, r in runs.items()})
    return replace(gpu, attention_head_dim=tuple(sorted(points.items())))


ALGORITHMS = {
    "ring": ring,
    "allgather": allgather,
    "ulysses": ulysses,
    "hybrid": hybrid,
    "tokenring": tokenring,
    "local": local,
}
"""Algorithm name → cost function; the names of the runtime's `<name>_attention` functions."""
