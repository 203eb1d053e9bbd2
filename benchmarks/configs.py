"""What is benchmarked: model shapes (``XL/2``) and variants (``mask50+kernels+compile``).

A model is ``SIZE/PATCH`` with SIZE in S, B, L, XL (DiT paper widths and depths) on ImageNet-256
latents (4 x 32 x 32, 1000 classes), or ``tiny/PATCH``: a 2-block, 64-wide model on 4 x 8 x 8
inputs for the CPU smoke mode. MaskDiT models add the paper's decoder (8 blocks, 512 wide).

A variant is an architecture followed by ``+``-separated modifiers:

    dit | maskdit | maskNN       plain DiT | MaskDiT without masking | MaskDiT training with NN% masked
    +kernels                     Triton kernels on (otherwise the PyTorch reference ops)
    +sdpa|flash3|flash2|xformers|reference|auto
                                 attention backend (default sdpa; auto = the best one available)
    +compile                     torch.compile the network
    +bf16|fp32                   precision (default: bf16 autocast on CUDA, fp32 on CPU)

Names are canonical (modifiers in the order above, defaults left out), so equal settings have
equal names. The plain ``dit`` is the way public DiT trainers run (kernels off, SDPA attention,
eager, bf16 autocast on CUDA); which row is compared with which is ``benchmarks/policy.py``'s rule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import kernels
from maskdit_fast.config import DIT_SIZES, ModelConfig

BASELINE = "dit"
PRECISIONS = ("bf16", "fp32")
ATTENTIONS = ("sdpa", "flash3", "flash2", "xformers", "reference")
FUSED_ATTENTIONS = ("flash3", "flash2", "xformers")  # CUDA and 16-bit only
# The tiny model of the CPU smoke mode: every code path of the real models at a few kFLOPs.
TINY = {"hidden_size": 64, "depth": 2, "num_heads": 4, "input_size": 8, "num_classes": 10,
        "decoder_hidden_size": 32, "decoder_depth": 1, "decoder_num_heads": 2}


@dataclass(frozen=True)
class ModelSpec:
    """A model shape such as ``XL/2`` (DiT-XL, patch 2, ImageNet-256 latents) or ``tiny/2``."""

    name: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        match = re.fullmatch(r"(tiny|[A-Z]+)/(\d+)", text.strip())
        if match is None or (match[1] != "tiny" and match[1] not in DIT_SIZES):
            raise ValueError(f"model {text!r} is not SIZE/PATCH with SIZE in {[*DIT_SIZES, 'tiny']} (e.g. XL/2)")
        spec = cls(f"{match[1]}/{int(match[2])}")
        spec.config("dit", 0.0)  # validates the patch size
        return spec

    def config(self, arch: str, mask_ratio: float) -> ModelConfig:
        """The model config of this shape for ``arch`` (dit | maskdit) trained with ``mask_ratio``."""
        size, patch = self.name.split("/")
        common = {"arch": arch, "mask_ratio": mask_ratio, "patch_size": int(patch), "in_channels": 4}
        if size == "tiny":
            return ModelConfig(size=None, **TINY, **common)
        return ModelConfig(size=size, input_size=32, num_classes=1000, **common)


@dataclass(frozen=True)
class Variant:
    """How a model runs: architecture, mask ratio, kernels, attention, compile, precision."""

    name: str  # canonical, see the module docstring
    arch: str  # dit | maskdit
    mask_ratio: float
    kernels: bool
    attention: str
    compile: bool
    precision: str

    @classmethod
    def parse(cls, text: str, device_type: str) -> Variant:
        """``mask50+kernels+flash2`` -> Variant; ``auto`` attention resolves to a backend of this machine."""
        default_precision = "bf16" if device_type == "cuda" else "fp32"
        head, *mods = [part.strip() for part in text.strip().split("+")]
        match = re.fullmatch(r"dit|maskdit|mask(\d\d)", head)
        if match is None:
            raise ValueError(f"variant {text!r}: starts with dit, maskdit or maskNN (NN = percent masked), "
                             f"not {head!r}")
        mask_ratio = int(match[1]) / 100 if match[1] else 0.0
        if match[1] and not 0 < mask_ratio < 1:
            raise ValueError(f"variant {text!r}: the masked percentage must be in 1..99")
        arch = "dit" if head == "dit" else "maskdit"
        on = {"kernels": False, "compile": False}
        attention, precision = "sdpa", default_precision
        for mod in mods:
            if mod in on:
                on[mod] = True
            elif mod == "auto" or mod in ATTENTIONS:
                attention = resolve_attention(mod, device_type)
            elif mod in PRECISIONS:
                precision = mod
            else:
                raise ValueError(f"variant {text!r}: unknown modifier {mod!r}; use kernels, compile, "
                                 f"{', '.join(PRECISIONS)}, auto or one of {', '.join(ATTENTIONS)}")
        if attention in FUSED_ATTENTIONS and precision != "bf16":
            raise ValueError(f"variant {text!r}: {attention} attention needs bf16")
        name = "+".join([head] + ["kernels"] * on["kernels"] + [attention] * (attention != "sdpa")
                        + ["compile"] * on["compile"] + [precision] * (precision != default_precision))
        return cls(name, arch, mask_ratio, on["kernels"], attention, on["compile"], precision)


def resolve_attention(name: str, device_type: str) -> str:
    """An attention backend that runs here: ``auto`` becomes the best available one."""
    if name == "auto":
        if device_type != "cuda":
            return "sdpa"
        kernels.set_attention_backend("auto")
        try:
            return kernels.attention_backend()
        finally:
            kernels.set_attention_backend(None)
    if name in FUSED_ATTENTIONS:
        if device_type != "cuda":
            raise ValueError(f"{name} attention needs a CUDA device")
        if name not in kernels.available_attention_backends():
            raise ValueError(f"{name} attention is not installed here; available: "
                             f"{kernels.available_attention_backends()}")
    return name


def default_train_variants(device_type: str, tiny: bool) -> list[str]:
    """The side-by-side comparison of a report: the baseline first."""
    if tiny:  # every code path, at tiny cost
        return ["dit", "dit+kernels", "dit+reference", "dit+kernels+compile", "dit+bf16",
                "mask50", "mask50+kernels", "mask25", "mask75+kernels", "mask50+kernels+compile", "mask50+bf16"]
    if device_type != "cuda":  # CPU at real shapes: kernels would run in Triton's interpreter
        return ["dit", "mask50", "mask25", "mask75"]
    fused = [f"dit+kernels+{name}" for name in FUSED_ATTENTIONS if name in kernels.available_attention_backends()]
    return ["dit", "dit+kernels", *fused, "dit+kernels+compile", "dit+kernels+auto+compile", "dit+fp32",
            "mask50", "mask50+kernels", "mask25", "mask25+kernels", "mask75", "mask75+kernels",
            "mask50+kernels+auto", "mask50+kernels+compile", "mask50+kernels+auto+compile"]


def default_sample_variants(device_type: str, tiny: bool) -> list[str]:
    """Sampling comparison (always every token: the mask ratio plays no part)."""
    if tiny:
        return ["dit", "maskdit+kernels"]
    if device_type != "cuda":
        return ["dit", "maskdit"]
    return ["dit", "dit+kernels", "dit+kernels+auto", "maskdit+kernels+auto", "maskdit+kernels+auto+compile"]


def parse_variants(names: list[str], device_type: str, sampling: bool = False) -> list[Variant]:
    """Variants in the given order, duplicates (after resolving names) dropped, baseline first."""
    variants: dict[str, Variant] = {}
    for text in [BASELINE, *names]:
        variant = Variant.parse(text, device_type)
        if sampling and variant.mask_ratio > 0:
            raise ValueError(f"sampling variant {text!r}: sampling uses every token; write maskdit, not maskNN")
        variants.setdefault(variant.name, variant)
    return list(variants.values())
