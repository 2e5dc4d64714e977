"""Dims: every tensor dim of a captured graph as a product of named factors.

    dims = analyze(cap, axes={"x": "b t p c"})
    dims.sig_str(node)          # "((b, t), (p,), (d,))"
    dims.roles[node]            # {factor: Role} for the factors the node splits non-locally
    dims.unsupported            # {node: reason} - ops that run on replicated inputs
    print(dims.summary())       # one row per node: op, factor signature, module, source line

Propagation runs the op rules of `seqshard.dims.ops` over the graph in order (see
`registry.py` for what a rule states). Names are given last, by what factors are for:
user-named input axes first, then attention (`s`, `h`, `g`, `r`, `e`), embeddings (`v`, `d`),
normalized dims (`d`), the leading dim of inputs (`b`), linear outputs (`f`), then `x0, x1, ...`
in graph order. A name is unique within every node that uses it, so a plan can say `split:h`
and mean each layer's own head factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import ops  # noqa: F401 - registers the rules
from .factors import Dim, FactorError, Factors, Sig
from .registry import AttentionDims, Role, RuleCtx, UnsupportedOp, find_rule

__all__ = ["analyze", "DimAnalysis", "AttentionDims", "Factors", "Role", "Sig", "Dim",
           "FactorError"]



@dataclass
class DimAnalysis:
    cap: object                                   # seqshard.capture.Captured
    F: Factors
    sigs: dict = field(default_factory=dict)      # node → Sig | list[Sig | None] | None
    roles: dict = field(default_factory=dict)     # node → {atom: Role}
    attrs: dict = field(default_factory=dict)     # node → facts from rules (attention, loss, ...)
    unsupported: dict = field(default_factory=dict)  # node → reason

    # ------------------------------------------------------------------ queries
    def sig(self, node: fx.Node) -> Sig:
        return self.sigs[node]

    def atoms(self, node: fx.Node) -> Sig:
        return self.F.atoms_sig(self.sigs[node])

    def sig_str(self, node: fx.Node) -> str:
        s = self.sigs.get(node)
        if s is None:
            return "-"
        if isinstance(s, list):
            return "[" + ", ".join(self.F.sig_str(x) if x is not None else "-" for x in s) + "]"
        return self.F.sig_str(s)

    def iteration_atoms(self, node: fx.Node) -> list[int]:
        """The atomic factors of the node's inputs and outputs, in first-seen order."""
        seen: dict[int, None] = {}
        for x in list(node.all_input_nodes) + [node]:
            for sig in _sig_list(self.sigs.get(x)):
                for d in sig:
                    for a in self.F.atoms_of(d):
                        seen.setdefault(self.F.find(a))
        return list(seen)

    def factor(self, node: fx.Node, name: str) -> int | None:
        """The atom named `name` in the node's iteration space (or a composite's outermost)."""
        for a in self.iteration_atoms(node):
            if self.F.label(a) == name:
                return a
        return None

    def attention(self, node: fx.Node) -> AttentionDims | None:
        """The attention dims of an SDPA node; None for any other node."""
        return self.attrs.get(node, {}).get("attention")

    def seq_atoms(self, node: fx.Node) -> set[int]:
        """The atoms of an attention node's key sequence (what distributed attention splits)."""
        return {self.F.find(a) for a in self.F.atoms_of(self.attention(node).seq_k)}

    def sizes(self) -> dict[str, int]:
        """Every named atomic factor's size, by name (names repeat across layers, sizes agree)."""
        out = {}
        for sig in self.sigs.values():
            for s in _sig_list(sig):
                for d in s:
                    for a in self.F.atoms_of(d):
                        out.setdefault(self.F.label(a), self.F.size(a))
        return out

    def summary(self, *, show_all: bool = False) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="captured graph: factor signatures", show_lines=False)
        for col in ("node", "op", "factors", "not local", "module", "source"):
            table.add_column(col, overflow="fold")
        for n in self.cap.nodes():
            if n.op not in ("call_function", "placeholder") or n.target is getattr:
                continue
            if n.op == "placeholder" and not show_all and n.name not in self.cap.inputs:
                continue
            roles = self.roles.get(n, {})
            nonlocal_ = ", ".join(f"{self.F.label(a)}:{r.name.lower()}" for a, r in roles.items()
                                  if r != Role.LOCAL)
            if n in self.unsupported:
                nonlocal_ = f"[red]no rule: {self.unsupported[n]}[/red]"
            op = n.name if n.op == "placeholder" else _op_name(n)
            table.add_row(n.name, op, self.sig_str(n), nonlocal_, self.cap.module_path(n),
                          self.cap.source(n))
        console = Console(width=200, record=True, file=open("/dev/null", "w"))
        console.print(table)
        return console.export_text()


