"""DyDiT fine-tune: a trained DiT / MaskDiT learns where to spend compute.

Objective per step (batch of N images):

    loss = DSM(dynamic net)                                       (EDM denoising loss, no masking; for a
                                                                   model.diffusion=ddpm base such as an official
                                                                   DiT: DiT's eps MSE + VB at uniform t)
         + flops_coef * (mean_n F_dyn(n) / F_static - lambda)^2   (lambda: 1 -> target over lambda_warmup)
         + min_tokens_coef * sum_blocks max(0, min_tokens - mean token decision)
         + distill_coef * EDM-weighted MSE(dynamic denoised, frozen base denoised)   (optional)

FLOPs are those of the whole network (embedders, final layer and static blocks included, routers
counted), so lambda is the FLOPs ratio the sampler will measure. EDM trains on
ln(sigma) ~ N(P_mean, P_std^2), which rarely visits the high noise levels where the sampler spends
half its steps; ``dydit.sampler_sigma_frac`` of each batch therefore takes its sigma from the
sampler's own noise levels, so that the FLOPs target (and the quality of the thinned network)
holds where the sampler runs it. (In DDPM, as in the paper, training and sampling timesteps are
both uniform, and this mismatch does not arise.)

Label dropout (classifier-free guidance) is applied here rather than inside the network, so that
the distillation teacher sees the same labels as the student.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import ema_metadata, load_checkpoint
from ..config import ConfigError, SampleConfig, config_to_dict
from ..data.loader import build_loader
from ..data.sampler import split_global_batch
from ..diffusion.ddpm_loss import ddpm_loss
from ..diffusion.denoiser import Denoiser
from ..diffusion.edm import build_net
from ..diffusion.loss import edm_weight, sample_sigma
from ..diffusion.samplers import edm_time_steps
from ..dist import Dist, any_rank, processes
from ..generate import generate, seed_labels, write_sample_grid
from ..models.precision import resolve_precision
from ..train.ema import EMA
from ..train.loop import (LossFn, MicroBatch, Run, check_run_dir, replace_data_vae, resumed_micro_batch,
                          train_loop)
from ..train.optimizer import check_optimizer
from ..train.preemption import PREEMPTED_EXIT, Preempted, resume_after_restart, stop_signals
from ..train.run_lock import RunLock
from .checkpoint import save_dydit
from .config import DyDiTConfig, DyDiTRunConfig
from .flops import FlopsMeter, ModelFlops, model_flops
from .model import routing_of, to_dydit

log = logging.getLogger(__name__)


def sampler_sigmas(sample: SampleConfig) -> torch.Tensor:
    """The noise levels at which the EDM sampler evaluates the network, one entry per evaluation
    (Heun evaluates every level but the first twice). Returns (E,) float32."""
    t = edm_time_steps(sample.num_steps, sample.sigma_min, sample.sigma_max, sample.rho)[:-1].float()
    if sample.solver == "heun":
        t = torch.cat([t, t[1:]])
    return t


def training_sigmas(n: int, cfg: DyDiTRunConfig, levels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N,) noise levels: EDM's log-normal, with a share ``dydit.sampler_sigma_frac`` from ``levels``."""
    sigma = sample_sigma(n, cfg.loss.P_mean, cfg.loss.P_std, device)
    k = round(cfg.dydit.sampler_sigma_frac * n)
    if k:
        pick = torch.randint(0, levels.numel(), (k,), device=device)
        sigma = torch.cat([levels.to(device)[pick], sigma[k:]])
    return sigma


def _drop_labels(labels: torch.Tensor, rate: float, null: int) -> torch.Tensor:
    """labels (N,) with each replaced by ``null`` (no class) with probability ``rate``."""
    drop = torch.rand(labels.shape[0], device=labels.device) < rate
    return torch.where(drop, torch.full_like(labels, null), labels)


