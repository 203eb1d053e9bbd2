"""Import official DiT checkpoints (facebookresearch/DiT) as this package's safetensors.

    python -m maskdit_fast.convert official-dit DiT-XL-2-256x256.pt OUT.safetensors

The released files are plain ``torch.save`` state dicts (the EMA weights); a DiT training
checkpoint (``{"model", "ema", "opt", "args"}``) works too (``--weights``). They are read with the
same restricted unpickler as official MaskDiT files: no code from the file runs.

What is kept: every weight, the learned "no class" row (the class table's last row, used for
guidance), and the learned-variance outputs (``learn_sigma``: the final layer's 2C channels). The
architecture comes from the shapes (width, depth, patch 2/4/8, 256 or 512 px); the head count from
DiT's presets for the width (or ``--num-heads``). The result is a ``model.diffusion=ddpm`` network:
``load_checkpoint`` gives a :class:`~maskdit_fast.diffusion.ddpm_precond.DDPMPrecond`, and the file
records DiT's sampling settings (250 DDPM steps, guidance 1.5 on three channels as the official code,
the SD VAE for 4-channel latents).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .checkpoint import build_net, save_safetensors
from .config import DIT_SIZES, ModelConfig
from .convert import read_official

HEADS_BY_WIDTH = {width: heads for width, _, heads in DIT_SIZES.values()}
SIZE_BY_WIDTH_DEPTH = {(width, depth): name for name, (width, depth, _) in DIT_SIZES.items()}
# What the official sample.py / the DyDiT paper use: 250 respaced DDPM steps, guidance on 3 channels.
DIT_SAMPLING = {"solver": "ddpm", "num_steps": 250, "cfg_scale": 1.5, "guidance": "dit"}
DIT_VAE = "stabilityai/sd-vae-ft-ema"


def _depth(state: dict, prefix: str = "blocks") -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})


def infer_dit_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> ModelConfig:
    """The ModelConfig whose parameters have the shapes of an official DiT state dict (unprefixed keys)."""
    try:
        proj = state["x_embedder.proj.weight"]
        pos = state["pos_embed"]
        out = state["final_layer.linear.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not an official DiT state dict: missing {err} (an official MaskDiT file? use "
                         "official-maskdit)") from None
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _depth(state)
    if out not in (patch * patch * channels, 2 * patch * patch * channels):
        raise ValueError(f"final layer has {out} outputs; a DiT of patch {patch} on {channels} channels has "
                         f"{patch * patch * channels} (or twice that with learn_sigma)")
    heads = num_heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ValueError(f"cannot infer the head count of width {width}; pass --num-heads")
    table = state.get("y_embedder.embedding_table.weight")
    return ModelConfig(
        arch="dit", size=SIZE_BY_WIDTH_DEPTH.get((width, depth)), hidden_size=width, depth=depth, num_heads=heads,
        patch_size=patch, input_size=math.isqrt(pos.shape[1]) * patch, in_channels=channels,
        num_classes=0 if table is None else table.shape[0] - 1,  # the last row is the learned "no class"
        diffusion="ddpm", learn_sigma=out == 2 * patch * patch * channels, null_class="learned", mask_ratio=0.0)


def official_dit_to_native(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Official DiT tensors -> this package's state dict (``model.`` prefix, float32). The stored
    sin-cos position embedding is checked against the one this package computes, then dropped."""
    net = build_net(cfg)
    native = {}
    for key, value in state.items():
        if key == "pos_embed":
            if not torch.allclose(value.reshape(net.model.pos_embed.shape).float(), net.model.pos_embed, atol=1e-5):
                raise ValueError("pos_embed differs from the sin-cos embedding this package computes")
            continue
        native["model." + key.replace("y_embedder.embedding_table.", "y_embedder.embedding.")] = value
    expected = set(net.state_dict())
    if set(native) != expected:
        missing, extra = sorted(expected - set(native)), sorted(set(native) - expected)
        raise ValueError(f"tensor names do not match a DiT: missing {missing[:5]}, unexpected {extra[:5]}")
    return {k: v.float() for k, v in native.items()}


def convert_official_dit(src: str | Path, dst: str | Path, weights: str = "ema",
                         num_heads: int | None = None) -> ModelConfig:
    """Convert an official DiT file (a state dict, or a training checkpoint's ``weights`` entry) to
    this package's safetensors; returns its model config."""
    ckpt = read_official(src)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{src} does not hold a state dict")
    state = ckpt if "x_embedder.proj.weight" in ckpt else ckpt.get(weights)
    if not isinstance(state, dict):
        raise ValueError(f"{src} is neither a DiT state dict nor a training checkpoint with {weights!r} weights; "
                         f"it holds {sorted(k for k in ckpt if isinstance(k, str))[:8]}")
    cfg = infer_dit_config(state, num_heads)
    extra = {"source": Path(src).name, "weights": weights, "sample_config": DIT_SAMPLING}
    if cfg.in_channels == 4:
        extra |= {"vae": DIT_VAE, "latent_scale": 0.18215}
    save_safetensors(dst, official_dit_to_native(state, cfg), cfg, extra)
    return cfg
