"""FLOPs of one network evaluation, per sample, from the routers' decisions.

Counted like ``torch.utils.flop_counter``: 2 FLOPs per multiply-accumulate of every matmul,
linear and convolution (the paper's "GFLOPs" are MACs: divide by 2); softmax, norms, GELU and
element-wise ops are not counted. Every constant comes from the model's config and modules
(width, heads, MLP width, tokens, patch size, decoder), nothing is hard-coded per model size.

One DiT block of width D with H heads of size d = D/H, MLP width M split in H groups of M/H,
L tokens, conditioning width C, for a sample with h heads, g groups and T tokens on:

    adaLN        2 * C * 6D
    attention    h * 2 * (3 L D d + 2 L^2 d + L d D)          (qkv, QK^T, AV, proj)
    MLP          g * T * 2 * 2 D (M/H)                         (fc1 + fc2 on T tokens)
    routers      2 * (2 C_t H) + 2 * L (D r + r)               (DyDiT only: TDW on t_emb, SDT, r = D/16)

:class:`FlopsMeter` measures a sampling run: it hooks the network and adds up, per evaluation, the
FLOPs each row of the batch executed (from the routers' decisions; the static count for a base
model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion.denoiser import Denoiser
from ..models import DiT, MaskDiT
from ..models.layers import DiTBlock, ModulatedLinear
from ..models.dydit_block import DyDiTBlock, Routing


@dataclass(frozen=True)
class BlockFlops:
    """FLOPs constants of one block (one sample)."""

    dim: int
    heads: int
    mlp_hidden: int
    cond_dim: int
    tokens: int
    width_router_in: int = 0   # TDW routers' input width (0: no TDW routers)
    token_router_hidden: int = 0  # SDT router hidden width (0: no SDT router)

    @property
    def per_head(self) -> float:
        d, L, D = self.dim // self.heads, self.tokens, self.dim
        return 2.0 * (3 * L * D * d + 2 * L * L * d + L * d * D)

    @property
    def per_group_token(self) -> float:
        return 2.0 * 2 * self.dim * (self.mlp_hidden // self.heads)

    @property
    def modulation(self) -> float:
        return 2.0 * self.cond_dim * 6 * self.dim

    @property
    def routers(self) -> float:
        r = self.token_router_hidden
        sdt = 2.0 * self.tokens * (self.dim * r + r) if r else 0.0
        return 2.0 * 2 * self.width_router_in * self.heads + sdt

    @property
    def static(self) -> float:
        """The plain block (every head, group and token; no routers)."""
        return self.modulation + self.heads * self.per_head + self.heads * self.tokens * self.per_group_token

    def dynamic(self, routing: Routing) -> torch.Tensor:
        """(N,) FLOPs of the block for each sample of ``routing`` (differentiable in its decisions)."""
        heads = routing.heads.sum(-1)
        groups = routing.groups.sum(-1)
        tokens = routing.tokens.sum(-1)
        return (self.modulation + self.routers) + self.per_head * heads + self.per_group_token * groups * tokens


def block_flops(block: DiTBlock, tokens: int) -> BlockFlops:
    dim = block.attn.proj.out_features
    width_in = token_hidden = 0
    if isinstance(block, DyDiTBlock):
        width_in = block.head_router.linear.in_features if block.head_router is not None else 0
        token_hidden = block.token_router.hidden if block.token_router is not None else 0
    return BlockFlops(dim, block.attn.num_heads, block.mlp.fc1.out_features,
                      block.adaLN_modulation[-1].in_features, tokens, width_in, token_hidden)


@dataclass(frozen=True)
class ModelFlops:
    """Per-sample FLOPs of a DiT / MaskDiT / DyDiT forward (full-token path)."""

    fixed: float                      # embedders, final layer, MaskDiT's decoder input, static blocks
    blocks: tuple[BlockFlops, ...]    # every block, in forward order
    dynamic_index: tuple[int, ...]    # positions in ``blocks`` of the DyDiT blocks, in routing order

    @property
    def static(self) -> float:
        """The base model: every block full, no routers."""
        return self.fixed + sum(b.static for b in self.blocks)

    def dynamic(self, routing: list[Routing]) -> torch.Tensor:
        """(N,) FLOPs per sample of the forward whose decisions are ``routing``."""
        if len(routing) != len(self.dynamic_index):
            raise ValueError(f"{len(routing)} routing records for {len(self.dynamic_index)} dynamic blocks")
        dyn = set(self.dynamic_index)
        total = self.fixed + sum(b.static for i, b in enumerate(self.blocks) if i not in dyn)
        out = 0.0
        for i, r in zip(self.dynamic_index, routing):
            out = out + self.blocks[i].dynamic(r)
        return total + out

    def ratio(self, routing: list[Routing]) -> torch.Tensor:
        """(N,) FLOPs_dynamic / FLOPs_static of each sample."""
        return self.dynamic(routing) / self.static

    @property
    def masked(self) -> float:
        """FLOPs per sample of the masked formulation, which computes every head, group and token
        (and the routers) whatever the decisions."""
        return self.static + sum(self.blocks[i].routers for i in self.dynamic_index)


def model_flops(net: Denoiser | nn.Module) -> ModelFlops:
    """Constants of ``net`` (a preconditioned or raw DiT / MaskDiT, dynamic or not)."""
    model: DiT = net.model if isinstance(net, Denoiser) else net
    cfg = model.cfg
    L, D = model.num_patches, cfg.hidden_size
    patch_in = cfg.in_channels * cfg.patch_size**2
    t_mlp = model.t_embedder.mlp
    fixed = 2.0 * L * patch_in * D                                                  # patch embedding
    fixed += 2.0 * (t_mlp[0].in_features * t_mlp[0].out_features + t_mlp[2].in_features * t_mlp[2].out_features)
    blocks = list(model.blocks)
    if isinstance(model, MaskDiT):
        dec = model.decoder_layer
        fixed += 2.0 * dec.adaLN_modulation[-1].in_features * dec.adaLN_modulation[-1].out_features
        fixed += 2.0 * L * dec.linear.in_features * dec.linear.out_features
        blocks += list(model.decoder_blocks)
    final = model.final_layer
    fixed += 2.0 * final.adaLN_modulation[-1].in_features * final.adaLN_modulation[-1].out_features
    fixed += 2.0 * L * final.linear.in_features * final.linear.out_features
    counted = tuple(block_flops(b, L) for b in blocks)
    dynamic = tuple(i for i, b in enumerate(blocks) if isinstance(b, DyDiTBlock))
    return ModelFlops(fixed, counted, dynamic)


class FlopsMeter:
    """``with FlopsMeter(net) as meter: ...`` records the FLOPs of every forward of ``net.model``.

    One record per network evaluation: sigma (from the network's noise label, ``net.noise_level``), the
    rows evaluated (guidance doubles them), their FLOPs and the mean share of heads / groups /
    tokens on. Works for base (static) networks too (ratio 1).
    """

    def __init__(self, net: Denoiser):
        self.net = net
        self.flops = model_flops(net)
        self.records: list[dict] = []
        self._handle = None

    def __enter__(self) -> FlopsMeter:
        self._handle = self.net.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        noise_labels = args[1]
        routing = getattr(module, "routing", None)
        rows = noise_labels.shape[0]
        if not routing:
            flops, rates = self.flops.static * rows, {"heads": 1.0, "groups": 1.0, "tokens": 1.0}
        else:  # rates: the decisions; FLOPs: what ran (the masked formulation computes everything)
            rates = {k: float(torch.stack([getattr(r, k).float().mean() for r in routing]).mean())
                     for k in ("heads", "groups", "tokens")}
            if all(b.runs_fast() for b in module.dynamic_blocks()):
                flops = float(self.flops.dynamic(routing).detach().double().sum())
            else:
                flops = self.flops.masked * rows
        self.records.append({"sigma": float(self.net.noise_level(noise_labels).mean()), "rows": rows,
                             "flops": flops, **rates})

    def summary(self, images: int | None = None) -> dict:
        """Totals of the records: FLOPs per network row and per image, and the ratio to the base model."""
        rows = sum(r["rows"] for r in self.records)
        total = sum(r["flops"] for r in self.records)
        per_row = total / max(rows, 1)
        out = {"flops_per_row": per_row, "base_flops_per_row": self.flops.static, "ratio": per_row / self.flops.static,
               "rows": rows, "total_flops": total,
               "note": "FLOPs = 2 x MACs of matmuls/linears/convs; a row = one sample in one network evaluation "
                       "(guidance doubles the rows)",
               "per_evaluation": [{**r, "ratio": r["flops"] / (r["rows"] * self.flops.static)} for r in self.records]}
        if images:
            out["flops_per_image"] = total / images
        return out


def paper_gmacs(net: Denoiser | nn.Module) -> float:
    """GFLOPs of the static network as the DiT and DyDiT papers report them (fvcore's count): one per
    multiply-accumulate of the linears, convolutions and attention matmuls, plus 4 per element that an
    affine-free LayerNorm normalises (2 per DiT block, 1 per final / decoder-input layer); softmax,
    GELU and the modulation are not counted. DiT-XL/2 at 256 px (learned variance): 118.69."""
    model: DiT = net.model if isinstance(net, Denoiser) else net
    tokens = model.num_patches
    norm_elements = 0
    for module in model.modules():
        if isinstance(module, DiTBlock):
            norm_elements += 2 * tokens * module.attn.proj.out_features
        elif isinstance(module, ModulatedLinear):
            norm_elements += tokens * module.linear.in_features
    return (model_flops(net).static / 2 + 4 * norm_elements) / 1e9