def dydit_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, lam: float, cfg: DyDiTRunConfig,
               flops: ModelFlops, levels: torch.Tensor, teacher: Denoiser | None = None,
               raw: Denoiser | None = None) -> dict[str, torch.Tensor]:
    """One draw of the DyDiT objective; returns scalar terms (``loss`` is the one to minimise).
    images: (N, C, H, W); labels: (N,) int64 or None.

    ``net`` is called (it may be DDP-wrapped); ``raw`` is the network inside (``net`` itself when
    None), whose blocks hold the routing decisions. Labels are dropped here at the model's
    ``class_dropout`` rate, so the network's own label dropout must be off
    (``net.model.y_embedder.dropout = 0``, as :func:`finetune` sets it).
    """
    d: DyDiTConfig = cfg.dydit
    m = cfg.model
    raw = net if raw is None else raw
    n = images.shape[0]
    embedder = raw.model.y_embedder
    if raw.training and labels is not None and embedder is not None and embedder.dropout > 0:
        raise ValueError("set net.model.y_embedder.dropout = 0: the fine-tune drops labels itself, "
                         "so that the distillation teacher sees the same labels")
    if m.diffusion == "ddpm":  # DiT's own objective (hybrid loss, uniform t), as the paper fine-tunes
        if labels is not None and m.class_dropout > 0:
            labels = _drop_labels(labels, m.class_dropout, m.num_classes)
        dsm = ddpm_loss(net, images, labels, 0.0, cfg.loss, m).loss.mean()
    else:
        sigma = training_sigmas(n, cfg, levels, images.device)
        s = sigma.view(-1, 1, 1, 1)
        noisy = images + torch.randn_like(images) * s
        if labels is not None and m.class_dropout > 0:
            labels = _drop_labels(labels, m.class_dropout, m.num_classes)
        denoised = net(noisy, sigma, labels)
        weight = edm_weight(s, m.sigma_data)
        dsm = (weight * (denoised - images).pow(2)).mean()
    routing = routing_of(raw)
    ratio = flops.ratio(routing)
    flops_loss = d.flops_coef * (ratio.mean() - lam) ** 2
    token_rates = torch.stack([r.tokens.mean() for r in routing])
    min_tokens = F.relu(d.min_tokens - token_rates).sum()
    loss = dsm + flops_loss + d.min_tokens_coef * min_tokens
    terms = {"dsm": dsm.detach(), "flops_loss": flops_loss.detach(), "min_tokens": min_tokens.detach()}
    if teacher is not None and d.distill_coef > 0:
        with torch.no_grad():
            target = teacher(noisy, sigma, labels)
        distill = (weight * (denoised - target).pow(2)).mean()
        loss = loss + d.distill_coef * distill
        terms["distill"] = distill.detach()
    terms.update(loss=loss, flops_ratio=ratio.detach().mean(),
                 heads=torch.stack([r.heads.mean() for r in routing]).mean().detach(),
                 groups=torch.stack([r.groups.mean() for r in routing]).mean().detach(),
                 tokens=token_rates.mean().detach())
    return terms


