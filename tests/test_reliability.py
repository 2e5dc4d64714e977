"""Reliability of the driver: every accepted call runs exactly, misuse fails on every rank.

- train/eval after `parallelize` switches the program (dropout on/off), built from the same plan;
- the per-call input check compares a digest of the bytes (order-sensitive, NaN-safe) and names
  the input and the ranks;
- a difference in how ranks call `parallelize`, or an error on one rank, raises on every rank
  within seconds instead of blocking in a collective until the process group's timeout;
- inputs that require grad get the single-device gradient on every rank;
- plan JSON is checked field by field; a plan carries the input axes it was made with.

Failures point at seqshard/planner/parallel.py (ParallelModule, _together, _check_same_call,
_input_digest), seqshard/codegen/sharder.py (sum_grad on inputs) or seqshard/strategies/plan.py
(from_json, _check_json, axes)."""

import copy
import functools
import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from seqshard.models import AXES, build, named_plans
from seqshard.testing import mesh as make_mesh

TOL = 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the message is what we test
        return f"{type(e).__name__}: {e}"
    return None


def _mesh():
    return make_mesh((dist.get_world_size(),), ("sp",))


class DropNet(nn.Module):
    """x: [b, s, d] → [b, s, d] with dropout between two projections."""

    def __init__(self, d=16, p=0.5):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(d, d), nn.Dropout(p), nn.Linear(d, d)

    def forward(self, x):
        return self.b(self.drop(self.a(x).relu()))


class TokenNet(nn.Module):
    """ids, labels: [b, s] → mean cross-entropy of a one-layer model."""

    def __init__(self, vocab=50, d=8):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, ids, labels):
        return F.cross_entropy(self.out(self.emb(ids)).flatten(0, 1), labels.flatten())


def _token_module(**kw):
    from seqshard.planner import parallelize

    torch.manual_seed(0)
    model = TokenNet()
    ids, labels = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    pm = parallelize(model, (ids, labels), mesh=_mesh(), axes={"ids": "b s", "labels": "b s"},
                     overrides={"*": "split:s"}, **kw)
    return pm, model, ids, labels


# ------------------------------------------------------------------ 1. train / eval
def modes_follow_the_module(start_training: bool):
    """Parallelize in one mode, then switch back and forth: the eval output equals the
    single-device one, and the training output (dropout p=0.5) is another."""
    from seqshard.planner import parallelize

    torch.manual_seed(0)
    model = DropNet().train(start_training)
    ref = copy.deepcopy(model).eval()
    x = torch.randn(2, 10, 16)
    pm = parallelize(model, (x,), mesh=_mesh(), axes={"x": "b s d"},
                     overrides={"*": "split:s", "drop": "replicate"})
    want = ref(x)
    eval_err, differs = [], []
    for training in (start_training, not start_training, start_training):
        out = pm.train(training).gather(pm(x))
        (differs if training else eval_err).append(_rel(out, want))
    return max(eval_err), min(differs), len(getattr(pm, "_programs", ()))


@pytest.mark.parametrize("start_training", [True, False])
def test_train_and_eval_follow_the_module_mode(pool2, start_training):
    """Old: the mode was frozen at capture, so pm.eval() after parallelize in training mode kept
    dropout on (and the reverse kept it off)."""
    for eval_err, differs, programs in pool2.run(modes_follow_the_module, start_training):
        assert eval_err <= TOL, f"eval output off by {eval_err:.2e}"
        assert differs > 0.1, "training output equals the eval output: dropout did not switch"
        assert programs == 2, "each mode's program is built once and kept"


# ------------------------------------------------------------------ 2. input digests
def digest_mismatch(case: str):
    pm, _, ids, labels = _token_module()
    if case == "permuted" and dist.get_rank() == 1:
        ids = ids.flip(1)                       # same values, other order: the same sum
    if case == "mode" and dist.get_rank() == 1:
        pm.eval()
    return _error(pm, ids, labels)


@pytest.mark.parametrize("case", ["permuted", "mode"])
def test_a_rank_that_differs_fails_on_every_rank(pool2, case):
    """Old: a sum of every input, so permuted tokens passed unnoticed; a mode differing between
    ranks ran two different programs."""
    msgs = pool2.run(digest_mismatch, case)
    want = "rank 1 passed a different 'ids' than rank 0" if case == "permuted" else \
        "different train/eval modes (rank 0 | rank 1)"
    assert all(m and want in m for m in msgs), msgs


def nan_inputs():
    from seqshard.planner import parallelize

    torch.manual_seed(0)
    model = DropNet().eval()
    x = torch.randn(2, 10, 16)
    x[0, 3, 5] = float("nan")
    pm = parallelize(model, (x,), mesh=_mesh(), axes={"x": "b s d"}, overrides={"*": "split:s"})
    same = _error(pm, x)
    y = x.clone()
    if dist.get_rank() == 1:
        y[0, 3, 5], y[1, 0, 0] = 0.0, float("nan")
    return same, _error(pm, y)


