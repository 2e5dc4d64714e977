"""Reading a plan and its program by module name: `layers.1` names layer 1 and what is inside
it, never `layers.10`; `Program.code_of` also shows the lines that moved into a recomputed
layer's submodule. Failures point at strategies/plan.py (`_under`) or codegen/sharder.py
(`_code_of`)."""
import torch

from seqshard.models import llama
from seqshard.planner import plan


def _llama(layers, seq):
    cfg = llama.LlamaConfig(vocab=96, dim=48, layers=layers, heads=6, kv_heads=2, ffn=80)
    torch.manual_seed(0)
    return llama.Llama(cfg), llama.example_inputs(cfg, 1, seq)


def test_module_names_are_not_prefixes():
    model, inputs = _llama(12, 16)
    p = plan(model, inputs, mesh=(("sp", 2),), overrides={"layers.10": "recompute"})
    mods = {n.module for n in p.nodes}
    assert any(m.startswith("layers.10.") for m in mods)
    assert p._find("layers.1").module.split(".")[:2] == ["layers", "1"]
    text = p.explain("layers.1")
    assert "layers.10" not in text and "layers.1" in text, text


def test_code_of_shows_recomputed_layer():
    from seqshard.capture import capture
    from seqshard.codegen import MeshInfo, apply_plan
    from seqshard.dims import analyze

    model, inputs = _llama(2, 16)
    p = plan(model, inputs, mesh=(("sp", 1),), overrides={"layers.*": "recompute"})
    assert p.recompute
    prog = apply_plan(analyze(capture(model, inputs)), p, MeshInfo.virtual((("sp", 1),)))
    code = prog.code_of("layers.0")
    assert "# self.recompute_layers_0:" in code, code
    assert "attention" in code, code
    assert "layers_1" not in code.replace("recompute_layers_1", ""), code
