"""Strategies: what splitting a node's factors means for its inputs and its output.

A node's strategy splits, on each mesh axis, at most one atomic factor of its iteration space
(the factors of its inputs and outputs). From the node's factor roles (`seqshard.dims`) follow:

    every input holding the factor  → Shard(factor) on that axis, the others replicated on it
    the output holding the factor   → Shard(factor) on that axis
    a SUM factor (contracted)       → the output is a partial sum (P) on that axis
    a SEQ factor (attention)        → needs a distributed attention algorithm (`algorithms`)
    a WHOLE factor                  → illegal: the op needs it whole
    a joint factor (`Factors.join`) → split piece by piece: where the op makes it or cuts it
                                      (cat, split, slice), the pieces are split on their
                                      `piece_atom`s (`joint_layouts`)

    candidates(dims, node, mesh)    every legal strategy of a node (what the solver chooses from)
    resolve(node, dims, splits, algorithm, axis_names)   one strategy, checked
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import product
from math import prod

import torch
import torch.fx as fx

from seqshard.capture import ATTENTION, mask_inputs, sdpa_options
from seqshard.dims import DimAnalysis, Role

from .algorithms import ALGORITHMS, SEQ_ALGORITHMS, for_seq_axes
from .layout import P, R, Layout, PlanError, Shard
from .overrides import Spec, forced

aten = torch.ops.aten

__all__ = ["Strategy", "resolve", "candidates", "whole_somewhere", "plan_nodes", "tensor_inputs",
           "atoms_of", "is_attention", "where"]


@dataclass(frozen=True)
class Strategy:
    splits: tuple                  # per mesh axis: the atom it splits, or None
    algorithm: str | None          # attention nodes only: a key of `ALGORITHMS`
    inputs: tuple                  # (input node, required Layout) for every tensor input
    output: Layout | list          # Layout, or a list of Layouts (None: not a tensor) for multi-output nodes

    def outputs(self) -> list:
        return self.output if isinstance(self.output, list) else [self.output]


def plan_nodes(dims: DimAnalysis) -> list[fx.Node]:
    """The nodes a plan decides: every op except tuple indexing (it follows its producer)."""
    return [n for n in dims.cap.nodes() if n.op == "call_function" and n.target is not operator.getitem]


def tensor_inputs(node: fx.Node, dims: DimAnalysis) -> list[fx.Node]:
    return [x for x in node.all_input_nodes if isinstance(dims.sigs.get(x), tuple)]


def atoms_of(dims: DimAnalysis, sig) -> set[int]:
    return {dims.F.find(a) for d in sig for a in dims.F.atoms_of(d)}


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ATTENTION


def where(dims: DimAnalysis, node: fx.Node) -> str:
    """`name (module: source line)`, how errors point at a node."""
    return f"{node.name} ({dims.cap.module_path(node) or 'top'}: {dims.cap.source(node)})"


def local_heads(dims: DimAnalysis, node: fx.Node, splits: tuple, sizes) -> tuple[int, int]:
    """(query heads, kv heads) per rank of an attention node once mesh axes that split a head
    factor (not the sequence) are applied."""
    att, F = dims.attention(node), dims.F
    seq = dims.seq_atoms(node)
    heads_atoms = {F.find(a) for a in F.atoms_of(att.heads)}
    kv_atoms = {F.find(a) for a in F.atoms_of(att.kv_heads)}
    by = [(sizes[i], a) for i, a in enumerate(splits) if a is not None and a not in seq]
    h = F.dim_size(att.heads) // prod((n for n, a in by if a in heads_atoms), start=1)
    hk = F.dim_size(att.kv_heads) // prod((n for n, a in by if a in kv_atoms), start=1)
    return h, hk


def repeated_atoms(dims: DimAnalysis, node: fx.Node) -> set[int]:
    """Atoms that index two dims of one of the node's tensors: `Linear(d, d)`'s weight when a
    residual makes its output features the input's, a self-attention mask [s, s]."""
    out = set()
    for x in list(node.all_input_nodes) + [node]:
        s = dims.sigs.get(x)
        for sig in (s if isinstance(s, list) else [s]):
            if not isinstance(sig, tuple):
                continue
            atoms = [dims.F.find(a) for d in sig for a in dims.F.atoms_of(d)]
            out |= {a for a in atoms if atoms.count(a) > 1 and dims.F.size(a) > 1}
            out |= {a for a in atoms if _piece_atoms(dims.F, a) & set(atoms)}
    return out


