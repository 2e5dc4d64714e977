"""seqshard's own kernels, where fusion pays and the compiler does not reach; each kernel's
Triton code sits in a private module imported on first use (CPU-only installs need no Triton),
with a torch path for devices Triton does not run on.

    linear_ce.linear_cross_entropy   LM head + cross-entropy in token chunks, logits never whole
    a2a_layout.pack / unpack         the layout copies around all-to-alls (permute + pack in one
                                     pass, RoPE optionally fused); copy_ for any strided views
    accumulate.merge_rows_           the ring's fp32 merge of partial attention results, and
    accumulate.add_rows_             fp32 += bf16, one pass each

A leaf: it imports nothing else of seqshard, so both the program codegen emits and the runtime
(ring merges, Ulysses' exchanges) call it (tests/test_layering.py).
"""
