"""The one timer of bench/: how long a step takes, in milliseconds.

    from timing import measure
    t = measure(step, warmup=2, repeats=5, slowest="median")   # t.median_ms, t.times_ms

What it measures. `step()` runs `warmup` times untimed, then `repeats` times timed. A timed
iteration is bracketed by two CUDA events recorded on the current stream; its time is the GPU time
between the stream reaching the first and reaching the second. On a CPU device (the scripts'
gloo checks) it is the host's `perf_counter` around the call. The result's `median_ms` is the
median of the iterations in `times_ms`. Options, each a different question asked of the same
measurement:

    back_to_back  False (default, "isolated"): the device is synchronized after the warm-ups and
                  after every timed iteration, so each iteration starts on an idle GPU and the
                  launch of its first kernel counts. True: warm-ups and timed iterations are one
                  uninterrupted stream of work and the device is synchronized once, at the end:
                  the steady-state time of a step, the host running ahead.
    barrier       Before every timed iteration all ranks meet (`dist.barrier()`, then a
                  synchronize), so a collective in the step does not wait for a late rank.
                  Isolated iterations only.
    slowest       None (default): this rank's times; no collective, the caller combines ranks.
                  "median": every rank's times are gathered and the rank with the largest median
                  is reported (its times and median). "each": every iteration's slowest rank (the
                  elementwise maximum over ranks), then the median of those.
    a dict of steps  {name: step} is timed in interleaved rounds: round i runs every step once, in
                  turn (the warm-ups likewise), so a drift of the GPU clocks over minutes of load
                  spreads over all steps instead of favouring the first. Returns {name: Timing}.

Which benchmark asks which question is in bench/README.md ("Timing").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

SLOWEST = (None, "median", "each")


@dataclass(frozen=True)
class Timing:
    """The timed iterations of one step: this rank's, or the slowest rank's (see `slowest`)."""

    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def measure(step: Callable[[], object] | Mapping[str, Callable[[], object]], *, repeats: int,
            warmup: int = 0, device: torch.device | str = "cuda", back_to_back: bool = False,
            barrier: bool = False, slowest: str | None = None) -> Timing | dict[str, Timing]:
    """Time `step` (or each step of a dict, interleaved) as the module docstring says."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if slowest not in SLOWEST:
        raise ValueError(f"slowest must be one of {SLOWEST}, got {slowest!r}")
    if barrier and back_to_back:
        raise ValueError("barrier synchronizes before every iteration: use it without back_to_back")
    device = torch.device(device)
    cuda = device.type == "cuda"
    steps = step if isinstance(step, Mapping) else {"": step}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not back_to_back:
        sync()
    marks: dict[str, list] = {name: [] for name in steps}  # (start, end) events, or ms on a CPU
    for _ in range(repeats):
        for name, fn in steps.items():
            if barrier:
                dist.barrier()
                sync()
            marks[name].append(_timed_call(fn, cuda))
            if not back_to_back:
                sync()
    sync()
    out = {name: _across_ranks([_ms(mark) for mark in m], slowest, device)
           for name, m in marks.items()}
    return out if isinstance(step, Mapping) else out[""]


def _timed_call(fn, cuda: bool):
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _ms(mark) -> float:
    """A CUDA event pair's elapsed time (after the device is synchronized), or the host's ms."""
    return mark[0].elapsed_time(mark[1]) if isinstance(mark, tuple) else mark


def _across_ranks(times: list[float], slowest: str | None, device: torch.device) -> Timing:
    if slowest is None:
        return Timing(times)
    t = torch.tensor(times, dtype=torch.float64, device=device)
    if slowest == "each":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return Timing(t.tolist())
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    return Timing(max((x.tolist() for x in every), key=statistics.median))
