"""A sequence made of several factors (video: frames t × patches p, flattened) split on a factor
the ranks do not divide: the padding of the outermost factor is a suffix of the sequence and the
runtime masks it (`seq_len` is the whole sequence's real length); padding an inner factor would
sit inside the sequence and is refused with a PlanError that says what to split instead.

Old behaviour: every attention algorithm was silently wrong (loss 1e-2, gradients 1.1) with 3
frames on 2 ranks: codegen passed the split factor's length (3) as the sequence length."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

TOL = 1e-5


class FramesAttention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x, target):                       # x: [b, t, p, d]
        b, t, p, d = x.shape
        h = x.flatten(1, 2)                             # [b, t·p, d]
        q, k, v = self.qkv(h).view(b, t * p, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)     # [b, heads, t·p, e]
        o = self.o(o.transpose(1, 2).reshape(b, t * p, d)).view(b, t, p, d)
        return F.mse_loss(o, target)


def run(frames, patches, split, algorithm):
    from seqshard.planner import parallelize
    from seqshard.strategies import PlanError

    torch.manual_seed(0)
    model = FramesAttention()
    ref = copy.deepcopy(model)
    x, target = torch.randn(1, frames, patches, 8), torch.randn(1, frames, patches, 8)
    try:
        pm = parallelize(model, (x, target), axes={"x": "b t p d", "target": "b t p d"},
                         overrides={"*": f"split:{split} {algorithm}"})
    except PlanError as e:
        return "refused", str(e)
    pm(x, target).backward()
    ref(x, target).backward()
    return "ran", max(((a.grad - b.grad).norm() / b.grad.norm()).item()
                      for a, b in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("algorithm", ["ring", "allgather", "ulysses", "tokenring"])
def test_padded_outer_factor_is_exact(pool2, algorithm):
    for kind, err in pool2.run(run, 3, 4, "t", algorithm):
        assert kind == "ran" and err <= TOL, (kind, err)


def test_padded_inner_factor_is_refused(pool2):
    for kind, msg in pool2.run(run, 2, 3, "p", "ring"):  # 3 patches over 2 ranks, inside t × p
        assert kind == "refused" and "padding there is not a suffix" in msg and "Split 't'" in msg, msg
