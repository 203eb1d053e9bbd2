"""The training loop: MaskDiT (or the plain DiT baseline) with EDM, EMA, checkpoints and logs.

One step: batch -> EDM noise -> (mask) -> loss -> backward -> AdamW -> EMA, on one process or on
several launched by torchrun (``train.parallel=ddp|fsdp``), each running ``accumulation``
micro-batches per step. Everything random (noise, masks, label dropout, flips) draws from the
global RNG and the batch order is a function of the step. One process with one micro-batch per
step draws from one continuous stream whose state is checkpointed; otherwise every micro-batch
reseeds from (seed, step, its place in the global batch), so the numbers do not depend on how many
processes share the batch. Either way ``resume=True`` continues exactly where a crashed run stopped:
the final parameters equal those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm

import kernels

from ..checkpoint import build_net, ema_metadata, load_checkpoint, save_safetensors
from ..config import Config, ConfigError, config_to_dict
from ..data.loader import build_loader
from ..data.sampler import micro_batch_seed, split_global_batch
from ..diffusion.loss import edm_loss
from ..eval.images import to_uint8_nhwc
from ..generate import generate, save_grid
from .dist import Dist, all_reduce_mean, barrier, processes, select_device
from .ema import EMA
from .parallel import clip_grad_norm, gradient_sync, parallelize
from .state import (atomic_write, latest_training_state, load_into, load_training_state, process_state,
                    process_state_to_load, restore_process_state, save_training_state, trim_metrics)

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (bf16 | fp16) on ``device``; a no-op context for fp32."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()
__all__ = ["learning_rate", "select_device", "train"]


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr`` at ``max_steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def prepare_micro_batch(cfg: Config, data, step: int, j: int, x: torch.Tensor, y: torch.Tensor, split: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Micro-batch ``j`` of ``step`` as the loss takes it. ``split`` (the global batch is shared by
    processes or micro-batches): the RNG is seeded by the micro-batch's place in the global batch,
    so its noise does not depend on the split. Random horizontal flips unless the loader flips
    (``data.flips``); no labels for an unconditional model. x: (m, C, H, W), y: (m,) int64."""
    if split:
        torch.manual_seed(micro_batch_seed(cfg.train.seed, step, j))
    if cfg.data.flip and not data.flips:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x, (None if cfg.model.num_classes == 0 else y)


def write_sample_grid(cfg: Config, ema_net, path: Path) -> bool:
    """A grid of EMA samples, one row per class (up to 10 classes), fixed seeds; True if written.
    Latent models need ``data.vae`` to decode them; without it nothing is sampled."""
    m = cfg.model
    if not cfg.data.vae and m.in_channels not in (1, 3):
        log.info("no sample grid at %s: set data.vae to decode the model's %d-channel latents", path.name, m.in_channels)
        return False
    per_row = cfg.sample.grid_per_class
    rows = min(m.num_classes, 10) if m.num_classes else 8
    classes = None
    if m.num_classes:
        chosen = torch.linspace(0, m.num_classes - 1, rows).round().long()
        classes = chosen.repeat_interleave(per_row)
    seeds = list(range(rows * per_row))
    images = generate(ema_net, seeds, classes, cfg.sample)
    if cfg.data.vae:
        from ..data.vae import decode_latents, load_vae
        try:
            vae = load_vae(cfg.data.vae, next(ema_net.parameters()).device)
        except RuntimeError as err:  # e.g. a hub id on an offline node: not worth stopping the run for
            log.warning("no sample grid at %s: %s", path.name, err)
            return False
        images = decode_latents(vae, images, cfg.data.latent_scale)
    save_grid(to_uint8_nhwc(images), path, nrow=per_row)
    return True


def _initialise_from(path: str, net, ema: EMA) -> None:
    """Unmasked fine-tune start: weights from a pretrained checkpoint (model + EMA of a training
    state, or the EMA weights of a safetensors file for both)."""
    try:
        if Path(path).suffix == ".safetensors":
            weights = load_checkpoint(path).state_dict()
            net.load_state_dict(weights)
            ema.load_state_dict(weights)
        else:
            state = load_training_state(Path(path), parts=("model", "ema"))
            net.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
    except RuntimeError as err:
        raise RuntimeError(f"--init-from {path}: its architecture does not match this config's model: {err}") from None