def test_nan_inputs_compare_by_bits(pool2):
    """Old: NaN != NaN, so the same input with a NaN failed as "rank 0 passed a different 'x'
    than rank 0"; a NaN moved elsewhere is a different input."""
    for same, moved in pool2.run(nan_inputs):
        assert same is None, same
        assert moved and "rank 1 passed a different 'x' than rank 0" in moved, moved


def test_digest_properties():
    from seqshard.planner.parallel import _input_digest

    w = {}

    def d(t):
        return _input_digest(t, w).item()

    x = torch.randn(1000)
    assert d(x) == d(x.clone()) and d(x) != d(x.flip(0)) and d(x) != d(x.roll(1))
    nan = x.clone(); nan[7] = float("nan")
    assert d(nan) == d(nan.clone()) and d(nan) != d(x)
    for dtype in (torch.int64, torch.int32, torch.bfloat16, torch.bool, torch.uint8, torch.complex64):
        t = torch.arange(37).to(dtype)
        u = t.clone(); u[36] = u[0]  # one element differs (bool: 1 → 0)
        assert d(t) == d(t.clone()) and d(t) != d(u), dtype
    odd = torch.arange(40, dtype=torch.float32)[1:]  # a storage offset of 4 bytes
    assert d(odd) == d(odd.clone())


# ------------------------------------------------------------------ 3. no hangs
def plan_on_one_rank_only():
    from seqshard.planner import parallelize, plan

    model, inputs = build("llama", "tiny", batch=1, seq=16)
    p = plan(model, inputs, mesh=(("sp", 2),), overrides=named_plans("llama", "tiny")["ring"][0])
    t0 = time.perf_counter()
    msg = _error(parallelize, model, inputs, mesh=_mesh(),
                 plan=p if dist.get_rank() == 0 else None)
    return msg, time.perf_counter() - t0


def test_plan_on_one_rank_only_fails_fast_on_every_rank(pool2):
    """Old: rank 0 applied its plan and entered the ring while rank 1 waited for rank 0's
    planning broadcast: both blocked until the process group's 30-minute timeout."""
    timeout, pool2.timeout = pool2.timeout, 60
    try:
        results = pool2.run(plan_on_one_rank_only)
    finally:
        pool2.timeout = timeout
    for msg, seconds in results:
        assert msg and msg.startswith("ValueError") and "plan: rank 0 has plan " in msg \
            and "rank 1 plan=None" in msg, msg
        assert seconds < 10, f"took {seconds:.1f} s"


class FailsOnRank1(DropNet):
    def forward(self, x):
        if dist.get_rank() == 1:
            raise ValueError("rank one cannot do this")
        return super().forward(x)


def error_on_one_rank():
    from seqshard.planner import parallelize

    return _error(parallelize, FailsOnRank1(), (torch.randn(2, 10, 16),), mesh=_mesh(),
                  axes={"x": "b s d"}, overrides={"*": "split:s"})


def test_an_error_on_one_rank_raises_on_every_rank(pool2):
    """Old: rank 1 raised during capture while rank 0 waited in planning's broadcast."""
    timeout, pool2.timeout = pool2.timeout, 60
    try:
        msgs = pool2.run(error_on_one_rank)
    finally:
        pool2.timeout = timeout
    assert msgs[1] == "ValueError: rank one cannot do this", msgs[1]
    assert msgs[0] == "ValueError: rank 1 failed in capture: rank one cannot do this", msgs[0]


def bad_token():
    pm, _, ids, labels = _token_module()
    bad_ids, bad_labels, ignored = ids.clone(), labels.clone(), labels.clone()
    bad_ids[1, -1] = 50            # only the rank holding the last tokens would see it
    bad_labels[0, -1] = -1
    ignored[0, 0] = -100           # cross_entropy's ignore_index: allowed
    return _error(pm, bad_ids, labels), _error(pm, ids, bad_labels), _error(pm, ids, ignored)


def test_out_of_range_token_ids_raise_on_every_rank(pool2):
    """Old: the rank holding the bad id raised inside the program and the other blocked in the
    next collective."""
    timeout, pool2.timeout = pool2.timeout, 60
    try:
        results = pool2.run(bad_token)
    finally:
        pool2.timeout = timeout
    for ids, labels, ignored in results:
        assert ids and "IndexError: 'ids' holds 50, outside [0, 50) of the embedding emb" in ids, ids
        assert labels and "'labels' holds -1, outside [0, 50)" in labels, labels
        assert ignored is None, ignored


