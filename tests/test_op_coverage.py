"""Op coverage on the patterns real models use: each module below is a small copy of one, run on
2 ranks under a forced split and under the planner's own plan, and compared with the
single-device model (loss and every parameter gradient, float32, relative error <= 1e-5).

Failures point at: the op rules (seqshard/dims/ops: a factor given the wrong role), the
localizers (seqshard/codegen/local_ops.py: a bias added on every addend of a partial sum),
functionalization at capture (seqshard/capture: an in-place write landing in a redistributed
copy), or the einsum cost (seqshard/strategies/costs.py)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from seqshard.capture import capture
from seqshard.dims import Role, analyze
from seqshard.testing import mesh as make_mesh

TOL = 1e-5
aten = torch.ops.aten


# ------------------------------------------------------------------ the patterns
class FeedForward(nn.Module):
    """diffusers CogVideoX `FeedForward`: Linear → GELU(tanh) → Dropout → Linear, with biases.
    Splitting the hidden factor makes `proj_out` a partial sum; its bias must be added once."""

    def __init__(self, d=8, mult=4, p=0.0):
        super().__init__()
        self.proj_in = nn.Linear(d, d * mult)
        self.drop = nn.Dropout(p)
        self.proj_out = nn.Linear(d * mult, d)

    def forward(self, x, target):
        h = self.proj_out(self.drop(F.gelu(self.proj_in(x), approximate="tanh")))
        return F.mse_loss(h, target)


class Conv1DMLP(nn.Module):
    """transformers GPT-2 `Conv1D`: `addmm(bias, x.view(-1, nx), weight)`."""

    def __init__(self, d=8, hidden=16):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d, hidden) * 0.3), nn.Parameter(torch.randn(hidden))
        self.w2, self.b2 = nn.Parameter(torch.randn(hidden, d) * 0.3), nn.Parameter(torch.randn(d))

    def forward(self, x, target):
        b, s, d = x.shape
        h = F.gelu(torch.addmm(self.b1, x.view(-1, d), self.w1).view(b, s, -1))
        out = torch.addmm(self.b2, h.view(-1, h.shape[-1]), self.w2, beta=0.5, alpha=2.0)
        return F.mse_loss(out.view(b, s, d), target)


class Baddbmm(nn.Module):
    """`baddbmm(bias, h, w)` with the contraction split."""

    def __init__(self, d=8, hidden=16):
        super().__init__()
        self.proj = nn.Linear(d, hidden, bias=False)
        self.bias = nn.Parameter(torch.randn(1, 1, d))
        self.w = nn.Parameter(torch.randn(hidden, d) * 0.3)

    def forward(self, x, target):
        h = F.silu(self.proj(x))
        out = torch.baddbmm(self.bias, h, self.w.expand(x.shape[0], -1, -1), beta=0.5, alpha=2.0)
        return F.mse_loss(out, target)


class Einsums(nn.Module):
    """A contraction written with '...', one with an implicit output (alphabetical: `bes`), and
    Latte's unpatchify, `einsum("nhwpqc->nchpwq", x)`, which reorders the pieces of a dim."""

    def __init__(self, d=8, hidden=16):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d, hidden) * 0.3), nn.Parameter(torch.randn(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, d) * 0.3)

    def forward(self, x, target):
        h = F.gelu(torch.einsum("...d,df->...f", x, self.w1) + self.b1)    # [b, s, f]
        out = torch.einsum("bsf,fe", h, self.w2).transpose(1, 2)           # [b, e, s] → [b, s, e]
        n, s, e = out.shape
        out = torch.einsum("nhwpqc->nchpwq", out.reshape(n, s // 4, 2, 2, 1, e))
        return F.mse_loss(out.reshape(n, e, s).transpose(1, 2), target)


class WanRope(nn.Module):
    """diffusers Wan attention: rotary embedding written into `empty_like` through strided slices."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, cos, sin, target):
        def rope(h):
            x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = cos[..., 0::2], sin[..., 1::2]
            out = torch.empty_like(h)
            out[..., 0::2] = x1 * c - x2 * s
            out[..., 1::2] = x1 * s + x2 * c
            return out.type_as(h)

        q, k, v = (p(x).unflatten(2, (self.heads, -1)) for p in (self.q, self.k, self.v))
        q, k = rope(q), rope(k)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return F.mse_loss(self.o(a.transpose(1, 2).flatten(2)), target)


class InPlace(nn.Module):
    """In-place writes into intermediates: `add_`, `mul_`, `+=`, a slice and a column assigned."""

    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, target):
        z = self.lin(x).clone()
        z.add_(x)
        z.mul_(2)
        z[..., :2] = x[..., 2:4] * 5
        z[..., 3] = 1.0
        z += 1
        return F.mse_loss(z, target)


class WriteThroughFlatten(nn.Module):
    """A write through `flatten`, which is a view or a copy depending on strides: capture hands
    the program to torch's functionalization. Dropout with p = 0 in training as well."""

    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.0)

    def forward(self, x, target):
        z = self.drop(self.lin(x)).clone()
        z.flatten(0, 1)[:, :2] = x.flatten(0, 1)[:, 2:4] * 5
        return F.mse_loss(z, target)


class Dropouts(nn.Module):
    def __init__(self, d=8, p=0.5):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x, target):
        return F.mse_loss(self.drop(self.lin(x)), target)