def _restore(path: Path, cfg: Config, env: Dist, net, optimizer, ema: EMA, scaler) -> tuple[int, bytes | None]:
    """Collective: load the training state at ``path`` into the (wrapped, maybe sharded) objects;
    returns its step and this rank's saved loader state (None if there is none). The checkpoint may
    come from another number of processes."""
    if path.is_file():
        raise ValueError(f"cannot resume {path}: it is a single-file state of an earlier version; resume it with "
                         "that version, or start a new run from its weights with --init-from")
    model_sd, optim_sd = get_state_dict(net, optimizer)
    rank_key = f"rank{env.rank}"
    state = {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(ema.model),
             "rng": {rank_key: process_state_to_load(path, rank_key, env.device)}}
    meta = load_into(path, state)
    saved = meta["config"]
    if saved["model"] != config_to_dict(cfg.model):
        raise ValueError(f"cannot resume {path}: it was trained with another model config")
    for key in ("global_batch", "seed"):
        if saved["train"][key] != getattr(cfg.train, key):
            raise ValueError(f"cannot resume {path}: train.{key} was {saved['train'][key]}, now {getattr(cfg.train, key)}; "
                             "the data order depends on it")
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    set_model_state_dict(ema.model, state["ema"])
    scaler.load_state_dict(meta["scaler"])
    loader_state = restore_process_state(state, rank_key, env.device)  # the loader checks it fits this split
    log.info("resumed from %s at step %d (written by %d processes)", path, meta["step"], meta["world_size"])
    return meta["step"], loader_state


