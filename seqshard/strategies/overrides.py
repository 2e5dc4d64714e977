"""Overrides: force choices per module-name pattern; the planner fills in the rest.

    overrides = {"*": "split:s ring zigzag",            # every node: split s, ring attention
                 "layers.*.attn": "ulysses",            # ...but Ulysses inside attention modules
                 "temporal.*": "split:t"}

Patterns are `fnmatch` globs over module paths (`layers.3.attn.q_proj`; top-level code has the
path "" and matches "*"). When several patterns match a node, each later one overrides the parts
it sets. A spec is a list of terms:

    split:F         split factor F on every mesh axis this spec does not give another factor
    split:F@A       split factor F on mesh axis A
    split:seq       split the sequence: at each node, the query sequence of its attention (the
                    nearest attention node by module path; see `sequence_of`), so each
                    attention of a video model splits its own sequence (Latte: the patches of a
                    frame in spatial blocks, the frames in temporal blocks)
    replicate       split nothing here
    ring | allgather | ulysses | hybrid | tokenring | local
                    the attention algorithm (attention nodes whose sequence is split)
    zigzag | contig the order of the split factors of this spec (zigzag balances causal work)
    recompute       on a layer (a module path ending in an index, `layers.3`): keep only its
                    inputs for backward and run its forward again there (activation checkpointing)
    recompute:selective
                    on a layer: recompute it, but keep its attention's outputs (out, lse) too, so
                    attention does not run again in backward (LightSeq's rematerialization-aware
                    checkpointing); with `offload`, its inputs in host memory as well. Without an
                    override the planner picks how many layers of each class do this
    offload         on a layer: recompute it, and keep its inputs in host memory until its
                    backward (copied out on a side stream in forward, back in backward). Without
                    an override the planner picks how many layers of each class do this (the
                    earliest: their backward runs last)
    group:G         on layers (`layers.*`): recompute them in nested groups of G consecutive
                    layers of each class (the last group shorter where G does not divide them):
                    each group keeps only its first layer's inputs, and in backward runs its
                    forward again (but for its last layer) before each layer's own backward
                    (`solver/groups.py`); with `offload`, the groups' inputs in host memory;
                    group:1 is plain `recompute`. Without an override the planner picks G per
                    class from `solver.groups.GROUP_SIZES`
    chunk | chunk:K on an LM head whose logits feed a cross-entropy (`lm_head`): run the head and
                    the loss in chunks of tokens (K of them; default: the planner sizes them);
                    on a token-wise module inside a layer (`layers.*.mlp`, see
                    `solver.token_regions`): run it in K chunks of tokens, each recomputed in
                    backward (ALST's tiled MLP)

A node that lacks the factor stays replicated on that axis, except an attention node, where it
is an error (names are per node: Latte's spatial attention calls its patches `s_3`, and `s` is
the text there; `split:seq` is each attention's own sequence). A node that has the factor but
cannot split it (a softmax over it, an op without a rule) is an error that names the node and
its source line: force a different factor there, or `replicate`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from seqshard.dims import Role

from .algorithms import ALGORITHMS, NAMES
from .layout import PlanError
from .plan import ORDERS

__all__ = ["Spec", "parse_spec", "spec_for", "forced", "sequence_of", "SEQ"]

SEQ = "seq"
"""The factor name an override uses for "the sequence of this node's attention" (`split:seq`)."""

DEFAULT_FOR_SEQ_AXES = {1: "ring", 2: "hybrid"}
"""The algorithm an override that splits the sequence but names none gets."""


@dataclass(frozen=True)
class Spec:
    splits: tuple[tuple[str | None, str], ...] | None = None   # (axis or None for "the rest", factor)
    algorithm: str | None = None
    order: str | None = None
    recompute: bool | None = None
    chunk: int | None = None       # chunk count; 0: the planner's
    offload: bool | None = None    # recompute, its inputs in host memory
    selective: bool | None = None  # recompute, keeping attention's outputs
    group: int | None = None       # recompute in nested groups of this many layers

    def merged(self, later: "Spec") -> "Spec":
        return Spec(later.splits if later.splits is not None else self.splits,
                    later.algorithm or self.algorithm, later.order or self.order,
                    later.recompute if later.recompute is not None else self.recompute,
                    later.chunk if later.chunk is not None else self.chunk,
                    later.offload if later.offload is not None else self.offload,
                    later.selective if later.selective is not None else self.selective,
                    later.group if later.group is not None else self.group)

    def assign(self, axis_names: tuple[str, ...]) -> dict[str, str]:
        """axis → factor name."""
        out: dict[str, str] = {}
        for axis, factor in self.splits or ():
            if axis is not None:
                if axis not in axis_names:
                    raise ValueError(f"override names mesh axis {axis!r}; the mesh axes are {axis_names}")
                out[axis] = factor
        for axis, factor in self.splits or ():
            if axis is None:
                for a in axis_names:
                    out.setdefault(a, factor)
        return out


def parse_spec(text: str) -> Spec:
    splits, algorithm, order, recompute, chunk, offload = None, None, None, None, None, None
    selective = group = None
    for term in text.replace(",", " ").split():
        if term.startswith("split:"):
            body = term[len("split:"):]
            factor, _, axis = body.partition("@")
            if not factor:
                raise ValueError(f"override term {term!r}: write split:FACTOR or split:FACTOR@AXIS")
            splits = (splits or ()) + ((axis or None, factor),)
        elif term == "replicate":
            splits = ()
        elif term in NAMES:
            algorithm = term
        elif term in ORDERS:
            order = term
        elif term == "recompute":
            recompute = True
            selective = bool(selective)  # plain: attention runs again (unless selective here)
        elif term == "recompute:selective":
            recompute = selective = True
        elif term == "offload":
            recompute = offload = True
        elif term.startswith("group:"):
            count = term[len("group:"):]
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"override term {term!r}: write group:G with G >= 1")
            recompute, group = True, int(count)
            selective = bool(selective)
        elif term == "chunk" or term.startswith("chunk:"):
            count = term[len("chunk:"):] if term != "chunk" else "0"
            if not count.isdigit() or (term != "chunk" and int(count) < 1):
                raise ValueError(f"override term {term!r}: write chunk or chunk:K with K >= 1")
            chunk = int(count)
        else:
            raise ValueError(f"unknown override term {term!r} in {text!r}; terms are split:F, "
                             f"split:F@AXIS, replicate, {', '.join(NAMES)}, {', '.join(ORDERS)}, "
                             "recompute, recompute:selective, offload, group:G, chunk, chunk:K")
    return Spec(splits, algorithm, order, recompute, chunk, offload, selective, group)


def spec_for(overrides: dict[str, str], module: str) -> Spec | None:
    """The merged spec of every pattern that matches `module` (later patterns win)."""
    spec = None
    for pattern, text in overrides.items():
        if fnmatch.fnmatchcase(module, pattern):
            s = parse_spec(text)
            spec = s if spec is None else spec.merged(s)
    return spec


def forced(dims, node, spec: Spec, axis_names: tuple[str, ...]):
    """(splits as atoms per axis, algorithm) that `spec` forces on `node`, checked."""
    assign = spec.assign(axis_names)
    splits = []
    where = f"{node.name} ({dims.cap.module_path(node) or 'top'}: {dims.cap.source(node)})"
    for axis in axis_names:
        name = assign.get(axis)
        if name == SEQ:  # its outermost atom (the patches' rows)
            atom = next((a for a in sequence_of(dims, node) if dims.F.size(a) > 1), None)
        else:
            atom = dims.factor(node, name) if name else None
        if name and atom is None and dims.attention(node) is not None:
            raise PlanError(
                f"{where}: the override on axis {axis!r} splits factor {name!r}, which this "
                "attention lacks; its sequence is "
                + "·".join(dims.F.label(a) for a in sequence_of(dims, node))
                + f" (names are per node). Write 'split:{SEQ}' for each attention's own "
                "sequence, or name the factor this attention has")
        if atom is not None and dims.roles.get(node, {}).get(atom) == Role.WHOLE:
            why = dims.unsupported.get(node)
            raise PlanError(
                f"{where} cannot split factor {dims.F.label(atom)!r} (forced by an override "
                f"on axis {axis!r}): "
                + (f"{why}, so it runs on replicated inputs" if why else "it needs the factor whole")
                + f". Override {dims.cap.module_path(node) or '*'!r} with 'replicate' or another "
                "factor, or add an op rule for it")
        splits.append(atom)
    algorithm = None
    if dims.attention(node) is not None:
        seq = dims.seq_atoms(node)
        count = sum(1 for a in splits if a in seq)
        algorithm = spec.algorithm or DEFAULT_FOR_SEQ_AXES.get(count, "local")
        if count and ALGORITHMS[algorithm].seq_axes != count:
            raise PlanError(f"{where}: {algorithm!r} attention splits the sequence over "
                            f"{ALGORITHMS[algorithm].seq_axes} mesh axes, the override over {count}")
        if not count:
            algorithm = "local"
    return tuple(splits), algorithm


def sequence_of(dims, node) -> tuple[int, ...]:
    """The atoms `split:seq` means at `node`, outermost first: an attention's query sequence
    (for cross-attention, its queries: the keys stay whole); elsewhere the query sequence of the
    nearest attention nodes (the longest common module path) if the node carries it, else ()
    (the node stays replicated). Nearest attentions with different sequences that the node all
    carries (a top-level node of a spatial-temporal model) are an error: name a factor there."""
    F = dims.F
    attention = [n for n in dims.attrs if dims.attention(n) is not None]
    if not attention:
        raise PlanError(f"split:{SEQ} splits the sequence of attention, and this model has none; "
                        "name the factor to split (`seqshard capture` lists them)")

    def queries(n):
        return tuple(F.find(a) for a in F.atoms_of(dims.attention(n).seq_q))

    if node in attention:
        return queries(node)
    path = dims.cap.module_path(node).split(".")

    def shared(n):  # module path parts in common with `node`
        k = 0
        for a, b in zip(path, dims.cap.module_path(n).split(".")):
            if a != b:
                break
            k += 1
        return k

    near = max(shared(n) for n in attention)
    have = set(dims.iteration_atoms(node))
    found = {queries(n): n for n in attention if shared(n) == near and set(queries(n)) <= have}
    if len(found) > 1:
        raise PlanError(
            f"{node.name} ({dims.cap.module_path(node) or 'top'}: {dims.cap.source(node)}) "
            f"carries the sequences of {len(found)} attentions as near to it as each other ("
            + ", ".join(f"{n.name} in {dims.cap.module_path(n)}: "
                        + "·".join(F.label(a) for a in seq) for seq, n in found.items())
            + f"), so 'split:{SEQ}' does not say which; override this module with a factor name "
            "or 'replicate'")
    return next(iter(found), ())
