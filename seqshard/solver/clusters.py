"""Repeated layers: identical layers are solved once (one template per position in a layer class).

Clustering identical blocks is what keeps an 80-layer model's CP-SAT problem small (51 templates
for Llama-3-70B): every node of a repeated layer maps to the same node of its first copy.
"""

from __future__ import annotations

import re
from typing import Callable

import torch.fx as fx

from seqshard.dims import DimAnalysis

__all__ = ["cluster_layers"]

_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")


def cluster_layers(dims: DimAnalysis, nodes: list[fx.Node],
                   spec_of: Callable[[str], object] = lambda module: None) -> dict[fx.Node, fx.Node]:
    """Map every node of a repeated layer to the same node of the first identical layer.

    A layer is a module path ending in an index (`layers.7`, `blocks.3`); two layers are
    identical when their nodes have the same ops, factor signatures, wiring and forced choices
    (`spec_of(module path)`: an override on `layers.1.attn` alone makes layer 1 its own class)."""
    layers: dict[str, list[fx.Node]] = {}
    for n in nodes:
        m = _LAYER.match(dims.cap.module_path(n))
        if m:
            layers.setdefault(m.group(1), []).append(n)
    templates: dict[tuple, list[fx.Node]] = {}
    mapping = {n: n for n in nodes}
    for members in layers.values():
        pos = {n: i for i, n in enumerate(members)}
        key = tuple((str(n.target), _shape_key(dims, n), spec_of(dims.cap.module_path(n)),
                     tuple(("in", pos[x]) if x in pos else ("out", _shape_key(dims, x))
                           for x in n.all_input_nodes)) for n in members)
        if key in templates:
            for n, t in zip(members, templates[key]):
                mapping[n] = t
        else:
            templates[key] = members
    return mapping


_AUTO = re.compile(r"\bx\d+\b")


def _shape_key(dims: DimAnalysis, n: fx.Node) -> str:
    """A node's factor signature with auto-generated names (x12) blanked, plus its shape: equal
    for the same tensor of two identical layers."""
    val = n.meta.get("val")
    shape = tuple(val.shape) if hasattr(val, "shape") else None
    return f"{_AUTO.sub('x', dims.sig_str(n))}{shape}"
