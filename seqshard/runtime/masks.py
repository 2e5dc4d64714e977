"""Structured attention masks given by per-token tensors: documents, positions, sliding window and
key padding (the family of notes MASKS.md; packed sequences, position_ids, attention_mask).

Query i of batch row b attends key j iff

    (segments is None or segments[b, i] == segments[b, j])       same document
    and (not causal or positions[b, j] <= positions[b, i])       causal by position
    and (window is None or positions[b, i] - positions[b, j] < window)
    and (key_valid is None or key_valid[b, j])                    key padding

with i, j global indices of the valid (unpadded) sequence in natural order, and positions None
meaning positions[b, i] = i. The tensors are [B, S] or [1, S] (broadcast over the batch),
replicated on every rank: S integers per sequence, small next to the activations.

A `TokenMask` serves blocks.py, which keeps reducing every algorithm's mask to blocks:

* `index_causal`: the causal part may be read by index (j <= i) once documents are applied,
  because positions increase along every document (plain indices, or position_ids that restart
  at each document). Then the layouts' causal block structure (skip what lies above the diagonal,
  square causal blocks on it) stays exact, and only the rest of the mask is left to check.
* `pieces(index)`: the runs of a block's rows that stay inside one document (for every batch
  row), so a block splits into per-document blocks: the cu_seqlens varlen of FlashAttention, done
  by the ordinary full and causal kernels.
* `visible(q_index, k_index)`: the dense bool mask [B|1, 1, Lq, Lk] of a block, from the
  per-token tensors gathered at its rows' global indices. blocks.py classifies each block by it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from seqshard.runtime.layout import local_positions

__all__ = ["TokenMask", "token_mask", "global_index"]


@dataclass(frozen=True, eq=False)
class TokenMask:
    """The mask of one attention call; build it with `token_mask`."""

    causal: bool
    device: torch.device             # where the tensors and the blocks' dense masks live
    positions: torch.Tensor | None   # int64 [B|1, S] on the device of q
    segments: torch.Tensor | None    # int64 [B|1, S] on the device of q
    window: int | None
    key_valid: torch.Tensor | None   # bool [B|1, S] on the device of q
    index_causal: bool               # positions increase along every document (module docstring)
    segments_host: torch.Tensor | None  # segments on the CPU: where blocks split into documents

    def visible(self, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """bool [B|1, 1, Lq, Lk]: which keys (global indices k_index) each query sees."""
        parts = []
        if self.segments is not None:
            parts.append(self.segments[:, q_index, None] == self.segments[:, None, k_index])
        if self.causal or self.window is not None:
            if self.positions is None:
                pq, pk = q_index[None, :, None], k_index[None, None, :]
            else:
                pq, pk = self.positions[:, q_index, None], self.positions[:, None, k_index]
            if self.causal:
                parts.append(pk <= pq)
            if self.window is not None:
                parts.append(pq - pk < self.window)
        if self.key_valid is not None:
            parts.append(self.key_valid[:, None, k_index])
        seen = torch.ones((1, len(q_index), len(k_index)), dtype=torch.bool, device=self.device)
        for part in parts:
            seen = seen & part
        return seen.unsqueeze(1)

    def pieces(self, index: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor | None]:
        """The runs [a, b) of rows (global indices `index`, on the CPU) inside which no batch row
        changes document, and each run's document ids [B|1, runs] (None without documents)."""
        if self.segments_host is None:
            return [(0, len(index))], None
        seg = self.segments_host[:, index]
        starts = [0, *((seg[:, 1:] != seg[:, :-1]).any(0).nonzero().flatten() + 1).tolist()]
        return list(zip(starts, [*starts[1:], len(index)])), seg[:, starts]


def token_mask(causal: bool, positions: torch.Tensor | None, segments: torch.Tensor | None,
               window: int | None, key_valid: torch.Tensor | None,
               device: torch.device) -> TokenMask | None:
    """The mask of an attention call on `device` (q's) with these per-token tensors (on that
    device, checked by the wrappers: opsupport.check_mask_inputs); None when there are none:
    plain causal or full attention."""
    if positions is None and segments is None and window is None and key_valid is None:
        return None
    return TokenMask(causal, device, positions, segments, window, key_valid,
                     _increasing_within_documents(positions, segments),
                     None if segments is None else segments.cpu())


def _increasing_within_documents(positions, segments) -> bool:
    """Do positions strictly increase along the tokens of every document of every batch row? Then
    for two tokens of one document positions[j] <= positions[i] iff j <= i."""
    if positions is None:
        return True
    if segments is None:
        return bool((positions[:, 1:] > positions[:, :-1]).all())
    rows = max(positions.shape[0], segments.shape[0])
    seg_sorted, order = torch.sort(segments.expand(rows, -1), dim=-1, stable=True)
    pos = positions.expand(rows, -1).gather(-1, order)  # each document's positions in index order
    same = seg_sorted[:, 1:] == seg_sorted[:, :-1]
    return bool(((pos[:, 1:] > pos[:, :-1]) | ~same).all())


@functools.lru_cache(maxsize=256)
def global_index(order: str, rank: int, world: int, local_len: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(on the CPU, on `device`): the global index of each local row of a shard. Cached."""
    index = local_positions(order, rank, world, local_len)
    return index, index.to(device)
