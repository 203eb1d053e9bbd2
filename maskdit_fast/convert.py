"""Import official MaskDiT (Anima-Lab/MaskDiT) and DiT (facebookresearch/DiT) checkpoints as safetensors.

    python -m maskdit_fast.convert official-maskdit IN.pt OUT.safetensors [--weights ema|model]
    python -m maskdit_fast.convert official-dit DiT-XL-2-256x256.pt OUT.safetensors

Every pickle of the file (the legacy non-zip format's magic-number, protocol and system-info
pickles included) is read with a restricted unpickler that rebuilds tensors and plain containers
only (:mod:`maskdit_fast.safe_pickle`); any other pickled object (e.g. the ``argparse.Namespace``
of the training arguments) becomes an inert placeholder, so no code from the file runs. The architecture is inferred from the tensor
shapes; head counts cannot be, so they follow the DiT presets unless given.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

from .checkpoint import save_safetensors
from .diffusion.edm import build_net
from .config import DIT_SIZES, ModelConfig
from .errors import ArgumentParser
from .safe_pickle import official_pickle

HEADS_BY_WIDTH = {width: heads for width, _, heads in DIT_SIZES.values()} | {512: 16}
SIZE_BY_WIDTH_DEPTH = {(width, depth): name for name, (width, depth, _) in DIT_SIZES.items()}


def read_official(path: str | Path) -> dict:
    """The checkpoint dict (tensors and containers; anything else inert), without running its code."""
    try:
        return torch.load(path, map_location="cpu", pickle_module=official_pickle, weights_only=False)
    except Exception as err:  # a damaged or foreign file fails anywhere in torch.load's parsing
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err}); "
                         "pass the official MaskDiT .pt file") from None


def _count(state: dict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})


def infer_model_config(state: dict[str, torch.Tensor], num_heads: int | None = None,
                       decoder_num_heads: int | None = None) -> ModelConfig:
    """The ModelConfig whose parameters have the shapes found in an official state dict (``model.`` keys)."""
    try:
        proj = state["model.x_embedder.proj.weight"]
        pos = state["model.pos_embed"]
    except KeyError as err:
        raise ValueError(f"not an official MaskDiT/DiT state dict: missing {err}") from None
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _count(state, "model.blocks")
    out = state["model.final_layer.linear.weight"].shape[0]
    if out != patch * patch * channels:
        raise ValueError(f"final layer has {out} outputs, expected {patch * patch * channels}: "
                         "learn_sigma models are not supported")
    heads = num_heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ValueError(f"cannot infer the head count of width {width}; pass --num-heads")
    table = state.get("model.y_embedder.embedding_table.weight")
    use_decoder = "model.mask_token" in state
    decoder_width = state["model.mask_token"].shape[-1] if use_decoder else 512
    decoder_heads = decoder_num_heads or HEADS_BY_WIDTH.get(decoder_width)
    if use_decoder and decoder_heads is None:
        raise ValueError(f"cannot infer the decoder head count of width {decoder_width}; pass --decoder-num-heads")
    return ModelConfig(
        arch="maskdit" if use_decoder else "dit", size=SIZE_BY_WIDTH_DEPTH.get((width, depth)),
        hidden_size=width, depth=depth, num_heads=heads, patch_size=patch,
        input_size=math.isqrt(pos.shape[1]) * patch, in_channels=channels,
        num_classes=0 if table is None else table.shape[1],
        decoder_hidden_size=decoder_width, decoder_depth=_count(state, "model.decoder_blocks") if use_decoder else 8,
        decoder_num_heads=decoder_heads or 16, mask_ratio=0.0)


def official_to_native(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename/reshape official tensors to this package's EDMPrecond state dict.

    The class table (D, K) applied to one-hot labels becomes an embedding (K, D); the frozen sin-cos
    position embeddings are recomputed from the config, and checked against the file.
    """
    net = build_net(cfg)
    native = {}
    for key, value in state.items():
        if key in ("model.pos_embed", "model.decoder_pos_embed"):
            ours = getattr(net.model, key.split(".")[1])
            if not torch.allclose(value.reshape(ours.shape).float(), ours, atol=1e-5):
                raise ValueError(f"{key} differs from the sin-cos embedding this package computes")
            continue
        if key == "model.y_embedder.embedding_table.weight":
            native["model.y_embedder.embedding.weight"] = value.t().contiguous()
            continue
        native[key] = value
    expected = set(net.state_dict())
    if set(native) != expected:
        missing, extra = sorted(expected - set(native)), sorted(set(native) - expected)
        raise ValueError(f"tensor names do not match: missing {missing[:5]}, unexpected {extra[:5]}")
    return {k: v.float() for k, v in native.items()}