def _piece_atoms(F, a: int) -> set[int]:
    """The atoms of a joint factor's pieces, through joints inside them (empty for others): a
    tensor that holds one of them besides the joint factor (a weight [5, 5 ⊕ 7]) would hold it
    twice once the joint factor is split piece by piece."""
    out = set()
    for p in F.pieces(a) or ():
        for b in F.atoms_of(p):
            out |= {F.find(b)} | _piece_atoms(F, b)
    return out


def resolve(node: fx.Node, dims: DimAnalysis, splits: tuple, algorithm: str | None,
            axis_names: tuple[str, ...], sizes: tuple[int, ...] | None = None) -> Strategy:
    """The strategy of `node` when mesh axis i splits atom `splits[i]` (None: nothing). With
    `sizes` (the mesh axis sizes), an attention algorithm's head rule is checked too."""
    roles = dims.roles.get(node, {})
    space = set(dims.iteration_atoms(node))
    at = where(dims, node)
    repeated = repeated_atoms(dims, node) if any(a is not None for a in splits) else set()
    mask = sdpa_options(node).get("attn_mask") if is_attention(node) else None
    if mask is not None and any(a in dims.seq_atoms(node) for a in splits):
        raise PlanError(
            f"{at}: its attn_mask {mask.name} (built at {dims.cap.source(mask) or 'top'}) is "
            "not a mask seqshard reads as per-token tensors ("
            + node.meta.get("seqshard_mask", "not analysed") + "); distributed attention "
            "cannot take an S×S mask, so the sequence stays whole here: build the mask from "
            "causal / position_ids / document ids / a sliding window / key padding, or "
            "split another factor here (heads)")
    for axis, a in zip(axis_names, splits):
        if a is None:
            continue
        label = dims.F.label(a)
        if a not in space:
            raise PlanError(f"{at} has no factor {label!r} to split on axis {axis!r}")
        role = roles.get(a, Role.LOCAL)
        if role == Role.WHOLE:
            why = dims.unsupported.get(node)
            raise PlanError(f"{at} needs factor {label!r} whole"
                            + (f" ({why}; it runs replicated)" if why else "")
                            + f"; it cannot be split on axis {axis!r} here - split another "
                            "factor or let this node be replicated")
        if a in repeated:
            raise PlanError(f"{at}: factor {label!r} indexes two dims of one tensor here (a "
                            "square weight tied by a residual, an S×S mask); split, each rank "
                            "would hold only diagonal blocks - split it elsewhere or let this "
                            f"node be replicated on axis {axis!r}")
        if role == Role.SEQ and algorithm not in SEQ_ALGORITHMS:
            raise PlanError(f"{at} splits the attention sequence {label!r}: choose an "
                            f"algorithm from {SEQ_ALGORITHMS}, not {algorithm!r}")
    if is_attention(node):
        seq = dims.seq_atoms(node)
        seq_axes = [i for i, a in enumerate(splits) if a in seq]
        algorithm = algorithm or "local"
        algo = ALGORITHMS[algorithm]
        if algo.seq_axes != len(seq_axes):
            raise PlanError(f"{at}: {algorithm!r} splits the sequence over {algo.seq_axes} mesh "
                            f"axes, this strategy over {len(seq_axes)}; use "
                            + " or ".join(repr(a.name) for a in for_seq_axes(len(seq_axes)))
                            + (" (ring on the outer axis, Ulysses on the inner)" if len(seq_axes) == 2 else ""))
        if seq_axes and atoms_of(dims, (dims.attention(node).seq_q,)) != seq:
            raise PlanError(f"{at}: distributed attention needs self-attention (queries and "
                            "keys from the same sequence)")
        joint = [a for a in splits if a in seq and dims.F.pieces(a) is not None]
        if joint and (sdpa_options(node).get("is_causal") or mask_inputs(node)):
            raise PlanError(
                f"{at}: its sequence {dims.F.label(joint[0])!r} is a concatenation ("
                + " ⊕ ".join(dims.F.dim_str(p) for p in dims.F.pieces(joint[0]))
                + ") split piece by piece, so each rank holds its share of every piece and the "
                "order along it is not the sequence's; a causal or per-token mask depends on "
                "that order. Split another factor here (heads), or keep the sequence whole")
        queries = atoms_of(dims, (dims.attention(node).seq_q,))
        if mask_inputs(node) and queries != seq and any(a in queries for a in splits):
            raise PlanError(f"{at}: a per-token mask is for self-attention; the queries of this "
                            "cross-attention cannot be split under it")
        if sizes is not None and seq_axes:
            h, hk = local_heads(dims, node, splits, sizes)
            why = algo.check_heads(h, hk, tuple(sizes[i] for i in seq_axes))
            if why:
                raise PlanError(f"{at}: {why}")
    elif algorithm not in (None, "local"):
        raise PlanError(f"{at} is not attention; it takes no algorithm ({algorithm!r})")

    inputs = []
    per_token = set(mask_inputs(node).values()) if is_attention(node) else set()
    whole = dims.seq_atoms(node) if per_token else set()
    for x in tensor_inputs(node, dims):
        have = atoms_of(dims, dims.sigs[x]) - (whole if x in per_token else set())
        inputs.append((x, tuple(Shard(a) if a is not None and a in have else R for a in splits)))

    def out_layout(sig):
        have = atoms_of(dims, sig)
        return tuple(R if a is None else Shard(a) if a in have else
                     (P if roles.get(a) == Role.SUM else R) for a in splits)

    sig = dims.sigs[node]
    output = [out_layout(s) if s is not None else None for s in sig] if isinstance(sig, list) \
        else out_layout(sig)
    inputs, output = joint_layouts(dims, node, splits, inputs, output)
    return Strategy(tuple(splits), algorithm if is_attention(node) else None, tuple(inputs), output)


