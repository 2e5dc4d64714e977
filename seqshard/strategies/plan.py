"""The plan: for every node, which factor each mesh axis splits, and for attention the algorithm.

A plan is written in factor names and node keys (`from_plan.node_keys`: module, op and count,
not FX names), never in sizes or dtypes, so the bf16 plan made for a 1M-token run applies to the
same model at 37 tokens in float32 on 4 CPU processes. It prints as a table
(one row per layer), explains its choices, and round-trips through JSON (no pickle).

    Split(axis="sp", factor="s")                   # str: "s@sp"
    NodePlan(node="linear_3", module="layers.0.attn.o_proj", op="linear",
             key="layers.0.attn.o_proj/linear#0", splits=(Split("sp", "s"),))
    Plan(mesh=(("sp", 4),), orders={"s": "zigzag"}, nodes=(...), predicted=...)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace

from .algorithms import NAMES as ALGORITHMS

ORDERS = ("contig", "zigzag")


@dataclass(frozen=True)
class Split:
    """Mesh axis `axis` splits factor `factor` of a node's iteration space."""

    axis: str
    factor: str

    def __str__(self) -> str:
        return f"{self.factor}@{self.axis}"


@dataclass(frozen=True)
class Cost:
    """Predicted cost terms of one choice, kept separate (seconds and bytes)."""

    compute_s: float = 0.0
    comm_s: float = 0.0          # exposed communication of the node itself (partial sums, algorithm)
    redistribute_s: float = 0.0  # redistributions on the node's inputs
    memory_bytes: float = 0.0    # activation bytes this node keeps (saved for backward when training)
    comm_bytes: float = 0.0      # bytes sent per GPU
    transient_bytes: float = 0.0 # working memory only while the node runs (gathered K/V, buffers)

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_s + self.redistribute_s


@dataclass(frozen=True)
class NodePlan:
    node: str                     # FX node name in the captured graph
    module: str                   # module path, for people
    op: str
    splits: tuple[Split, ...] = ()
    algorithm: str | None = None  # attention only
    cost: Cost | None = None
    key: str = ""                 # what the node is, stable across dtypes (`from_plan.node_keys`)

    def __post_init__(self):
        if self.algorithm is not None and self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown attention algorithm {self.algorithm!r}; choose from {ALGORITHMS}")
        axes = [s.axis for s in self.splits]
        if len(set(axes)) != len(axes):
            raise ValueError(f"{self.node}: a mesh axis can split one factor, got {self.splits}")

    def split_str(self) -> str:
        return " ".join(str(s) for s in self.splits) or "replicated"


