"""Models people bring, built from small configs (random init, nothing downloaded): transformers
causal LMs and diffusers video transformers, each at a tiny size (to run) and a production size
on the meta device (to plan). The wrappers are what a user writes around them: the loss.

    model, inputs = build("llama", "tiny")          # runs on CPU in milliseconds
    model, inputs = build("llama", "production")    # meta device: plan only
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DECODERS = ("llama", "qwen2", "mistral", "phi3")
VIDEO = ("cogvideox", "latte", "wan")
ALL = DECODERS + VIDEO


class CausalLMLoss(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels, position_ids=None):
        return self.lm(input_ids=input_ids, labels=labels, position_ids=position_ids).loss


class DiffusionLoss(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, hidden_states, timestep, encoder_hidden_states, target):
        out = self.net(hidden_states=hidden_states, timestep=timestep,
                       encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return F.mse_loss(out, target)


def _decoder(name: str, size: str, seq: int):
    import transformers as T

    classes = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
               "mistral": (T.MistralConfig, T.MistralForCausalLM), "phi3": (T.Phi3Config, T.Phi3ForCausalLM)}
    if size == "tiny":  # the production shape's head structure (GQA or not), at 4 heads
        cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=4 if name == "phi3" else 2)
    else:  # the published shapes (2 layers: a plan is per layer template)
        cfg = {"llama": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_attention_heads=32, num_key_value_heads=8),       # Llama-3.2-1B
               "qwen2": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                             num_attention_heads=12, num_key_value_heads=2),       # Qwen2-1.5B
               "mistral": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                               num_attention_heads=32, num_key_value_heads=8),     # Mistral-7B
               "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                            num_attention_heads=32, num_key_value_heads=32)}[name]  # Phi-3-mini
    cfg.update(num_hidden_layers=2, use_cache=False, max_position_embeddings=max(seq, 4096))
    if name == "mistral":
        cfg["sliding_window"] = 8 if size == "tiny" else 4096
    if name == "phi3":
        cfg.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config_cls, model_cls = classes[name]
    return CausalLMLoss(model_cls(config_cls(**cfg)))


def _video(name: str, size: str):
    import diffusers as D

    tiny = size == "tiny"
    if name == "cogvideox":
        heads, dim, frames, h, w = (4, 8, 3, 4, 4) if tiny else (30, 64, 13, 60, 90)
        net = D.CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=dim, in_channels=4 if tiny else 16,
            out_channels=4 if tiny else 16, time_embed_dim=32 if tiny else 512,
            text_embed_dim=32 if tiny else 4096, num_layers=2, sample_width=w, sample_height=h,
            sample_frames=(frames - 1) * 4 + 1, patch_size=2, max_text_seq_length=8 if tiny else 226)
        x = (1, frames, net.config.in_channels, h, w)
        text = (1, net.config.max_text_seq_length, net.config.text_embed_dim)
    elif name == "latte":
        heads, dim, frames, s = (4, 8, 4, 8) if tiny else (16, 72, 16, 32)
        net = D.LatteTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=dim, in_channels=4, out_channels=4,
            num_layers=2, sample_size=s, patch_size=2, cross_attention_dim=heads * dim,
            caption_channels=32 if tiny else 4096, video_length=frames, norm_type="ada_norm_single")
        x = (1, 4, frames, s, s)
        text = (1, 8 if tiny else 120, 32 if tiny else 4096)
    else:  # wan
        heads, dim, frames, s = (4, 8, 3, 8) if tiny else (12, 128, 21, 60)
        net = D.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim,
            in_channels=4 if tiny else 16, out_channels=4 if tiny else 16,
            text_dim=32 if tiny else 4096, freq_dim=32 if tiny else 256,
            ffn_dim=64 if tiny else 8960, num_layers=2, rope_max_seq_len=64 if tiny else 1024)
        x = (1, net.config.in_channels, frames, s, s)
        text = (1, 8 if tiny else 512, 32 if tiny else 4096)
    return DiffusionLoss(net), x, text


def build(name: str, size: str = "tiny", *, seq: int | None = None, seed: int = 0,
          dtype: torch.dtype = torch.float32):
    """(model, example inputs). size: "tiny" (CPU) or "production" (meta device: nothing is
    allocated). A plan made at one dtype applies at the other (a bf16 model's graph has casts
    that float32's lacks; plans key nodes by what they are, not by FX name)."""
    device = "cpu" if size == "tiny" else "meta"
    gen = torch.Generator().manual_seed(seed + 1)

    def rand(*shape):
        t = torch.randn(*shape, generator=gen) if device == "cpu" else torch.empty(*shape, device="meta")
        return t.to(dtype)

    torch.manual_seed(seed)
    with torch.device(device):
        if name in DECODERS:
            seq = seq or (13 if size == "tiny" else 131072)
            model = _decoder(name, size, seq).to(dtype)
            ids = (torch.randint(0, 128, (2, seq), generator=gen) if device == "cpu"
                   else torch.zeros(1, seq, dtype=torch.long, device="meta"))
            return model, (ids, ids.clone())
        model, x, text = _video(name, size)
        model = model.to(dtype)
    t = torch.tensor([3], device=device)
    return model, (rand(*x), t, rand(*text), rand(*x))


def packed_position_ids(lengths: list[int], batch: int = 1) -> torch.Tensor:
    """Positions of documents packed into one sequence: 0..n-1 for each document in turn."""
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).expand(batch, -1).clone()
