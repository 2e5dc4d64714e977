"""Exchanges by copy engine over symmetric memory: all-to-alls that leave the SMs to attention.

Why. cuDNN's attention kernels fill every SM, and NCCL moves data with kernels, so an exchange
beside attention slows it by far more than the exchange's own time. Between GPUs of one host the
bytes can move on the copy engines instead, which no kernel competes for.

How. Each rank copies what it sends into a slot of a symmetric buffer
(`torch.distributed._symmetric_memory`: every rank maps every other rank's buffer) and tells its
peers so; each rank *pulls* its pieces from its peers' slots straight to where they belong:
`dst.copy_(src)` between contiguous tensors of one dtype is one `cudaMemcpyAsync`, done by a copy
engine. Strided destinations (a head-chunk of the sequence, say) are cut into contiguous pieces
first, so no permutation kernel is ever run. The signals are 32-bit flags in symmetric memory,
set and awaited by the GPUs' front ends with the CUDA driver's stream memory operations
(cuStreamWriteValue32 / cuStreamWaitValue32: `stream_write`, `stream_wait`), not by kernels: a
spinning barrier kernel holds an SM. Exchanges take slots in turn (`_SLOTS` of them), so a rank
stages the next exchange while its peers still pull the last; `_Peers` gives the protocol.
`Pending.wait()` makes the current stream wait for the pulls.

    start_pull(stage, pulls, group, result)
        stage   a tensor of the same shape and dtype on every rank (any strides)
        pulls   (peer, index, dst): copy peer's stage[index] into dst, for every piece this rank
                needs (peer == own rank copies locally, from `stage` itself)

Transports: 'nccl' (the NCCL all-to-all, the default), 'peer' (copy engines, this module's
`start_pull`; CUDA, every rank of the group on one host, checked once per group) and 'emulated',
which runs the same pull lists with an all-gather of the stages instead of symmetric memory: CPU
tests check every index of the pull plans with it (gloo), the GPU smoke test checks the copy
engines (bench/gpu_smoke.py) and profile_step checks them against NCCL's result.

'nccl' stays the default: pipelined over head chunks, 'peer' ties NCCL rather than beating it
(the first chunk in and the last chunk out stay exposed, and one exchange alone is slower than
NCCL's); it is there for models whose exchanges can hide behind other work. The measurements are
in docs/runtime-measurements.md.
"""

from __future__ import annotations

import ctypes
import functools
import socket
import warnings

import torch
import torch.distributed as dist

from seqshard.runtime.collectives import Pending, start_all_gather

__all__ = ["start_pull", "transport", "check_transport", "TRANSPORTS", "stream_write",
           "stream_wait"]

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
    """A Pending's work: the current stream waits for events of the side streams."""

    def __init__(self, events, keep):
        self._events, self._keep = events, keep

    def wait(self):
        for event in self._events:
            torch.cuda.current_stream().wait_event(event)
        self._keep = None


@functools.cache
def _driver():
    """cuStreamWriteValue32 / cuStreamWaitValue32 of the CUDA driver, through ctypes: signals
    between GPUs that the GPUs' front ends carry out, with no kernel (a spinning barrier kernel
    holds an SM that attention wants)."""
    lib = ctypes.CDLL("libcuda.so.1")
    write, wait = lib.cuStreamWriteValue32_v2, lib.cuStreamWaitValue32_v2
    for f in (write, wait):
        f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        f.restype = ctypes.c_int
    return write, wait


