"""bench/timing.py, the one timer of bench/, on CPU (host clock; the path `bench/attention.py
--device cpu`, `gpu_smoke.py --device cpu` and `predict_vs_measure.py --dry-run` take): what is
timed, in which order, and which rank's numbers come back. CUDA events are the same loop with
another clock; they run on the device machine."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest

_BENCH = str(Path(__file__).resolve().parents[1] / "bench")


def _load(name):
    sys.path.insert(0, _BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(_BENCH)


timing = _load("timing")


def test_warmups_are_untimed_and_each_repeat_is_timed():
    """A wrong count here means a benchmark's warm-up (cuDNN plans, NCCL channels) is timed."""
    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.005 if len(calls) > 2 else 0.05)  # the two warm-ups are slow

    t = timing.measure(step, warmup=2, repeats=3, device="cpu")
    assert len(calls) == 5 and len(t.times_ms) == 3
    assert all(5.0 <= ms < 50.0 for ms in t.times_ms), t.times_ms
    assert t.median_ms == sorted(t.times_ms)[1]


def test_a_dict_of_steps_is_timed_in_interleaved_rounds():
    """overlap.py's variants: round i runs every step once before round i + 1 (warm-ups too)."""
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    out = timing.measure(steps, warmup=1, repeats=2, device="cpu")
    assert order == ["a", "b", "c"] * 3
    assert set(out) == {"a", "b", "c"} and all(len(t.times_ms) == 2 for t in out.values())


def test_contradictory_options_are_refused():
    with pytest.raises(ValueError, match="back_to_back"):
        timing.measure(lambda: None, repeats=1, device="cpu", barrier=True, back_to_back=True)
    with pytest.raises(ValueError, match="slowest"):
        timing.measure(lambda: None, repeats=1, device="cpu", slowest="max")
    with pytest.raises(ValueError, match="repeats"):
        timing.measure(lambda: None, repeats=0, device="cpu")


def _two_ranks():
    """Rank 0 is slow in iteration 3, rank 1 in iteration 1: each rank's median is short, but
    every other iteration has a slow rank."""
    import torch.distributed as dist

    tm = _load("timing")
    slow = 2 if dist.get_rank() == 0 else 0
    sleeps = iter([0.03 if i == slow else 0.001 for i in range(3)])

    def step():
        time.sleep(next(sleeps))

    per_median = tm.measure(step, repeats=3, device="cpu", barrier=True, slowest="median")
    sleeps = iter([0.03 if i == slow else 0.001 for i in range(3)])
    per_iteration = tm.measure(step, repeats=3, device="cpu", barrier=True, slowest="each")
    return per_median.times_ms, per_iteration.times_ms


def test_slowest_rank_median_or_slowest_rank_per_iteration(pool2):
    """slowest='median' reports the rank with the largest median (profile_step, predict_vs_measure,
    overlap's exchanges); 'each' the slowest rank of every iteration (overlap's rounds)."""
    (med0, each0), (med1, each1) = pool2.run(_two_ranks)
    assert med0 == med1 and each0 == each1                  # every rank gets the same numbers
    assert sorted(med0)[1] < 15.0 and max(med0) >= 30.0      # one rank's times: one slow iteration
    assert each0[0] >= 30.0 and each0[2] >= 30.0 and each0[1] < 15.0
    assert sorted(each0)[1] >= 30.0
