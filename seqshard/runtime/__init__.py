"""seqshard.runtime: what generated per-rank code calls.

    collectives  autograd-aware collectives as custom ops (all-to-all, all-gather, reduce-scatter,
                 all-reduce, ring shift)
    backends     local attention kernels behind one (out, lse) interface, and their selection
    merge        numerically stable fp32 merge of partial attention results
    peer         Ulysses exchanges by copy engine over symmetric memory (transport='peer')
    layout       contig / zigzag sequence layouts, positions and permutations
    blocks       attention masks as full / causal-square / masked blocks over shards
    masks        structured masks from per-token tensors: documents (segments), positions,
                 sliding window, key padding (every attention function's keyword arguments)
    ring, tokenring, allgather, ulysses (+ hybrid), local
                 exact distributed attention, each a custom op seqshard::<name>_attention with a
                 readable wrapper of the same name
    opsupport    what those share: input checks, option defaults, `register_attention_op`
    sharding     redistribution steps (slice / gather / all-to-all a factor) built on collectives
    offload      a recomputed layer's inputs in host memory between forward and backward
    selective    a recomputed layer that keeps its attention's outputs (attention runs once)

Tensors are q [b, h, s_local, e], k, v [b, hk, s_local, e]; lse is [b, h, s_local], fp32.
The Triton kernels it runs on CUDA (the fp32 merge, fp32 += bf16 adds, Ulysses' layout copies;
torch ops elsewhere) are seqshard.codegen.kernels, the one part of codegen the runtime imports.
"""

from seqshard.runtime import layout, merge
from seqshard.runtime.allgather import allgather_attention
from seqshard.runtime.backends import (BACKENDS, attention_backward, attention_forward,
                                       backend_report, select_backend)
from seqshard.runtime.collectives import (all_gather, all_reduce, all_to_all, group_name,
                                          reduce_scatter, resolve_group, ring_shift)
from seqshard.runtime.local import local_attention
from seqshard.runtime.ring import ring_attention
from seqshard.runtime.tokenring import tokenring_attention
from seqshard.runtime.ulysses import hybrid_attention, ulysses_attention

__all__ = [
    "layout",
    "merge",
    "BACKENDS",
    "attention_forward",
    "attention_backward",
    "select_backend",
    "backend_report",
    "all_to_all",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "ring_shift",
    "group_name",
    "resolve_group",
    "ring_attention",
    "allgather_attention",
    "ulysses_attention",
    "hybrid_attention",
    "tokenring_attention",
    "local_attention",
]
