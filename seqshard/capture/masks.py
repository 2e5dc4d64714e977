"""Attention masks as per-token tensors: the one mask family every distributed algorithm runs.

Query i of batch b sees key j iff

    (segments is None or segments[b, i] == segments[b, j])          documents (packed sequences)
    and (not causal or positions[b, j] <= positions[b, i])          causal, by position values
    and (window is None or positions[b, i] - positions[b, j] < window)   sliding window
    and (key_valid is None or key_valid[b, j])                      key padding

with positions, segments int64 [B or 1, S] (None: positions[b, i] = i, one document), key_valid
bool [B or 1, S] and window an int; a row that sees no key is 0 (docs: /work/notes/MASKS.md).

`recognize_masks` rewrites `scaled_dot_product_attention(q, k, v, attn_mask=M)` into
`masked_attention(q, k, v, is_causal=..., positions=..., ...)` (or plain SDPA with `is_causal`
when the family member needs no tensors) when it can show that M is that member, and leaves M
in place otherwise. The proof is a symbolic evaluation of M's subgraph:

    arange(n) + c          the index of a dim, plus c          Lin: Σ coef·Term + const
    x[b_idx, i_idx]        a per-token tensor at a token        Term(src, at)
    unsqueeze / expand / view that adds or drops size-1 dims, dtype casts between integers
    eq ne lt le gt ge      a comparison of two linear forms    Conj: an "and" of atoms
    & (and, logical_and, bool ones)                            Conj

Anything else that is a 1-D or 2-D integer or bool tensor is an opaque per-token tensor (a `Term`
with itself as source): position_ids, transformers' packed-sequence ids `cumsum(diff(pos) != 1)`,
an attention_mask. At the end every atom must read per-token tensors at the query or the key
token only, and the conjunction must be exactly the family above (`_family`); such tensors are
then computed once as small [B, S] tensors by nodes kept in the graph and passed to the attention
node. Tensors that depend on no input are evaluated: default positions (an arange) become None,
one document becomes no segments, so a mask that is exactly causal is plain `is_causal=True`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

__all__ = ["masked_attention", "MASK_KWARGS", "recognize_masks"]

MASK_KWARGS = ("positions", "segments", "window", "key_valid")
"""The per-token keyword arguments of `masked_attention` (and of every runtime attention)."""


def masked_attention(q, k, v, *, is_causal: bool = True, scale: float | None = None,
                     enable_gqa: bool = False, dropout_p: float = 0.0, positions=None,
                     segments=None, window: int | None = None, key_valid=None):
    """Attention of q [b, h, s, e] to k, v [b, g, s, e] under the family's mask (module
    docstring). The reference semantics: what a captured graph runs on one device."""
    s = q.shape[-2]
    pos = positions if positions is not None else torch.arange(s, device=q.device)[None]
    pq, pk = pos[:, :, None], pos[:, None, :]
    ok = torch.ones(1, s, s, dtype=torch.bool, device=q.device)
    if segments is not None:
        ok = ok & (segments[:, :, None] == segments[:, None, :])
    if is_causal:
        ok = ok & (pk <= pq)
    if window is not None:
        ok = ok & (pq - pk < window)
    if key_valid is not None:
        ok = ok & key_valid[:, None, :]
    ok = ok[:, None]                                 # [b or 1, 1, s, s]
    seen = ok.any(-1, keepdim=True)                  # rows that see some key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ok | ~seen, dropout_p=dropout_p,
                                         scale=scale, enable_gqa=enable_gqa)
    return out.masked_fill(~seen, 0)


# ------------------------------------------------------------------ the symbolic values
@dataclass(frozen=True)
class Term:
    """`src[m[at[0]], m[at[1]], ...]` at the multi-index m of a value (an `at` of None reads index
    0 of a size-1 dim of src); src None: the index itself, `m[at[0]]`. Dims are negative (counted
    from the right), so numpy broadcasting leaves them unchanged."""

    src: fx.Node | None
    at: tuple


@dataclass(frozen=True)
class Lin:
    """An integer tensor of `nd` dims: Σ coef·term + const."""

    terms: tuple   # ((Term, coef), ...)
    const: int
    nd: int


@dataclass(frozen=True)
class Conj:
    """A bool tensor of `nd` dims: the "and" of atoms `("cmp", op, Lin)` (lin op 0) and
    `("true", Term)` (a bool per-token tensor)."""

    atoms: tuple
    nd: int


def _lin(terms: dict, const: int, nd: int) -> Lin:
    return Lin(tuple((t, c) for t, c in terms.items() if c), const, nd)


def _add(a: Lin, b: Lin, sign: int = 1) -> Lin:
    terms = dict(a.terms)
    for t, c in b.terms:
        terms[t] = terms.get(t, 0) + sign * c
    return _lin(terms, a.const + sign * b.const, max(a.nd, b.nd))


def _scale(a: Lin, k: int) -> Lin:
    return _lin({t: c * k for t, c in a.terms}, a.const * k, a.nd)


def _remap(v, f, nd: int):
    """The value with every dim d of its terms moved to f(d), as a value of nd dims."""
    def term(t: Term) -> Term:
        return Term(t.src, tuple(None if d is None else f(d) for d in t.at))

    if isinstance(v, Lin):
        return _lin({term(t): c for t, c in v.terms}, v.const, nd)
    atoms = tuple(("true", term(a[1])) if a[0] == "true" else
                  ("cmp", a[1], _remap(a[2], f, nd)) for a in v.atoms)
    return Conj(atoms, nd)


def _shape(x) -> tuple[int, ...]:
    return tuple(int(n) for n in x.meta["val"].shape)


_COMPARE = {aten.eq: "eq", aten.ne: "ne", aten.lt: "lt", aten.le: "le", aten.gt: "gt",
            aten.ge: "ge"}
_AND = {aten.logical_and, aten.bitwise_and, aten.__and__}
_SAME_VALUE = {aten.alias, aten.clone, aten.contiguous, aten.detach, aten.lift_fresh_copy,
               aten.to, aten._to_copy, aten.type_as, aten.unsqueeze, aten.squeeze, aten.view,
               aten.reshape, aten._unsafe_view, aten.slice}
_EXPAND = {aten.expand, aten.expand_as, aten.broadcast_to}


class _Evaluator:
    """Symbolic values of the nodes of one mask subgraph (memoized across the graph's masks)."""

    def __init__(self):
        self.memo: dict = {}

    def __call__(self, x):
        if isinstance(x, bool):
            return Conj((), 0) if x else None
        if isinstance(x, int):
            return Lin((), x, 0)
        if not isinstance(x, fx.Node):
            return None
        if x not in self.memo:
            v = self._rule(x) if x.op == "call_function" else None
            self.memo[x] = v if v is not None else _leaf(x)
        return self.memo[x]

    def _rule(self, n: fx.Node):
        packet = getattr(n.target, "overloadpacket", None)
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        nd, a = val.dim(), n.args
        if packet is aten.arange:
            return _arange(n)
        if packet in (aten.add, aten.sub):
            x, y = self(a[0]), self(a[1])
            alpha = n.kwargs.get("alpha", 1)
            if not (isinstance(x, Lin) and isinstance(y, Lin) and isinstance(alpha, int)):
                return None
            return _add(x, _scale(y, alpha), -1 if packet is aten.sub else 1)
        if packet is aten.neg:
            x = self(a[0])
            return _scale(x, -1) if isinstance(x, Lin) else None
        if packet is aten.mul:
            x, y = self(a[0]), self(a[1])
            if isinstance(x, Conj) and isinstance(y, Conj):
                return Conj(x.atoms + y.atoms, nd)
            if isinstance(x, Lin) and isinstance(y, Lin):
                if not y.terms:
                    return _scale(x, y.const)
                if not x.terms:
                    return _scale(y, x.const)
            return None
        if packet in _COMPARE:
            x, y = self(a[0]), self(a[1])
            if isinstance(x, Lin) and isinstance(y, Lin):
                return Conj((("cmp", _COMPARE[packet], _add(x, y, -1)),), nd)
            return None
        if packet in _AND:
            x, y = self(a[0]), self(a[1])
            if isinstance(x, Conj) and isinstance(y, Conj):
                return Conj(x.atoms + y.atoms, nd)
            return None
        if packet in (aten.new_ones, aten.ones, aten.new_full, aten.full):
            fill = 1 if packet in (aten.new_ones, aten.ones) else a[-1]
            if val.dtype == torch.bool:
                return Conj((), nd) if fill else None
            return Lin((), fill, nd) if isinstance(fill, int) and not val.is_floating_point() else None
        if packet is aten.index and n.target == aten.index.Tensor:
            return self._index(n)
        if packet in _EXPAND:
            x = self(a[0])
            return _remap(x, lambda d: d, nd) if x is not None else None
        if packet in _SAME_VALUE:
            return self._same_value(n, packet)
        return None

    def _same_value(self, n: fx.Node, packet):
        """Ops that keep every value and only add or drop size-1 dims (or cast)."""
        x_node = n.args[0]
        x = self(x_node)
        if x is None or not isinstance(x_node, fx.Node):
            return None
        val, xval = n.meta["val"], x_node.meta["val"]
        if packet is aten.slice:
            dim = n.args[1] if len(n.args) > 1 else 0
            start = n.args[2] if len(n.args) > 2 else 0
            end = n.args[3] if len(n.args) > 3 else None
            step = n.args[4] if len(n.args) > 4 else 1
            size = xval.shape[dim]
            if not (start in (0, None) and (end is None or end >= size) and step == 1):
                return None
        if val.dtype != xval.dtype:  # casts: integers stay themselves, bool of an integer is != 0
            if val.dtype == torch.bool and isinstance(x, Lin):
                x = Conj((("cmp", "ne", x),), x.nd)
            elif val.dtype == torch.bool or val.is_floating_point() or xval.is_floating_point() \
                    or xval.dtype == torch.bool:
                return None
        ins = [i for i, s in enumerate(xval.shape) if s > 1]
        outs = [j for j, s in enumerate(val.shape) if s > 1]
        if [xval.shape[i] for i in ins] != [val.shape[j] for j in outs]:
            return None
        where = {i - xval.dim(): j - val.dim() for i, j in zip(ins, outs)}
        return _remap(x, where.__getitem__, val.dim())

    def _index(self, n: fx.Node):
        """`src[i_0, ..., i_{r-1}]` with every i_j the index of one dim of the result (an arange
        over src's whole dim j): the result reads src's terms at those dims."""
        src, indices = n.args
        x = self(src)
        shape = _shape(src)
        if x is None or len(indices) != len(shape) or any(i is None for i in indices):
            return None
        to = {}
        for j, ix in enumerate(indices):
            v = self(ix)
            if shape[j] == 1:
                continue
            if not (isinstance(v, Lin) and v.const == 0 and len(v.terms) == 1):
                return None
            (t, c), = v.terms
            if t.src is not None or c != 1 or _shape(ix)[t.at[0]] != shape[j]:
                return None
            to[j - len(shape)] = t.at[0]
        try:
            return _remap(x, to.__getitem__, n.meta["val"].dim())
        except KeyError:  # src's value reads a size-1 dim the index broadcasts: not a token read
            return None


def _arange(n: fx.Node):
    val = n.meta["val"]
    if val.is_floating_point() or val.dtype == torch.bool:
        return None
    args = [a for a in n.args]
    start, step = 0, 1
    if n.target == aten.arange.default:
        (end,) = args[:1]
    elif n.target == aten.arange.start:
        start, end = args[:2]
    elif n.target == aten.arange.start_step:
        start, end, step = args[:3]
    else:
        return None
    if not all(isinstance(x, int) for x in (start, end, step)) or step != 1:
        return None
    if end - start <= 1:
        return Lin((), start, 1)
    return Lin(((Term(None, (-1,)), 1),), start, 1)


def _leaf(x) -> Lin | Conj | None:
    """An opaque per-token tensor: a 1-D or 2-D integer or bool tensor, read where indexed."""
    if not isinstance(x, fx.Node):
        return None
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() not in (1, 2) or val.is_floating_point() \
            or val.is_complex():
        return None
    nd = val.dim()
    term = Term(x, tuple(i - nd if s > 1 else None for i, s in enumerate(val.shape)))
    if val.dtype == torch.bool:
        return Conj((("true", term),), nd)
    return Lin(((term, 1),), 0, nd)


# ------------------------------------------------------------------ the family
@dataclass(frozen=True)
class Family:
    causal: bool
    window: int | None
    positions: Term | None        # the per-token function read at q and k (None: the index)
    segments: Term | None
    key_valid: tuple              # atoms that read key tokens only


class NotFamily(Exception):
    """The mask is not (shown to be) a member of the family; the message says why."""


def _side(t: Term, batch: int, seq: int) -> tuple[str, Term]:
    """('q' or 'k', the per-token function with the token dim taken out) of a term, checking
    that it reads one token of a [batch or 1, seq] (or [seq]) tensor."""
    token = t.at[-1]
    if token not in (-2, -1):
        raise NotFamily("a tensor is read at something other than the query or key token")
    side = "q" if token == -2 else "k"
    if t.src is None:
        return side, Term(None, ())
    shape = _shape(t.src)
    if shape[-1] != seq:
        raise NotFamily(f"a per-token tensor {t.src.name} has length {shape[-1]}, not {seq}")
    if len(shape) == 2:
        b = t.at[0]
        if not (b is None or (b == -4 and shape[0] == batch)):
            raise NotFamily(f"{t.src.name} is read at a dim that is not the batch")
    return side, Term(t.src, t.at[:-1])


def _family(mask: Conj, batch: int, seq: int) -> Family:
    bounds, segs, keys, pos = [], set(), [], set()
    for atom in mask.atoms:
        if atom[0] == "true":
            side, _ = _side(atom[1], batch, seq)
            if side != "k":
                raise NotFamily("a query-side condition (rows masked by a per-token tensor)")
            keys.append(atom)
            continue
        _, op, lin = atom
        sides = [(_side(t, batch, seq), c) for t, c in lin.terms]
        if not sides:
            if not _holds(op, lin.const):
                raise NotFamily("a condition that is false everywhere")
            continue
        if all(s == "k" for (s, _), _ in sides):
            keys.append(atom)
            continue
        if len(sides) != 2 or {s for (s, _), _ in sides} != {"q", "k"}:
            raise NotFamily("a condition that is not between one query and one key value")
        ((sa, fa), ca), ((_, fb), cb) = sides
        if fa != fb or ca != -cb or abs(ca) != 1:
            raise NotFamily("a comparison of different per-token tensors of query and key")
        if sa == "k":  # make it f(q) - f(k) + c op 0
            ca = -ca
        if ca == -1:
            op, c = _FLIP[op], -lin.const
        else:
            c = lin.const
        if op == "eq" and c == 0:
            segs.add(fa)
        elif op in ("le", "lt", "ge", "gt"):
            pos.add(fa)
            bounds.append((op, -c))  # f(q) - f(k) op -c
        else:
            raise NotFamily(f"a condition {op} between query and key values")
    if len(pos) > 1 or len(segs) > 1:
        raise NotFamily("conditions over several different position (or document) tensors")
    lo = max((v + (op == "gt") for op, v in bounds if op in ("ge", "gt")), default=None)
    hi = min((v - (op == "lt") for op, v in bounds if op in ("le", "lt")), default=None)
    if lo is None and hi is not None or lo not in (None, 0):
        raise NotFamily("a position condition other than causal (key at or before the query)"
                        " with an optional window")
    if hi is not None and hi < 0:
        raise NotFamily("a window that shows no key")
    (p,) = pos or (None,)
    (s,) = segs or (None,)
    return Family(causal=lo == 0, window=None if hi is None else hi + 1,
                  positions=p, segments=s, key_valid=tuple(keys))


_FLIP = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt", "eq": "eq", "ne": "ne"}


def _holds(op: str, c: int) -> bool:
    return {"eq": c == 0, "ne": c != 0, "lt": c < 0, "le": c <= 0, "gt": c > 0, "ge": c >= 0}[op]


# ------------------------------------------------------------------ the rewrite
def recognize_masks(graph: fx.Graph, sdpa, constant_value) -> list[str]:
    """Rewrite every SDPA whose `attn_mask` is a family member (module docstring). Masks it
    cannot show to be one stay, with the reason in `node.meta["seqshard_mask"]`."""
    from .canonicalize import sdpa_options

    ev, made, done = _Evaluator(), {}, []
    for n in list(graph.nodes):
        if not (n.op == "call_function" and n.target == sdpa):
            continue
        kw = sdpa_options(n)
        mask = kw.get("attn_mask")
        if not isinstance(mask, fx.Node) or kw.get("is_causal"):
            continue
        q, k, v = n.args[:3]
        qv = q.meta["val"]
        try:
            value = _as_bool(mask, ev, constant_value)
            if not isinstance(value, Conj):
                raise NotFamily(f"its values are not a bool condition seqshard can read "
                                f"(an op in {mask.name}'s subgraph has no symbolic rule)")
            if qv.dim() != 4 or _shape(q)[-2] != _shape(k)[-2]:
                raise NotFamily("not self-attention over [batch, heads, seq, head_dim]")
            fam = _family(value, int(qv.shape[0]), int(qv.shape[-2]))
            if fam.key_valid and mask.meta["val"].dtype != torch.bool:
                raise NotFamily("an additive mask with key padding: a row that sees no key "
                                "attends to every key there, not to none")
            tensors = _per_token(graph, n, mask, fam, made, constant_value)
        except NotFamily as e:
            n.meta["seqshard_mask"] = f"{e}"
            continue
        kw.pop("attn_mask")
        kw["is_causal"] = fam.causal
        kw = {key: val for key, val in kw.items() if val is not None}
        if not any(t is not None for t in tensors.values()):
            n.args, n.kwargs = (q, k, v), kw
            done.append(f"{n.name}: attn_mask {mask.name} is {'causal' if fam.causal else 'full'}"
                        " → is_causal")
            continue
        with graph.inserting_before(n):
            new = graph.call_function(masked_attention, (q, k, v),
                                      {**kw, **{key: t for key, t in tensors.items()
                                                if t is not None}})
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        parts = [key if key != "window" else f"window={tensors['window']}"
                 for key, t in tensors.items() if t is not None]
        done.append(f"{new.name}: attn_mask {mask.name} is {'causal' if fam.causal else 'full'}"
                    f" with {', '.join(parts)} → masked_attention")
    if made or done:
        graph.eliminate_dead_code()
        _mark_per_token(graph)
    return done


def _mark_per_token(graph: fx.Graph) -> None:
    """`node.meta["seqshard_per_token"] = True` on the nodes that only compute masks' per-token
    tensors (transformers' `cumsum(diff(position_ids) != 1)`): small [B, S] work that may stay
    replicated where an override splits the sequence of everything else."""
    for n in reversed(graph.nodes):
        if n.op != "call_function" or not n.users:
            continue
        if all(u.meta.get("seqshard_per_token") or (u.target is masked_attention
                                                     and n not in u.args) for u in n.users):
            n.meta["seqshard_per_token"] = True


def _as_bool(mask: fx.Node, ev: _Evaluator, constant_value):
    """The bool condition of a mask: a bool mask itself, or the `where(cond, 0, -inf)` of an
    additive float mask (a large negative number masks as -inf does for rows that see a key)."""
    val = mask.meta["val"]
    if val.dtype == torch.bool:
        return ev(mask)
    if mask.op == "call_function" and getattr(mask.target, "overloadpacket", None) is aten.where:
        cond, a, b = mask.args
        a, b = (_number(x, constant_value) for x in (a, b))
        if a == 0 and b is not None and b <= -1e30:
            return ev(cond)
    return None


def _number(x, constant_value):
    if isinstance(x, (int, float)):
        return float(x)
    t = constant_value(x) if isinstance(x, fx.Node) else None
    return float(t) if isinstance(t, torch.Tensor) and t.numel() == 1 else None


def _per_token(graph, att, mask, fam: Family, made: dict, constant_value) -> dict:
    """The family's per-token tensors as graph nodes ([B or 1, S]; None where the default holds),
    made once and shared by every attention with the same mask."""
    qv = att.args[0].meta["val"]
    seq = int(qv.shape[-2])
    emit = _Emitter(graph, att, mask, seq, made, constant_value)

    positions = None
    if fam.positions is not None and fam.positions.src is not None:
        known = emit.constant(fam.positions)
        if known is None or not bool((known == torch.arange(seq)).all()):
            positions = emit.int64(fam.positions)
    segments = None
    if fam.segments is not None:
        known = emit.constant(fam.segments)
        if known is None or not bool((known == known[:, :1]).all()):
            segments = emit.int64(fam.segments)
    key_valid = []
    for atom in fam.key_valid:
        known = emit.atom_constant(atom)
        if known is None or not bool(known.all()):
            key_valid.append(atom)
    return {"positions": positions, "segments": segments, "window": fam.window,
            "key_valid": emit.key_valid(key_valid) if key_valid else None}


class _Emitter:
    """Makes the per-token nodes before the first attention that needs them (with fake values,
    the source line of the mask and its module)."""

    def __init__(self, graph, att, mask, seq, made, constant_value):
        from torch._guards import detect_fake_mode

        self.graph, self.att, self.mask, self.seq, self.made = graph, att, mask, seq, made
        self.constant_value = constant_value
        self.device = att.args[0].meta["val"].device
        self.fake = detect_fake_mode([att.args[0].meta["val"]])

    def call(self, target, *args, **kwargs) -> fx.Node:
        key = (target, args, tuple(sorted(kwargs.items(), key=operator.itemgetter(0))))
        if key in self.made:
            return self.made[key]
        with self.graph.inserting_before(self.att):
            node = self.graph.call_function(target, args, kwargs)
        vals = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        if self.fake is not None:
            with self.fake:
                node.meta["val"] = target(*vals[0], **vals[1])
        else:
            node.meta["val"] = target(*vals[0], **vals[1])
        for key_ in ("stack_trace", "nn_module_stack"):
            if key_ in self.mask.meta:
                node.meta[key_] = self.mask.meta[key_]
        self.made[key] = node
        return node

    def term(self, t: Term) -> fx.Node:
        """The per-token tensor of a (token-less) term as [B or 1, S]."""
        if t.src is None:
            idx = self.call(aten.arange.default, self.seq, dtype=torch.int64, device=self.device)
            return self.call(aten.unsqueeze.default, idx, 0)
        if len(_shape(t.src)) == 1:
            return self.call(aten.unsqueeze.default, t.src, 0)
        return t.src

    def int64(self, t: Term) -> fx.Node:
        x = self.term(t)
        if x.meta["val"].dtype != torch.int64:
            x = self.call(aten._to_copy.default, x, dtype=torch.int64)
        return x

    def constant(self, t: Term) -> torch.Tensor | None:
        if t.src is None:
            return torch.arange(self.seq)[None]
        value = self.constant_value(t.src)
        return value.reshape(-1, self.seq) if value is not None else None

    def atom_constant(self, atom) -> torch.Tensor | None:
        if atom[0] == "true":
            return self.constant(Term(atom[1].src, atom[1].at[:-1]))
        _, op, lin = atom
        total = torch.tensor(lin.const)
        for t, c in lin.terms:
            value = self.constant(Term(t.src, t.at[:-1]))
            if value is None:
                return None
            total = total + c * value
        return _COMPARE_FN[op](total, 0)

    def key_valid(self, atoms) -> fx.Node:
        out = None
        for atom in atoms:
            if atom[0] == "true":
                x = self.term(Term(atom[1].src, atom[1].at[:-1]))
            else:
                _, op, lin = atom
                x = None
                for t, c in lin.terms:
                    y = self.term(Term(t.src, t.at[:-1]))
                    if c != 1:
                        y = self.call(aten.mul.Tensor, y, c)
                    x = y if x is None else self.call(aten.add.Tensor, x, y)
                x = self.call(getattr(aten, op).Scalar, x, -lin.const)
            out = x if out is None else self.call(aten.logical_and.default, out, x)
        return out


_COMPARE_FN = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt,
               "ge": torch.ge}
