"""The timed work: one full training step, one run of the EDM Heun sampler.

A training step is what ``maskdit_fast.train.trainer`` does per batch (data loading aside): EDM
noise, random masks, ``edm_loss`` under autocast, backward, AdamW (fused on CUDA), zero_grad and
an EMA update. Inputs are random latents of the model's shape.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import kernels
from maskdit_fast.config import LossConfig
from maskdit_fast.diffusion import edm_loss, edm_sample
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.models.precision import autocast_for
from maskdit_fast.train.ema import EMA

from .configs import ModelSpec, Variant
from .measure import residual_stream_dtype

@contextlib.contextmanager
def variant_settings(variant: Variant) -> Iterator[None]:
    """Kernels and attention backend of ``variant``, process-wide, for the duration of the block.

    On exit the attention backend goes back to ``$MASKDIT_ATTENTION`` (there is no getter for a
    previous override).
    """
    kernels.set_attention_backend(variant.attention)
    try:
        with kernels.backend("triton" if variant.kernels else "reference"):
            yield
    finally:
        kernels.set_attention_backend(None)


def _probe(net, forward, device: torch.device) -> str:
    """The residual-stream dtype of one eager, gradient-free ``forward()`` of ``net`` (before any
    compile: compiling keeps every tensor's dtype), the RNG left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        return residual_stream_dtype(net, forward)


def _build(spec: ModelSpec, variant: Variant, device: torch.device):
    cfg = spec.config(variant.arch, variant.mask_ratio)
    with device:  # initialise the weights where they will live (seconds saved per XL model on a GPU)
        net = build_net(cfg)
    return cfg, net.to(device)  # the buffers built from numpy


class TrainStep:
    """Callable: one training step of ``spec`` as ``variant`` on a fixed batch of ``batch`` images.

    Build and call it inside :func:`variant_settings`. ``residual_dtype``: the residual stream's
    dtype in this step's forward, measured (:func:`benchmarks.measure.residual_stream_dtype`).
    """

    def __init__(self, spec: ModelSpec, variant: Variant, batch: int, device: torch.device, compile_backend: str):
        cfg, self.net = _build(spec, variant, device)
        self.net.train()
        self.ema = EMA(self.net, decay=0.9999)  # copied before compiling: the EMA is never run
        side = cfg.input_size
        self.images = torch.randn(batch, cfg.in_channels, side, side, device=device)
        self.labels = torch.randint(0, cfg.num_classes, (batch,), device=device) if cfg.num_classes else None
        self.mask_ratio = variant.mask_ratio
        self.loss_cfg, self.model_cfg = LossConfig(), cfg
        self.autocast = autocast_for(variant.precision, device)
        self.residual_dtype = _probe(self.net, self._loss, device)
        if variant.compile:
            self.net.model.compile(backend=compile_backend, dynamic=False)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.step = 0

    def _loss(self) -> torch.Tensor:
        with self.autocast:
            return edm_loss(self.net, self.images, self.labels, self.mask_ratio, self.loss_cfg,
                            self.model_cfg).loss.mean()

    def __call__(self) -> None:
        loss = self._loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net, self.step)
        self.step += 1


class Sampler:
    """Callable: one EDM Heun sampler run (``2 * num_steps - 1`` network evaluations) on ``batch``
    noise images, with classifier-free guidance when ``cfg_scale != 1`` (the network then sees
    twice the batch). Build and call it inside :func:`variant_settings`; ``residual_dtype`` as in
    :class:`TrainStep`."""

    def __init__(self, spec: ModelSpec, variant: Variant, batch: int, device: torch.device, num_steps: int,
                 cfg_scale: float, compile_backend: str):
        cfg, self.net = _build(spec, variant, device)
        self.net.eval().requires_grad_(False)
        side = cfg.input_size
        self.noise = torch.randn(batch, cfg.in_channels, side, side, device=device)
        self.labels = torch.randint(0, cfg.num_classes, (batch,), device=device) if cfg.num_classes else None
        self.num_steps = num_steps
        self.cfg_scale = cfg_scale
        self.autocast = autocast_for(variant.precision, device)
        self.residual_dtype = _probe(self.net, lambda: self(num_steps=2), device)
        if variant.compile:
            self.net.model.compile(backend=compile_backend, dynamic=False)

    def __call__(self, num_steps: int | None = None) -> torch.Tensor:
        with torch.no_grad(), self.autocast:
            return edm_sample(lambda x, sigma: self.net(x, sigma, self.labels, cfg_scale=self.cfg_scale), self.noise,
                              num_steps=num_steps or self.num_steps)
