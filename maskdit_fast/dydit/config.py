"""DyDiT fine-tune configuration (the routers' shape, :class:`~maskdit_fast.config.RouterConfig`, is a model
setting and lives with the other model configs).

A fine-tune run is the package's :class:`~maskdit_fast.config.Config` (data, loss, train, sample;
the model section comes from the ``--init`` checkpoint) plus a ``dydit`` section, loaded from
``configs/dydit-*.yaml`` with ``key=value`` overrides exactly like ``train.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import Config, ConfigError, RouterConfig, _require, resolve_config_path


@dataclass
class DyDiTConfig(RouterConfig):
    """Routers + the fine-tune objective."""

    target: float = 0.5                # lambda: FLOPs_dynamic / FLOPs_static aimed at
    lambda_warmup: int = 0             # steps over which lambda goes linearly from 1 to target
    flops_coef: float = 2.0            # weight of (mean FLOPs ratio - lambda)^2
    min_tokens: float = 0.1            # each block keeps at least this share of tokens ...
    min_tokens_coef: float = 1.0       # ... or pays this much per missing unit
    distill_coef: float = 0.0          # MSE to the frozen base model's denoised output (0 = off)
    sampler_sigma_frac: float = 0.0    # share of each batch at the sampler's noise levels (see docs)
    router_lr_scale: float = 1.0       # routers' learning rate = train.lr * this

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 < self.target <= 1, "dydit.target", f"must be in (0, 1], got {self.target}")
        _require(self.lambda_warmup >= 0, "dydit.lambda_warmup", "must be >= 0")
        for key in ("flops_coef", "min_tokens_coef", "distill_coef", "router_lr_scale"):
            _require(getattr(self, key) >= 0, f"dydit.{key}", "must be >= 0")
        _require(0 <= self.min_tokens <= 1, "dydit.min_tokens", "must be in [0, 1]")
        _require(0 <= self.sampler_sigma_frac <= 1, "dydit.sampler_sigma_frac", "must be in [0, 1]")

    def router(self) -> RouterConfig:
        return RouterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RouterConfig)})

    def lambda_at(self, step: int) -> float:
        """lambda at ``step``: 1 -> target linearly over ``lambda_warmup`` steps, then target."""
        if step >= self.lambda_warmup:
            return self.target
        return 1.0 + (self.target - 1.0) * step / self.lambda_warmup


@dataclass
class DyDiTRunConfig(Config):
    dydit: DyDiTConfig = field(default_factory=DyDiTConfig)


def load_dydit_config(name_or_path: str | None = "dydit-0.5", overrides: list[str] | tuple[str, ...] = ()) -> DyDiTRunConfig:
    """Defaults <- YAML preset (``dydit-0.5``) or file <- ``key=value`` overrides.

    There is no ``model`` section: the network is the fine-tuned checkpoint's."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. dydit.target=0.3)")
        if item.split("=", 1)[0].split(".")[0] == "model":
            raise ConfigError(f"{item.split('=', 1)[0]}: the model is the --init checkpoint's; "
                              "a DyDiT fine-tune takes no model.* settings")
    sources = [] if name_or_path is None else [OmegaConf.load(resolve_config_path(name_or_path))]
    if any("model" in source for source in sources):
        raise ConfigError(f"model: {name_or_path} has a model section, but the model is the --init checkpoint's; "
                          "remove it")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DyDiTRunConfig), *sources, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None
