"""Exchanges by copy engine over symmetric memory: all-to-alls that leave the SMs to attention.

Why. cuDNN's attention kernels fill every SM. NCCL's all-to-all runs as kernels too, so an
exchange overlapped with attention stretched the attention by more than it hid (4×H200 at 128K:
Ulysses in 4 head chunks ran at 478 TFLOP/s per GPU against 507 unpipelined;
bench/results/profile_step-2026-11-21.md). Between GPUs of one host the same bytes can move on
the copy engines, which no kernel competes for.

How. Each rank copies what it sends into a symmetric buffer (`torch.distributed._symmetric_memory`:
every rank maps every other rank's buffer), a barrier says every stage is written, and each rank
*pulls* its pieces from its peers' buffers straight to where they belong: `dst.copy_(src)` between
contiguous tensors of one dtype is one `cudaMemcpyAsync`, done by a copy engine. Strided
destinations (a head-chunk of the sequence, say) are cut into contiguous pieces first, so no
permutation kernel is ever run. A second barrier says every peer has read this rank's buffer, so
the next exchange may overwrite it. All of it runs on one high-priority side stream in issue
order (one stream per peer for the pulls, so the copy engines work in parallel), so consecutive
exchanges share one workspace; `Pending.wait()` makes the current stream wait for it.

    start_pull(stage, pulls, group, result)
        stage   a tensor of the same shape and dtype on every rank (any strides)
        pulls   (peer, index, dst): copy peer's stage[index] into dst, for every piece this rank
                needs (peer == own rank copies locally, from `stage` itself)

Transports: 'nccl' (the NCCL all-to-all, the default), 'peer' (copy engines, this module's
`start_pull`; CUDA, every rank of the group on one host, checked once per group) and 'emulated',
which runs the same pull lists with an all-gather of the stages instead of symmetric memory: CPU
tests check every index of the pull plans with it (gloo), the GPU smoke test checks the copy
engines.

Measured (4×H200, 128K, causal MHA 32×128, fwd+bwd; bench/results/profile_step-2026-11-21b.md):
correct, but not faster in isolation. Over copy engines Ulysses ran at 504.7 TFLOP/s per GPU
unpipelined and 498.3 in 4 head chunks, against 507.2 for NCCL unpipelined: the attention kernels
ran 5.7% longer beside the copies (and beside the barrier kernels that wait for the peers), more
than the hidden exchange saved. So 'nccl' stays the default; 'peer' is there for models whose
exchanges can hide behind other work, and for the next attempt at hiding them here. (The same
pull plans as NCCL point-to-point row runs, landing in place with no permutation kernel, were
slower still: 503.0 against 512.2; profile_step-2026-11-21d.md.)
"""

from __future__ import annotations

import socket
import warnings

import torch
import torch.distributed as dist

from seqshard.runtime.collectives import Pending, start_all_gather

__all__ = ["start_pull", "transport", "check_transport", "TRANSPORTS"]

TRANSPORTS = ("nccl", "peer", "emulated")

# A piece smaller than this goes as one strided copy (a kernel) rather than as many memcpys.
_MIN_PIECE_BYTES = 1 << 16


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) as contiguous pieces: each a cudaMemcpyAsync (a copy engine) on CUDA."""
    if dst.is_contiguous() and src.is_contiguous():
        dst.copy_(src)
    elif dst.dim() == 0 or dst[0].numel() * dst.element_size() < _MIN_PIECE_BYTES:
        dst.copy_(src)
    else:
        for d, s in zip(dst.unbind(0), src.unbind(0)):
            _copy(d, s)


class _StreamWork:
    """A Pending's work: the current stream waits for an event of the side stream."""

    def __init__(self, event: torch.cuda.Event, keep):
        self._event, self._keep = event, keep

    def wait(self):
        torch.cuda.current_stream().wait_event(self._event)
        self._keep = None


