"""What the attention ops share: input checks, option defaults, and their registration.

Every algorithm is a pair of `torch.library` custom ops with fake implementations, so generated
code and torch.compile see one opaque node per attention call:

    seqshard::<name>(q, k, v, *options)                 -> (out, lse, *saved)
    seqshard::<name>_backward(dout, *saved', *options)  -> (dq, dk, dv)

`register_attention_op` writes both ops and their autograd once. Only `out` is differentiable.
`FORWARD_OPS` lists the forward ops registered so far: what a selective recompute keeps
(`selective.py`).

Structured masks (masks.py) enter every op as its last options, `positions`, `segments`,
`key_valid` (Tensor?) and `window` (int?): all None is plain causal or full attention, as before.
They are options, so they reach the backward op as they are and get no gradient.
"""

from __future__ import annotations

import torch

from seqshard.runtime.backends import select_backend
from seqshard.runtime.layout import check_local_len

__all__ = ["check_attention_inputs", "check_mask_inputs", "resolve_options", "fresh_like",
           "lse_like", "register_attention_op", "unpack_pair", "FORWARD_OPS"]

FORWARD_OPS: list = []
"""The forward op of every attention algorithm registered (`torch.ops.seqshard.<name>.default`)."""


def check_attention_inputs(q, k, v, *, world: int, order: str, seq_len: int | None,
                           algorithm: str) -> None:
    """ValueError naming the fix for shards that do not fit the convention or the layout."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"{algorithm}: expected q [b, h, s, e] and k, v [b, hk, s, e] of one shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{algorithm}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, "
                         "local sequence length and head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{algorithm}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} "
                         "kv heads")
    check_local_len(order, world, q.shape[2])
    padded = world * q.shape[2]
    if seq_len is not None and not 1 <= seq_len <= padded:
        raise ValueError(f"{algorithm}: seq_len={seq_len} must be in [1, {padded}] (the padded global "
                         f"length: {world} ranks × {q.shape[2]} local tokens)")


def check_mask_inputs(q, *, world: int, seq_len: int | None, positions, segments, window,
                      key_valid, algorithm: str):
    """(positions, segments, window, key_valid) of MASKS.md checked, on q's device as int64 /
    bool [B or 1, S] with S the valid global length; ValueError naming the fix."""
    length = world * q.shape[2] if seq_len is None else seq_len
    batch = q.shape[0]

    def per_token(name, x, dtype):
        if x is None:
            return None
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] not in (1, batch) \
                or x.shape[1] != length:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{algorithm}: {name} must be [{batch} or 1, {length}]: one entry per "
                             f"token of the whole global sequence, padding excluded (seq_len), in "
                             f"natural order, on every rank; got {got}")
        # key_valid may come as an integer 0/1 attention_mask; ids and positions are integers
        if x.dtype.is_floating_point or x.dtype.is_complex or (x.dtype == torch.bool
                                                                and dtype != torch.bool):
            kind = "a bool (or integer 0/1)" if dtype == torch.bool else "an integer"
            raise ValueError(f"{algorithm}: {name} must be {kind} tensor, got {x.dtype}")
        return x.to(device=q.device, dtype=dtype)

    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"{algorithm}: window must be a positive int (keys with position within "
                         f"window - 1 before the query's are visible), got {window!r}")
    return (per_token("positions", positions, torch.int64),
            per_token("segments", segments, torch.int64), window,
            per_token("key_valid", key_valid, torch.bool))


def resolve_options(q, scale: float | None, backend: str | None) -> tuple[float, str]:
    """Default scale 1/sqrt(e); the local backend for q's device, dtype and head dim."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return scale, select_backend(q.device, q.dtype, q.shape[-1], override=backend)


def fresh_like(x: torch.Tensor) -> torch.Tensor:
    """An empty contiguous tensor of x's shape and dtype: fake implementations must promise the
    strides the real op returns (fresh, contiguous), not those of a possibly transposed input."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def lse_like(q: torch.Tensor) -> torch.Tensor:
    """An empty lse for q's rows ([b, h, s], fp32; fp64 for fp64 q): for fake implementations."""
    return q.new_empty(q.shape[:-1], dtype=torch.promote_types(q.dtype, torch.float32))


def _fake_out_lse(q, k, v, *options):
    return fresh_like(q), lse_like(q)


def _fake_grads(dout, q, k, v, *rest):
    return fresh_like(q), fresh_like(k), fresh_like(v)


def register_attention_op(name: str, forward, backward, *, saves: str = "inputs",
                          fake=_fake_out_lse, backward_fake=_fake_grads) -> None:
    """Register the custom ops `name` (e.g. 'seqshard::ring_attention') and `name`_backward, their
    fake implementations and the autograd formula that joins them.

    `forward` and `backward` are typed functions: their annotations are the ops' schemas.
        saves='inputs'   forward(q, k, v, *options) -> (out, lse)
                         backward(dout, q, k, v, out, lse, *options) -> (dq, dk, dv)
        saves='outputs'  forward(q, k, v, *options) -> (out, lse, *saved)
                         backward(dout, *saved, kv_heads, *options) -> (dq, dk, dv)
    ('outputs': the forward returns what its backward needs, e.g. Ulysses' head-layout tensors.)
    The default fakes give fresh (out, lse) like q and (dq, dk, dv) like q, k, v.
    """
    assert saves in ("inputs", "outputs"), saves
    op = torch.library.custom_op(name, forward, mutates_args=())
    backward_op = torch.library.custom_op(f"{name}_backward", backward, mutates_args=())
    op.register_fake(fake)
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        if saves == "inputs":
            ctx.save_for_backward(*inputs[:3], *output)
            ctx.kv_heads = ()
        else:
            ctx.save_for_backward(*output[2:])
            ctx.kv_heads = (inputs[1].shape[1],)
        ctx.options = inputs[3:]
        ctx.mark_non_differentiable(*output[1:])
        # no zero-filled gradients for lse and the saved tensors (Ulysses: 4 tensors the size of
        # the inputs, filled on every step)
        ctx.set_materialize_grads(False)

    def differentiate(ctx, dout, *_unused):
        unused = [None] * len(ctx.options)
        if dout is None:
            return None, None, None, *unused
        dq, dk, dv = backward_op(dout, *ctx.saved_tensors, *ctx.kv_heads, *ctx.options)
        return dq, dk, dv, *unused

    op.register_autograd(differentiate, setup_context=setup_context)
    namespace, op_name = name.split("::")
    FORWARD_OPS.append(getattr(getattr(torch.ops, namespace), op_name).default)


def unpack_pair(pair: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed [2, ...] (dk, dv) buffer as two tensors of `dtype` that do not alias each other
    (custom-op outputs must not): the first is always a fresh copy."""
    return pair[0].to(dtype, copy=True), pair[1].to(dtype)
