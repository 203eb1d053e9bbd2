"""DyDiT fine-tune: a trained DiT / MaskDiT learns where to spend compute.

Objective per step (batch of N images):

    loss = DSM(dynamic net)                                       (EDM denoising loss, no masking)
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

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from tqdm.auto import tqdm

from ..checkpoint import ema_metadata, load_checkpoint
from ..config import ConfigError, SampleConfig, config_to_dict
from ..data.loader import build_loader
from ..data.sampler import split_global_batch
from ..diffusion.edm import EDMPrecond
from ..diffusion.loss import edm_weight, sample_sigma
from ..diffusion.samplers import edm_time_steps
from ..generate import generate, seed_labels
from ..train.dist import Dist, all_reduce_mean, barrier, processes
from ..train.ema import EMA
from ..train.parallel import gradient_sync, parallelize, unwrap
from ..train.state import (latest_training_state, load_into, process_state, process_state_to_load,
                           restore_process_state, save_training_state, trim_metrics)
from ..train.trainer import autocast_for, learning_rate, prepare_micro_batch, resolve_precision, write_sample_grid
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


def dydit_loss(net: EDMPrecond, images: torch.Tensor, labels: torch.Tensor | None, lam: float, cfg: DyDiTRunConfig,
               flops: ModelFlops, levels: torch.Tensor, teacher: EDMPrecond | None = None) -> dict[str, torch.Tensor]:
    """One draw of the DyDiT objective; returns scalar terms (``loss`` is the one to minimise).

    Labels are dropped here at the model's ``class_dropout`` rate, so ``net``'s own label dropout
    must be off (``net.model.y_embedder.dropout = 0``, as :func:`finetune` sets it).
    """
    d: DyDiTConfig = cfg.dydit
    n = images.shape[0]
    embedder = net.model.y_embedder
    if net.training and labels is not None and embedder is not None and embedder.dropout > 0:
        raise ValueError("set net.model.y_embedder.dropout = 0: the fine-tune drops labels itself, "
                         "so that the distillation teacher sees the same labels")
    sigma = training_sigmas(n, cfg, levels, images.device)
    s = sigma.view(-1, 1, 1, 1)
    noisy = images + torch.randn_like(images) * s
    dropout = net.model.cfg.class_dropout
    if labels is not None and dropout > 0:
        drop = torch.rand(n, device=images.device) < dropout
        labels = torch.where(drop, torch.full_like(labels, net.num_classes), labels)
    denoised = net(noisy, sigma, labels)
    weight = edm_weight(s, net.sigma_data)
    dsm = (weight * (denoised - images).pow(2)).mean()
    routing = routing_of(unwrap(net))  # the decisions live on the modules, inside a DDP wrapper
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


def _restore(path: Path, run_config: dict, net: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
             device: torch.device, rank_key: str = "rank0") -> tuple[int, bytes | None]:
    """Load the training state ``path`` into the objects; returns its step and the loader's saved
    state (None if it has none). The run's config (the base checkpoint included) must be the one the
    state was written with, ``train.max_steps`` and the process layout aside."""
    model_sd, optim_sd = get_state_dict(net, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(ema.model),
             "rng": {rank_key: process_state_to_load(path, rank_key, device)}}
    meta = load_into(path, state)
    then, now = _flatten(meta["config"]), _flatten(json.loads(json.dumps(run_config)))
    free = {"train.max_steps", "train.parallel", "train.micro_batch"}  # may change between the runs
    changed = sorted(k for k in then.keys() | now.keys() if k not in free and then.get(k) != now.get(k))
    if changed:
        k = changed[0]
        raise ValueError(f"cannot resume {path}: {', '.join(changed)} differ from the saved run's config ({k}: "
                         f"{then.get(k)!r} then, {now.get(k)!r} now); resume with the same --config, --init and "
                         "overrides (train.max_steps, train.parallel and train.micro_batch may change)")
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    set_model_state_dict(ema.model, state["ema"])
    loader_state = restore_process_state(state, rank_key, device)
    log.info("resumed from %s at step %d (written by %d processes)", path, meta["step"], meta["world_size"])
    return meta["step"], loader_state


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finetune(cfg: DyDiTRunConfig, init: str | Path, out_dir: str | Path, progress: bool = True,
             resume: bool = False) -> Path:
    """Fine-tune the DiT / MaskDiT checkpoint ``init`` into a DyDiT; returns the EMA safetensors path.

    Every ``train.ckpt_every`` steps and at the end it writes the training state
    (``checkpoints/step-XXXXXXX``: network, EMA, optimizer, each rank's RNG; atomic, as the
    trainer's) and ``ema.safetensors``; also ``metrics.jsonl``, ``config.json`` and
    ``samples/final.png`` (+ ``samples/final-flops.json``). ``resume=True`` continues from the newest
    training state in ``out_dir`` exactly where it was written (same data order and random draws):
    the result equals an uninterrupted run's.

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
    if t.parallel == "fsdp":
        raise ConfigError("train.parallel: fsdp is not supported by the DyDiT fine-tune; use ddp (the routers and "
                          "the EMA are small, DDP keeps a full copy of the network per GPU)")
    with processes(t.parallel, t.device, "train.parallel=ddp") as env:
        return _finetune(cfg, Path(init), Path(out_dir), env, progress, resume)


def _finetune(cfg: DyDiTRunConfig, init: Path, out_dir: Path, env: Dist, progress: bool, resume: bool) -> Path:
    t = cfg.train
    device = env.device
    state_path = latest_training_state(out_dir)
    if not resume and (state_path is not None or (out_dir / "ema.safetensors").exists()):
        raise FileExistsError(f"{out_dir} already holds a DyDiT run; pass --resume to continue it or choose "
                              "another --out")
    if resume and state_path is None and (out_dir / "ema.safetensors").exists():
        raise FileExistsError(f"cannot resume {out_dir}: it holds EMA weights but no training state (written by an "
                              "earlier version); start a new run in another --out")
    precision = resolve_precision(t.precision, device)
    if precision == "fp16":
        raise ConfigError("train.precision: fp16 is not supported by the DyDiT fine-tune; use bf16 or fp32")
    micro, accumulation = split_global_batch(t.global_batch, env.world_size, t.micro_batch)
    split = env.world_size * accumulation > 1  # else: one continuous RNG stream
    torch.manual_seed(t.seed)

    base = load_checkpoint(init, device)
    cfg.model = base.model.cfg
    if cfg.model.arch == "maskdit" and cfg.model.mask_ratio > 0:
        log.info("MaskDiT base: DyDiT fine-tunes its unmasked path (mask ratio 0)")
    raw = to_dydit(base, cfg.dydit.router()).train().requires_grad_(True)
    if getattr(raw.model, "mask_token", None) is not None:
        raw.model.mask_token.requires_grad_(False)  # never used without masking: kept as it is
    if raw.model.y_embedder is not None:
        raw.model.y_embedder.dropout = 0.0  # dydit_loss drops labels (at cfg.model.class_dropout)
    teacher = base if cfg.dydit.distill_coef > 0 else None
    flops = model_flops(raw)
    levels = sampler_sigmas(cfg.sample)
    ema = EMA(raw, t.ema_decay, t.ema_warmup)
    net = parallelize(raw, ema.model, cfg, precision, device, env.world_size, accumulation)
    trained = [(name, p) for name, p in raw.named_parameters() if p.requires_grad]
    routers = [p for name, p in trained if "_router." in name]
    others = [p for name, p in trained if "_router." not in name]
    optimizer = torch.optim.AdamW([{"params": others, "lr_scale": 1.0},
                                   {"params": routers, "lr_scale": cfg.dydit.router_lr_scale}],
                                  lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    data = build_loader(cfg, device, env.rank, env.world_size, micro, accumulation)
    if not cfg.data.vae and data.vae:  # grids decode with the VAE that made the latents
        cfg.data.vae = data.vae
    autocast = autocast_for(precision, device)
    run_config = {**config_to_dict(cfg), "init": str(init)}
    rank_key = f"rank{env.rank}"
    start, loader_state = 0, None
    if state_path is not None:
        start, loader_state = _restore(state_path, run_config, net, optimizer, ema, device, rank_key)
    elif resume:
        log.info("--resume: no training state in %s, starting from scratch", out_dir)
    data.start(start, t.max_steps, loader_state)
    barrier()  # every rank has read the run directory before rank 0 writes to it
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves no empty run directory
        (out_dir / "config.json").write_text(json.dumps(run_config, indent=2))
        trim_metrics(out_dir / "metrics.jsonl", start)  # rows past the training state are logged again
    extra = {**ema_metadata(run_config, 0), "base": str(init), "lambda": cfg.dydit.target}

    def save(step: int) -> None:
        """Collective: the training state of every rank, then rank 0's EMA safetensors."""
        model_sd, optim_sd = get_state_dict(net, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(ema.model),
                 "rng": {rank_key: process_state(device, data.state())}}
        meta = {"step": step, "world_size": env.world_size, "config": run_config}
        save_training_state(out_dir, step, state, meta, t.keep_last, env.is_main)
        if env.is_main:
            save_dydit(out_dir / "ema.safetensors", ema.state_dict(), cfg.model, cfg.dydit.router(),
                       {**extra, "step": step})

    sums: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    metrics = (out_dir / "metrics.jsonl").open("a") if env.is_main else None
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, disable=not (progress and env.is_main),
               desc="dydit", dynamic_ncols=True)
    for step in bar:
        done = step + 1
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        lam = cfg.dydit.lambda_at(step)
        step_loss = torch.zeros((), device=device)
        for a, (j, _, x, y) in enumerate(data.step(step)):
            x, y = prepare_micro_batch(cfg, data, step, j, x, y, split)
            with gradient_sync(net, a == accumulation - 1), autocast:
                terms = dydit_loss(net, x, y, lam, cfg, flops, levels, teacher)
                (terms["loss"] / accumulation).backward()
            step_loss += terms["loss"].detach().float() / accumulation
            for key, v in terms.items():  # on the device: no host sync but the one below
                sums[key] = sums.get(key, 0) + v.detach().float() / accumulation
        if all_reduce_mean(torch.isfinite(step_loss).float()).item() < 1:  # every rank stops together
            raise FloatingPointError(f"loss is not finite at step {done}")
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(raw, step)
        window_steps += 1
        if done % t.log_every == 0 or done == t.max_steps:
            elapsed = time.perf_counter() - window_start
            keys = sorted(sums)
            means = all_reduce_mean(torch.stack([sums[k] / window_steps for k in keys])).tolist()
            row = {"step": done, **dict(zip(keys, means)), "lambda": lam, "lr": lr,
                   "img_per_s": window_steps * t.global_batch / elapsed}
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", flops=f"{row['flops_ratio']:.2f}", lam=f"{lam:.2f}")
            sums, window_start, window_steps = {}, time.perf_counter(), 0
        if done % t.ckpt_every == 0 and done != t.max_steps:
            save(done)
    if start < t.max_steps:
        save(t.max_steps)
    data.close()
    if metrics is not None:
        metrics.close()
    if env.is_main:
        _final_samples(cfg, ema.model.eval(), out_dir)
    barrier()
    return out_dir / "ema.safetensors"


def _final_samples(cfg: DyDiTRunConfig, ema_net: EDMPrecond, out_dir: Path) -> None:
    """``samples/final.png`` and the FLOPs that sampling executed (``samples/final-flops.json``)."""
    with FlopsMeter(ema_net) as meter:
        if not write_sample_grid(cfg, ema_net, out_dir / "samples" / "final.png"):
            # latents without a VAE to decode them: sample anyway, for the FLOPs the sampler executes
            seeds = list(range(8))
            generate(ema_net, seeds, seed_labels(seeds, cfg.model.num_classes), cfg.sample)
    (out_dir / "samples").mkdir(exist_ok=True)
    (out_dir / "samples" / "final-flops.json").write_text(json.dumps(meter.summary(), indent=2))