# ------------------------------------------------------------------ 4. input gradients
def input_gradient(requires_grad_at_parallelize: bool):
    from seqshard.planner import parallelize

    model, (x, t, target) = build("video_dit", "tiny", batch=1, frames=3, patches=5)
    ref = copy.deepcopy(model)
    overrides, _ = named_plans("video_dit", "tiny")["dsp"]
    pm = parallelize(model, (x.clone().requires_grad_(requires_grad_at_parallelize), t, target),
                     mesh=_mesh(), overrides=overrides, axes=AXES["video_dit"])
    x, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    pm(x, t, target).backward()
    ref(x_ref, t, target).backward()
    params = max(_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    return _rel(x.grad, x_ref.grad), params


@pytest.mark.parametrize("requires_grad_at_parallelize", [True, False])
def test_input_gradient_equals_single_device(pool2, requires_grad_at_parallelize):
    """Old: x.grad was this rank's share (relative error 0.73 at 2 ranks); parameters were
    summed over ranks, inputs were not. An example input without requires_grad: the first call
    with one builds the program that sums its gradient."""
    for x_err, p_err in pool2.run(input_gradient, requires_grad_at_parallelize):
        assert x_err <= TOL, f"x.grad off by {x_err:.2e}"
        assert p_err <= TOL, f"a parameter gradient off by {p_err:.2e}"


def unfrozen_after_parallelize():
    from seqshard.planner import parallelize

    torch.manual_seed(0)
    model = DropNet().eval()
    model.a.requires_grad_(False)         # frozen when the program is built
    ref = copy.deepcopy(model).requires_grad_(True)
    x = torch.randn(2, 10, 16)
    pm = parallelize(model, (x,), mesh=_mesh(), axes={"x": "b s d"}, overrides={"*": "split:s"})
    model.a.requires_grad_(True)
    pm(x).square().sum().backward()       # this rank's part of the loss (its tokens)
    ref(x).square().sum().backward()
    return _rel(model.a.weight.grad, ref.a.weight.grad)


def test_parameters_unfrozen_after_parallelize_get_summed_gradients(pool2):
    """A parameter frozen at parallelize had no sum over ranks in its program; unfreezing it
    builds the program that sums it (else each rank would keep its share)."""
    for err in pool2.run(unfrozen_after_parallelize):
        assert err <= TOL, f"a.weight.grad off by {err:.2e}"


# ------------------------------------------------------------------ 6. plans: JSON and axes
def plan_axes_carry_over():
    from seqshard.planner import parallelize, plan

    big, big_inputs = build("video_dit", "tiny", device="meta", batch=1, frames=16, patches=64)
    overrides, _ = named_plans("video_dit", "tiny")["dsp"]
    p = plan(big, big_inputs, mesh=(("sp", 4),), overrides=overrides, axes=AXES["video_dit"])
    p = type(p).from_json(p.to_json())
    model, inputs = build("video_dit", "tiny", batch=1, frames=3, patches=5)
    ref = copy.deepcopy(model)
    pm = parallelize(model, inputs, mesh=_mesh(), plan=p)     # no axes=: the plan's
    return _rel(pm(*inputs), ref(*inputs)), dict(p.axes)


def test_a_plan_carries_its_input_axes(pool2):
    """Old: parallelize(plan=p) without axes= named the input factors afresh, and a plan that
    splits `t` of the video DiT did not apply ("has no factor 't'")."""
    err, axes = pool2.run(plan_axes_carry_over)[0]
    assert axes == AXES["video_dit"]
    assert err <= TOL, err


@functools.cache
def _small_plan():
    from seqshard.planner import plan

    model, inputs = build("llama", "tiny", device="meta", batch=1, seq=64)
    return plan(model, inputs, mesh=(("sp", 4),), axes=AXES["llama"],
                overrides=named_plans("llama", "tiny")["ring"][0])


def test_plan_json_round_trip_and_old_json():
    from seqshard.strategies import Plan

    p = _small_plan()
    assert p.axes == tuple(AXES["llama"].items())
    q = Plan.from_json(p.to_json())
    assert q == p and q.hash() == p.hash() and q.axes == p.axes
    old = json.loads(p.to_json())
    del old["axes"]                           # JSON written before plans had axes
    r = Plan.from_json(json.dumps(old))
    assert r.axes == () and r.nodes == p.nodes
    # the hash of a plan without axes is what it was before axes existed
    from seqshard.strategies import NodePlan, Split

    fixed = Plan(mesh=(("sp", 4),), orders=(("s", "zigzag"),),
                 nodes=(NodePlan("linear", "a.b", "linear", (Split("sp", "s"),)),
                        NodePlan("sdpa", "a", "attention", (Split("sp", "s"),), "ring")))
    assert fixed.hash() == "5fbd9a3ba52ef03b"
    assert fixed.with_axes({"x": "b s d"}).hash() != fixed.hash()


def _edited(p, edit):
    d = json.loads(p.to_json())
    edit(d)
    return json.dumps(d)


BAD_PLANS = [  # (edit of a valid plan's JSON, the message)
    (lambda d: d.update(extra=1), "plan JSON: (top): unknown field 'extra'"),
    (lambda d: d["nodes"][0].update(bar=2), "plan JSON: nodes[0]: unknown field 'bar'"),
    (lambda d: d.pop("mesh"), "plan JSON: mesh: missing"),
    (lambda d: d["nodes"][1].pop("op"), "plan JSON: nodes[1].op: missing"),
    (lambda d: d.update(mesh=[["sp", "4"]]), "plan JSON: mesh[0][1]: expected a positive integer, got '4'"),
    (lambda d: d.update(mesh=[["sp", 4], ["sp", 2]]), "plan JSON: mesh: axis names must differ"),
    (lambda d: d.update(mesh={"sp": 4}), "plan JSON: mesh: expected a list, got {'sp': 4}"),
    (lambda d: d["nodes"][2].update(algorithm="magic"), "plan JSON: nodes[2].algorithm: expected one of null, 'local'"),
    (lambda d: d.update(orders=[["s", "spiral"]]), "plan JSON: orders[0][1]: expected one of 'contig', 'zigzag', got 'spiral'"),
    (lambda d: d["nodes"][0].update(splits=[{"axis": 5, "factor": "s"}]), "plan JSON: nodes[0].splits[0].axis: expected a string, got 5"),
    (lambda d: d["nodes"][0].update(splits=[{"axis": "tp", "factor": "s"}]), "plan JSON: nodes[0].splits[0].axis: expected a mesh axis ['sp'], got 'tp'"),
    (lambda d: d["nodes"][0].update(cost={"compute_s": "fast"}), "plan JSON: nodes[0].cost.compute_s: expected a number, got 'fast'"),
    (lambda d: d.update(version=2), "plan JSON: version: expected one of 1, got 2"),
    (lambda d: d.update(axes=[["x"]]), "plan JSON: axes[0]: expected a pair [name, value], got ['x']"),
    (lambda d: d.update(nodes=[[[[[]]]]]), "plan JSON: nodes[0]: expected an object, got [[[[]]]]"),
]


def test_plan_json_errors_name_the_field():
    """Old: a bare TypeError/KeyError/RecursionError (or a plan that failed later in codegen)."""
    from seqshard.strategies import Plan

    p = _small_plan()
    for edit, want in BAD_PLANS:
        with pytest.raises(ValueError) as e:
            Plan.from_json(_edited(p, edit))
        assert str(e.value).startswith(want), (want, str(e.value))
    for text, want in [("[" * 100_000, "plan JSON: nested too deeply"), ("{", "plan JSON: not JSON"),
                       ("[1]", "plan JSON: (top): expected an object")]:
        with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)")):
            Plan.from_json(text)


