"""Cost model: cluster spec + strategy → seconds, bytes moved, bytes held.

    cluster      GPU, Link, Cluster: presets, JSON, mapping of mesh axes onto links
    collectives  alpha-beta time of all-gather, reduce-scatter, all-reduce, all-to-all, send/recv
    compute      roofline per op kind, FLOP/byte counters, attention FLOPs, model-state memory
    attention    ring, allgather, ulysses, hybrid, tokenring, local: time, traffic, memory
    calibrate    measure this machine and write a cluster JSON
    symbolic     the helpers that let every cost take numbers or sympy expressions

Every cost is in seconds or bytes.
"""

from seqshard.costmodel.attention import AttentionCost, AttentionShape
from seqshard.costmodel.cluster import GPU, Cluster, Link

__all__ = ["GPU", "Link", "Cluster", "AttentionShape", "AttentionCost"]