def _op_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__ if t._overloadname == "default" else f"{t.overloadpacket.__name__}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def _sig_list(s):
    if s is None:
        return []
    if isinstance(s, list):
        return [x for x in s if x is not None]
    return [s]


def _is_tensor_val(v) -> bool:
    return isinstance(v, torch.Tensor)


def parse_axes(spec: str | tuple | list) -> list[str]:
    names = spec.split() if isinstance(spec, str) else list(spec)
    return names


def analyze(cap, axes: dict[str, str] | None = None) -> DimAnalysis:
    """Propagate factors through the captured graph and name them.

    axes: names for the factors of user inputs, by forward() argument name, e.g.
    `{"x": "b t p c"}`; a name of '_' leaves that dim unnamed."""
    F = Factors()
    da = DimAnalysis(cap, F)
    axes = dict(axes or {})
    unknown = set(axes) - set(cap.input_names)
    if unknown:
        raise ValueError(f"axes names inputs {sorted(unknown)} that forward() does not take; "
                         f"its inputs are {cap.input_names}")
    ctx_roles: dict = {}
    user_named: dict[str, Dim] = {}
    for n in cap.nodes():
        val = n.meta.get("val")
        if n.op in ("placeholder", "get_attr"):
            da.sigs[n] = F.fresh_sig(val.shape) if _is_tensor_val(val) else None
            if n.op == "placeholder" and n.name in cap.inputs:
                arg = cap.input_names[cap.inputs.index(n.name)]
                if arg in axes:
                    names = parse_axes(axes[arg])
                    if len(names) != val.dim():
                        raise ValueError(f"axes[{arg!r}] = {axes[arg]!r} names {len(names)} dims, "
                                         f"but {arg} has {val.dim()} (shape {tuple(val.shape)})")
                    for d, name in zip(da.sigs[n], names):
                        if name == "_":
                            continue
                        if name in user_named:  # one name, one factor
                            if F.dim_size(user_named[name]) != F.dim_size(d):
                                raise ValueError(
                                    f"axes name {name!r} is used for dims of sizes "
                                    f"{F.dim_size(user_named[name])} and {F.dim_size(d)}")
                            F.unify(user_named[name], d)
                        user_named[name] = d
                        F.set_name(d[0], name, 0)
            continue
        if n.op != "call_function":
            continue
        if val is None or not (_is_tensor_val(val) or isinstance(val, (list, tuple))):
            da.sigs[n] = None
            continue
        fn = find_rule(n.target)
        ctx = RuleCtx(F, n, da.sigs)
        try:
            if fn is None:
                raise UnsupportedOp(f"no rule for {_op_name(n)}")
            da.sigs[n] = fn(ctx)
        except (UnsupportedOp, FactorError) as e:
            da.unsupported[n] = str(e)
            da.sigs[n] = ctx.fresh_out()
            ctx.roles = [(d, Role.WHOLE) for x in list(n.all_input_nodes) + [n]
                         for s in _sig_list(da.sigs.get(x)) for d in s]
        ctx_roles[n] = ctx.roles
        if ctx.attrs:
            da.attrs[n] = ctx.attrs
        _check_sizes(da, n)
    _resolve_roles(da, ctx_roles)
    _name_factors(da, axes)
    return da


def _check_sizes(da: DimAnalysis, n: fx.Node) -> None:
    val, sig = n.meta["val"], da.sigs[n]
    pairs = zip(val, sig) if isinstance(sig, list) else [(val, sig)]
    for v, s in pairs:
        if s is None or not _is_tensor_val(v):
            continue
        got = tuple(da.F.dim_size(d) for d in s)
        assert got == tuple(int(x) for x in v.shape), \
            f"rule for {n.name} ({_op_name(n)}) gave sizes {got}, tensor has {tuple(v.shape)}"


