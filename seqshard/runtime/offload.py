"""Offload: the inputs a checkpointed layer keeps for backward live in host memory.

A recomputed layer (`torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False)`)
keeps only its inputs; at long sequences those are the memory (Llama-3-8B at 256K tokens: 32
layers × a 2 GiB residual stream). `offloaded_checkpoint` runs the same checkpoint under a pair
of saved-tensor hooks that move those inputs to the host:

    forward   pack:   wait for the compute stream (an event), copy the tensor into pinned host
                      memory on a side stream (non_blocking), `record_stream` keeps its GPU
                      memory from being reused until the copy is done; the compute stream goes on
    backward  unpack: wait for the copy, copy the host tensor back to its device on the current
                      stream (non_blocking from pinned memory); the rerun of the layer reads it,
                      unless it was prefetched (below): then wait for that copy's event instead

Prefetch: the first unpack of a layer's inputs in a backward pass starts copying back the inputs
of the layer packed before it in forward (the next one backward needs) on the side stream, into
GPU memory taken on the compute stream (the side stream first waits for the compute stream,
which may still be using that memory's last owner; `record_stream` keeps it from being reused
before the copy is done, should it be dropped untaken), so that the copy lands while this layer's
backward computes. At most two layers' inputs are on the GPU at once (the one being recomputed,
the one being fetched: `IN_FLIGHT` in the solver): starting a prefetch drops any other one not
yet taken. Which layer comes before which is told by the pack order of one forward: a layer
links to the one packed last, unless a backward ended since (a new step) or nothing of that one
is alive (its graph was freed: a forward without backward); a layer packs nothing under no_grad
and links nothing. The end of every backward pass that unpacked (a callback queued on the
autograd engine) drops what was fetched and not taken, so nothing of one step is left in the
next. Whatever an unpack finds not prefetched (a first layer, a second backward over a retained
graph, an order not foreseen: two forwards before one backward fetch across their boundary and
drop it) it copies back as before: prefetch only ever saves a wait.

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
with. On CPU the "host copy" is a plain copy and a prefetch a plain copy too (the same
bookkeeping, for tests); `stats` counts what was packed, unpacked and prefetched.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint, noop_context_fn

__all__ = ["offloaded_checkpoint", "offload_saved", "MIN_BYTES", "stats", "Stats"]

MIN_BYTES = 2**20
"""Tensors smaller than this stay where they are."""


@dataclass
class Stats:
    """What the hooks moved in this process (tests read it; `reset` clears it)."""

    packed: int = 0          # tensors copied to the host in forward
    unpacked: int = 0        # tensors copied back in backward
    prefetched: int = 0      # ...of those, the ones a prefetch had copied before their unpack
    bytes: int = 0           # bytes copied to the host
    kept: int = 0            # tensors the hooks saw and left in place (parameters, small ones)

    def reset(self) -> None:
        self.packed = self.unpacked = self.prefetched = self.bytes = self.kept = 0


stats = Stats()


@dataclass(eq=False)
class _Layer:
    """One offloaded checkpoint call's host copies (weak: the autograd graph owns them), and the
    layer packed before it in the same forward: the one whose inputs its backward prefetches."""

    prev: _Layer | None = None
    packs: list = field(default_factory=list)   # weakrefs to its _OnHost, in pack order
    linked: bool = False                        # it has packed: `prev` is set
    fired: int = -1                             # the backward pass that prefetched `prev`

    def alive(self):
        return [p for p in (r() for r in self.packs) if p is not None]


@dataclass(eq=False)
class _OnHost:
    """A saved tensor's host copy: the tensor it becomes again on `device` once `done` fired."""

    host: torch.Tensor
    device: torch.device
    layer: _Layer
    done: object = None      # torch.cuda.Event recorded after the copy (CUDA only)
    ahead: torch.Tensor | None = None   # prefetched back to `device`, not yet taken
    landed: object = None    # torch.cuda.Event recorded after that copy (CUDA only)
    taken: int = -1          # the backward pass that last unpacked it


@dataclass
class _Prefetch:
    """Where prefetching stands in this process."""

    last: _Layer | None = None      # the layer packed last: the next one links to it
    fetched: list = field(default_factory=list)  # the layers whose prefetches may be untaken
    passes: int = 0                 # backward passes ended (numbers the current one)
    queued: bool = False            # the end-of-pass callback is queued


_state = _Prefetch()
_side: dict = {}  # device → the side stream that copies to the host and prefetches back