def dydit_objective(cfg: DyDiTRunConfig, raw: Denoiser, teacher: Denoiser | None) -> LossFn:
    """The DyDiT objective for the training loop (:func:`dydit_loss` at lambda of the step)."""
    flops, levels = model_flops(raw), sampler_sigmas(cfg.sample)

    def loss_fn(net: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = dydit_loss(net, batch.images, batch.labels, cfg.dydit.lambda_at(step), cfg, flops, levels, teacher,
                           raw)
        loss = terms.pop("loss")
        return loss, terms

    return loss_fn


def finetune(cfg: DyDiTRunConfig, init: str | Path, out_dir: str | Path, progress: bool = True,
             resume: bool = False) -> Path:
    """Fine-tune the DiT / MaskDiT checkpoint ``init`` into a DyDiT; returns the EMA safetensors path.

    It runs on the package's training loop (:mod:`maskdit_fast.train.loop`): every
    ``train.ckpt_every`` steps and at the end it writes the training state
    (``checkpoints/step-XXXXXXX``: network, EMA, optimizer, each rank's RNG; atomic) and
    ``ema.safetensors``; also ``metrics.jsonl``, ``config.json`` and ``samples/final.png``
    (+ ``samples/final-flops.json``). ``resume=True`` continues from the newest training state in
    ``out_dir`` exactly where it was written (same data order and random draws): the result equals
    an uninterrupted run's. ``cfg`` is not changed (the model section is the checkpoint's).

    ``train.parallel=ddp`` under torchrun splits each global batch over the processes (and
    ``train.micro_batch`` into micro-batches); every micro-batch draws its noise from a seed of its
    place in the global batch and adds its own FLOPs term, so N processes compute what one process
    with N micro-batches does.
    """
    t = cfg.train
    for key in ("compile", "activation_checkpointing"):
        if getattr(t, key):
            raise ConfigError(f"train.{key}: not supported by the DyDiT fine-tune (untested with the routers); "
                              f"set train.{key}=false")
    if t.micro_batch == "auto":
        raise ConfigError("train.micro_batch: auto plans MaskDiT / DiT training (train.py), not the DyDiT fine-tune; "
                          "give a number (python -m benchmarks.plan shows what fits the base model)")
    if t.parallel == "fsdp":
        raise ConfigError("train.parallel: fsdp is not supported by the DyDiT fine-tune; use ddp (the routers and "
                          "the EMA are small, DDP keeps a full copy of the network per GPU)")
    with processes(t.parallel, t.device, "train.parallel=ddp", t.collective_timeout_s) as env, \
            RunLock(Path(out_dir), env.is_main) as lock, stop_signals(t.preempt_signals):
        resume = resume_after_restart(Path(out_dir), resume)
        return _finetune(cfg, Path(init), Path(out_dir), env, lock, progress, resume)


def _finetune(cfg: DyDiTRunConfig, init: Path, out_dir: Path, env: Dist, lock: RunLock, progress: bool,
              resume: bool) -> Path:
    t = cfg.train
    device = env.device
    check_optimizer(t, device)  # apex_fused_adam without apex or a GPU: a user error before anything is read
    state_path = check_run_dir(out_dir, resume, lock)
    precision = resolve_precision(t.precision, device)
    if precision == "fp16":
        raise ConfigError("train.precision: fp16 is not supported by the DyDiT fine-tune; use bf16 or fp32")
    micro_batch = resumed_micro_batch(state_path, t.global_batch, env.world_size, t.micro_batch)
    micro, accumulation = split_global_batch(t.global_batch, env.world_size, micro_batch)
    torch.manual_seed(t.seed)

    base = load_checkpoint(init, device)
    cfg = dataclasses.replace(cfg, model=base.model.cfg)
    if cfg.model.diffusion == "ddpm" and cfg.dydit.distill_coef > 0:
        raise ConfigError("dydit.distill_coef: distillation is for EDM bases; a DDPM base (an official DiT) "
                          "fine-tunes with DiT's own loss: set dydit.distill_coef=0")
    if cfg.model.arch == "maskdit" and cfg.model.mask_ratio > 0:
        log.info("MaskDiT base: DyDiT fine-tunes its unmasked path (mask ratio 0)")
    raw = to_dydit(base, cfg.dydit.router()).train().requires_grad_(True)
    if getattr(raw.model, "mask_token", None) is not None:
        raw.model.mask_token.requires_grad_(False)  # never used without masking: kept as it is
    if raw.model.y_embedder is not None:
        raw.model.y_embedder.dropout = 0.0  # dydit_loss drops labels (at cfg.model.class_dropout)
    teacher = base if cfg.dydit.distill_coef > 0 else None
    objective = dydit_objective(cfg, raw, teacher)
    ema = EMA(raw, t.ema_decay, t.ema_warmup)
    data = build_loader(cfg, device, env.rank, env.world_size, micro, accumulation)
    cfg = replace_data_vae(cfg, data.vae)  # grids decode with the VAE that made the latents
    run_config = {**config_to_dict(cfg), "init": str(init)}
    extra = {**ema_metadata(run_config, 0), "base": str(init), "lambda": cfg.dydit.target}

    def param_groups(net: nn.Module) -> list[dict]:
        trained = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
        return [{"params": [p for name, p in trained if "_router." not in name], "lr_scale": 1.0},
                {"params": [p for name, p in trained if "_router." in name], "lr_scale": cfg.dydit.router_lr_scale}]

    run = Run(
        cfg=cfg, run_config=run_config, raw=raw, ema=ema, param_groups=param_groups, loss_fn=objective,
        export=lambda step, weights: save_dydit(out_dir / "ema.safetensors", weights, cfg.model, cfg.dydit.router(),
                                                {**extra, "step": step}),
        build=lambda: build_net(cfg.model, cfg.dydit.router()),
        step_values=lambda step: {"lambda": cfg.dydit.lambda_at(step)},
        desc="dydit",
    )
    train_loop(run, out_dir, env, data, precision, accumulation, state_path, lock, progress)
    with stop_signals(t.preempt_signals) as stop:
        if env.is_main:
            stop.cut_short(lambda: _final_samples(cfg, ema.model.eval(), out_dir))
        if any_rank(stop.requested, device):  # (in place of a barrier) every rank exits alike
            message = (f"preempted during the final samples; the training state of step {t.max_steps} is saved: "
                       f"--resume samples again (exit status {PREEMPTED_EXIT})")
            if env.is_main:
                log.warning("%s", message)
            raise Preempted(message, t.max_steps)
    return out_dir / "ema.safetensors"


def _final_samples(cfg: DyDiTRunConfig, ema_net: Denoiser, out_dir: Path) -> None:
    """``samples/final.png`` and the FLOPs that sampling executed (``samples/final-flops.json``)."""
    with FlopsMeter(ema_net) as meter:
        if not write_sample_grid(cfg, ema_net, out_dir / "samples" / "final.png"):
            # latents without a VAE to decode them: sample anyway, for the FLOPs the sampler executes
            seeds = list(range(8))
            generate(ema_net, seeds, seed_labels(seeds, cfg.model.num_classes), cfg.sample)
    (out_dir / "samples").mkdir(exist_ok=True)
    (out_dir / "samples" / "final-flops.json").write_text(json.dumps(meter.summary(), indent=2))