# ------------------------------------------------------------------ gather is differentiable once
def loss_on_gathered_output():
    import torch.nn.functional as F

    from seqshard.planner import parallelize

    model, (x, t) = build("video_dit", "tiny", batch=1, frames=3, patches=5, loss=False)
    target = torch.randn_like(x)
    ref = copy.deepcopy(model)
    overrides, _ = named_plans("video_dit", "tiny")["dsp"]
    pm = parallelize(model, (x, t), mesh=_mesh(), overrides=overrides,
                     axes={"x": AXES["video_dit"]["x"], "t": AXES["video_dit"]["t"]})
    out = pm(x, t)
    F.mse_loss(pm.gather(out), target).backward()
    F.mse_loss(ref(x, t), target).backward()
    return max(_rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))


def test_a_loss_on_gathered_outputs_counts_once(pool2):
    """Old: every rank's loss on `pm.gather(out)` added its gradient, 2x at 2 ranks."""
    for err in pool2.run(loss_on_gathered_output):
        assert err <= TOL, f"a parameter gradient off by {err:.2e}"


def parameters_of_the_module():
    from seqshard.planner import parallelize

    model, inputs = build("llama", "tiny", seq=16)
    pm = parallelize(model, inputs, mesh=_mesh())
    return [n for n, _ in pm.named_parameters()] == [f"model.{n}" for n, _ in model.named_parameters()]


def test_the_parallel_module_lists_the_models_parameters(pool2):
    """Old: ParallelModule stored a list in `self._parameters` (nn.Module's own registry), so
    pm.parameters() raised and torch.compile of the module broke."""
    assert all(pool2.run(parameters_of_the_module))