def _resolve_roles(da: DimAnalysis, ctx_roles: dict) -> None:
    F = da.F
    for n, marks in ctx_roles.items():
        roles: dict[int, Role] = {}
        for dim, role in marks:
            for a in F.atoms_of(dim):
                a = F.find(a)
                roles[a] = max(roles.get(a, Role.LOCAL), role)
        outs = {F.find(a) for s in _sig_list(da.sigs[n]) for d in s for a in F.atoms_of(d)}
        for a in da.iteration_atoms(n):
            if a not in outs and a not in roles:
                roles[a] = Role.WHOLE
        da.roles[n] = {a: r for a, r in roles.items() if r != Role.LOCAL}


def _name_factors(da: DimAnalysis, axes: dict) -> None:
    F = da.F
    nodes = list(da.cap.nodes())
    for n in nodes:  # attention first: it knows what its dims are for
        att = da.attention(n)
        if att is None:
            continue
        for d in att.seq_k + att.seq_q:
            F.set_name(d, "s", 1)
        for d in att.head_dim:
            F.set_name(d, "e", 1)
        heads, kv = att.heads, att.kv_heads
        if F.atoms_of(heads) == F.atoms_of(kv):
            for d in heads:
                F.set_name(d, "h", 1)
        else:
            for d in heads:
                F.set_name(d, "h", 1)
            for d in kv:
                F.set_name(d, "g", 1)
            rest = [a for a in F.atoms_of(heads) if a not in {F.find(x) for x in F.atoms_of(kv)}]
            for a in rest:
                F.set_name(a, "r", 1)
        for d in att.batch:
            if len(d) == 1:
                F.set_name(d[0], "b", 5)
    for n in nodes:
        emb = da.attrs.get(n, {}).get("embedding")
        classes = da.attrs.get(n, {}).get("classes")
        if classes and len(classes) == 1:  # the classes of a cross-entropy: a vocabulary
            F.set_name(classes[0], "v", 2)
        if emb:
            F.set_name(emb["vocab"][0], "v", 2) if len(emb["vocab"]) == 1 else None
            F.set_name(emb["dim"][0], "d", 2) if len(emb["dim"]) == 1 else None
        if n.op == "call_function" and n.target in (torch.ops.aten.layer_norm.default,
                                                    torch.ops.aten.rms_norm.default):
            last = da.sigs[n][-1]
            if len(last) == 1:
                F.set_name(last[0], "d", 3)
        if n.op == "placeholder" and n.name in da.cap.inputs and da.sigs[n]:
            sig = da.sigs[n]
            if len(sig) >= 2:
                F.set_name(sig[0][0], "b", 4)
            if len(sig) == 2 and not n.meta["val"].is_floating_point():
                F.set_name(sig[1][0], "s", 4)
    for n in nodes:  # atoms of a named composite: "e.0", "e.1"
        for sig in _sig_list(da.sigs.get(n)):
            for d in sig:
                for f in d:
                    _name_parts(F, f)
    for n in nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default:
            last = da.sigs[n][-1]  # an output-feature factor that nothing else named
            if len(last) == 1 and F.atoms(last[0]) == (F.find(last[0]),) and F.name(last[0]) is None:
                F.set_name(last[0], "f", 6)
    # everything else: x0, x1, ... in graph order
    counter = 0
    for n in nodes:
        for s in _sig_list(da.sigs.get(n)):
            for d in s:
                for f in d:
                    _name_parts(F, f)
                for a in F.atoms_of(d):
                    if F.name(a) is None:
                        F.set_name(a, f"x{counter}", 9)
                        counter += 1
    _make_unique(da)


def _name_parts(F: Factors, f: int) -> None:
    root = F.find(f)
    ex = F._e[root].expand
    if ex is None:
        return
    base = F.name(root)
    for i, g in enumerate(ex):
        if base is not None and F.name(g) is None:
            F.set_name(g, f"{base}.{i}", 8)
        _name_parts(F, g)


def _make_unique(da: DimAnalysis) -> None:
    """Two different atoms with one name inside one node get suffixes (x, x_2): a plan's names
    must be unambiguous wherever they are used."""
    F = da.F
    for n in da.cap.nodes():
        seen: dict[str, int] = {}
        for a in da.iteration_atoms(n):
            name = F.label(a)
            if name in seen and seen[name] != a:
                k = 2
                used = {F.label(b) for b in da.iteration_atoms(n)}
                while f"{name}_{k}" in used:
                    k += 1
                F._e[F.find(a)].name = f"{name}_{k}"
            else:
                seen[name] = a
