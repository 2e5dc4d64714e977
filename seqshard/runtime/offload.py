"""Offload: the inputs a checkpointed layer keeps for backward live in host memory.

A recomputed layer (`torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False)`)
keeps only its inputs; at long sequences those are the memory (Llama-3-8B at 256K tokens: 32
layers × a 2 GiB residual stream). `offloaded_checkpoint` runs the same checkpoint under a pair
of saved-tensor hooks that move those inputs to the host:

    forward   pack:   wait for the compute stream (an event), copy the tensor into pinned host
                      memory on a side stream (non_blocking), `record_stream` keeps its GPU
                      memory from being reused until the copy is done; the compute stream goes on
    backward  unpack: wait for the copy, copy the host tensor back to its device on the current
                      stream (non_blocking from pinned memory); the rerun of the layer reads it

Why the hooks see exactly the inputs: non-reentrant checkpoint saves its inputs before it enters
its own hooks (`_checkpoint_hook`), so an outer `saved_tensors_hooks` packs them, and everything
the layer's ops save inside goes through checkpoint's hooks instead (not packed here). torch 2.13
saves them with `_CheckpointFrame.save_inputs` (`SavedTensor`s, which go through the current
hooks; pytorch#174327); torch 2.11 and earlier save them with
`_NoopSaveInputs.apply(dummy, kwargs, *args)`, whose `ctx.save_for_backward` also runs under the
outer hooks (the 0-element dummy is packed too, and stays: it is small).

What moves: the arguments the caller names (`offload=`: positions in `args`; codegen names the
layer's activations, the values made from the model's inputs) of at least `MIN_BYTES`, and never
a parameter. Parameters (in the generated program they arrive through `sum_grads`, with a
grad_fn), buffers and tables made from them (rotary cos/sin) live on the GPU anyway, so copying
them would only cost time and host memory; small tensors are not worth a copy. Which tensor is
which is told by identity: a pack hook receives the Python object the checkpoint was called
with. On CPU the "host copy" is a plain copy (the same bookkeeping, for tests); `stats` counts
what was packed and unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["offloaded_checkpoint", "offload_saved", "MIN_BYTES", "stats", "Stats"]

MIN_BYTES = 2**20
"""Tensors smaller than this stay where they are."""


@dataclass
class Stats:
    """What the hooks moved in this process (tests read it; `reset` clears it)."""

    packed: int = 0          # tensors copied to the host in forward
    unpacked: int = 0        # tensors copied back in backward
    bytes: int = 0           # bytes copied to the host
    kept: int = 0            # tensors the hooks saw and left in place (parameters, small ones)

    def reset(self) -> None:
        self.packed = self.unpacked = self.bytes = self.kept = 0


stats = Stats()


@dataclass
class _OnHost:
    """A saved tensor's host copy: the tensor it becomes again on `device` once `done` fired."""

    host: torch.Tensor
    device: torch.device
    done: object = None      # torch.cuda.Event recorded after the copy (CUDA only)


_side: dict = {}  # device → the side stream that copies to the host


def _side_stream(device: torch.device):
    if device not in _side:
        _side[device] = torch.cuda.Stream(device)
    return _side[device]


def _pack(moved: set, t: torch.Tensor):
    if id(t) not in moved or isinstance(t, torch.nn.Parameter) or \
            t.numel() * t.element_size() < MIN_BYTES:
        stats.kept += 1
        return t
    stats.packed += 1
    stats.bytes += t.numel() * t.element_size()
    if t.device.type != "cuda":
        return _OnHost(t.detach().clone(), t.device)
    compute = torch.cuda.current_stream(t.device)
    side = _side_stream(t.device)
    ready = torch.cuda.Event()
    ready.record(compute)                    # t is final once the compute stream gets here
    side.wait_event(ready)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.stream(side):
        host.copy_(t.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    t.record_stream(side)                    # its memory is not reused before the copy ends
    return _OnHost(host, t.device, done)


def _unpack(p):
    if not isinstance(p, _OnHost):
        return p
    stats.unpacked += 1
    if p.done is None:
        return p.host.clone()
    torch.cuda.current_stream(p.device).wait_event(p.done)
    return p.host.to(p.device, non_blocking=True)


def offload_saved(tensors) -> torch.autograd.graph.saved_tensors_hooks:
    """The hooks as a context manager: around a non-reentrant `checkpoint` call, they move those
    of its saved inputs that are `tensors` to the host (see the module docstring)."""
    return torch.autograd.graph.saved_tensors_hooks(partial(_pack, {id(t) for t in tensors}),
                                                    _unpack)


def offloaded_checkpoint(fn, *args, offload: tuple[int, ...] = ()):
    """`checkpoint(fn, *args, use_reentrant=False)` whose inputs at positions `offload` live in
    host memory between the forward and the backward."""
    with offload_saved([args[i] for i in offload]):
        return checkpoint(fn, *args, use_reentrant=False)