def joint_layouts(dims: DimAnalysis, node: fx.Node, splits: tuple, inputs: list, output):
    """Where a node makes a joint factor (cat) or cuts it into its pieces (split, a slice of one
    piece) and a mesh axis splits it: on that axis each piece is split on its `piece_atom`
    (`cat(text_r, video_r)` is the joint factor's share on rank r). Else as given."""
    F = dims.F
    joint = dims.attrs.get(node, {}).get("joint")
    axes = [i for i, a in enumerate(splits) if joint is not None and a == F.find(joint)]
    if not axes:
        return inputs, output
    pieces = F.pieces(joint)
    at = where(dims, node)
    if pieces is None:
        raise PlanError(f"{at} needs factor {F.label(joint)!r} whole: it is cut here into pieces "
                        "that are not those it was concatenated from")
    atoms = [F.piece_atom(p) for p in pieces]
    if None in atoms:
        raise PlanError(f"{at}: factor {F.label(joint)!r} joins a piece of size 1 without a "
                        "factor of its own; it cannot be split piece by piece here")

    def via(layout, k):  # k: the piece, None for an empty tensor (nothing to split)
        return tuple((R if k is None else Shard(atoms[k])) if i in axes else p
                     for i, p in enumerate(layout))

    packet = getattr(node.target, "overloadpacket", node.target)
    if packet is aten.cat:
        dim = norm_cat_dim(dims, node)
        nonempty = [x for x in node.args[0] if dims.F.dim_size(dims.sigs[x][dim]) > 0]
        inputs = [(x, via(lay, nonempty.index(x) if x in nonempty else None)) for x, lay in inputs]
    elif isinstance(output, list):  # split into the pieces (size-0 outputs hold none)
        sizes = [F.dim_size(s[dims.attrs[node]["split_dim"]]) for s in dims.sigs[node]]
        ks = iter(range(len(pieces)))
        output = [via(lay, next(ks) if n else None) for lay, n in zip(output, sizes)]
    else:  # a slice that is one piece
        output = via(output, dims.attrs[node]["slice"]["piece"])
    return inputs, output


