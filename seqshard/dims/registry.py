"""The op-rule registry: one small function per op family says how factors flow through the op
and what splitting each factor means for it.

A rule receives a `RuleCtx` and returns the output signature (a tuple of signatures for ops that
return several tensors). It states facts with `ctx.F.unify(dim_a, dim_b)` and marks factors
with a `Role`:

- `LOCAL`  splitting the factor keeps the op local (the default for a factor the output has);
- `SUM`    the op sums over the factor: split inputs give partial sums (contractions, sum, mean);
- `WHOLE`  every rank needs the whole factor (softmax or norm over it, slicing or concatenating
           along it, an op with no rule);
- `SEQ`    the key/value sequence of attention: splitting it needs a distributed algorithm.

A factor of an input that the output does not have, and that the rule gave no role, is `WHOLE`:
when in doubt, never a wrong result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .factors import Dim, Factors, Sig


class Role(enum.IntEnum):
    LOCAL = 0
    SUM = 1
    SEQ = 2
    WHOLE = 3


RULES: dict = {}


def rule(*targets) -> Callable:
    """Register a rule for ATen op packets (`aten.view`) or overloads (`aten.view.default`)."""
    def deco(fn):
        for t in targets:
            RULES[t] = fn
        return fn
    return deco


def find_rule(target):
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    if packet in RULES:
        return RULES[packet]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        from .ops.pointwise_ops import pointwise
        return pointwise
    return None


@dataclass(frozen=True)
class AttentionDims:
    """What the dims of one attention node are for (set by the SDPA rule):
    q [*batch, heads, seq_q, head_dim], k and v [*batch, kv_heads, seq_k, head_dim]."""

    batch: tuple[Dim, ...]
    heads: Dim
    kv_heads: Dim
    seq_q: Dim
    seq_k: Dim
    head_dim: Dim


class UnsupportedOp(Exception):
    """Raised by a rule for a use of its op it cannot describe; the op runs replicated."""


@dataclass
class RuleCtx:
    F: Factors
    node: fx.Node
    sigs: dict                       # node → Sig (or list of Sigs for multi-output nodes)
    roles: list[tuple[Dim, Role]] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)  # facts for later stages (e.g. "mean_over")

    # ------------------------------------------------------------------ arguments
    def arg(self, key: int | str, default=None):
        """The op's argument by position or schema name, wherever the call put it."""
        schema = getattr(self.node.target, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        if isinstance(key, str):
            if key in self.node.kwargs:
                return self.node.kwargs[key]
            if key in names and names.index(key) < len(self.node.args):
                return self.node.args[names.index(key)]
            if key in names:
                d = schema.arguments[names.index(key)].default_value
                return default if d is None else d
            return default
        if key < len(self.node.args):
            return self.node.args[key]
        if key < len(names) and names[key] in self.node.kwargs:
            return self.node.kwargs[names[key]]
        return default

    def sig(self, x: fx.Node) -> Sig:
        return self.sigs[x]

    @staticmethod
    def shape(x) -> tuple[int, ...]:
        return tuple(int(s) for s in x.meta["val"].shape)

    def out_val(self):
        return self.node.meta["val"]

    def out_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.out_val().shape)

    def fresh_out(self):
        val = self.out_val()
        if isinstance(val, (list, tuple)):
            return [self.F.fresh_sig(v.shape) if isinstance(v, torch.Tensor) else None for v in val]
        return self.F.fresh_sig(val.shape)

    # ------------------------------------------------------------------ facts
    def mark(self, dims, role: Role) -> None:
        for d in dims:
            self.roles.append((tuple(d), role))

    def broadcast(self, sigs: list[Sig], shape: tuple[int, ...]) -> Sig:
        """Numpy broadcasting: dims aligned from the right are the same factor unless of size 1."""
        out = []
        for i in range(1, len(shape) + 1):
            dims = [s[-i] for s in sigs if len(s) >= i]
            n = shape[-i]
            full = [d for d in dims if self.F.dim_size(d) == n]
            if n == 1 or not full:
                out.append(full[0] if full else ())
                if n > 1:  # every input is 1 here but the output is n: a new factor
                    out[-1] = (self.F.new(n),)
                continue
            for d in full[1:]:
                self.F.unify(full[0], d)
            out.append(full[0])
        return tuple(reversed(out))


def norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0