def _side_stream(device: torch.device):
    if device not in _side:
        _side[device] = torch.cuda.Stream(device)
    return _side[device]


def _pack(moved: set, layer: _Layer, t: torch.Tensor):
    if id(t) not in moved or isinstance(t, torch.nn.Parameter) or \
            t.numel() * t.element_size() < MIN_BYTES:
        stats.kept += 1
        return t
    stats.packed += 1
    stats.bytes += t.numel() * t.element_size()
    if not layer.linked:  # its first pack: it follows the layer packed last, if that one lives
        last = _state.last
        layer.prev = last if last is not None and last.alive() else None
        layer.linked, _state.last = True, layer
    if t.device.type != "cuda":
        p = _OnHost(t.detach().clone(), t.device, layer)
    else:
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
        p = _OnHost(host, t.device, layer, done)
    layer.packs.append(weakref.ref(p))
    return p


def _copy_back(p: _OnHost) -> torch.Tensor:
    """p's tensor on its device, copied on the current stream (or taken from its prefetch)."""
    if p.ahead is not None:
        t, p.ahead = p.ahead, None
        stats.prefetched += 1
        if p.landed is not None:
            torch.cuda.current_stream(p.device).wait_event(p.landed)
        return t
    if p.done is None:
        return p.host.clone()
    torch.cuda.current_stream(p.device).wait_event(p.done)
    return p.host.to(p.device, non_blocking=True)


def _fetch_ahead(p: _OnHost) -> None:
    """Start copying p back on the side stream (a plain copy on CPU)."""
    if p.done is None:
        p.ahead = p.host.clone()
        return
    compute = torch.cuda.current_stream(p.device)
    side = _side_stream(p.device)
    p.ahead = torch.empty(p.host.shape, dtype=p.host.dtype, device=p.device)  # compute's memory
    side.wait_stream(compute)                # ...which its last owner may still be using
    side.wait_event(p.done)
    with torch.cuda.stream(side):
        p.ahead.copy_(p.host, non_blocking=True)
        p.landed = torch.cuda.Event()
        p.landed.record(side)


def _drop(layer: _Layer) -> None:
    """Let go of layer's prefetched tensors not taken (their memory waits for their copies)."""
    for p in layer.alive():
        if p.landed is not None:
            p.ahead.record_stream(_side_stream(p.device))
        p.ahead = p.landed = None


def _pass_ended() -> None:
    """The end of a backward pass that unpacked: drop what was fetched and not taken; the next
    pack starts a new forward."""
    for layer in _state.fetched:
        _drop(layer)
    _state.fetched, _state.last, _state.queued = [], None, False
    _state.passes += 1


def _prefetch_before(layer: _Layer) -> None:
    """On the first unpack of `layer` in this backward pass: fetch the inputs of the layer
    before it, dropping any other prefetch not taken (at most two layers' worth on the GPU)."""
    if torch._C._current_graph_task_id() == -1:  # not in a backward pass: no pass to end
        return
    if not _state.queued:
        torch.autograd.Variable._execution_engine.queue_callback(_pass_ended)
        _state.queued = True
    if layer.fired == _state.passes:
        return
    layer.fired = _state.passes
    keep = [x for x in (layer, layer.prev) if x is not None]
    for other in _state.fetched:
        if all(other is not x for x in keep):
            _drop(other)
    _state.fetched = keep
    for p in layer.prev.alive() if layer.prev is not None else ():
        if p.ahead is None and p.taken != _state.passes:
            _fetch_ahead(p)


def _unpack(p):
    if not isinstance(p, _OnHost):
        return p
    stats.unpacked += 1
    t = _copy_back(p)
    p.taken = _state.passes
    _prefetch_before(p.layer)
    return t


def offload_saved(tensors) -> torch.autograd.graph.saved_tensors_hooks:
    """The hooks as a context manager: around a non-reentrant `checkpoint` call, they move those
    of its saved inputs that are `tensors` to the host (see the module docstring)."""
    return torch.autograd.graph.saved_tensors_hooks(
        partial(_pack, {id(t) for t in tensors}, _Layer()), _unpack)


def offloaded_checkpoint(fn, *args, offload: tuple[int, ...] = (), context_fn=noop_context_fn):
    """`checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)` whose inputs at
    positions `offload` live in host memory between the forward and the backward."""
    with offload_saved([args[i] for i in offload]):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)