def norm_cat_dim(dims: DimAnalysis, node: fx.Node) -> int:
    """The dim a `cat` node concatenates along, non-negative."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % len(dims.sigs[node])


def candidates(dims: DimAnalysis, node: fx.Node, mesh: tuple[tuple[str, int], ...],
               spec: Spec | None = None, whole: frozenset = frozenset()) -> list[Strategy]:
    """Every legal strategy of `node` (restricted by an override spec when given); factors in
    `whole` are not offered (see `whole_somewhere`)."""
    names = tuple(a for a, _ in mesh)
    sizes = tuple(n for _, n in mesh)
    roles = dims.roles.get(node, {})
    atoms = [a for a in dims.iteration_atoms(node)
             if dims.F.size(a) > 1 and roles.get(a, Role.LOCAL) != Role.WHOLE
             and a not in whole]
    if spec is not None and spec.splits is not None and not node.meta.get("seqshard_per_token"):
        forced_splits, _ = forced(dims, node, spec, names)
        choices = [[a] for a in _queries_not_keys(dims, node, forced_splits, sizes)]
    else:  # (a mask's per-token tensors, capture/masks.py, are small: the solver places them)
        # an axis of size 1 splits nothing (a split there would only add copies)
        choices = [[None] + [a for a in atoms if dims.F.size(a) >= n > 1] for n in sizes]
    out, why = [], []
    for splits in product(*choices):
        algos = [None]
        if is_attention(node):
            seq = dims.seq_atoms(node)
            count = sum(1 for a in splits if a in seq)
            algos = [a.name for a in for_seq_axes(count)]
            if spec is not None and spec.algorithm is not None and count:
                algos = [a for a in algos if a == spec.algorithm]  # only where s is split
        for algo in algos:
            try:
                out.append(resolve(node, dims, tuple(splits), algo, names, sizes))
            except PlanError as e:
                why.append(str(e))
    if not out:
        raise PlanError(f"no legal strategy for {where(dims, node)}"
                        + (" under its override" if spec else "")
                        + (": " + "; ".join(dict.fromkeys(why)) if why else ""))
    return out


def _queries_not_keys(dims: DimAnalysis, node: fx.Node, splits: tuple, sizes) -> tuple:
    """Cross-attention (keys from another sequence) whose key sequence an override splits: the
    keys stay whole and the axis splits the query sequence instead (local attention; the
    distributed algorithms are for self-attention)."""
    att = dims.attention(node) if is_attention(node) else None
    if att is None:
        return splits
    seq_k, F = dims.seq_atoms(node), dims.F
    queries = [F.find(a) for a in F.atoms_of(att.seq_q)]
    if set(queries) == seq_k:
        return splits
    roles = dims.roles.get(node, {})
    out = list(splits)
    for i, a in enumerate(splits):
        if a in seq_k:
            out[i] = next((b for b in queries if b not in out and F.size(b) >= sizes[i]
                           and roles.get(b, Role.LOCAL) != Role.WHOLE), None)
    return tuple(out)


def whole_somewhere(dims: DimAnalysis) -> frozenset:
    """Factors some op needs whole (a norm's hidden dim, attention's head dim, a vocabulary).
    They are not offered as splits anywhere: splitting one elsewhere only adds a gather in
    front of that op, and leaving them out keeps 2-D meshes fast to solve. (Ops without a rule
    mark everything whole; they say nothing about how a factor is used, so they don't count;
    nor do the small ops that make a mask's per-token tensors, such as the scan that numbers
    packed documents: they run replicated. Nor do concatenations and splits into unequal
    pieces: a joint text+video attention concatenates the two sequences and splits them again,
    and the video's sequence is still worth splitting everywhere else, and at the joint too,
    piece by piece: `joint_layouts`.)"""
    return frozenset(a for n, roles in dims.roles.items()
                     if n not in dims.unsupported and not n.meta.get("seqshard_per_token")
                     and getattr(n.target, "overloadpacket", n.target) not in PIECES
                     for a, r in roles.items() if r == Role.WHOLE)


PIECES = {aten.cat, aten.split_with_sizes, aten.split, aten.tensor_split, operator.getitem}
"""Ops that join or cut a dim into pieces, and the pick of one piece (the dim is whole there,
which is no reason to keep it whole elsewhere)."""
