"""Rules for diff and constant padding (dims/ops/scan_ops.py): transformers' packed-sequence
detection and causal-LM label shift run through them. A failure means they were reported as ops
without a rule (run replicated), or their new-length dim kept the input's factor."""

import torch

from seqshard.capture import capture
from seqshard.dims import Role, analyze


class LabelShiftAndDocuments(torch.nn.Module):
    def forward(self, position_ids, labels):
        documents = (torch.diff(position_ids, dim=-1) != 1).cumsum(-1)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        return documents.sum() + shifted.sum()


def test_diff_and_pad_have_rules():
    cap = capture(LabelShiftAndDocuments(), (torch.arange(8)[None], torch.arange(8)[None]))
    dims = analyze(cap)
    assert not dims.unsupported, dims.unsupported
    by_op = {n.name: n for n in cap.nodes()}
    F = dims.F
    for name, src in (("diff", "position_ids"), ("pad", "labels")):
        n = by_op[name]
        (b_in, s_in), (b_out, s_out) = dims.sigs[by_op[src]], dims.sigs[n]
        assert F.find(b_in[0]) == F.find(b_out[0]), f"{name} lost the batch factor"
        assert F.find(s_in[0]) != F.find(s_out[0]), f"{name}'s new-length dim kept the input factor"
        assert dims.roles[n][F.find(s_in[0])] == Role.WHOLE
