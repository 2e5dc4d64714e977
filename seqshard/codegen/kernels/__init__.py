"""seqshard's own kernels, where fusion pays and the compiler does not reach; each kernel's
Triton code sits in a private module imported on first use (CPU-only installs need no Triton),
with a torch path for devices Triton does not run on.

    linear_ce.linear_cross_entropy   LM head + cross-entropy in token chunks, logits never whole
"""
