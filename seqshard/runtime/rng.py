"""Dropout on a shard, with a random stream of the shard's own.

Ranks start from one seed: they must, so that a random tensor every rank makes whole (an op
that runs replicated) is the same tensor everywhere. Dropout run as it is on each rank's shard
would then draw the same mask on every shard, and a sequence split N ways would drop token i
together with tokens i + S/N, i + 2S/N, ... So a shard's mask comes from a generator seeded by
one draw from the global generator (the same draw on every rank, which keeps the ranks in step)
and the shard's index among the ranks that split the tensor (ranks holding the same shard share
the index, so their copies stay equal). The result has the distribution of dropout on one
device, not its values; with p = 0 or outside training it is the input.
"""

from __future__ import annotations

import torch

__all__ = ["dropout", "native_dropout"]

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads shard indices over seed space


def _keep_mask(x: torch.Tensor, p: float, shard: int) -> torch.Tensor:
    seed = int(torch.randint(0, 1 << 62, (), device="cpu"))
    gen = torch.Generator(device=x.device)
    gen.manual_seed((seed + shard * _GOLDEN) % (1 << 63))
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=gen)


def dropout(x: torch.Tensor, p: float, train: bool, shard: int) -> torch.Tensor:
    """`torch.dropout(x, p, train)` on shard number `shard` of the tensor."""
    if not train or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return x * _keep_mask(x, p, shard) * (1.0 / (1.0 - p))


def native_dropout(x: torch.Tensor, p: float, train: bool | None, shard: int):
    """`aten.native_dropout(x, p, train)` (output, kept mask) on shard number `shard`."""
    if train is False or p == 0.0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    keep = _keep_mask(x, p, shard) if p < 1.0 else torch.zeros_like(x, dtype=torch.bool)
    return x * keep * (1.0 / (1.0 - p) if p < 1.0 else 0.0), keep
