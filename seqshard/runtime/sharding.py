"""Moving activations between layouts, as generated code calls it.

One function per step of a redistribution (the strategies stage's `redistribution`), each
on one mesh axis and one tensor dim that holds exactly the factor being moved:

    slice_shard      replicated → split      local: keep this rank's piece (zero-padded first)
    gather_shard     split → replicated      all-gather, restore the order, drop the padding
    all_to_all_shard split f → split f'      Ulysses' s→h, DSP's t→p: one all-to-all
    reduce_scatter_shard  partial → split    sum over ranks, keep this rank's piece
    all_reduce_sum   partial → replicated

Orders (defined once, in `layout.py`). `contig`: rank u of N holds the u-th of N pieces. `zigzag`
(causal load balance): the dim is cut into 2N chunks and rank u holds chunks u and 2N-1-u. A factor split over several mesh
axes is split outer axis first, and zigzag is defined over the flattened rank index; the inner
axis then sees a local dim in zigzag order over the outer ranks, and splitting it the same way
(chunks u and 2N_inner-1-u of it) gives exactly the flattened zigzag. So every function here
works on one level and never needs to know about the others.

Padding. A factor whose size the split does not divide is zero-padded at its end to a multiple
of N (2N for zigzag) while it is split, and cut back when it is gathered whole.

All functions are plain torch ops around the autograd-aware collectives of
`seqshard.runtime.collectives`, so gradients are exact (a slice's adjoint puts the gradient back
into zeros; an all-gather's adjoint is a reduce-scatter) and `torch.compile` traces them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layout

__all__ = ["slice_shard", "gather_shard", "all_to_all_shard", "reduce_scatter_shard",
           "all_reduce_sum", "sum_grad", "sum_grads", "padding_mask", "zero_padding", "scale_grad", "local_positions_of",
           "cross_entropy_partial"]


def _pad(x: torch.Tensor, dim: int, size: int | None) -> torch.Tensor:
    if size is None or x.shape[dim] == size:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, size - x.shape[dim]]
    return F.pad(x, pad)


def _pack(x: torch.Tensor, dim: int, world: int, order: str) -> torch.Tensor:
    """Reorder `dim` so that rank u's piece is the u-th contiguous 1/N of it."""
    if order == "contig":
        return x
    return torch.cat([slice_shard(x, dim, r, world, order) for r in range(world)], dim)


def _unpack(x: torch.Tensor, dim: int, world: int, order: str) -> torch.Tensor:
    """Inverse of `_pack`: pieces gathered in rank order back to the dim's own order."""
    return x if order == "contig" else layout.unshard(x, dim, order, world)