def build(case: str, big: bool = False):
    """(model, inputs, axes), alike on every rank: tiny on the CPU, or `big` (a long sequence
    and wide layers) on the meta device, to plan."""
    torch.manual_seed(0)
    b, s, d, w = (1, 1 << 16, 1024, 4) if big else (2, 8, 8, 2)   # w: the hidden width / d

    def rand(*shape):
        return torch.empty(*shape, device="meta") if big else torch.randn(*shape)

    x, target = rand(b, s, d), rand(b, s, d)
    axes = {"x": "b s d"}
    with torch.device("meta" if big else "cpu"):
        model = {"feedforward": lambda: FeedForward(d, mult=2 * w),
                 "conv1d": lambda: Conv1DMLP(d, w * d), "baddbmm": lambda: Baddbmm(d, w * d),
                 "einsum": lambda: Einsums(d, w * d), "wan_rope": lambda: WanRope(2 * d, heads=2),
                 "inplace": lambda: InPlace(d), "write_through_flatten": lambda: WriteThroughFlatten(d),
                 "dropout_eval": lambda: Dropouts(d).eval()}[case]()
    if case == "wan_rope":
        return model, (rand(b, s, 2 * d), rand(s, 1, d), rand(s, 1, d), rand(b, s, 2 * d)), axes
    return model, (x, target), axes


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def hidden_factor(dims) -> str:
    """The factor the model's last contraction sums over (an MLP's hidden features)."""
    for n in reversed(list(dims.cap.nodes())):
        if getattr(n.target, "overloadpacket", None) in CONTRACTIONS:
            summed = [a for a, r in dims.roles.get(n, {}).items() if r == Role.SUM]
            if summed:
                return dims.F.label(summed[0])
    raise AssertionError("no contraction sums over a factor")


CONTRACTIONS = (aten.linear, aten.addmm, aten.baddbmm, aten.einsum)


def compare(case: str, overrides):
    """On every rank: the worst relative error of the loss and the gradients, and where.
    `overrides` is a dict (`HIDDEN` in it stands for `hidden_factor`) or a plan as JSON."""
    from seqshard.planner import Plan, parallelize

    model, inputs, axes = build(case)
    ref = copy.deepcopy(model)
    mesh = make_mesh((dist.get_world_size(),), ("sp",))
    if isinstance(overrides, str):  # a plan's JSON
        pm = parallelize(model, inputs, mesh=mesh, plan=Plan.from_json(overrides))
    else:
        if any("HIDDEN" in v for v in overrides.values()):
            hidden = hidden_factor(analyze(capture(model, inputs), axes))
            overrides = {k: v.replace("HIDDEN", hidden) for k, v in overrides.items()}
        pm = parallelize(model, inputs, mesh=mesh, overrides=overrides, axes=axes)
    loss, loss_ref = pm(*inputs), ref(*inputs)
    loss.backward()
    loss_ref.backward()
    errs = {"loss": _rel(loss.detach(), loss_ref.detach())}
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        errs[f"grad {n}"] = float("inf") if p.grad is None else _rel(p.grad, q.grad)
    where = max(errs, key=errs.get)
    split = sorted({sp.factor for n in pm.plan.nodes for sp in n.splits})
    return errs[where], where, split


