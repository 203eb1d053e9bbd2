import pytest

from maskdit_fast.config import (
    CONFIG_DIR,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
)
from maskdit_fast.dydit import load_dydit_config

# configs/dydit-*.yaml are DyDiT fine-tune presets (python -m maskdit_fast.dydit finetune --config dydit-0.5):
# the training config plus a `dydit` section, read by the DyDiT loader.
DYDIT_PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("dydit-*.yaml"))
TRAIN_PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in DYDIT_PRESETS)


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


@pytest.mark.parametrize("name", DYDIT_PRESETS)
def test_every_dydit_preset_loads_with_the_dydit_loader(name):
    assert load_dydit_config(name).dydit.target == float(name.split("-")[-1])  # dydit[-base]-LAMBDA
    with pytest.raises(ConfigError, match="dydit"):  # train.py refuses it, naming the section
        load_config(name)


def test_required_presets_exist_with_paper_values():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert {"mnist", "imagenet256-pretrain", "imagenet256-finetune", "imagenet512-pretrain"} <= names
    pre = load_config("imagenet256-pretrain")
    assert (pre.model.hidden_size, pre.model.depth, pre.model.patch_size) == (1152, 28, 2)
    assert (pre.model.mask_ratio, pre.loss.mae_coef, pre.model.decoder_depth, pre.model.decoder_hidden_size) == (0.5, 0.1, 8, 512)
    assert pre.train.global_batch == 1024 and pre.train.lr == 1e-4 and pre.train.ema_decay == 0.9999
    fine = load_config("imagenet256-finetune")
    assert fine.model.mask_ratio == 0 and fine.train.precision == "fp32"
    assert load_config("imagenet512-pretrain").model.input_size == 64


def test_overrides_are_typed_and_applied():
    cfg = load_config("mnist", ["model.mask_ratio=0.25", "train.max_steps=500", "train.unmasked_steps=0"])
    assert cfg.model.mask_ratio == 0.25 and cfg.train.max_steps == 500 and isinstance(cfg.train.max_steps, int)


@pytest.mark.parametrize("overrides,shape", [
    (["model.size=S"], (384, 12, 6)),                    # the XL preset's shape is replaced, not kept
    (["model.size=B", "model.depth=3"], (768, 3, 12)),   # an explicit value next to size wins
    (["model.depth=4"], (1152, 4, 16)),                  # no size override: the preset's size fills the rest
])
def test_model_size_override_sets_the_shape(overrides, shape):
    model = load_config("imagenet256-pretrain", overrides).model
    assert (model.hidden_size, model.depth, model.num_heads) == shape


def test_model_size_override_replaces_an_explicit_preset_shape():
    model = load_config("mnist", ["model.size=S"]).model
    assert (model.hidden_size, model.depth, model.num_heads) == (384, 12, 6)


@pytest.mark.parametrize("override,key", [
    ("model.nonsense=1", "model.nonsense"),
    ("trian.max_steps=3", "trian"),
    ("train.max_steps=abc", "train.max_steps"),
    ("model.mask_ratio=1.0", "model.mask_ratio"),
    ("model.mask_ratio=-0.5", "model.mask_ratio"),
    ("model.arch=unet", "model.arch"),
    ("model.num_heads=5", "model.hidden_size"),
    ("train.precision=fp8", "train.precision"),
    ("sample.solver=rk45", "sample.solver"),
    ("train.global_batch=0", "train.global_batch"),
    ("model.noise_embed_scale=0", "model.noise_embed_scale"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("mnist", [override])


def test_plain_dit_cannot_mask():
    with pytest.raises(ConfigError, match="model.mask_ratio"):
        load_config("mnist", ["model.arch=dit"])
    assert load_config("mnist", ["model.arch=dit", "model.mask_ratio=0"]).model.arch == "dit"


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("mnist", ["train.max_steps"])
    with pytest.raises(ConfigError, match="presets"):
        load_config("no-such-config")


def test_unknown_key_in_a_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match="model.hiden_size"):
        load_config(str(path))


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("4", 4), ("8", 8), ("null", None)])
def test_micro_batch_is_a_divisor_null_or_auto(value, expected):
    cfg = load_config("mnist", ["train.global_batch=8", f"train.micro_batch={value}"])
    assert cfg.train.micro_batch == expected and type(cfg.train.micro_batch) is type(expected)
    # the trainer hands the config to the planner's child process as a dict
    assert config_from_dict(config_to_dict(cfg)).train.micro_batch == expected


@pytest.mark.parametrize("value,message", [
    ("3", "must be positive and divide"), ("0", "must be positive"), ("-2", "must be positive"),
    ("big", "is not an integer, null or auto"), ("2.5", "is not an integer"), ("true", "is not an integer"),
    ("AUTO", "is not an integer, null or auto"),
])
def test_micro_batch_rejects_anything_else(value, message):
    with pytest.raises(ConfigError, match=rf"train\.micro_batch: .*{message}"):
        load_config("mnist", ["train.global_batch=8", f"train.micro_batch={value}"])