@dataclass(frozen=True)
class Predicted:
    step_s: float
    peak_memory_bytes: float
    comm_bytes: float
    compute_s: float = 0.0
    comm_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    mesh: tuple[tuple[str, int], ...]             # (axis name, size), outermost first
    nodes: tuple[NodePlan, ...]
    orders: tuple[tuple[str, str], ...] = ()      # (factor, "zigzag"|"contig"); contig if absent
    predicted: Predicted | None = None
    model_state: str = "replicated"               # parameters, gradients, optimizer state priced
    #                "replicated", "sharded" (FSDP2) or "offload" (optimizer state on the host)
    notes: tuple[str, ...] = ()                   # what the planner wants people to know
    explanations: dict = field(default_factory=dict, compare=False, hash=False)
    axes: tuple[tuple[str, str], ...] = ()        # (input name, its factor names "b t p c")
    recompute: tuple[str, ...] = ()               # layers (`layers.3`) run again in backward
    chunks: tuple[tuple[str, int], ...] = ()      # (loss node, k): LM head + loss in k chunks
    offload: tuple[str, ...] = ()                 # recomputed layers whose inputs live on the host
    chunked_modules: tuple[tuple[str, int], ...] = ()  # (module, k): a token-wise module in a
    #                layer (`layers.3.mlp`) run in k chunks of tokens, each recomputed in backward
    keep_attention: tuple[str, ...] = ()          # recomputed layers that keep their attention's
    #                outputs (out, lse) for backward: attention is not run again (selective)
    recompute_groups: tuple[tuple[str, ...], ...] = ()  # consecutive recomputed layers under one
    #                more checkpoint: a group keeps its first layer's inputs alone, and in backward
    #                runs its forward again (but its last layer's) before each layer's own
    #                (`solver/groups.py`); offloaded groups list every layer in `offload`
    kernels: tuple[tuple[str, str], ...] = ()     # (module or node, what runs it) where the plan
    #                was priced for parallelize(compile=..., kernels=...): compiled templates,
    #                the fused LM-head loss; a build option, not a decision (not in the hash)

    def __post_init__(self):
        for f, o in self.orders:
            if o not in ORDERS:
                raise ValueError(f"order of {f!r} must be one of {ORDERS}, got {o!r}")
        for layer in self.offload:
            if layer not in self.recompute:
                raise ValueError(f"the plan offloads {layer!r} but does not recompute it: "
                                 "offload moves what a recomputed layer keeps (its inputs) to "
                                 "host memory; add it to `recompute`")
        seen: set = set()
        for group in self.recompute_groups:
            if len(group) < 2 or any(layer not in self.recompute or layer in seen for layer in group):
                raise ValueError(f"the plan groups {list(group)}: a group is two or more recomputed "
                                 "layers (each in `recompute`), in no other group")
            if len({layer in self.offload for layer in group}) > 1:
                raise ValueError(f"the plan offloads part of the group {list(group)}: a group keeps "
                                 "one input (its first layer's), offloaded or not; list every layer "
                                 "of it in `offload`, or none")
            seen.update(group)
        for layer in self.keep_attention:
            if layer not in self.recompute:
                raise ValueError(f"the plan keeps the attention outputs of {layer!r} but does not "
                                 "recompute it: a layer that is not recomputed keeps them anyway; "
                                 "add it to `recompute`")

    # ------------------------------------------------------------------ access
    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.mesh)

    def order(self, factor: str) -> str:
        return dict(self.orders).get(factor, "contig")

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.node == name:
                return n
        raise KeyError(f"the plan has no node {name!r}")

    def by_name(self) -> dict[str, NodePlan]:
        return {n.node: n for n in self.nodes}

    def attention(self) -> list[NodePlan]:
        return [n for n in self.nodes if n.algorithm is not None]

    # ------------------------------------------------------------------ identity and JSON
    def to_json(self) -> str:
        d = asdict(self)
        d["version"] = 1
        return json.dumps(d, indent=1)

    @staticmethod
    def from_json(text: str | bytes) -> "Plan":
        """The plan of `to_json`'s text. Anything else raises one `ValueError` that names the
        field: "plan JSON: nodes[3].splits[0].axis: expected a string, got 5"."""
        try:
            d = json.loads(text)
        except RecursionError:
            raise ValueError("plan JSON: nested too deeply to be a plan") from None
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"plan JSON: not JSON text: {e}") from None
        _check_json(d)
        nodes = tuple(
            NodePlan(node=n["node"], module=n["module"], op=n["op"],
                     splits=tuple(Split(**s) for s in n.get("splits", ())),
                     algorithm=n.get("algorithm"), cost=Cost(**n["cost"]) if n.get("cost") else None,
                     key=n.get("key", ""))
            for n in d["nodes"])
        return Plan(mesh=tuple(tuple(m) for m in d["mesh"]), nodes=nodes,
                    orders=tuple(tuple(o) for o in d.get("orders", ())),
                    predicted=Predicted(**d["predicted"]) if d.get("predicted") else None,
                    model_state=d.get("model_state", "replicated"),
                    notes=tuple(d.get("notes", ())), explanations=d.get("explanations", {}),
                    axes=tuple(tuple(a) for a in d.get("axes", ())),
                    recompute=tuple(d.get("recompute", ())),
                    chunks=tuple(tuple(c) for c in d.get("chunks", ())),
                    offload=tuple(d.get("offload", ())),
                    chunked_modules=tuple(tuple(c) for c in d.get("chunked_modules", ())),
                    keep_attention=tuple(d.get("keep_attention", ())),
                    recompute_groups=tuple(tuple(g) for g in d.get("recompute_groups", ())),
                    kernels=tuple(tuple(k) for k in d.get("kernels", ())))

    def hash(self) -> str:
        """A stable hash of what the plan decides (not of its predictions). The input axes count
        when recorded: they name the factors the splits refer to."""
        key = {"mesh": [a for a, _ in self.mesh], "orders": sorted(self.orders),
               "nodes": [(n.node, [str(s) for s in n.splits], n.algorithm) for n in self.nodes]}
        if self.axes:
            key["axes"] = [list(a) for a in self.axes]
        if self.model_state != "replicated":
            key["model_state"] = self.model_state
        if self.recompute:
            key["recompute"] = list(self.recompute)
        if self.chunks:
            key["chunks"] = [list(c) for c in self.chunks]
        if self.offload:
            key["offload"] = list(self.offload)
        if self.chunked_modules:
            key["chunked_modules"] = [list(c) for c in self.chunked_modules]
        if self.keep_attention:
            key["keep_attention"] = list(self.keep_attention)
        if self.recompute_groups:
            key["recompute_groups"] = [list(g) for g in self.recompute_groups]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def with_mesh(self, mesh: tuple[tuple[str, int], ...]) -> "Plan":
        return replace(self, mesh=tuple(mesh))

    def with_axes(self, axes: dict) -> "Plan":
        """This plan recording the input axes it was made with ({"x": "b t p c"} or lists of
        names), so `parallelize(plan=...)` needs no `axes=`."""
        return replace(self, axes=tuple((str(k), v if isinstance(v, str) else " ".join(v))
                                        for k, v in (axes or {}).items()))

    # ------------------------------------------------------------------ people
    def rows(self) -> list[tuple]:
        """One row per layer (module path with its leaf projections folded in): the layouts it
        uses, attention algorithm, predicted time, memory and traffic. Consecutive repeated
        layers planned alike fold into one row (`layers.0-79.attn`) with per-layer figures."""
        groups: dict[str, list[NodePlan]] = {}
        for n in self.nodes:
            groups.setdefault(_layer_of(n.module), []).append(n)
        rows = []
        for layer, nodes in groups.items():
            layouts = sorted({n.split_str() for n in nodes}, key=lambda s: (s == "replicated", s))
            algos = sorted({n.algorithm for n in nodes if n.algorithm})
            t = sum(n.cost.time_s for n in nodes if n.cost)
            mem = sum(n.cost.memory_bytes for n in nodes if n.cost)
            comm = sum(n.cost.comm_bytes for n in nodes if n.cost)
            rows.append((layer or "(top)", ", ".join(layouts), ", ".join(algos) or "-",
                         t, mem, comm, len(nodes)))
        return _fold(rows)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        mesh = " × ".join(f"{a}={n}" for a, n in self.mesh)
        orders = ", ".join(f"{f}:{o}" for f, o in self.orders) or "contig"
        table = Table(title=f"seqshard plan {self.hash()}  mesh {mesh}  order {orders}")
        for col in ("layer", "splits", "attention", "time", "act. memory", "sent", "nodes"):
            table.add_column(col, overflow="fold", justify="right" if col in
                             ("time", "act. memory", "sent", "nodes") else "left")
        for layer, layouts, algos, t, mem, comm, count in self.rows():
            table.add_row(layer, layouts, algos, _fmt_s(t), _fmt_b(mem), _fmt_b(comm), str(count))
        console = Console(width=160, record=True, file=open("/dev/null", "w"))
        console.print(table)
        text = console.export_text()
        if self.predicted:
            p = self.predicted
            text += (f"predicted step {_fmt_s(p.step_s)} (compute {_fmt_s(p.compute_s)}, "
                     f"exposed comm {_fmt_s(p.comm_s)}), peak memory {_fmt_b(p.peak_memory_bytes)}"
                     f" per GPU, {_fmt_b(p.comm_bytes)} sent per GPU\n")
        if self.recompute:
            text += ("recompute (inputs kept, forward run again in backward): "
                     + ", ".join(r[0] for r in _fold([(m,) for m in self.recompute])) + "\n")
        if self.offload:
            text += ("offload (a recomputed layer's inputs in host memory until its backward): "
                     + ", ".join(r[0] for r in _fold([(m,) for m in self.offload])) + "\n")
        if self.keep_attention:
            text += ("recompute keeping attention's outputs (attention not run again in "
                     "backward): " + ", ".join(r[0] for r in _fold([(m,) for m in self.keep_attention]))
                     + "\n")
        if self.recompute_groups:
            text += ("recompute in groups (one checkpoint around each, keeping its first layer's "
                     "inputs; its forward again in backward): "
                     + ", ".join(_span(g) for g in self.recompute_groups) + "\n")
        for loss, k in self.chunks:
            text += f"chunked: the LM head and {loss} run in {k} chunks of tokens\n"
        for module, k in _fold([(m, k) for m, k in self.chunked_modules]):
            text += (f"chunked: {module} in {k} chunks of tokens (each recomputed in backward)\n"
                     if k > 1 else f"checkpointed: {module} whole (recomputed in backward)\n")
        for where, what in _fold(list(self.kernels)):
            text += f"kernel: {where}: {what}\n"
        for note in self.notes:
            text += f"note: {note}\n"
        return text

    def to_html(self) -> str:
        """One self-contained HTML page: strategy map, time and memory per layer, alternatives."""
        from .plan_html import to_html
        return to_html(self)

    def explain(self, name: str) -> str:
        """The alternatives for a layer's attention (or any node, by node or module name) with
        their predicted costs, and why the chosen one won."""
        keys = [k for k in self.explanations if k == name] or \
            [k for k in self.explanations if _under(self.node(k).module, name)]
        if not keys:
            n = self._find(name)
            return (f"{n.node} ({n.module}, {n.op}): {n.split_str()}"
                    + (f", {n.algorithm}" if n.algorithm else "")
                    + " - no alternatives were recorded (the plan was given, not solved)")
        return "\n".join(self.explanations[k] for k in keys)

    def _find(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.node == name or n.module == name:
                return n
        for n in self.nodes:
            if _under(n.module, name):
                return n
        raise KeyError(f"no node or module {name!r} in the plan")


def _under(module: str, name: str) -> bool:
    """`module` is `name` or inside it: `layers.1` holds `layers.1.attn`, not `layers.10`."""
    return module == name or module.startswith(name + ".")


# ------------------------------------------------------------------ the JSON schema
# An object is {field: (what, required)} (what "|None": null allowed); a what is "str",
# "number", "size" (an int >= 1), OneOf(values), Pair(what, what), [what] (a list) or
# {str: what} (a mapping).
@dataclass(frozen=True)
class _OneOf:
    values: tuple


@dataclass(frozen=True)
class _Pair:
    first: object
    second: object


_COST = {f: ("number", False) for f in ("compute_s", "comm_s", "redistribute_s", "memory_bytes",
                                        "comm_bytes", "transient_bytes")}
_SPLIT = {"axis": ("str", True), "factor": ("str", True)}
_NODE = {"node": ("str", True), "module": ("str", True), "op": ("str", True),
         "splits": ([_SPLIT], False), "algorithm": (_OneOf((None,) + tuple(ALGORITHMS)), False),
         "cost": (_COST, False, "|None"), "key": ("str", False)}
_PREDICTED = {"step_s": ("number", True), "peak_memory_bytes": ("number", True),
              "comm_bytes": ("number", True), "compute_s": ("number", False),
              "comm_s": ("number", False)}
_PLAN = {"version": (_OneOf((1,)), True), "mesh": ([_Pair("str", "size")], True),
         "model_state": (_OneOf(("replicated", "sharded", "offload")), False),
         "nodes": ([_NODE], True), "orders": ([_Pair("str", _OneOf(ORDERS))], False),
         "predicted": (_PREDICTED, False, "|None"), "notes": (["str"], False),
         "explanations": ({str: "str"}, False), "axes": ([_Pair("str", "str")], False),
         "recompute": (["str"], False), "chunks": ([_Pair("str", "size")], False),
         "offload": (["str"], False), "chunked_modules": ([_Pair("str", "size")], False),
         "keep_attention": (["str"], False), "kernels": ([_Pair("str", "str")], False),
         "recompute_groups": ([["str"]], False)}


def _check_json(d) -> None:
    """Raise `ValueError("plan JSON: <path>: expected ..., got ...")` unless `d` is a plan."""
    _check_value(d, _PLAN, "")
    names = [a for a, _ in d["mesh"]]
    if len(set(names)) != len(names):
        raise ValueError(f"plan JSON: mesh: axis names must differ, got {names}")
    for i, n in enumerate(d["nodes"]):
        axes = [s["axis"] for s in n.get("splits", ())]
        for j, a in enumerate(axes):
            if a not in names:
                raise ValueError(f"plan JSON: nodes[{i}].splits[{j}].axis: expected a mesh axis "
                                 f"{names}, got {a!r}")
            if a in axes[:j]:
                raise ValueError(f"plan JSON: nodes[{i}].splits: axis {a!r} splits two factors")


def _check_value(v, what, path: str) -> None:
    def fail(expected: str):
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise ValueError(f"plan JSON: {path or '(top)'}: expected {expected}, got {shown}")

    if what == "str":
        if not isinstance(v, str):
            fail("a string")
    elif what == "number":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail("a number")
    elif what == "size":
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fail("a positive integer")
    elif isinstance(what, _OneOf):
        if isinstance(v, (bool, list, dict)) or v not in what.values:
            fail("one of " + ", ".join("null" if x is None else repr(x) for x in what.values))
    elif isinstance(what, _Pair):
        if not isinstance(v, list) or len(v) != 2:
            fail("a pair [name, value]")
        _check_value(v[0], what.first, f"{path}[0]")
        _check_value(v[1], what.second, f"{path}[1]")
    elif isinstance(what, list):
        if not isinstance(v, list):
            fail("a list")
        for i, x in enumerate(v):
            _check_value(x, what[0], f"{path}[{i}]")
    elif str in what:  # a mapping of names to values
        if not isinstance(v, dict):
            fail("an object")
        for k, x in v.items():
            _check_value(x, what[str], f"{path}.{k}")
    else:  # an object with named fields
        if not isinstance(v, dict):
            fail("an object")
        unknown = sorted(set(v) - set(what))
        if unknown:
            raise ValueError(f"plan JSON: {path or '(top)'}: unknown field {unknown[0]!r}; the "
                             f"fields are {sorted(what)}")
        for name, (kind, required, *null) in what.items():
            here = f"{path}.{name}" if path else name
            if name not in v:
                if required:
                    raise ValueError(f"plan JSON: {here}: missing")
            elif not (null and v[name] is None):
                _check_value(v[name], kind, here)


_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def _fold(rows: list[tuple]) -> list[tuple]:
    """Merge runs of consecutive layers whose rows are the same but for the layer index."""
    blocks: list[list] = []  # [prefix, index, rows]
    for row in rows:
        m = _INDEX.search(row[0])
        prefix, index = (row[0][: m.start()], int(m.group(1))) if m else (row[0], None)
        if blocks and index is not None and blocks[-1][:2] == [prefix, index]:
            blocks[-1][2].append(row)
        else:
            blocks.append([prefix, index, [row]])

    def key(block):
        return [(_INDEX.sub(".#", r[0], count=1),) + r[1:] for r in block[2]]

    out, i = [], 0
    while i < len(blocks):
        j = i + 1
        while (blocks[i][1] is not None and j < len(blocks) and blocks[j][0] == blocks[i][0]
               and blocks[j][1] == blocks[j - 1][1] + 1 and key(blocks[j]) == key(blocks[i])):
            j += 1
        span = f".{blocks[i][1]}-{blocks[j - 1][1]}"
        for r in blocks[i][2]:
            out.append(((_INDEX.sub(span, r[0], count=1) if j > i + 1 else r[0]),) + r[1:])
        i = j
    return out


def _span(layers) -> str:
    """`layers.0-1` for a group of consecutive layers, else them joined by '+'."""
    first, last = layers[0], layers[-1]
    m, n = _INDEX.search(first), _INDEX.search(last)
    if m and n and first[:m.start()] == last[:n.start()] and \
            int(n.group(1)) - int(m.group(1)) == len(layers) - 1:
        return f"{first[:m.start()]}.{m.group(1)}-{n.group(1)}"
    return "+".join(layers)


def _layer_of(module: str) -> str:
    """`layers.3.attn.q_proj` → `layers.3.attn`, `lm.model.layers.3.self_attn.q_proj` →
    `lm.model.layers.3.self_attn`: the part after a layer index is the row; deeper modules
    (leaf projections) fold into it. Without an index: the first three parts."""
    parts = module.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    keep = index + 2 if index is not None else 3
    return ".".join(parts[:keep])


def _fmt_s(t: float) -> str:
    if t == 0:
        return "-"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_b(b: float) -> str:
    if b == 0:
        return "-"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b:.0f} B"
