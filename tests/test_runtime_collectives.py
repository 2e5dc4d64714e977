"""Collective custom ops: forward equals the single-device equivalent, backward is the true adjoint.

Every rank builds every rank's input from a seed, so it can evaluate the single-device version of
the collective (a function of all ranks' inputs) and its gradient with plain autograd, and compare
its own output and input gradient (float64). A wrong adjoint (e.g. all-gather's backward taking the
local slice instead of reduce-scattering, or ring_shift's backward shifting the wrong way) shows up
as a gradient mismatch naming the op and dims. Also: the ops trace under torch.compile with fake
tensors (fullgraph, aot_eager) and give the same values and gradients as eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqshard.runtime import all_gather, all_reduce, all_to_all, reduce_scatter, ring_shift
from seqshard.runtime.collectives import group_name


def _inputs(shape, world, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(world)]


def _single_device(op: str, xs: list[torch.Tensor], arg) -> list[torch.Tensor]:
    """What each rank receives, computed from all ranks' inputs on one device."""
    n = len(xs)
    if op == "all_to_all":
        scatter_dim, gather_dim = arg
        return [torch.cat([x.chunk(n, scatter_dim)[r] for x in xs], gather_dim) for r in range(n)]
    if op == "all_gather":
        return [torch.cat(xs, arg) for _ in range(n)]
    if op == "reduce_scatter":
        return list(sum(xs).chunk(n, arg))
    if op == "all_reduce":
        return [sum(xs) for _ in range(n)]
    if op == "ring_shift":
        return [xs[(r - arg) % n] for r in range(n)]
    raise AssertionError(op)


def _distributed(op: str, x, arg):
    """Through the readable wrappers; with a negative dim straight through torch.ops (as
    generated code may call it)."""
    if op == "all_to_all":
        if min(arg) < 0:
            return torch.ops.seqshard.all_to_all(x, *arg, group_name(None))
        return all_to_all(x, *arg)
    if op == "all_gather":
        return torch.ops.seqshard.all_gather(x, arg, group_name(None)) if arg < 0 else all_gather(x, arg)
    if op == "reduce_scatter":
        if arg < 0:
            return torch.ops.seqshard.reduce_scatter(x, arg, group_name(None))
        return reduce_scatter(x, arg)
    if op == "all_reduce":
        return all_reduce(x)
    return ring_shift(x, arg)


CASES = [
    ("all_to_all", (4, 8, 8, 3), (1, 2)),    # Ulysses s -> h on [b, h, s, e]
    ("all_to_all", (4, 8, 8, 3), (2, 1)),    # h -> s
    ("all_to_all", (8, 5, 4), (0, 2)),
    ("all_to_all", (3, 8, 4), (-1, 0)),
    ("all_gather", (2, 3, 5), 0),
    ("all_gather", (2, 3, 5), 1),
    ("all_gather", (2, 3, 5), -1),
    ("reduce_scatter", (8, 3, 4), 0),
    ("reduce_scatter", (3, 8, 4), 1),
    ("reduce_scatter", (3, 4, 8), 2),
    ("reduce_scatter", (3, 4, 8), -1),
    ("all_reduce", (3, 5), None),
    ("ring_shift", (3, 5), 1),
    ("ring_shift", (3, 5), -1),
    ("ring_shift", (2, 4), 3),
]


def check_collectives(cases):
    """Worker: per case, (max |out error|, max |grad error|) of this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = []
    for i, (op, shape, arg) in enumerate(CASES if cases is None else cases):
        xs = [x.requires_grad_() for x in _inputs(shape, world, seed=i)]
        expected = _single_device(op, xs, arg)
        ys = _inputs(expected[0].shape, world, seed=1000 + i)  # each rank's upstream gradient
        sum((e * y).sum() for e, y in zip(expected, ys)).backward()

        x = xs[rank].detach().clone().requires_grad_()
        out = _distributed(op, x, arg)
        out.backward(ys[rank])
        assert out.data_ptr() != x.data_ptr()
        errors.append(((out - expected[rank]).abs().max().item(),
                       (x.grad - xs[rank].grad).abs().max().item()))
    return errors


@pytest.mark.parametrize("pool_name", ["pool2", "pool4"])
def test_collectives_match_single_device_and_adjoint(pool_name, request):
    pool = request.getfixturevalue(pool_name)
    per_rank = pool.run(check_collectives, None)
    failures = [f"rank {r}: {CASES[i][0]} shape {CASES[i][1]} arg {CASES[i][2]}: "
                f"out error {e_out:.1e}, grad error {e_grad:.1e}"
                for r, errs in enumerate(per_rank) for i, (e_out, e_grad) in enumerate(errs)
                if not (e_out < 1e-12 and e_grad < 1e-12)]
    assert not failures, "\n".join(failures)


def reject_indivisible():
    messages = []
    for call in (lambda: all_to_all(torch.zeros(3, 4), 0, 1), lambda: reduce_scatter(torch.zeros(5), 0),
                 lambda: all_to_all(torch.zeros(4, 4), 1, 1)):
        try:
            call()
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_collectives_reject_bad_dims(pool2):
    messages = pool2.run(reject_indivisible)[0]
    assert len(messages) == 3, messages
    assert "not divisible by the group size 2" in messages[0] and "pad it" in messages[0]
    assert "two different dims" in messages[2]


def compiled_matches_eager():
    """Worker: generated-code style calls (torch.ops with a group name), compiled fullgraph."""
    name = group_name(None)
    rank = dist.get_rank()

    def program(x, k, v):
        q = torch.ops.seqshard.all_to_all(x, 2, 1, name)          # [b, h, s, e] heads -> seq
        out, lse = torch.ops.seqshard.ring_attention(q, k, v, name, True, "zigzag", 7, 0.25, "math")
        y = torch.ops.seqshard.all_gather(out * 2, 3, name)
        y = torch.ops.seqshard.reduce_scatter(y, 3, name)
        return torch.ops.seqshard.ring_shift(torch.ops.seqshard.all_reduce(y, name), 1, name)

    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1, 2, 8, 4, generator=gen)  # 2 ranks: h 2 -> 4 heads, s 8 -> 4 local
    k = torch.randn(1, 2, 4, 4, generator=gen)
    v = torch.randn(1, 2, 4, 4, generator=gen)
    results = []
    for fn in (program, torch.compile(program, backend="aot_eager", fullgraph=True)):
        inputs = [t.clone().requires_grad_() for t in (x, k, v)]
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), *(t.grad for t in inputs)))
    return [(a - b).abs().max().item() for a, b in zip(*results)]


def test_ops_compile_fullgraph_with_fake_tensors(pool2):
    for rank, errors in enumerate(pool2.run(compiled_matches_eager)):
        assert max(errors) < 1e-6, f"rank {rank}: compiled vs eager (out, dx, dk, dv) {errors}"


def opcheck_ops():
    """Worker: torch.library.opcheck (schema, fake tensor, autograd registration) on each op."""
    name = group_name(None)
    x = torch.randn(4, 6, 2, dtype=torch.float64, requires_grad=True)
    calls = [(torch.ops.seqshard.all_to_all.default, (x, 0, 1, name)),
             (torch.ops.seqshard.all_gather.default, (x, 2, name)),
             (torch.ops.seqshard.reduce_scatter.default, (x, 1, name)),
             (torch.ops.seqshard.all_reduce.default, (x, name)),
             (torch.ops.seqshard.ring_shift.default, (x, 1, name))]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor"))
    return True


def test_ops_pass_opcheck(pool2):
    assert pool2.run(opcheck_ops) == [True, True]