def _checked(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {code}; use transport='nccl'")


def stream_write(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """On `stream`: a fenced 32-bit store of `value` at `address` (here a peer's flag)."""
    _checked(_driver()[0](stream.cuda_stream, address, value, 0), "cuStreamWriteValue32")


def stream_wait(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """`stream` waits until the 32-bit word at `address` is >= `value` (CU_STREAM_WAIT_VALUE_GEQ)."""
    _checked(_driver()[1](stream.cuda_stream, address, value, 0), "cuStreamWaitValue32")


_READY, _DONE = 0, 1  # the two flag rows of every rank: [kind, source rank]
_SLOTS = 4  # stages in flight per rank: later exchanges stage while earlier ones are pulled


class _Peers:
    """Symmetric workspace, flags and side streams of one (group, device).

    Exchange e (counted from 1, the same on every rank) stages into slot e % _SLOTS of the
    workspace. Rank r, on its side stream: waits until every peer p has read that slot in exchange
    e - _SLOTS (done[p] >= e - _SLOTS in r's flags), copies its stage there and sets ready[r] = e
    in every peer's flags. On its pull stream for peer p: waits for ready[p] >= e in its own
    flags, pulls its pieces from p's slot, and sets done[r] = e in p's flags. The current stream
    waits for the pulls (and the copies of its own pieces) when the result is needed. A rank
    waits only for the partner of each copy, never for the whole group, and stages ahead of its
    pulls: consecutive exchanges overlap."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.rank, self.world = group.rank(), group.size()
        self.peers = [(self.rank + step) % self.world for step in range(1, self.world)]
        self.stream = torch.cuda.Stream(device, priority=-1)
        self.pull_streams = {p: torch.cuda.Stream(device, priority=-1) for p in self.peers}
        self.buffer, self.handle, self.slot_bytes, self.epoch = None, None, 0, 0
        from torch.distributed import _symmetric_memory as symm_mem
        self.flags = symm_mem.empty(2 * self.world, dtype=torch.int32, device=device)
        self.flags.zero_()
        self.flag_ptrs = list(symm_mem.rendezvous(self.flags, group.group_name).buffer_ptrs)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's flags are zero before anyone signals

    def _flag(self, owner: int, kind: int, source: int) -> int:
        """The address of flag [kind, source] in `owner`'s flags."""
        return self.flag_ptrs[owner] + 4 * (kind * self.world + source)

    def _workspace(self, nbytes: int):
        """The symmetric handle of _SLOTS slots of at least `nbytes` (collective when it grows)."""
        nbytes = -(-nbytes // 256) * 256
        if self.buffer is None or self.slot_bytes < nbytes:
            from torch.distributed import _symmetric_memory as symm_mem
            if self.buffer is not None:  # every peer has read, and this rank has pulled, the last
                for p in self.peers:
                    stream_wait(self.stream, self._flag(self.rank, _DONE, p), self.epoch)
                for s in (self.stream, *self.pull_streams.values()):
                    s.synchronize()
            self.slot_bytes = max(nbytes, 2 * self.slot_bytes)
            self.buffer = symm_mem.empty(_SLOTS * self.slot_bytes, dtype=torch.uint8,
                                         device=self.device)
            self.handle = symm_mem.rendezvous(self.buffer, self.group.group_name)
        return self.handle

    def start(self, stage: torch.Tensor, pulls, result) -> Pending:
        handle = self._workspace(stage.numel() * stage.element_size())
        self.epoch += 1
        e = self.epoch
        offset = (e % _SLOTS) * self.slot_bytes // stage.element_size()

        def slot(rank):
            return handle.get_buffer(rank, stage.shape, stage.dtype, offset)

        current, main = torch.cuda.current_stream(self.device), self.stream
        by_peer: dict[int, list] = {}
        for peer, index, dst in pulls:
            by_peer.setdefault(peer, []).append((index, dst))
        main.wait_stream(current)
        with torch.cuda.stream(main):
            if e > _SLOTS:
                for p in self.peers:
                    stream_wait(main, self._flag(self.rank, _DONE, p), e - _SLOTS)
            _copy(slot(self.rank), stage)
            for p in self.peers:
                stream_write(main, self._flag(p, _READY, self.rank), e)
            for index, dst in by_peer.get(self.rank, ()):
                _copy(dst, stage[index])
        events = [main.record_event()]
        for p in self.peers:  # from rank + 1 on, so no buffer is everyone's first read
            stream = self.pull_streams[p]
            stream.wait_stream(current)
            stream_wait(stream, self._flag(self.rank, _READY, p), e)
            remote = slot(p)
            with torch.cuda.stream(stream):
                for index, dst in by_peer.get(p, ()):
                    _copy(dst, remote[index])
            stream_write(stream, self._flag(p, _DONE, self.rank), e)
            events.append(stream.record_event())
        # the caller's tensors stay referenced until wait(); the current stream then orders any
        # reuse of their memory after the side streams
        return Pending([_StreamWork(events, (stage, pulls))], result)


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
            _driver()
        except (ImportError, OSError, AttributeError):
            local = False
    hosts = [None] * group.size()
    dist.all_gather_object(hosts, (socket.gethostname(), local), group=group)
    if any(not ok for _, ok in hosts):
        return ("a rank of the group is not on CUDA, or lacks torch's symmetric memory or the CUDA "
                "driver's stream memory operations")
    if len({host for host, _ in hosts}) > 1:
        return "the group spans hosts"
    try:
        key = (group.group_name, device)
        _PEERS[key] = _PEERS.get(key) or _Peers(group, device)
        _PEERS[key]._workspace(1 << 20)
    except Exception as error:  # noqa: BLE001 - reported below; every rank must agree
        warnings.warn(f"seqshard: symmetric memory failed: {error}")
        failed = torch.ones(1, device=device)
    else:
        failed = torch.zeros(1, device=device)
    dist.all_reduce(failed, group=group)
    return "symmetric memory failed on a rank" if failed.item() else None