def slice_shard(x: torch.Tensor, dim: int, rank: int, world: int, order: str = "contig",
                pad_to: int | None = None) -> torch.Tensor:
    """Keep rank `rank`'s piece of `dim` (after zero-padding it to `pad_to`): the token runs of
    `layout.local_runs`, as views where the piece is one run."""
    x = _pad(x, dim, pad_to)
    n = x.shape[dim]
    if n % layout.layout_multiple(order, world):
        raise ValueError(f"slice_shard: dim {dim} of size {n} does not split {world} ways "
                         f"({order}); the planner should have padded it")
    runs = layout.local_runs(order, rank, world, n // world)
    pieces = [x.narrow(dim, start, length) for _, start, length in runs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def gather_shard(x: torch.Tensor, dim: int, group_name: str, world: int, order: str = "contig",
                 size: int | None = None) -> torch.Tensor:
    """All-gather `dim`, restore its order and cut it to `size` (dropping the padding)."""
    y = _unpack(torch.ops.seqshard.all_gather(x, dim, group_name), dim, world, order)
    return y if size is None else y.narrow(dim, 0, size)


def all_to_all_shard(x: torch.Tensor, gather_dim: int, scatter_dim: int, group_name: str,
                     world: int, gather_order: str = "contig", scatter_order: str = "contig",
                     gather_size: int | None = None, scatter_pad: int | None = None) -> torch.Tensor:
    """Gather `gather_dim` and split `scatter_dim` in one all-to-all."""
    x = _pack(_pad(x, scatter_dim, scatter_pad), scatter_dim, world, scatter_order)
    y = torch.ops.seqshard.all_to_all(x.contiguous(), scatter_dim, gather_dim, group_name)
    y = _unpack(y, gather_dim, world, gather_order)
    return y if gather_size is None else y.narrow(gather_dim, 0, gather_size)


def reduce_scatter_shard(x: torch.Tensor, dim: int, group_name: str, world: int,
                         order: str = "contig", pad_to: int | None = None) -> torch.Tensor:
    """Sum a partial tensor over the group and keep this rank's piece of `dim`."""
    x = _pack(_pad(x, dim, pad_to), dim, world, order)
    return torch.ops.seqshard.reduce_scatter(x.contiguous(), dim, group_name)


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.ops.seqshard.all_reduce(x, group_name)


def local_positions_of(size: int, padded: int, levels: tuple, device=None) -> torch.Tensor:
    """Global positions of the local elements of a factor split at `levels`, a tuple of
    (rank, world, order) from the outermost mesh axis in."""
    pos = torch.arange(padded, device=device)
    for rank, world, order in levels:
        pos = slice_shard(pos, 0, rank, world, order)
    return pos


def padding_mask(atoms: tuple, device=None) -> torch.Tensor:
    """Which elements of a (possibly merged) local dim are real, not padding: a flat bool mask.

    atoms: one entry per factor of the dim, outermost first: `(local, None, None, ())` for an
    unpadded factor, `(local, size, padded, levels)` for a padded split one (levels as in
    `local_positions_of`), `("pieces", (atoms, ...))` for a concatenation split piece by piece
    (each rank holds its share of every piece, in order: the pieces' masks concatenated)."""
    mask = torch.ones((), dtype=torch.bool, device=device)
    for entry in atoms:
        if entry[0] == "pieces":
            mask = mask[..., None] & torch.cat([padding_mask(p, device) for p in entry[1]])
            continue
        local, size, padded, levels = entry
        if size is None:
            valid = torch.ones(local, dtype=torch.bool, device=device)
        else:
            valid = local_positions_of(size, padded, levels, device) < size
        mask = mask[..., None] & valid
    return mask.flatten()


def zero_padding(x: torch.Tensor, dim: int, atoms: tuple) -> torch.Tensor:
    """Zero the padded positions of `dim` (see `padding_mask`), so a sum over it is exact."""
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * padding_mask(atoms, x.device).view(shape).to(x.dtype)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.ops.seqshard.all_reduce(g.contiguous(), ctx.group_name), None


def sum_grad(p: torch.Tensor, group_name: str) -> torch.Tensor:
    """Identity forward; the gradient is summed over the group (each rank holds a share of a
    replicated parameter's gradient; the sum is the single-device gradient)."""
    return _SumGrad.apply(p, group_name)


class _SumGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group_name, *xs):
        ctx.group_name = group_name
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs):
        present = [g for g in gs if g is not None]
        if not present:
            return (None,) * (len(gs) + 1)
        flat = torch.ops.seqshard.all_reduce(torch.cat([g.reshape(-1) for g in present]),
                                             ctx.group_name)
        sums = iter(flat.split([g.numel() for g in present]))
        return (None, *(None if g is None else next(sums).view_as(g) for g in gs))


def sum_grads(xs: tuple[torch.Tensor, ...], group_name: str) -> tuple[torch.Tensor, ...]:
    """`sum_grad` of several tensors with one all-reduce (a bucket): identity forward; in
    backward, when every gradient of the bucket is ready, they are flattened into one buffer,
    summed over the group, and split back."""
    return _SumGrads.apply(group_name, *xs)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by `factor`.

    Every rank seeds the backward of a replicated output (the loss) with the same gradient; the
    distributed program must see it once, not N times, so it is scaled by 1/N there."""
    return _ScaleGrad.apply(x, factor)


def cross_entropy_partial(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                          reduction: int, count_groups: tuple[str, ...],
                          padding: tuple | None = None) -> torch.Tensor:
    """This rank's share of a cross-entropy whose tokens are split: the local sum, divided (for
    a mean) by the global number of counted tokens. Summing the shares over the ranks (an
    all-reduce, inserted by the plan) gives the single-device loss. `padding` (a
    `padding_mask` description of the token dim) marks padded tokens ignored."""
    if padding is not None:
        valid = padding_mask(padding, labels.device)
        labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction != 1:  # sum
        return total
    count = (labels != ignore_index).sum().to(total.dtype).detach()
    for g in count_groups:
        count = torch.ops.seqshard.all_reduce(count, g).detach()
    return total / count
