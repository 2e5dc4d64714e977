"""Repeated layers: identical layers are solved once (one template per position in a layer class).

Clustering identical blocks is what keeps an 80-layer model's CP-SAT problem small (51 templates
for Llama-3-70B): every node of a repeated layer maps to the same node of its first copy.
"""

from __future__ import annotations

import re
from typing import Callable

import torch.fx as fx

from seqshard.dims import DimAnalysis

__all__ = ["cluster_layers", "layer_of", "layer_classes"]

_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")


def layer_of(module: str) -> str | None:
    """The layer a module path belongs to: its prefix up to the first index (`layers.3.attn.q`
    → `layers.3`, `blocks.0.mlp.0` → `blocks.0`), or None for code outside any layer."""
    m = _LAYER.match(module)
    return m.group(1) if m else None


def cluster_layers(dims: DimAnalysis, nodes: list[fx.Node],
                   spec_of: Callable[[str], object] = lambda module: None) -> dict[fx.Node, fx.Node]:
    """Map every node of a repeated layer to the same node of the first identical layer.

    A layer is a module path ending in an index (`layers.7`, `blocks.3`); two layers are
    identical when their nodes have the same ops, factor signatures, wiring and forced choices
    (`spec_of(module path)` of every node and of the layer itself: an override on
    `layers.1.attn` alone, or `recompute` on `layers.1`, makes layer 1 its own class)."""
    layers: dict[str, list[fx.Node]] = {}
    for n in nodes:
        layer = layer_of(dims.cap.module_path(n))
        if layer:
            layers.setdefault(layer, []).append(n)
    templates: dict[tuple, list[fx.Node]] = {}
    mapping = {n: n for n in nodes}
    for layer, members in layers.items():
        pos = {n: i for i, n in enumerate(members)}
        key = (spec_of(layer),) + tuple((str(n.target), _shape_key(dims, n), spec_of(dims.cap.module_path(n)),
                     tuple(("in", pos[x]) if x in pos else ("out", _shape_key(dims, x))
                           for x in n.all_input_nodes)) for n in members)
        if key in templates:
            for n, t in zip(members, templates[key]):
                mapping[n] = t
        else:
            templates[key] = members
    return mapping


def layer_classes(dims: DimAnalysis, template: dict[fx.Node, fx.Node]) -> dict[str, list[str]]:
    """Layer classes: template layer path → the layers it stands for (itself first), in graph
    order. A class is what the solver decides once (its strategies, whether it recomputes)."""
    classes: dict[str, list[str]] = {}
    seen = set()
    for n, t in template.items():
        layer = layer_of(dims.cap.module_path(n))
        if layer and layer not in seen:
            seen.add(layer)
            classes.setdefault(layer_of(dims.cap.module_path(t)), []).append(layer)
    return classes


_AUTO = re.compile(r"\bx\d+\b")


def _shape_key(dims: DimAnalysis, n: fx.Node) -> str:
    """A node's factor signature with auto-generated names (x12) blanked, plus its shape: equal
    for the same tensor of two identical layers."""
    val = n.meta.get("val")
    shape = tuple(val.shape) if hasattr(val, "shape") else None
    return f"{_AUTO.sub('x', dims.sig_str(n))}{shape}"