class _Peers:
    """Symmetric workspace and side streams of one (group, device)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.rank, self.world = group.rank(), group.size()
        self.stream = torch.cuda.Stream(device, priority=-1)
        self.pull_streams = [torch.cuda.Stream(device, priority=-1) for _ in range(self.world - 1)]
        self.buffer, self.handle = None, None

    def _workspace(self, nbytes: int):
        """The symmetric handle of a workspace of at least `nbytes` (collective when it grows)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            from torch.distributed import _symmetric_memory as symm_mem
            self.stream.synchronize()  # queued copies may still read the old buffer
            size = max(nbytes, 2 * (0 if self.buffer is None else self.buffer.numel()))
            self.buffer = symm_mem.empty(size, dtype=torch.uint8, device=self.device)
            self.handle = symm_mem.rendezvous(self.buffer, self.group.group_name)
        return self.handle

    def start(self, stage: torch.Tensor, pulls, result) -> Pending:
        nbytes = stage.numel() * stage.element_size()
        handle = self._workspace(nbytes)
        main = self.stream
        main.wait_stream(torch.cuda.current_stream(self.device))
        by_peer: dict[int, list] = {}
        for peer, index, dst in pulls:
            by_peer.setdefault(peer, []).append((index, dst))
        with torch.cuda.stream(main):
            _copy(handle.get_buffer(self.rank, stage.shape, stage.dtype), stage)
            handle.barrier()
            # peers in rotation from rank + 1, so no buffer is everyone's first read
            order = [(self.rank + step) % self.world for step in range(1, self.world)]
            for stream, peer in zip(self.pull_streams, order):
                if peer not in by_peer:
                    continue
                stream.wait_stream(main)
                remote = handle.get_buffer(peer, stage.shape, stage.dtype)
                with torch.cuda.stream(stream):
                    for index, dst in by_peer[peer]:
                        _copy(dst, remote[index])
            for index, dst in by_peer.get(self.rank, ()):
                _copy(dst, stage[index])
            for stream, peer in zip(self.pull_streams, order):
                if peer in by_peer:
                    main.wait_stream(stream)
            handle.barrier()
            done = torch.cuda.Event()
            done.record(main)
        # the caller's tensors stay referenced until wait(); the current stream then orders any
        # reuse of their memory after the side streams
        return Pending([_StreamWork(done, (stage, pulls))], result)


_PEERS: dict[tuple[str, torch.device], _Peers] = {}


def _emulated(stage: torch.Tensor, pulls, group: dist.ProcessGroup, result) -> Pending:
    """The same pulls, served by an all-gather of the stages (no symmetric memory)."""
    stages = start_all_gather(stage.unsqueeze(0), 0, group).wait()  # [N, *stage.shape]
    for peer, index, dst in pulls:
        dst.copy_(stages[peer][index])
    return Pending([], result)


def start_pull(stage: torch.Tensor, pulls, group: dist.ProcessGroup, result, how: str) -> Pending:
    """Every rank stages `stage`; this rank copies peer's stage[index] into dst for each
    (peer, index, dst) of `pulls`. `how`: 'peer' or 'emulated'. Result: `result`."""
    if how == "emulated":
        return _emulated(stage, pulls, group, result)
    key = (group.group_name, stage.device)
    if key not in _PEERS:
        _PEERS[key] = _Peers(group, stage.device)
    return _PEERS[key].start(stage, pulls, result)


def check_transport(name: str) -> None:
    if name not in TRANSPORTS:
        raise ValueError(f"transport={name!r}: use one of {TRANSPORTS}")


_PEER_OK: dict[tuple[str, str], str | None] = {}


def transport(device: torch.device, group: dist.ProcessGroup, requested: str = "nccl") -> str:
    """The transport an exchange over `group` uses: `requested`, checked. 'peer' is checked once per
    group by all its ranks together (they must agree) and raises, naming the fix, where it can't
    run. A one-rank group moves nothing: 'nccl' (plain copies)."""
    check_transport(requested)
    if group.size() == 1 or requested != "peer":
        return "nccl" if group.size() == 1 else requested
    key = (group.group_name, str(device))
    if key not in _PEER_OK:
        _PEER_OK[key] = _peer_unavailable(device, group)
    if _PEER_OK[key] is not None:
        raise RuntimeError(f"transport='peer' is not available: {_PEER_OK[key]}; use "
                           "transport='nccl'")
    return "peer"


def _peer_unavailable(device: torch.device, group: dist.ProcessGroup) -> str | None:
    """Why copy-engine exchanges can't run over `group` (None: they can). Collective."""
    local = device.type == "cuda"
    if local:
        try:
            from torch.distributed import _symmetric_memory  # noqa: F401
        except ImportError:
            local = False
    hosts = [None] * group.size()
    dist.all_gather_object(hosts, (socket.gethostname(), local), group=group)
    if any(not ok for _, ok in hosts):
        return "a rank of the group is not on CUDA or lacks torch's symmetric memory"
    if len({host for host, _ in hosts}) > 1:
        return "the group spans hosts"
    try:
        _PEERS.setdefault((group.group_name, device), _Peers(group, device))._workspace(1 << 20)
    except Exception as error:  # noqa: BLE001 - reported below; every rank must agree
        warnings.warn(f"seqshard: symmetric memory failed: {error}")
        failed = torch.ones(1, device=device)
    else:
        failed = torch.zeros(1, device=device)
    dist.all_reduce(failed, group=group)
    return "symmetric memory failed on a rank" if failed.item() else None
