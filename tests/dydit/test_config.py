import pytest

from maskdit_fast.config import ConfigError
from maskdit_fast.dydit import load_dydit_config


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_presets_load(target):
    cfg = load_dydit_config(f"dydit-{target}")
    assert cfg.dydit.target == target
    assert cfg.data.dataset == "mnist"
    assert cfg.dydit.lambda_at(0) == 1.0 and cfg.dydit.lambda_at(10**9) == target


def test_lambda_warms_up_linearly():
    cfg = load_dydit_config("dydit-0.5", ["dydit.lambda_warmup=100", "dydit.target=0.4"])
    assert cfg.dydit.lambda_at(50) == pytest.approx(0.7)
    assert cfg.dydit.lambda_at(100) == 0.4
    assert load_dydit_config(None, ["dydit.lambda_warmup=0"]).dydit.lambda_at(0) == 0.5


def test_router_config_is_the_structural_part():
    router = load_dydit_config("dydit-0.5", ["dydit.token_ratio=8", "dydit.decoder=false"]).dydit.router()
    assert router.token_ratio == 8 and router.decoder is False
    assert not hasattr(router, "target")


@pytest.mark.parametrize("override,key", [("dydit.target=1.5", "dydit.target"), ("dydit.nope=1", "nope"),
                                          ("dydit.width_bias=-1", "dydit.width_bias"),
                                          ("dydit.sampler_sigma_frac=2", "dydit.sampler_sigma_frac"),
                                          ("train.max_steps=0", "train.max_steps")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_dydit_config("dydit-0.5", [override])


def test_overrides_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_dydit_config("dydit-0.5", ["dydit.target"])


def test_the_model_comes_from_the_checkpoint_not_the_config(tmp_path):
    with pytest.raises(ConfigError, match="model.depth: the model is the --init checkpoint's"):
        load_dydit_config("dydit-0.5", ["model.depth=3"])
    path = tmp_path / "with-model.yaml"
    path.write_text("model:\n  depth: 3\ndydit:\n  target: 0.4\n")
    with pytest.raises(ConfigError, match="model section"):
        load_dydit_config(str(path))
