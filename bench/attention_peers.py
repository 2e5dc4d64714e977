"""The peers bench/attention.py measures ours against, set up the way their users do, on the same
local kernel as ours: PyTorch context parallel (all-gather and all-to-all rotation) and
DeepSpeed-Ulysses; and the SDPA backend lists that pick that kernel.

    cp-allgather, cp-alltoall  `context_parallel(mesh)` with `set_rotate_method`, causal load
                 balancing (its head-tail layout is our zigzag); GQA K/V repeated to the query
                 heads before SDPA, as torchtitan does.
    ds-ulysses   `DistributedAttention(local_sdpa, group, scatter_idx=2, gather_idx=1)` on
                 [b, s, h, e] inputs (batch dim 0); K/V cross at kv heads, repeated after the
                 exchange.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_BY_NAME = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def expand(x, rep: int):
    """K/V heads repeated to the query heads (GQA), along dim 1."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def sdpa_backends(backend: str, device):
    """PyTorch SDPA backends in priority order, ours first (the peers and the ideal use the same
    local kernel as ours where SDPA has it)."""
    if device.type == "cpu":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend, SDPBackend.CUDNN_ATTENTION)
    rest = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return [first, *(b for b in rest if b != first)]


def sdpa_backends_named(names: list[str]):
    """--peer-sdpa's names ("flash", ...) as SDPA backends, in the order given."""
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(f"--peer-sdpa: unknown SDPA backends {unknown}; choose from {list(_BY_NAME)}")
    return [_BY_NAME[n] for n in names]


def sdpa_label(backends) -> str:
    """'sdpa:cudnn>flash>efficient': SDPA with these backends in priority order."""
    return "sdpa:" + ">".join(b.name.split("_")[0].lower() for b in backends)


# -- PyTorch context parallel ------------------------------------------------------------------

def cp_attention(mesh, rotate: str, backends, device):
    """fn(q, k, v) on [b, h, s/N, e] zigzag shards, and the context it runs in."""
    def cp(q, k, v):
        # torchtitan's GQA: repeat K/V to the query heads before SDPA (CP moves them so)
        rep = q.shape[1] // k.shape[1]
        k, v = expand(k, rep), expand(v, rep)
        with sdpa_kernel(backends, set_priority=True):
            # looked up at call time: context_parallel patches F.scaled_dot_product_attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return cp, _cp_context(mesh, rotate, device)


@contextlib.contextmanager
def _cp_context(mesh, rotate: str, device):
    """PyTorch context parallel over `mesh` with `rotate` ('allgather' | 'alltoall') and causal load
    balancing (head-tail = our zigzag). The inputs are sharded by us, zigzag (the head-tail order
    of its default load balancer), so the one buffer handed over is a placeholder of 2N positions.
    `context_parallel` does not restore SDPA when its body raises: do it here."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(rotate)
    placeholder = torch.zeros(2 * mesh.size(), device=device)
    try:
        with context_parallel(mesh, buffers=[placeholder], buffer_seq_dims=[0],
                              no_restore_buffers={placeholder}):
            yield
    finally:
        _restore_sdpa()


_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _restore_sdpa():
    if F.scaled_dot_product_attention is not _ORIGINAL_SDPA:
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp_impl

        cp_impl._disable_context_parallel_dispatcher_impl()
        F.scaled_dot_product_attention = _ORIGINAL_SDPA


# -- DeepSpeed-Ulysses ---------------------------------------------------------------------------

def import_deepspeed(device, dist_backend: str) -> str:
    """Import DeepSpeed and initialize deepspeed.comm on top of our process group (it wraps the
    existing group, no second init); returns its version."""
    if device.type == "cpu":  # CPU script check only: the CPU accelerator JIT-builds a
        import deepspeed.comm.torch  # noqa: F401  shared-memory op from csrc (removed): stub it
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed
    deepspeed.init_distributed(dist_backend=dist_backend, verbose=False)
    return deepspeed.__version__


def ds_ulysses_attention(group, backends):
    """fn(q, k, v) on [b, s/N, h, e] shards: DeepSpeed's exchange around a local SDPA."""
    from deepspeed.sequence.layer import DistributedAttention

    def local_attn(q, k, v):  # [b, s, h/N, e] after the exchange; GQA: expand it here
        rep = q.shape[2] // k.shape[2]
        # dense [b, h, s, e] for SDPA (a copy of ~1/500 of the attention's time at 128K)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        with sdpa_kernel(backends, set_priority=True):
            out = F.scaled_dot_product_attention(qt, expand(kt, rep), expand(vt, rep),
                                                 is_causal=True)
        # cuDNN's SDPA backward returns wrong gradients for a non-contiguous output
        # gradient (seen on H200, torch 2.11: dq error 1.4); the transpose below would
        # hand it one, so its gradient is made contiguous first (as our runtime does)
        return _ContiguousGrad.apply(out).transpose(1, 2)

    # [b, s, h, e]: scatter heads (dim 2), gather the sequence (dim 1); batch dim 0
    dist_attn = DistributedAttention(local_attn, group, scatter_idx=2, gather_idx=1)
    return lambda q, k, v: dist_attn(q, k, v, 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; the gradient is made contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()