def native_to_official(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`official_to_native` (used by tests and for exporting back)."""
    net = build_net(cfg)
    out = {"model.pos_embed": net.model.pos_embed.unsqueeze(0).clone()}
    if cfg.arch == "maskdit":
        out["model.decoder_pos_embed"] = net.model.decoder_pos_embed.unsqueeze(0).clone()
    for key, value in state.items():
        if key == "model.y_embedder.embedding.weight":
            out["model.y_embedder.embedding_table.weight"] = value.t().contiguous()
        else:
            out[key] = value
    return out


def convert_official(src: str | Path, dst: str | Path, weights: str = "ema", num_heads: int | None = None,
                     decoder_num_heads: int | None = None) -> ModelConfig:
    """Convert an official checkpoint file to this package's safetensors; returns its model config."""
    ckpt = read_official(src)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{src} does not hold a checkpoint dict")
    state = ckpt.get(weights)
    if not isinstance(state, dict):
        raise ValueError(f"{src} has no {weights!r} weights; it holds {sorted(k for k in ckpt if isinstance(k, str))}")
    cfg = infer_model_config(state, num_heads, decoder_num_heads)
    save_safetensors(dst, official_to_native(state, cfg), cfg, {"source": str(Path(src).name), "weights": weights})
    return cfg


# ---- official DiT (facebookresearch/DiT) -------------------------------------------------------
# The released files are plain state dicts (the EMA weights); a DiT training checkpoint's "ema" /
# "model" entry works too. Kept: every weight, the learned "no class" row (the class table's last
# row, used for guidance) and the learned-variance outputs (learn_sigma: 2C channels). The result is a
# model.diffusion=ddpm network (load_checkpoint gives a DDPMPrecond) that records DiT's sampling settings.

DIT_HEADS_BY_WIDTH = {width: heads for width, _, heads in DIT_SIZES.values()}
# What the official sample.py / the DyDiT paper use: 250 respaced DDPM steps, guidance on 3 channels.
DIT_SAMPLING = {"solver": "ddpm", "num_steps": 250, "cfg_scale": 1.5, "guidance": "dit"}
DIT_VAE = "stabilityai/sd-vae-ft-ema"


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
    depth = _count(state, "blocks")
    if out not in (patch * patch * channels, 2 * patch * patch * channels):
        raise ValueError(f"final layer has {out} outputs; a DiT of patch {patch} on {channels} channels has "
                         f"{patch * patch * channels} (or twice that with learn_sigma)")
    heads = num_heads or DIT_HEADS_BY_WIDTH.get(width)
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


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m maskdit_fast.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    official = sub.add_parser("official-maskdit", help="official MaskDiT .pt -> safetensors")
    official.add_argument("src")
    official.add_argument("dst")
    official.add_argument("--weights", choices=("ema", "model"), default="ema")
    official.add_argument("--num-heads", type=int, default=None)
    official.add_argument("--decoder-num-heads", type=int, default=None)
    dit = sub.add_parser("official-dit", help="official DiT .pt (facebookresearch/DiT) -> safetensors")
    dit.add_argument("src")
    dit.add_argument("dst")
    dit.add_argument("--weights", choices=("ema", "model"), default="ema", help="for a DiT training checkpoint")
    dit.add_argument("--num-heads", type=int, default=None)
    args = parser.parse_args(argv)
    if not Path(args.src).is_file():
        parser.error(f"{args.src}: no such file")
    try:
        if args.command == "official-dit":
            cfg = convert_official_dit(args.src, args.dst, args.weights, args.num_heads)
        else:
            cfg = convert_official(args.src, args.dst, args.weights, args.num_heads, args.decoder_num_heads)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.dst}: {cfg.arch} ({cfg.diffusion}) width {cfg.hidden_size} depth {cfg.depth} patch {cfg.patch_size} "
          f"input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
