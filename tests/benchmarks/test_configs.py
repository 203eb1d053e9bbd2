"""Model shapes and the variant syntax of the benchmarks."""
from __future__ import annotations

import pytest

from benchmarks.configs import ModelSpec, Variant, default_sample_variants, default_train_variants, parse_variants


def test_model_spec_is_the_imagenet_latent_model():
    cfg = ModelSpec.parse("XL/2").config("maskdit", 0.5)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (1152, 28, 16, 2)
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.mask_ratio) == (32, 4, 1000, 0.5)
    assert (cfg.decoder_hidden_size, cfg.decoder_depth) == (512, 8)
    assert ModelSpec.parse("tiny/2").config("dit", 0.0).input_size == 8


@pytest.mark.parametrize("text", ["XXL/2", "XL", "XL/3", "s/2"])
def test_bad_model_names_are_rejected(text):
    with pytest.raises(ValueError):
        ModelSpec.parse(text)


def test_variant_names_are_canonical():
    v = Variant.parse("mask50+compile+kernels+reference", "cuda")
    assert (v.arch, v.mask_ratio, v.kernels, v.attention, v.compile, v.precision) == \
        ("maskdit", 0.5, True, "reference", True, "bf16")
    assert v.name == "mask50+kernels+reference+compile"
    assert Variant.parse("dit+fp32", "cpu").name == "dit"  # fp32 is the CPU default
    assert Variant.parse("dit+bf16", "cpu").name == "dit+bf16"
    assert Variant.parse("dit+auto", "cpu").attention == "sdpa"
    assert Variant.parse("maskdit", "cpu").mask_ratio == 0.0


@pytest.mark.parametrize("text", ["vit", "mask5", "mask00", "dit+fast", "dit+flash2", "dit+kernels+xformers"])
def test_bad_variants_are_rejected_on_cpu(text):
    with pytest.raises(ValueError):
        Variant.parse(text, "cpu")


def test_parse_variants_puts_the_baseline_first_and_drops_duplicates():
    names = [v.name for v in parse_variants(["mask50", "dit+sdpa", "mask50+fp32", "dit+kernels"], "cpu")]
    assert names == ["dit", "mask50", "dit+kernels"]
    with pytest.raises(ValueError, match="sampling uses every token"):
        parse_variants(["mask50"], "cpu", sampling=True)


@pytest.mark.parametrize("tiny", [True, False])
def test_default_variants_parse(tiny):
    assert parse_variants(default_train_variants("cpu", tiny), "cpu")[0].name == "dit"
    parse_variants(default_sample_variants("cpu", tiny), "cpu", sampling=True)