def _check(results):
    err, where, factors = results[0]
    assert all(r[:2] == (err, where) for r in results), "ranks disagree"
    assert err <= TOL, f"relative error {err:.2e} at {where}"
    assert factors, "the plan split nothing"


CASES = [  # (case, forced overrides)
    ("feedforward", {"*": "split:HIDDEN"}),
    ("feedforward", {"*": "split:s"}),
    ("conv1d", {"*": "split:HIDDEN"}),
    ("baddbmm", {"*": "split:HIDDEN"}),
    ("einsum", {"*": "split:HIDDEN"}),
    ("einsum", {"*": "split:b"}),
    ("wan_rope", {"*": "split:s ring"}),
    ("wan_rope", {"*": "split:h"}),
    ("inplace", {"*": "split:s"}),
    ("write_through_flatten", {"*": "split:s"}),
    ("dropout_eval", {"*": "split:f"}),
]


@pytest.mark.parametrize("case,overrides", CASES, ids=[f"{c}-{'-'.join(sorted(set(o.values())))}"
                                                       for c, o in CASES])
def test_forced_split_is_exact(pool2, case, overrides):
    _check(pool2.run(compare, case, overrides))


@pytest.mark.parametrize("case", ["feedforward", "conv1d", "einsum", "wan_rope"])
def test_planner_plan_is_exact(pool2, case):
    """The plan the planner makes for 64K tokens on the meta device, run at 8 tokens."""
    from seqshard.planner import plan

    big, inputs, axes = build(case, big=True)
    made = plan(big, inputs, mesh=(("sp", 2),), axes=axes)
    _check(pool2.run(compare, case, made.to_json()))


# ------------------------------------------------------------------ single process: rules and capture
def _capture(case: str):
    model, inputs, axes = build(case)
    cap = capture(model, inputs)
    return model, inputs, cap, analyze(cap, axes)


def _calls(cap, packet):
    return [n for n in cap.nodes() if getattr(n.target, "overloadpacket", None) is packet]


def test_einsum_equations_spelled_out():
    from seqshard.dims.ops.matrix_ops import spell_out

    assert spell_out("...d,df->...f", [3, 2]) == "01d,df->01f"
    assert spell_out("...ij,...jk", [4, 3]) == "01ij,1jk->01ik"   # broadcast from the right
    assert spell_out("bsf,fe", [3, 2]) == "bsf,fe->bes"            # implicit: alphabetical
    assert spell_out("nhwpqc->nchpwq", [6]) == "nhwpqc->nchpwq"


def test_einsum_factors():
    """'...' and implicit outputs have rules; a contraction sums its letter, a permutation
    (Latte's unpatchify) moves factors and needs none whole."""
    _, _, cap, da = _capture("einsum")
    assert not da.unsupported
    first, second, unpatchify = _calls(cap, aten.einsum)
    assert da.sig_str(first) == "((b,), (s,), (" + hidden_factor(da) + ",))"
    assert {da.F.label(a): r for a, r in da.roles[second].items()} == {hidden_factor(da): Role.SUM}
    assert not da.roles[unpatchify]


class Gram(nn.Module):
    def forward(self, x):
        return torch.einsum("bsd,btd->bst", x, x).sum() + (x @ x.transpose(1, 2)).sum()


def test_a_factor_in_two_dims_of_one_tensor_is_whole():
    """`bsd,btd->bst` on the same tokens gives [b, s, s]: split, each rank would hold the diagonal
    blocks only. The contraction must need s whole (it still splits b)."""
    cap = capture(Gram(), (torch.randn(2, 6, 4),))
    da = analyze(cap, {"x": "b s d"})
    for n in _calls(cap, aten.einsum) + _calls(cap, aten.matmul):
        roles = {da.F.label(a): r for a, r in da.roles[n].items()}
        assert roles == {"s": Role.WHOLE, "d": Role.SUM}, (n.name, roles)


