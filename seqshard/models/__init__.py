"""Built-in reference models, with configurations by name.

    model, inputs = build("llama", "tiny", batch=1, seq=37)
    model, inputs = build("video_dit", "tiny", batch=1, frames=6, patches=10)
"""

from __future__ import annotations

import torch

from . import llama, video_dit

FAMILIES = {"llama": llama, "video_dit": video_dit}

# the factor names a user would write for each model's inputs (see planner.plan(axes=...))
AXES = {
    "llama": {"input_ids": "b s", "labels": "b s"},
    "video_dit": {"x": "b t p c", "t": "b", "target": "b t p c"},
}


def named_plans(family: str, name: str) -> dict[str, tuple[dict[str, str], tuple[str, ...]]]:
    """The expert plans for a built-in model, as overrides: {plan: (overrides, mesh axis names)}.

    These are what people choose by hand; the planner rediscovers them (tests/test_planner.py).
    llama: ring (zigzag), all-gather-KV, Ulysses, token-ring on a 1-D mesh, and the 2-D hybrid
    (ring across the outer axis, Ulysses inside the inner one). video_dit: DSP (split frames t
    for spatial blocks, switch to patches p for temporal blocks), Ulysses on the frame-split
    sequence, and ring over frames."""
    sp = ("sp",)
    if family == "llama":
        return {
            "ring": ({"*": "split:s ring zigzag"}, sp),
            "allgather": ({"*": "split:s allgather zigzag"}, sp),
            "ulysses": ({"*": "split:s ulysses"}, sp),
            "tokenring": ({"*": "split:s tokenring zigzag"}, sp),
            "hybrid": ({"*": "split:s hybrid zigzag"}, ("ring", "ulysses")),
        }
    cfg = config(family, name)
    temporal = {}
    for i in range(1, 2 * cfg.pairs, 2):  # odd blocks attend over frames
        temporal[f"blocks.{i}"] = temporal[f"blocks.{i}.*"] = "split:p"
    return {
        "dsp": ({"*": "split:t", **temporal}, sp),
        "ulysses": ({"*": "split:t ulysses"}, sp),
        "ring": ({"*": "split:t ring"}, sp),
    }


def config(family: str, name: str):
    try:
        configs = FAMILIES[family].CONFIGS
    except KeyError:
        raise ValueError(f"unknown model {family!r}; choose one of {sorted(FAMILIES)}") from None
    if name not in configs:
        raise ValueError(f"unknown {family} config {name!r}; choose one of {sorted(configs)}")
    return configs[name]


def build(family: str, name: str, *, device="cpu", dtype=torch.float32, loss: bool = True,
          seed: int = 0, **sizes):
    """The model (parameters initialised from `seed`) and example inputs.

    sizes: llama takes `batch, seq`; video_dit takes `batch, frames, patches`. On the `meta`
    device nothing is allocated, so the 70B shape can be planned on a laptop."""
    cfg = config(family, name)
    with torch.device(device):
        torch.manual_seed(seed)
        model = (llama.Llama(cfg) if family == "llama" else video_dit.VideoDiT(cfg)).to(dtype)
    gen = None if device == "meta" else torch.Generator(device).manual_seed(seed + 1)
    if family == "llama":
        inputs = llama.example_inputs(cfg, sizes.get("batch", 1), sizes["seq"], labels=loss,
                                      device=device, generator=gen)
    else:
        inputs = video_dit.example_inputs(cfg, sizes.get("batch", 1), sizes["frames"],
                                          sizes["patches"], target=loss, device=device, generator=gen)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return model, inputs