def _ema_for_sampling(cfg: Config, ema: EMA, env: Dist) -> tuple[torch.nn.Module | None, dict | None]:
    """Collective under FSDP: (EMA network, its weights) on rank 0 as a plain module; (None, None)
    elsewhere. Sharded EMA weights are gathered here, at sample/checkpoint time only."""
    if not isinstance(ema.model, FSDPModule):
        return (ema.model, ema.state_dict()) if env.is_main else (None, None)
    weights = get_model_state_dict(ema.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None, None
    with torch.random.fork_rng(devices=[]):  # initialising a network draws random weights: keep the training RNG
        net = build_net(cfg.model)
    net.load_state_dict(weights)
    return net.to(env.device).eval().requires_grad_(False), weights


def _nonfinite_sources(data, inputs: list) -> list[str]:
    """Where this rank's non-finite input samples come from (files, records): corrupted data."""
    sources = []
    for _, idx, x, _ in inputs:
        bad = ~torch.isfinite(x).flatten(1).all(1)
        if bad.any():
            sources += data.describe(idx[bad].cpu().numpy())
    return sources


def _save_nonfinite_batch(out_dir: Path, step: int, rank: int, value: float, inputs: list) -> Path:
    """This rank's micro-batches of a step whose loss was not finite, for a post-mortem."""
    path = out_dir / "nonfinite" / f"step-{step:07d}-rank{rank}.pt"
    batches = [{"index": j, "dataset_indices": idx.cpu(), "images": x.cpu(), "labels": None if y is None else y.cpu()}
               for j, idx, x, y in inputs]
    atomic_write(path, lambda tmp: torch.save({"step": step, "loss": value, "micro_batches": batches}, tmp))
    return path


def train(cfg: Config, out_dir: str | Path, resume: bool = False, init_from: str | None = None,
          progress: bool = True) -> Path:
    """Train per ``cfg`` into ``out_dir``; returns the path of the final EMA safetensors.

    With ``train.parallel=ddp|fsdp`` every process launched by torchrun calls this; it joins the
    default process group (creating it from torchrun's environment, or a group of one in a plain
    ``python`` launch) and destroys it at the end if it created it.
    """
    with processes(cfg.train.parallel, cfg.train.device, "parallel=ddp or parallel=fsdp") as env:
        return _train(cfg, Path(out_dir), env, resume, init_from, progress)


def _train(cfg: Config, out_dir: Path, env: Dist, resume: bool, init_from: str | None, progress: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    device = env.device
    precision = resolve_precision(t.precision, device)
    micro, accumulation = split_global_batch(t.global_batch, env.world_size, t.micro_batch)
    split = env.world_size * accumulation > 1  # else: one continuous RNG stream, as in a plain run
    if t.fsdp_cpu_offload and device.type != "cuda":
        raise ConfigError("train.fsdp_cpu_offload: offloads GPU memory, but this run is on the CPU")
    if cfg.model.kernels != "auto":
        kernels.set_backend(cfg.model.kernels)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    torch.manual_seed(t.seed)  # the same initial weights on every rank

    state_path = latest_training_state(out_dir) if resume else None
    if latest_training_state(out_dir) is not None and not resume:
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    data = build_loader(cfg, device, env.rank, env.world_size, micro, accumulation)
    if not cfg.data.vae and data.vae:  # grids and sample.py decode with the VAE that made the latents
        log.info("data.vae: %s (from %s/meta.json)", data.vae, cfg.data.path)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, vae=data.vae))
    raw = build_net(cfg.model).to(device).train()
    ema = EMA(raw, t.ema_decay, t.ema_warmup)
    if init_from and not resume:
        _initialise_from(init_from, raw, ema)
    net = parallelize(raw, ema.model, cfg, precision, device, env.world_size, accumulation)
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  fused=device.type == "cuda" and not t.fsdp_cpu_offload)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start, loader_state = 0, None
    if state_path is not None:
        start, loader_state = _restore(state_path, cfg, env, net, optimizer, ema, scaler)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)
    data.start(start, t.max_steps, loader_state)
    barrier()  # every rank has checked the run directory before rank 0 writes to it

    metrics_file = None
    if env.is_main:
        (out_dir / "config.yaml").write_text(json.dumps(config_to_dict(cfg), indent=2))
        trim_metrics(out_dir / "metrics.jsonl", start)  # rows past the checkpoint are logged again
        metrics_file = (out_dir / "metrics.jsonl").open("a")
    autocast = autocast_for(precision, device)
    sums = torch.zeros(3, device=device)  # loss, dsm, mae since the last log line (finite steps only)
    grad_norms = torch.zeros((), device=device)
    window_start, window_steps, window_skipped, skipped = time.perf_counter(), 0, 0, 0

    def checkpoint(step: int, ema_weights: dict | None) -> None:
        model_sd, optim_sd = get_state_dict(net, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(ema.model),
                 "rng": {f"rank{env.rank}": process_state(device, data.state())}}
        config = config_to_dict(cfg)
        meta = {"step": step, "world_size": env.world_size, "scaler": scaler.state_dict(), "config": config}
        save_training_state(out_dir, step, state, meta, t.keep_last, env.is_main)
        if env.is_main:
            save_safetensors(out_dir / "ema.safetensors", ema_weights, cfg.model, ema_metadata(config, step))

    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, disable=not (progress and env.is_main),
               desc="train", dynamic_ncols=True)
    for step in bar:
        done = step + 1
        mask_ratio = cfg.model.mask_ratio if step < t.max_steps - t.unmasked_steps else 0.0
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_terms = torch.zeros(3, device=device)
        inputs = []  # this rank's micro-batches, saved if the loss is not finite
        for a, (j, idx, x, y) in enumerate(data.step(step)):
            x, y = prepare_micro_batch(cfg, data, step, j, x, y, split)
            with gradient_sync(net, a == accumulation - 1):
                with autocast:
                    terms = edm_loss(net, x, y, mask_ratio, cfg.loss)
                loss = terms.loss.mean()
                scaler.scale(loss / accumulation).backward()
            step_terms += torch.stack([loss.detach(), terms.dsm.detach().mean(), terms.mae.detach().mean()]).float()
            inputs.append((j, idx, x, y))
        step_terms /= accumulation

        value = all_reduce_mean(step_terms[:1]).item()  # the same verdict on every rank
        if math.isfinite(value):
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norms += clip_grad_norm(net.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(net, step)
            sums += step_terms
        elif t.nonfinite == "stop":
            path = _save_nonfinite_batch(out_dir, done, env.rank, value, inputs)
            sources = _nonfinite_sources(data, inputs)
            if sources:
                raise FloatingPointError(f"loss is {value} at step {done}: the input latents of {len(sources)} "
                                         f"sample(s) are not finite, the data is corrupted: {', '.join(sources[:5])}; "
                                         "check it with python -m maskdit_fast.data.latents verify DIR")
            raise FloatingPointError(f"loss is {value} at step {done}; its batch is saved as "
                                     f"{path.parent}/step-{done:07d}-rank*.pt; lower train.lr, use "
                                     "train.precision=fp32, or set train.nonfinite=skip to skip such steps")
        else:
            optimizer.zero_grad(set_to_none=True)
            window_skipped += 1
            skipped += 1
            log.warning("step %d: loss is %s, step skipped (train.nonfinite=skip)%s", done, value,
                        "".join(f"; non-finite input: {s}" for s in _nonfinite_sources(data, inputs)[:5]))
        window_steps += 1

        if done % t.log_every == 0 or done == t.max_steps:
            finite_steps = window_steps - window_skipped
            loss_avg, dsm_avg, mae_avg = (all_reduce_mean(sums) / max(finite_steps, 1)).tolist()
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss_avg, "dsm": dsm_avg, "mae": mae_avg,
                      "img_per_s": window_steps * t.global_batch / elapsed, "lr": lr, "mask_ratio": mask_ratio,
                      "peak_mem_gb": peak_memory_gb(device)}
            if t.grad_clip > 0:
                record["grad_norm"] = grad_norms.item() / max(finite_steps, 1)  # global norm before clipping
            if t.nonfinite == "skip":
                record["skipped"] = skipped
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{record['img_per_s']:.0f}")
            sums.zero_()
            grad_norms.zero_()
            window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
        paused = time.perf_counter()  # sampling and checkpointing do not count towards img/s
        sample_now = done % t.sample_every == 0 or done == t.max_steps
        ckpt_now = done % t.ckpt_every == 0 or done == t.max_steps
        if sample_now or ckpt_now:
            ema_net, ema_weights = _ema_for_sampling(cfg, ema, env)
            if sample_now and env.is_main:
                write_sample_grid(cfg, ema_net, out_dir / "samples" / f"step-{done:07d}.png")
            if ckpt_now:
                checkpoint(done, ema_weights)
            barrier()
        window_start += time.perf_counter() - paused
    if metrics_file is not None:
        metrics_file.close()
    data.close()
    return out_dir / "ema.safetensors"