def test_einsum_cost_counts_local_flops():
    """The einsum cost is a matmul's on the local shards (it crashed on the equation string)."""
    from seqshard.costmodel import Cluster
    from seqshard.strategies import Costs, resolve

    _, _, cap, da = _capture("einsum")
    first = _calls(cap, aten.einsum)[0]
    costs = Costs(da, Cluster.preset("h200", gpus=2), (("sp", 2),))
    st = resolve(first, da, (da.factor(first, "b"),), None, ("sp",))
    work = costs._work(first, st)
    b, s, d, f = 2, 8, 8, 16
    assert (work.kind, work.flops) == ("matmul", 2 * (b // 2) * s * d * f)


def test_dropout_splits_like_a_pointwise_op():
    _, _, cap, da = _capture("dropout_eval")
    (drop,) = _calls(cap, aten.dropout)
    assert not da.roles[drop]


def _same(model, inputs, cap):
    torch.manual_seed(0)
    want = model(*inputs)
    torch.manual_seed(0)
    torch.testing.assert_close(cap.run(*inputs), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["wan_rope", "inplace"])
def test_writes_become_values(case):
    """No in-place op is left (they would write into a redistributed copy); the rewritten graph
    computes exactly what the model does."""
    model, inputs, cap, da = _capture(case)
    assert any("functionalized" in r for r in cap.rewrites), cap.rewrites
    assert not [n for n in cap.nodes() if n.op == "call_function"
                and getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable]
    assert _calls(cap, aten.slice_scatter)
    assert not da.unsupported, da.unsupported
    _same(model, inputs, cap)


class ReadsAView(nn.Module):
    """A view taken before a write and read after it sees the write; a reshape taken before it
    (a copy or a view, by strides) sends capture through torch's functionalization."""

    def __init__(self, reshape: bool):
        super().__init__()
        self.reshape = reshape
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        z = x * 1.0
        first = z[:, 0]
        flat = z.reshape(-1) if self.reshape else z
        z.mul_(2)
        z[:, 1:2] += first.unsqueeze(1)
        self.calls.add_(1)
        return first.sum() + z.sum() + flat.sum() * 0.5


@pytest.mark.parametrize("reshape", [False, True])
def test_views_read_after_a_write(reshape):
    model = ReadsAView(reshape)
    x = torch.randn(3, 4)
    cap = capture(model, (x,))
    via_torch = any("torch's functionalization" in r for r in cap.rewrites)
    assert via_torch == reshape, cap.rewrites
    assert any("calls is not written back" in r or "b_calls is not written back" in r
               for r in cap.rewrites), cap.rewrites
    _same(ReadsAView(reshape), (x,), cap)


def test_writes_through_flatten_use_torchs_functionalization():
    model, inputs, cap, da = _capture("write_through_flatten")
    assert any("torch's functionalization" in r for r in cap.rewrites), cap.rewrites
    assert not da.unsupported
    _same(model, inputs, cap)


def test_models_without_writes_are_not_touched():
    from seqshard.models import build as build_model

    model, inputs = build_model("llama", "tiny", batch=1, seq=8)
    cap = capture(model, inputs)
    assert not any("functionalized" in r for r in cap.rewrites)


# ------------------------------------------------------------------ dropout in training
def dropout_masks(p=0.5):
    """Dropout on the input, the sequence split in two: the gathered output and its halves."""
    from seqshard.planner import parallelize

    torch.manual_seed(0)
    x = torch.randn(2, 64, 8) + 5.0
    pm = parallelize(nn.Dropout(p), (x,), mesh=make_mesh((dist.get_world_size(),), ("sp",)),
                     overrides={"*": "split:s"}, axes={"input": "b s d"})
    out = pm.gather(pm(x))
    kept = out != 0
    return dict(scaled=torch.equal(out[kept], x[kept] / (1 - p)), kept=kept.float().mean().item(),
                halves_agree=(kept[:, :32] == kept[:, 32:]).float().mean().item(), total=out.sum().item())


def test_dropout_splits_with_a_mask_per_shard(pool2):
    """Training dropout under a sequence split: kept values scaled by 1/(1-p), about 1-p of them
    kept, the ranks' shards masked independently (ranks seeded alike would otherwise drop the
    same positions of both halves), and every rank sees the same result."""
    results = pool2.run(dropout_masks)
    r = results[0]
    assert all(x == r for x in results), "ranks disagree on the gathered output"
    assert r["scaled"], "a kept element is not x / (1 - p)"
    assert 0.42 < r["kept"] < 0.58, r
    assert r["halves_agree"] < 0.65, f"the two shards drew nearly the same mask: {r}"
