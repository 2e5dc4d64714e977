"""The machine a plan runs on: GPUs, the links between them, and how a device mesh maps onto both.

    Cluster(gpu=GPU(...), gpus=128, levels=((nvlink, 8), (infiniband, 16)))
    Cluster.preset("h200", gpus=4)          # numbers measured on our 4×H200 machine
    Cluster.parse("h100x1024")              # 128 nodes × 8, NVLink inside, IB NDR across
    Cluster.load("calibrated.json")         # written by `seqshard calibrate`

Units everywhere: seconds, bytes, FLOP/s, bytes/s. A bandwidth table maps a message size in
bytes to the bus bandwidth one GPU reaches (nccl-tests' `busbw`); a rate table maps the local
sequence length an attention kernel sees to its forward+backward FLOP/s. Tables interpolate
linearly in log(x) and are flat beyond their end points (see `symbolic.log_interp`).

Mesh mapping: ranks are laid out row-major over the mesh and fill nodes in order, so the last
mesh axis is the innermost (rank = i·8 + j on a (16, 8) mesh). `axis_link(mesh_shape, axis)`
gives one `Link` for the collectives along an axis: its own level's link when the groups stay in
one unit (a node), a combination when they cross units (see `axis_link`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from seqshard.costmodel.symbolic import Table, log_interp

__all__ = ["GPU", "Link", "Cluster", "COLLECTIVES", "PRESETS"]

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")
"""The collectives a `Link` has a bandwidth table for."""

_FORMAT = "seqshard-cluster/1"


def _table(value, what: str) -> Table:
    """Validate a table and return it as a tuple of (x, y) float pairs."""
    try:
        points = tuple((float(x), float(y)) for x, y in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of (x, y) pairs, got {value!r}") from None
    if not points:
        raise ValueError(f"{what} needs at least one (x, y) point")
    if any(x <= 0 or y <= 0 for x, y in points):
        raise ValueError(f"{what} must have positive x and y, got {points}")
    if any(a[0] >= b[0] for a, b in zip(points, points[1:])):
        raise ValueError(f"{what} must have strictly increasing x, got {[x for x, _ in points]}")
    return points


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive number, got {value!r}")


def _fraction(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{type(obj).__name__}.{name} must lie in [0, 1], got {value!r}")


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


@dataclass(frozen=True, kw_only=True)
class Link:
    """One interconnect level, seen from one GPU: bus bandwidth per collective and latency."""

    name: str
    """For people and for the names of symbolic table lookups, e.g. "nvlink", "ib-ndr"."""
    latency: float
    """Seconds per algorithm step (one ring hop, one tree level, one peer of an all-to-all)."""
    all_gather: Table
    """Bus bandwidth per GPU in bytes/s vs message size in bytes (the gathered output)."""
    reduce_scatter: Table
    """Bus bandwidth per GPU in bytes/s vs message size in bytes (the unreduced input)."""
    all_reduce: Table
    """Bus bandwidth per GPU in bytes/s vs message size in bytes (the buffer)."""
    all_to_all: Table
    """Bus bandwidth per GPU in bytes/s vs message size in bytes (each rank's send buffer)."""
    send_recv: Table
    """Bandwidth per GPU and direction in bytes/s vs message size, while every rank sends to its
    ring neighbour and receives from the other one (one ring-attention step)."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("Link.name must be a non-empty string")
        _positive(self, "latency")
        for kind in COLLECTIVES:
            object.__setattr__(self, kind, _table(getattr(self, kind), f"Link({self.name}).{kind}"))

    def table(self, kind: str) -> Table:
        """The bandwidth table of collective `kind` (one of `COLLECTIVES`)."""
        tables = {"all_gather": self.all_gather, "reduce_scatter": self.reduce_scatter,
                  "all_reduce": self.all_reduce, "all_to_all": self.all_to_all,
                  "send_recv": self.send_recv}
        if kind not in tables:
            raise ValueError(f"unknown collective {kind!r}; use one of {COLLECTIVES}")
        return tables[kind]

    def bus_bandwidth(self, kind: str, size):
        """Bus bandwidth in bytes/s of collective `kind` for a message of `size` bytes."""
        return log_interp(self.table(kind), size, f"busbw_{kind}_{self.name}")

    def __str__(self):
        return (f"{self.name} (AG {_si(self.all_gather[-1][1], 'B/s')}, "
                f"A2A {_si(self.all_to_all[-1][1], 'B/s')}, {self.latency * 1e6:.3g} µs/step)")


@dataclass(frozen=True, kw_only=True)
class GPU:
    """One accelerator: compute rates, memory bandwidth and capacity."""

    name: str
    """For people, e.g. "H200"."""
    matmul_bf16: float
    """Dense bf16 (and fp16) matmul rate in FLOP/s that a large GEMM reaches."""
    matmul_fp32: float
    """Dense fp32 matmul rate in FLOP/s (no TF32: PyTorch's default for matmul)."""
    hbm_bandwidth: float
    """Device memory bandwidth in bytes/s, counting bytes read plus bytes written (a copy)."""
    hbm_capacity: float
    """Device memory in bytes."""
    attention_causal: Table
    """Causal attention forward+backward FLOP/s (FlashAttention's count) vs the local sequence
    length the kernel sees. Also used for forward-only attention."""
    attention_full: Table
    """Non-causal attention forward+backward FLOP/s vs the local sequence length."""
    attention_head_dim: Table = ((128.0, 1.0),)
    """Attention rate relative to the tables above vs the head dim (1 at the head dim the tables
    were measured at, 128): kernels with smaller heads do less work per byte and reach less.
    Measured by `seqshard calibrate`; flat beyond its end points."""
    attention_backend: str = "cudnn"
    """The local attention kernel the three tables above describe, and so the one plans are
    priced at: "cudnn" (PyTorch's cuDNN SDPA), "fa4" (FlashAttention-4), ... as the runtime's
    backends are named. The runtime picks fa4 on sm90+ when flash-attn-4 is installed, cuDNN
    otherwise; `seqshard calibrate` measures the one it picks and keeps the other here."""
    attention_kernels: tuple = ()
    """Rates of other kernels: ((name, attention_causal, attention_full, attention_head_dim), ...).
    `with_attention_backend(name)` prices one of them instead."""
    matmul_efficiency: float = 1.0
    """Fraction of `matmul_*` that the planner's matmuls reach (1: the rates are measured GEMMs)."""
    pointwise_efficiency: float = 0.068
    """Fraction of the matmul rate that pointwise ops reach on their FLOPs (they run on the vector
    units: fp32 67 of 989 TFLOP/s on H100/H200). Such ops are nearly always memory bound."""
    reduction_efficiency: float = 0.034
    """Fraction of the matmul rate that reductions (sum, max, norms) reach on their FLOPs."""
    attention_block_efficiency: float = 0.9
    """Fraction of the attention rate reached when one attention is computed block by block and
    the partials merged (ring, token ring): kernels that also return lse, per-call overheads.
    ANCHORS: PyTorch's ring on 4×H200 reaches 477 of a 535 TFLOP/s ideal; ring-flash-attn's
    zigzag ring reports 90.2% of ideal on 8×H800."""
    overlap_slowdown: float = 0.12
    """Fraction of compute throughput lost while a collective runs beside it: NCCL's kernels take
    SMs and memory bandwidth (about 16 of 132 SMs). An overlapped step that computes for c and
    communicates for t takes max(t, c + overlap_slowdown·t)."""
    fused_bandwidth_efficiency: float = 1.0
    """Fraction of `hbm_bandwidth` that the fused pointwise chains of a compiled layer reach
    (Inductor's Triton kernels), on the bytes the cost model counts for them
    (`strategies.costs._fused_work`: each tensor from outside a chain read once, each output
    read outside it written once; backward `compute.BACKWARD_FACTOR` × forward). Measured by
    `seqshard calibrate` (a residual add + RMSNorm and SwiGLU's silu·mul compiled, forward and
    backward, at a bandwidth-bound size): what it reached over that count, so it also carries
    what the count misses. Presets: 1.0 (chains priced at the copy bandwidth); may exceed 1."""
    fused_loss_efficiency: float = 1.0
    """Speed of the fused LM-head + cross-entropy kernel (`codegen/kernels/linear_ce.py`)
    relative to its formula (`strategies.costs._fused_loss_work`: three GEMMs at the matmul rate,
    one pass over the logits at `hbm_bandwidth`): predicted time = formula / this. Measured by
    `seqshard calibrate` (the kernel forward + backward at the Llama-3.2-1B head at 16K tokens
    on a GPU); presets 1.0 (the formula as is)."""
    host_bandwidth: float = 50e9
    """Bytes/s between this GPU and pinned host memory, one direction (PCIe Gen5 x16: 64 GB/s
    line rate). Estimate, not measured here; prices optimizer state offloaded to the host."""
    host_memory_bandwidth: float = 25e9
    """Bytes/s of host memory this GPU's share of the CPUs reaches in an optimizer step (a
    2-socket node of 8 GPUs, ~200 GB/s that a vectorized CPU AdamW reaches). Estimate."""
    host_capacity: float = 256 * 2**30
    """Host memory per GPU in bytes (an 8-GPU node with 2 TiB). Estimate."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("GPU.name must be a non-empty string")
        _positive(self, "matmul_bf16", "matmul_fp32", "hbm_bandwidth", "hbm_capacity",
                  "matmul_efficiency", "pointwise_efficiency", "reduction_efficiency",
                  "attention_block_efficiency", "fused_bandwidth_efficiency",
                  "fused_loss_efficiency")
        _fraction(self, "matmul_efficiency", "pointwise_efficiency", "reduction_efficiency",
                  "attention_block_efficiency", "overlap_slowdown")
        for name in ("attention_causal", "attention_full", "attention_head_dim"):
            object.__setattr__(self, name, _table(getattr(self, name), f"GPU({self.name}).{name}"))
        kernels = []
        for entry in self.attention_kernels:
            try:
                kernel, causal, full, head_dim = entry
            except (TypeError, ValueError):
                raise ValueError(f"GPU({self.name}).attention_kernels entries are (name, causal "
                                 f"table, full table, head dim table), got {entry!r}") from None
            what = f"GPU({self.name}).attention_kernels[{kernel!r}]"
            kernels.append((str(kernel), _table(causal, f"{what} causal"), _table(full, f"{what} full"),
                            _table(head_dim, f"{what} head dim")))
        names = [self.attention_backend] + [k[0] for k in kernels]
        if not self.attention_backend or len(set(names)) != len(names):
            raise ValueError(f"GPU({self.name}): attention kernel names must be non-empty and "
                             f"distinct, got {names}")
        object.__setattr__(self, "attention_kernels", tuple(kernels))

    def matmul_rate(self, dtype_bytes: int = 2) -> float:
        """Dense matmul FLOP/s for elements of `dtype_bytes` (2: bf16/fp16, 4: fp32)."""
        if dtype_bytes == 2:
            return self.matmul_bf16
        if dtype_bytes == 4:
            return self.matmul_fp32
        raise ValueError(f"no matmul rate for {dtype_bytes}-byte elements; use 2 (bf16) or 4 (fp32)")

    def attention_rate(self, length, causal: bool, head_dim=128):
        """Attention forward+backward FLOP/s at local sequence length `length` (symbolic ok) and
        head dim `head_dim`."""
        table = self.attention_causal if causal else self.attention_full
        kind = "causal" if causal else "full"
        rate = log_interp(table, length, f"attn_rate_{kind}_{self.name}")
        if len(self.attention_head_dim) > 1:
            factor = log_interp(self.attention_head_dim, head_dim, f"attn_head_dim_{self.name}")
            if factor != 1:  # at the tables' own head dim the rate stays the table's lookup
                rate = rate * factor
        return rate

    def with_attention_backend(self, name: str) -> GPU:
        """This GPU with its attention priced at kernel `name`'s rates (one of
        `attention_backend` and the names in `attention_kernels`)."""
        if name == self.attention_backend:
            return self
        known = {k[0]: k for k in self.attention_kernels}
        if name not in known:
            raise ValueError(f"GPU {self.name} has no attention rates for {name!r}; it has "
                             f"{[self.attention_backend, *known]} (`seqshard calibrate` measures "
                             "the kernels installed on the machine)")
        current = (self.attention_backend, self.attention_causal, self.attention_full,
                   self.attention_head_dim)
        _, causal, full, head_dim = known[name]
        return replace(self, attention_backend=name, attention_causal=causal, attention_full=full,
                       attention_head_dim=head_dim,
                       attention_kernels=(current, *(k for k in self.attention_kernels if k[0] != name)))

    def __str__(self):
        return (f"{self.name} ({_si(self.matmul_bf16, 'FLOP/s')} bf16, "
                f"{_si(self.hbm_bandwidth, 'B/s')}, {self.hbm_capacity / 2**30:.0f} GiB)")


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """GPUs joined by a hierarchy of links.

    `levels` goes from the innermost out: `((nvlink, 8), (infiniband, 16))` means 8 GPUs joined
    by NVLink form a node, and 16 nodes are joined by InfiniBand. The counts multiply to `gpus`.
    """

    gpu: GPU
    """Every GPU of the cluster is this one."""
    gpus: int
    """Number of GPUs."""
    levels: tuple[tuple[Link, int], ...]
    """(link, how many units of the level below it joins), innermost first."""

    def __post_init__(self):
        if not isinstance(self.gpu, GPU):
            raise ValueError(f"Cluster.gpu must be a GPU, got {type(self.gpu).__name__}")
        if not (isinstance(self.gpus, int) and self.gpus >= 1):
            raise ValueError(f"Cluster.gpus must be a positive int, got {self.gpus!r}")
        levels = tuple((link, count) for link, count in self.levels)
        if not levels:
            raise ValueError("Cluster.levels needs at least one (link, count) level")
        for link, count in levels:
            if not isinstance(link, Link) or not (isinstance(count, int) and count >= 1):
                raise ValueError("each Cluster level must be (Link, positive int), "
                                 f"got ({link!r}, {count!r})")
        if math.prod(count for _, count in levels) != self.gpus:
            counts = " × ".join(str(count) for _, count in levels)
            raise ValueError(f"Cluster.levels counts multiply to {counts} = "
                             f"{math.prod(c for _, c in levels)}, not gpus={self.gpus}; "
                             "make the product of the level counts equal the number of GPUs")
        object.__setattr__(self, "levels", levels)

    @property
    def gpus_per_node(self) -> int:
        """GPUs joined by the innermost link."""
        return self.levels[0][1]

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    def __str__(self):
        levels = " × ".join(f"{count} over {link.name}" for link, count in self.levels)
        return f"{self.gpus} × {self.gpu.name} = {levels}"

    # --- presets --------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, *, gpus: int = 8, gpus_per_node: int = 8) -> Cluster:
        """A cluster of `gpus` GPUs of a known kind ("h200", "h100", "a100").

        Up to `gpus_per_node` GPUs form one node over NVLink; more must be a multiple of it and
        fill nodes joined by InfiniBand (NDR 400 Gb/s per GPU; HDR 200 Gb/s for A100).
        """
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"no cluster preset {name!r}; use one of {sorted(PRESETS)} "
                             "or load a calibrated JSON with Cluster.load(path)")
        gpu, nvlink, network = PRESETS[key]
        if not (isinstance(gpus, int) and gpus >= 1):
            raise ValueError(f"gpus must be a positive int, got {gpus!r}")
        if gpus <= gpus_per_node:
            return cls(gpu=gpu, gpus=gpus, levels=((nvlink, gpus),))
        if gpus % gpus_per_node:
            raise ValueError(f"{gpus} GPUs do not fill nodes of {gpus_per_node}; use a multiple "
                             f"of {gpus_per_node} or at most {gpus_per_node}")
        return cls(gpu=gpu, gpus=gpus, levels=((nvlink, gpus_per_node), (network, gpus // gpus_per_node)))

    def with_attention_backend(self, name: str) -> Cluster:
        """This cluster with its GPUs' attention priced at kernel `name` (`GPU.with_attention_backend`),
        e.g. `Cluster.preset("h200", gpus=4).with_attention_backend("fa4")`."""
        return replace(self, gpu=self.gpu.with_attention_backend(name))

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """"h100x1024" → `preset("h100", gpus=1024)`; a path ending in .json → `load(path)`."""
        if text.endswith(".json"):
            return cls.load(text)
        m = re.fullmatch(r"([a-z0-9]+)x(\d+)", text.strip().lower())
        if not m:
            raise ValueError(f"cannot read cluster {text!r}; write KINDxGPUS such as 'h200x8' "
                             f"or 'h100x1024' (kinds: {sorted(PRESETS)}), or a path to a .json")
        return cls.preset(m.group(1), gpus=int(m.group(2)))

    # --- mesh mapping ---------------------------------------------------------------------

    def axis_group_size(self, mesh_shape: tuple[int, ...], axis: int) -> int:
        """Number of ranks in one group along `axis` of a mesh of `mesh_shape`."""
        return mesh_shape[self._check_mesh(mesh_shape, axis)]

    def axis_link(self, mesh_shape: tuple[int, ...], axis: int) -> Link:
        """The link that collectives along `axis` of a row-major mesh over this cluster see.

        Take the group containing rank 0 (ranks j·stride, j < n, stride = product of the later
        mesh sizes) and count k_i, its members inside one unit of level i (one node for i = 0;
        k_{-1} = 1, the outermost k is n). Level i's link carries traffic when k_i > k_{i-1}.
        For each collective the bus bandwidth is the smallest over those levels of

            ring collectives (all-gather, reduce-scatter, all-reduce):  k_{i-1} · B_i
                every one of the k_{i-1} members in a unit below has its own port, and NCCL's
                rings cross each unit boundary once per channel;
            all-to-all:  (n-1)/(k_0-1) · B_0 inside a node, (n-1)/(n-k_{i-1}) · B_i above it
                a GPU sends (n-1)/n of its buffer, of which NVLink carries the (k_0-1)/n bound
                for its node and each level above carries all (n-k_{i-1})/n leaving the unit;
            send/recv (one ring step):  B_i
                the ring's slowest hop decides the step.

        and the latency per step is the largest over those levels. A group inside one node
        gets its node's link unchanged; a group of one GPU per node gets the network's.
        Tables are combined on the union of their message sizes (pointwise minimum).
        """
        axis = self._check_mesh(mesh_shape, axis)
        n = mesh_shape[axis]
        stride = math.prod(mesh_shape[axis + 1:])
        members, unit = [], 1  # members[i] = k_i
        for _, count in self.levels:
            unit *= count
            members.append(min(n, -(-unit // stride)))  # j with j·stride < unit
        used = [(i, link, below)
                for i, ((link, _), k, below) in enumerate(zip(self.levels, members, [1] + members[:-1]))
                if k > below]
        if not used:  # a group of one rank: nothing moves
            return self.levels[0][0]
        if len(used) == 1 and used[0][2] == 1:  # one level, one member per unit below it
            return used[0][1]

        def factor(kind: str, level: int, below: int) -> float:
            if kind == "send_recv":
                return 1.0
            if kind == "all_to_all":
                return (n - 1) / ((members[0] - 1) if level == 0 else (n - below))
            return float(below)

        tables = {}
        for kind in COLLECTIVES:
            sizes = sorted({x for _, link, _ in used for x, _ in link.table(kind)})
            tables[kind] = tuple(
                (x, min(factor(kind, i, below) * link.bus_bandwidth(kind, x) for i, link, below in used))
                for x in sizes)
        name = "+".join(link.name for _, link, _ in used)
        return Link(name=name, latency=max(link.latency for _, link, _ in used), **tables)

    def _check_mesh(self, mesh_shape, axis) -> int:
        """Validate a mesh over this cluster; return `axis` counted from 0."""
        if not mesh_shape or any(not isinstance(s, int) or s < 1 for s in mesh_shape):
            raise ValueError(f"mesh shape must be positive ints, got {mesh_shape!r}")
        if math.prod(mesh_shape) != self.gpus:
            raise ValueError(f"mesh {tuple(mesh_shape)} has {math.prod(mesh_shape)} ranks but the "
                             f"cluster has {self.gpus} GPUs; use a mesh whose sizes multiply to {self.gpus}")
        if not -len(mesh_shape) <= axis < len(mesh_shape):
            raise ValueError(f"axis {axis} out of range for a {len(mesh_shape)}-D mesh")
        return axis % len(mesh_shape)

    # --- JSON -----------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({
            "format": _FORMAT,
            "gpus": self.gpus,
            "gpu": _to_dict(self.gpu),
            "levels": [{"count": count, "link": _to_dict(link)} for link, count in self.levels],
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a seqshard cluster file (format {data.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        try:
            return cls(gpu=GPU(**data["gpu"]), gpus=data["gpus"],
                       levels=tuple((Link(**lv["link"]), lv["count"]) for lv in data["levels"]))
        except (KeyError, TypeError) as e:  # a missing or unknown field
            raise ValueError(f"malformed cluster JSON: {e}") from None

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> Cluster:
        return cls.from_json(Path(path).read_text())


def _to_dict(obj) -> dict:
    return {f.name: (list(map(list, v)) if isinstance(v, tuple) else v)
            for f in fields(obj) for v in [getattr(obj, f.name)]}


# --- presets ---------------------------------------------------------------------------------
#
# H200: measured on our 4×H200 machine (docs/anchors.md, 2026-11-21, torch 2.11, NCCL, cuDNN
# SDPA), except the fields marked "datasheet". H100 and A100 have not been measured here: they
# are their public datasheet figures multiplied by the efficiencies the H200 measurements show
# (measured / datasheet), for compute, memory bandwidth and NVLink alike. Latencies and the
# InfiniBand efficiency are estimates. `seqshard calibrate` replaces all of it by measurements.

_MiB = 2**20
_BF16_EFF = 758e12 / 989e12     # H200 measured bf16 GEMM / datasheet dense bf16
_HBM_EFF = 4.15e12 / 4.8e12     # H200 measured copy / datasheet HBM3e bandwidth
_IB_EFF = 0.9                   # estimate: NCCL bus bandwidth / InfiniBand line rate, large messages


def _scaled(table, factor: float):
    return tuple((x, y * factor) for x, y in table)


# Attention rate vs head dim, relative to d128, on one H200 (bench/results/fa4-20261201-181805.md:
# B1 H32 MHA, causal, fwd+bwd, 32K and 128K tokens, each head dim's rate over d128's of the same
# run and kernel, the two lengths averaged). cuDNN d64: 396/528 = 0.750 at 32K, 436/538 = 0.810
# at 128K; d72: 298/528 = 0.564, 326/538 = 0.606. FA4 d64: 550/620 = 0.887, 536/622 = 0.862;
# d72: 476/620 = 0.768, 453/622 = 0.728 (timed; its d72 backward was found wrong, so the runtime
# does not run FA4 at d72, see runtime/backends.py). The fits of the Llama-3.2-1B rows (d64) of
# bench/results/memory-20261201-*.json agree: their attention ran at ~370-430 TFLOP/s (cuDNN
# through SDPA at world size 1), not at the d128 table's 517-544 it was priced at (step time
# 22-30% over the prediction there, 2-10% on the d128 Llama-3-8B rows).
_CUDNN_HEAD_DIM = ((64.0, (0.750 + 0.810) / 2), (72.0, (0.564 + 0.606) / 2), (128.0, 1.0))
# FA4 d96: head dim 72 zero-padded to 96 through the runtime (copies included), the runtime's mode
# at 72 (bench/results/fa4-20261201-210430.md): 412 and 440 TFLOP/s of d72's FLOPs at 32K and
# 128K causal, i.e. 549 and 587 at d96's, over d128's 621 and 613 in the same run.
_FA4_HEAD_DIM = ((64.0, (0.887 + 0.862) / 2), (72.0, (0.768 + 0.728) / 2),
                 (96.0, (549 / 621 + 587 / 613) / 2), (128.0, 1.0))

# H200 SXM 141 GB. Source: docs/anchors.md (measured), datasheet where marked.
_H200_GPU = GPU(
    name="H200",
    matmul_bf16=758e12,                          # bf16 matmul 8192³
    matmul_fp32=67e12 * _BF16_EFF,               # datasheet fp32 67 TFLOP/s × measured efficiency
    hbm_bandwidth=4.15e12,                       # device-to-device copy, read + write
    hbm_capacity=143771 * _MiB,                  # total memory as nvidia-smi reports it
    attention_causal=((8192, 517e12), (32768, 544e12), (131072, 535e12)),  # cuDNN SDPA fwd+bwd
    attention_full=((32768, 559e12), (131072, 559e12)),                    # cuDNN SDPA fwd+bwd
    attention_head_dim=_CUDNN_HEAD_DIM,
    attention_kernels=((
        "fa4",  # FlashAttention-4 4.0.0b36, fwd+bwd, d128 (docs/anchors.md "One H200", 2026-12-01)
        ((32768, 614e12), (131072, 612e12)),
        # full: bench/results/fa4-20261201-181805.md, "S=32K/128K MHA H32 d128 full", seqshard
        # fwd+bwd (644, 608 TFLOP/s; the estimate before it was cuDNN's × FA4/cuDNN causal)
        ((32768, 644e12), (131072, 608e12)),
        _FA4_HEAD_DIM,
    ),),
)
# NVLink 4 (NV18, 450 GB/s per direction), 4 GPUs, NCCL bus bandwidth. Source: docs/anchors.md.
# Reduce-scatter was not measured: a ring reduce-scatter moves the bytes of a ring all-gather.
_NVLINK4 = Link(
    name="nvlink",
    latency=2e-6,                                               # estimate
    all_gather=((256 * _MiB, 317e9),),
    reduce_scatter=((256 * _MiB, 317e9),),
    all_reduce=((256 * _MiB, 318e9),),
    all_to_all=((16 * _MiB, 119e9), (256 * _MiB, 272e9)),
    send_recv=((16 * _MiB, 84e9), (256 * _MiB, 261e9)),
)


def _network(name: str, line_rate: float) -> Link:
    bw = ((256 * _MiB, line_rate * _IB_EFF),)
    return Link(name=name, latency=5e-6, all_gather=bw, reduce_scatter=bw, all_reduce=bw,
                all_to_all=bw, send_recv=bw)


_IB_NDR = _network("ib-ndr", 400e9 / 8)   # ConnectX-7, 400 Gb/s per GPU (DGX/HGX H100, H200)
_IB_HDR = _network("ib-hdr", 200e9 / 8)   # ConnectX-6, 200 Gb/s per GPU (DGX A100)

# H100 SXM 80 GB. Source: datasheet (989 TFLOP/s bf16, 67 fp32, 3.35 TB/s, NVLink 4 as H200)
# × the H200 efficiencies above; same SMs and clocks as H200, so the same attention rates.
_H100_GPU = GPU(
    name="H100",
    matmul_bf16=989e12 * _BF16_EFF,
    matmul_fp32=67e12 * _BF16_EFF,
    hbm_bandwidth=3.35e12 * _HBM_EFF,
    hbm_capacity=81559 * _MiB,
    attention_causal=_H200_GPU.attention_causal,
    attention_full=_H200_GPU.attention_full,
    attention_head_dim=_H200_GPU.attention_head_dim,
    attention_kernels=_H200_GPU.attention_kernels,
)

# A100 SXM 80 GB. Source: datasheet (312 TFLOP/s bf16, 19.5 fp32, 2.04 TB/s, NVLink 3 at
# 300 GB/s per direction) × the H200 efficiencies above; attention scaled with the bf16 peak.
_A100_PEAK = 312e12 / 989e12
_A100_GPU = GPU(
    name="A100",
    matmul_bf16=312e12 * _BF16_EFF,
    matmul_fp32=19.5e12 * _BF16_EFF,
    hbm_bandwidth=2.039e12 * _HBM_EFF,
    hbm_capacity=81920 * _MiB,
    attention_causal=_scaled(_H200_GPU.attention_causal, _A100_PEAK),
    attention_full=_scaled(_H200_GPU.attention_full, _A100_PEAK),
    pointwise_efficiency=19.5 / 312,
    reduction_efficiency=19.5 / 312 / 2,
)
_NVLINK3 = Link(
    name="nvlink3",
    latency=_NVLINK4.latency,
    **{kind: _scaled(_NVLINK4.table(kind), 300 / 450) for kind in COLLECTIVES},
)

PRESETS: dict[str, tuple[GPU, Link, Link]] = {
    "h200": (_H200_GPU, _NVLINK4, _IB_NDR),
    "h100": (_H100_GPU, _NVLINK4, _IB_NDR),
    "a100": (_A100_GPU, _NVLINK3, _IB_HDR),
}
"""Preset name → (GPU, link inside a node, link across nodes)."""
