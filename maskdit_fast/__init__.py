"""maskdit_fast: fast training of diffusion transformers (DiT, MaskDiT) with EDM.

``load_checkpoint(path)`` returns a network ``net(x, sigma, class_labels=None, cfg_scale=None)``
giving the denoised ``x``.
"""
from ._version import __version__
from .checkpoint import load_checkpoint
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_checkpoint", "load_config", "__version__"]
