"""The rotary embedding into Ulysses' pack (`apply_plan(kernels=True)`).

Llama and HF rotate q and k just before attention,

    q' = q·cos + rotate_half(q)·sin,      rotate_half(x) = cat([-x[..., e/2:], x[..., :e/2]], -1)

~5 elementwise passes over q (mul, slice, neg, cat, mul, add) and as many over k, in forward and
again in backward. Where the plan runs that attention with Ulysses, the sequence → heads
all-to-all writes a send buffer from q and k anyway: `seqshard.runtime.ulysses_attention(q, k,
v, ..., cos=, sin=)` rotates them while it writes it (one kernel, kernels/a2a_layout.py) and
rotates dq, dk by the transpose on the way back. `fuse_rope` rewrites this rank's program to
that call:

    mul = q * cos;  slice_1 = q[..., e/2:];  neg = -slice_1;  slice_2 = q[..., :e/2]
    cat = cat([neg, slice_2], -1);  mul_1 = cat * sin;  q_rot = mul + mul_1
    (the same for k)
    out = ulysses_attention(q_rot, k_rot, v, group, ...)
        →   out = ulysses_attention(q, k, v, group, ..., cos = cos, sin = sin)

The match is made on the generated program, so what it replaces is exactly what this rank
computed; it is conservative, and leaves the graph as it is unless all of these hold:

  * q and k (the attention's first two arguments) are each the add of that pattern, in either
    operand order, with the slices at the half of the last dim (the dims counted for 4-D q);
  * q's and k's rotations read the same cos and the same sin (one value each, which is what the
    runtime receives), no redistribution between the rotation and the attention (the call
    reads the add itself), and every node of the pattern has no reader outside it (the rotated
    values are not needed elsewhere; the pre-rope q and k may have other readers: they stay);
  * the local cos and sin are [..., s, e] with leading dims of 1, s and e those of the local q
    and k (one row per local token: the broadcast the local ops did is the runtime's), of q's
    dtype (the ops' results keep q's dtype), and constants: nothing the loss differentiates
    (a parameter, an input that requires grad) is upstream of them.

Local shapes and dtypes come from the captured values behind the generated ones and the layouts
they have there (the sharder's `env` and cache). `rope_notes` lists the fused calls for `pm.code`
and `pm.explain` ("rope fused into ulysses pack").

Numerics: the rotation is computed in fp32 and rounded once; in fp32 it is the same arithmetic as
the model's ops (x1·c1 + (-x2)·s1 is x1·c1 - x2·s1 exactly), and so is the transposed one.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from .regions import in_layer

__all__ = ["fuse_rope", "rope_notes", "rotated_before", "NOTE"]

aten = torch.ops.aten
NOTE = "rope fused into ulysses pack"
_WHERE = ("(codegen/kernels/a2a_layout.py: q and k rotated while the sequence → heads send "
          "buffers are written, dq and dk by the transpose on the way back)")


def fuse_rope(program) -> list[fx.Node]:
    """Rewrite the Ulysses attention calls of `program.gm` whose q and k are rotated just before
    (module docstring) to take the pre-rope q, k and the tables; returns the calls rewritten."""
    from seqshard.runtime import ulysses_attention  # planning (`rotated_before`) loads no runtime

    sh, gm = program._sharder, program.gm
    values = _captured_values(sh)

    def local(v):  # (local shape, dtype, the captured node) of generated value v
        return _local(v, sh, values)

    fused = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not ulysses_attention \
                or len(n.args) < 3 or n.kwargs.get("cos") is not None:
            continue
        q, k = (_match(x, local, sh.cap) for x in n.args[:2])
        if q is None or k is None or (q[1], q[2]) != (k[1], k[2]):
            continue
        n.args = (q[0], k[0], *n.args[2:])
        n.kwargs = {**n.kwargs, "cos": q[1], "sin": q[2]}
        for pattern in {id(q[3]): q[3], id(k[3]): k[3]}.values():
            for node in pattern:  # readers first
                if not node.users:
                    gm.graph.erase_node(node)
        fused.append(n)
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _captured_values(sh) -> dict[fx.Node, tuple[fx.Node, tuple]]:
    """Generated value → (the captured node it holds, in which layout)."""
    values = {v: (c, sh.layout[c]) for c, v in sh.env.items()}
    values.update({v: (c, lay) for (c, lay), v in sh.cache.items()})
    return values


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _operands(node: fx.Node, target):
    """(a, b) of a two-operand call of `target` with nothing else passed (add: no alpha)."""
    if not _is(node, target) or len(node.args) != 2 or node.kwargs:
        return None
    return node.args


def _half(node):
    """(x, start, end) of `x[..., start:end]` on dim 3 (of a 4-D x) with step 1, else None."""
    if not _is(node, aten.slice.Tensor) or node.kwargs:
        return None
    x, dim, start, end, step = (*node.args, *(0, None, None, 1)[len(node.args) - 1:])
    if step != 1 or not isinstance(dim, int) or dim % 4 != 3:
        return None
    return x, start or 0, end


def rotated_before(dims, attention: fx.Node) -> bool:
    """Does the captured model rotate q and k just before `attention` the way `fuse_rope`
    matches (global shapes; the program's own rotation is matched again when it is built)?"""
    def whole(v):
        val = v.meta.get("val") if isinstance(v, fx.Node) else None
        return (list(val.shape), val.dtype, v) if isinstance(val, torch.Tensor) else None

    q, k = (_match(x, whole, dims.cap) for x in attention.args[:2])
    return q is not None and k is not None and (q[1], q[2]) == (k[1], k[2])


def _match(rotated, shape_of, cap):
    """(x, cos, sin, pattern nodes readers first) when `rotated` is x·cos + rotate_half(x)·sin
    as the module docstring says, else None. `shape_of(v)`: (shape, dtype, captured node)."""
    if not isinstance(rotated, fx.Node) or len(rotated.users) != 1:
        return None
    add = _operands(rotated, aten.add.Tensor)
    if add is None:
        return None
    for first, second in (add, add[::-1]):
        mul, mul_1 = _operands(first, aten.mul.Tensor), _operands(second, aten.mul.Tensor)
        if mul is None or mul_1 is None:
            continue
        for x, cos in (mul, mul[::-1]):
            for cat, sin in (mul_1, mul_1[::-1]):
                found = _rotate_half(cat, x, shape_of)
                if found is None or not _tables_fit(x, cos, sin, shape_of, cap):
                    continue
                pattern = [rotated, first, second, *found]
                if all(len(p.users) == 1 for p in pattern[1:]):
                    return x, cos, sin, pattern
    return None


def _rotate_half(cat, x, shape_of):
    """[cat, neg, the two slices] when `cat` is rotate_half(x), else None."""
    shape = shape_of(x)
    if not _is(cat, aten.cat.default) or shape is None or len(shape[0]) != 4:
        return None
    e = shape[0][3]
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if len(parts) != 2 or not isinstance(dim, int) or dim % 4 != 3 or e % 2 or \
            not _is(parts[0], aten.neg.default):
        return None
    upper, lower = _half(parts[0].args[0]), _half(parts[1])
    if upper is None or lower is None or upper[0] is not x or lower[0] is not x:
        return None
    if (lower[1], lower[2]) != (0, e // 2) or upper[1] != e // 2 or \
            upper[2] is None or upper[2] < e:
        return None
    return [cat, parts[0], parts[0].args[0], parts[1]]


def _local(v, sh, values):
    """(local shape, dtype, captured node) of generated value `v`, or None where unknown."""
    if v not in values:
        return None
    c, lay = values[v]
    val = c.meta.get("val")
    sig = sh.dims.sigs.get(c)
    if not isinstance(val, torch.Tensor) or sig is None or not isinstance(lay, tuple):
        return None
    return sh.local_shape(sh.sig_atoms(c), lay), val.dtype, c


def _tables_fit(x, cos, sin, shape_of, cap) -> bool:
    """cos, sin: [..., s, e] with leading 1s for x's local [b, h, s, e], x's dtype, constants."""
    xs = shape_of(x)
    for t in (cos, sin):
        ts = shape_of(t) if isinstance(t, fx.Node) else None
        if xs is None or ts is None:
            return False
        shape = list(ts[0])
        if len(shape) > 4 or shape[-2:] != xs[0][2:] or any(d != 1 for d in shape[:-2]) \
                or ts[1] != xs[1] or not _constant(ts[2], cap):
            return False
    return True


def _constant(c: fx.Node, cap) -> bool:
    """Is nothing upstream of captured node `c` differentiated (a parameter that requires grad,
    an input captured with requires_grad)?"""
    seen, stack = set(), [c]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n.name in cap.params:
                if cap.model.get_parameter(cap.params[n.name]).requires_grad:
                    return False
            elif getattr(n.meta.get("val"), "requires_grad", False):
                return False
        stack.extend(n.all_input_nodes)
    return True


# ------------------------------------------------------------------ what pm.code says
def rope_notes(gm: fx.GraphModule, name: str | None = None,
               templates: dict[fx.GraphModule, list[str]] | None = None) -> list[str]:
    """One line naming the attention modules (or nodes) whose Ulysses call rotates q and k in
    its pack, also inside the submodules recompute and compiled layers move them into;
    `templates`: each compiled layer template and the layers that run it (a call in a template
    counts for each of them). With `name`, only those under it."""
    from seqshard.runtime import ulysses_attention

    where = []
    for m in gm.modules():
        if not isinstance(m, fx.GraphModule):
            continue
        for n in m.graph.nodes:
            if n.op != "call_function" or n.target is not ulysses_attention \
                    or n.kwargs.get("cos") is None:
                continue
            module = n.meta.get("module") or n.name
            layers = (templates or {}).get(m, ())
            first = next((layer for layer in layers if in_layer(module, layer)), None)
            where += [layer + module[len(first):] for layer in layers] if first else [module]
    where = [w for w in dict.fromkeys(where) if name is None or in_layer(w, name)
             or w == name]
    if not where:
        return []
    return [f"{_fold(where)}: {NOTE} {_WHERE}"]


def _fold(paths: list[str]) -> str:
    """`layers.0.attn, layers.1.attn, layers.2.attn` → `layers.0-2.attn`."""
    runs: list[list] = []  # [prefix, first, last, suffix]
    for p in paths:
        m = re.fullmatch(r"(.*?)(\d+)(\D.*)?", p)
        prefix, i, suffix = (m.group(1), int(m.group(2)), m.group(3) or "") if m else (p, None, "")
        if runs and i is not None and runs[-1][0::3] == [prefix, suffix] and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([prefix, i, i, suffix])
    return ", ".join(p + s if a is None else f"{p}{a}" + (f"-{b}" if b != a else "") + s
                     for p, a, b, s in runs)
