"""Compute time by roofline, the FLOP and byte counts of the op families, and model-state memory.

    op_time(flops, bytes, kind, gpu) = max(flops / (rate · efficiency[kind]), bytes / hbm_bandwidth)

`rate` is the GPU's dense matmul rate for the dtype (bf16 for pointwise and reductions, which
run on the vector units at a fraction of it: their efficiency), `bytes` counts reads plus writes
of device memory. Attention has its own measured rate table per local sequence length and
FlashAttention's FLOP count:

    forward   4 · B · H · S_q · S_k · d      (× 1/2 when causal)
    backward  2.5 × forward                 (forward + backward = 3.5 × forward)

Training: the backward of a matmul is two forward-sized matmuls (dX = dY·Wᵀ, dW = Xᵀ·dY), so
2× forward; see `BACKWARD_FACTOR` for the other kinds, and `Work.backward_factor` for ops whose
backward kernels are counted one by one (`cross_entropy`: PyTorch's passes over the logits;
`cast`).

All counters accept sympy sizes (see `symbolic`); every result is FLOPs, bytes or seconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from seqshard.costmodel.cluster import GPU
from seqshard.costmodel.symbolic import Num, fmt, smax

__all__ = ["KINDS", "BACKWARD_FACTOR", "ATTENTION_BACKWARD", "Work", "op_time", "matmul", "linear",
           "einsum", "pointwise", "reduction", "norm", "softmax", "cast", "cross_entropy",
           "CE_FORWARD_PASSES", "CE_BACKWARD_PASSES", "embedding", "attention_flops",
           "attention_time", "StateMemory", "model_state", "offload_step", "OPTIMIZERS",
           "optimizer_bytes", "optimizer_step"]

KINDS = ("matmul", "pointwise", "reduction")
"""Op kinds of the roofline: each has its own efficiency on the GPU."""

BACKWARD_FACTOR = {
    "matmul": 2.0,      # dX = dY·Wᵀ and dW = Xᵀ·dY: two forward-sized GEMMs
    "pointwise": 1.5,   # reads the saved input and dY, writes dX: 3 tensors where forward touched 2
    "reduction": 1.5,   # norm/softmax backward reads x (or y) and dY, writes dX
}
"""Backward work / forward work, per kind (FLOPs and bytes alike)."""

ATTENTION_BACKWARD = 2.5
"""Attention backward FLOPs / forward FLOPs (FlashAttention's count)."""


def op_time(flops, bytes, kind: str, gpu: GPU, *, dtype_bytes: int = 2):
    """Roofline seconds: max(flops / (rate · efficiency[kind]), bytes / gpu.hbm_bandwidth)."""
    if kind == "matmul":
        rate = gpu.matmul_rate(dtype_bytes) * gpu.matmul_efficiency
    elif kind == "pointwise":
        rate = gpu.matmul_bf16 * gpu.pointwise_efficiency
    elif kind == "reduction":
        rate = gpu.matmul_bf16 * gpu.reduction_efficiency
    else:
        raise ValueError(f"unknown op kind {kind!r}; use one of {KINDS} (attention: attention_time)")
    return smax(flops / rate, bytes / gpu.hbm_bandwidth)


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes (read + written) of one op, and the roofline it runs on."""

    flops: Num
    bytes: Num
    kind: str
    dtype_bytes: int = 2
    backward_factor: float | None = None
    """Backward work / forward work of this op when it is not its kind's `BACKWARD_FACTOR`
    (an op whose backward kernels are known: `cross_entropy`, `cast`)."""

    def time(self, gpu: GPU):
        """Seconds on `gpu` by `op_time`."""
        return op_time(self.flops, self.bytes, self.kind, gpu, dtype_bytes=self.dtype_bytes)

    def backward(self) -> Work:
        """The backward of this op: FLOPs and bytes × `backward_factor` (default
        `BACKWARD_FACTOR[kind]`)."""
        f = BACKWARD_FACTOR[self.kind] if self.backward_factor is None else self.backward_factor
        return Work(self.flops * f, self.bytes * f, self.kind, self.dtype_bytes)

    def __add__(self, other: Work) -> Work:
        if (self.kind, self.dtype_bytes, self.backward_factor) != \
                (other.kind, other.dtype_bytes, other.backward_factor):
            raise ValueError(f"cannot add {self.kind} work in {self.dtype_bytes}-byte elements to "
                             f"{other.kind} work in {other.dtype_bytes}-byte elements (or with "
                             "another backward); time them apart")
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.kind, self.dtype_bytes,
                    self.backward_factor)

    def __str__(self):
        return f"{self.kind}: {fmt(self.flops)} FLOP, {fmt(self.bytes)} B"


# --- counters ------------------------------------------------------------------------------

def matmul(m, k, n, *, batch=1, shared_rhs: bool = False, dtype_bytes: int = 2) -> Work:
    """[batch, m, k] @ [batch, k, n] (or a shared [k, n]): 2·batch·m·k·n FLOPs."""
    rhs = k * n if shared_rhs else batch * k * n
    return Work(2 * batch * m * k * n, (batch * m * k + rhs + batch * m * n) * dtype_bytes,
                "matmul", dtype_bytes)


def linear(tokens, in_features, out_features, *, bias: bool = False, dtype_bytes: int = 2) -> Work:
    """x[tokens, in] @ W[in, out] (+ b): 2·tokens·in·out FLOPs; reads x and W, writes y."""
    w = matmul(tokens, in_features, out_features, shared_rhs=True, dtype_bytes=dtype_bytes)
    if not bias:
        return w
    return Work(w.flops + tokens * out_features, w.bytes + out_features * dtype_bytes,
                "matmul", dtype_bytes)


def einsum(equation: str, *shapes, dtype_bytes: int = 2) -> Work:
    """An einsum such as "bsd,de->bse": 2 · (product of every index size) FLOPs when some index
    is contracted (a matmul), else the product (a pointwise op); bytes read and written."""
    m = re.fullmatch(r"\s*([a-zA-Z,\s]+)->\s*([a-zA-Z]*)\s*", equation)
    if not m:
        raise ValueError(f"einsum equation {equation!r} must be explicit, like 'bsd,de->bse'")
    inputs = [s.strip() for s in m.group(1).split(",")]
    output = m.group(2)
    if len(inputs) != len(shapes):
        raise ValueError(f"{equation!r} has {len(inputs)} operands but {len(shapes)} shapes were given")
    size = {}
    for letters, shape in zip(inputs, shapes):
        if len(letters) != len(shape):
            raise ValueError(f"operand {letters!r} of {equation!r} has {len(letters)} indices, "
                             f"shape {tuple(shape)} has {len(shape)}")
        for c, s in zip(letters, shape):
            if c in size and size[c] != s:
                raise ValueError(f"index {c!r} of {equation!r} is {size[c]} in one operand, {s} in another")
            size[c] = s
    contracted = set(size) - set(output)
    volume = math.prod(size.values())
    moved = sum(math.prod(shape) for shape in shapes) + math.prod(size[c] for c in output)
    if contracted:
        return Work(2 * volume, moved * dtype_bytes, "matmul", dtype_bytes)
    return Work(volume, moved * dtype_bytes, "pointwise", dtype_bytes)


def pointwise(numel, *, inputs: int = 1, outputs: int = 1, flops_per_element=1,
              dtype_bytes: int = 2) -> Work:
    """An elementwise op over `numel` elements reading `inputs` and writing `outputs` tensors."""
    return Work(numel * flops_per_element, numel * (inputs + outputs) * dtype_bytes,
                "pointwise", dtype_bytes)


def reduction(numel_in, numel_out, *, dtype_bytes: int = 2) -> Work:
    """A sum/max/mean of `numel_in` elements into `numel_out`: one FLOP per input element."""
    return Work(numel_in, (numel_in + numel_out) * dtype_bytes, "reduction", dtype_bytes)


def norm(numel, hidden, *, dtype_bytes: int = 2) -> Work:
    """A fused RMSNorm/LayerNorm over the last dim `hidden`: ~5 FLOPs per element (square,
    sum, scale, weight, bias); reads x and the weight, writes y."""
    return Work(5 * numel, (2 * numel + hidden) * dtype_bytes, "reduction", dtype_bytes)


def softmax(numel, *, dtype_bytes: int = 2) -> Work:
    """A fused softmax: ~5 FLOPs per element (max, subtract, exp, sum, divide); reads and writes once."""
    return Work(5 * numel, 2 * numel * dtype_bytes, "reduction", dtype_bytes)


def cast(numel, *, in_bytes: int, out_bytes: int) -> Work:
    """A dtype conversion (`x.float()`): reads `in_bytes`, writes `out_bytes` an element; its
    backward is the conversion back (reads the gradient in `out_bytes`, writes `in_bytes`): the
    same traffic. On [T, V] logits upcast for the loss (bf16 → fp32) that is 6 bytes an element
    each way, where pricing it as a 2-byte pointwise op counted 4 and 6."""
    return Work(numel, numel * (in_bytes + out_bytes), "pointwise", min(in_bytes, out_bytes),
                backward_factor=1.0)


CE_FORWARD_PASSES = 4
"""Passes over the [rows, classes] input of PyTorch's CUDA cross-entropy forward when a row does
not fit in shared memory (128K classes in fp32: 513 KB a row, over the 48 KB per block the
dispatch checks): log_softmax's `cunn_SoftMaxForwardGmem` reads the row for its max, again for
the sum of exponentials, and a third time to write the output (3 reads + 1 write); nll_loss then
gathers one value a row (aten/src/ATen/native/cuda/SoftMax.cu; rows of at most 1024 classes
take the one-pass persistent kernel instead)."""

CE_BACKWARD_PASSES = 5
"""...and of its backward: nll_loss's backward writes a zero [rows, classes] gradient and
scatters one value a row (1 write); `cunn_SoftMaxBackward` reads the gradient for its row sum,
then reads it and the saved output and writes the input's gradient (3 reads + 1 write)."""


def cross_entropy(numel, *, dtype_bytes: int = 4) -> Work:
    """`F.cross_entropy` of logits of `numel` elements ([rows, classes]) in eager PyTorch on a
    GPU: log_softmax + nll_loss, memory bound, `CE_FORWARD_PASSES` passes over the logits forward and
    `CE_BACKWARD_PASSES` backward (a fused softmax, `softmax`, counts 2 and 3). ~5 FLOPs an
    element (max, subtract, exp, sum, log). Checked against bench/results/codegen-20261201-
    192005.md: the plain LM head + loss (32K tokens, d 4096, V 128256, the logits upcast) took
    202.9 ms on an H200; its three GEMMs at 758 TFLOP/s take 136.3 ms, this and the casts 48.6 ms
    more (185 ms, 0.91 of it), the 2-pass count before it 30.4 ms (167 ms, 0.82)."""
    return Work(5 * numel, CE_FORWARD_PASSES * numel * dtype_bytes, "reduction", dtype_bytes,
                backward_factor=CE_BACKWARD_PASSES / CE_FORWARD_PASSES)


def embedding(tokens, dim, *, dtype_bytes: int = 2, index_bytes: int = 8) -> Work:
    """A table lookup: reads `tokens` rows of `dim` and the indices, writes the rows; no FLOPs."""
    return Work(0, tokens * (2 * dim * dtype_bytes + index_bytes), "pointwise", dtype_bytes)


# --- attention -----------------------------------------------------------------------------

def attention_flops(batch, heads, q_len, kv_len, head_dim, *, causal: bool, training: bool = False):
    """FlashAttention's count: 4·B·H·S_q·S_k·d forward, ×1/2 causal, ×3.5 with backward."""
    flops = 4 * batch * heads * q_len * kv_len * head_dim
    if causal:
        flops = flops / 2
    return flops * (1 + ATTENTION_BACKWARD) if training else flops


def attention_time(batch, heads, q_len, kv_len, head_dim, *, causal: bool, gpu: GPU,
                   training: bool = False, length=None):
    """Seconds of one attention kernel: FLOPs / gpu.attention_rate(length, causal).

    `length` is the local sequence length the kernel sees (default `q_len`); the GPU's rate
    table is measured forward+backward and is used for forward-only time too.
    """
    rate = gpu.attention_rate(q_len if length is None else length, causal, head_dim)
    return attention_flops(batch, heads, q_len, kv_len, head_dim, causal=causal, training=training) / rate


# --- model state -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StateMemory:
    """Bytes per GPU of parameters, gradients and optimizer state."""

    params: Num
    grads: Num
    optimizer: Num

    @property
    def total(self):
        return self.params + self.grads + self.optimizer

    def __str__(self):
        gib = 2**-30
        return (f"{fmt(self.total, gib, '.2f')} GiB (params {fmt(self.params, gib, '.2f')}, "
                f"grads {fmt(self.grads, gib, '.2f')}, optimizer {fmt(self.optimizer, gib, '.2f')})")


def model_state(n_params, *, training: bool = True, param_bytes: int = 2, grad_bytes: int | None = None,
                master_bytes: int | None = None, state_bytes: int = 4) -> StateMemory:
    """Memory of `n_params` parameters, with AdamW when training.

        params     n · param_bytes
        grads      n · grad_bytes                  (default: param_bytes)
        optimizer  n · (master_bytes + 2 · state_bytes)
                   AdamW's exp_avg and exp_avg_sq, plus an fp32 master copy when the parameters
                   are kept in a lower precision (master_bytes default: 4 if param_bytes < 4 else 0)
    """
    if not training:
        return StateMemory(n_params * param_bytes, 0, 0)
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    master_bytes = (4 if param_bytes < 4 else 0) if master_bytes is None else master_bytes
    return StateMemory(n_params * param_bytes, n_params * grad_bytes,
                       n_params * (master_bytes + 2 * state_bytes))


OPTIMIZERS = {
    "adamw": "AdamW in mixed precision: an fp32 master copy of lower-precision parameters and "
             "fp32 exp_avg and exp_avg_sq (16 bytes a parameter with bf16 parameters)",
    "adamw-pure": "AdamW with its state in the parameter dtype and no master copy, what "
                  "torch.optim.AdamW does on bf16 parameters (8 bytes a parameter in bf16)",
}
"""The optimizers a plan can price (`planner.plan(optimizer=...)`), with what each keeps."""


def optimizer_bytes(optimizer: str, param_bytes: int) -> dict:
    """`model_state` / `offload_step` keywords (master_bytes, state_bytes) of an optimizer of
    `OPTIMIZERS`: "adamw" {} (their defaults: fp32 master when parameters are narrower, fp32
    states); "adamw-pure" no master, states of `param_bytes`."""
    if optimizer == "adamw":
        return {}
    if optimizer == "adamw-pure":
        return dict(master_bytes=0, state_bytes=param_bytes)
    raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")


def optimizer_step(n_params, gpu: GPU, *, param_bytes: int = 2, grad_bytes: int | None = None,
                   master_bytes: int | None = None, state_bytes: int = 4):
    """Seconds of AdamW's step on the GPU (fused, bandwidth-bound): read the gradient, read and
    write exp_avg, exp_avg_sq and the master weights (the parameters themselves when there is no
    master copy), write the parameters.

        n · (grad + 4·state + 2·master + param bytes) / gpu.hbm_bandwidth   (master > 0)
        n · (grad + 4·state + 2·param bytes) / gpu.hbm_bandwidth            (no master)"""
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    master_bytes = (4 if param_bytes < 4 else 0) if master_bytes is None else master_bytes
    weights = 2 * master_bytes + param_bytes if master_bytes else 2 * param_bytes
    return n_params * (grad_bytes + 4 * state_bytes + weights) / gpu.hbm_bandwidth


def offload_step(n_params, gpu: GPU, *, param_bytes: int = 2, grad_bytes: int | None = None,
                 master_bytes: int | None = None, state_bytes: int = 4):
    """Seconds a step spends on optimizer state kept in host memory (ZeRO-Offload): gradients
    to the host, AdamW on the CPU, updated parameters back.

        copies  n · (grad_bytes + param_bytes) / gpu.host_bandwidth
        AdamW   n · (grad + 2·master + 4·state + param bytes) / gpu.host_memory_bandwidth
                (read the gradient; read and write the master weights, exp_avg, exp_avg_sq;
                write the parameter)

    Not overlapped: an upper bound (ZeRO-Offload overlaps the gradient copies with backward)."""
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    master_bytes = (4 if param_bytes < 4 else 0) if master_bytes is None else master_bytes
    copies = n_params * (grad_bytes + param_bytes) / gpu.host_bandwidth
    adam = n_params * (grad_bytes + 2 * master_bytes + 4 * state_bytes + param_bytes)
    return copies + adam / gpu.host_memory_bandwidth
