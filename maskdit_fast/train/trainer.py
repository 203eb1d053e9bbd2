"""The training loop: MaskDiT (or the plain DiT baseline) with EDM, EMA, checkpoints and logs.

One step: batch -> EDM noise -> (mask) -> loss -> backward -> AdamW -> EMA. Everything random
(noise, masks, label dropout) draws from the global RNG, whose state is checkpointed, and the
batch order is a function of the step, so ``resume=True`` continues exactly where a crashed run
stopped: the final parameters equal those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kernels

from ..checkpoint import build_net, load_checkpoint, save_safetensors
from ..config import Config, config_to_dict
from ..data import EpochBatches, load_mnist
from ..diffusion.loss import edm_loss
from ..eval.images import to_uint8_nhwc
from ..generate import generate, save_grid
from .ema import EMA
from .state import latest_training_state, load_training_state, rng_state, save_training_state, set_rng_state

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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


def load_dataset(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training set on ``device``: images (N, C, H, W), labels (N,) int64."""
    if cfg.data.dataset != "mnist":
        raise NotImplementedError("data.dataset=latents (pre-encoded ImageNet latents) is not implemented yet; "
                                  "only the bundled data.dataset=mnist is available in this version")
    images, labels = load_mnist(device)
    m = cfg.model
    if (m.in_channels, m.input_size) != tuple(images.shape[1:3]) or m.num_classes not in (0, 10):
        raise ValueError(f"the bundled MNIST is 1x32x32 with 10 classes; the model expects in_channels={m.in_channels}, "
                         f"input_size={m.input_size}, num_classes={m.num_classes} (use --config mnist)")
    return images, labels


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_sample_grid(cfg: Config, ema_net, path: Path) -> None:
    """A grid of EMA samples, one row per class (up to 10 classes), fixed seeds."""
    m = cfg.model
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
        images = decode_latents(load_vae(cfg.data.vae, next(ema_net.parameters()).device), images, cfg.data.latent_scale)
    save_grid(to_uint8_nhwc(images), path, nrow=per_row)


def _initialise_from(path: str, net, ema: EMA) -> None:
    """Unmasked fine-tune start: weights from a pretrained checkpoint (model + EMA of a training
    state, or the EMA weights of a safetensors file for both)."""
    try:
        if Path(path).suffix == ".safetensors":
            weights = load_checkpoint(path).state_dict()
            net.load_state_dict(weights)
            ema.load_state_dict(weights)
        else:
            state = load_training_state(Path(path))
            net.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
    except RuntimeError as err:
        raise RuntimeError(f"--init-from {path}: its architecture does not match this config's model: {err}") from None


def train(cfg: Config, out_dir: str | Path, resume: bool = False, init_from: str | None = None,
          progress: bool = True) -> Path:
    """Train per ``cfg`` into ``out_dir``; returns the path of the final EMA safetensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    device = select_device(t.device)
    precision = resolve_precision(t.precision, device)
    if cfg.model.kernels != "auto":
        kernels.set_backend(cfg.model.kernels)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    torch.manual_seed(t.seed)

    images, labels = load_dataset(cfg, device)
    batches = EpochBatches(images.shape[0], t.global_batch, t.seed)
    net = build_net(cfg.model).to(device).train()
    ema = EMA(net, t.ema_decay, t.ema_warmup)
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start = 0

    state_path = latest_training_state(out_dir) if resume else None
    if state_path is not None:
        state = load_training_state(state_path)
        if state["config"]["model"] != config_to_dict(cfg.model):
            raise ValueError(f"cannot resume {state_path}: it was trained with another model config")
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = state["step"]
        log.info("resumed from %s at step %d", state_path, start)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)
    elif init_from:
        _initialise_from(init_from, net, ema)
    if latest_training_state(out_dir) is not None and not resume:
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")

    (out_dir / "config.yaml").write_text(json.dumps(config_to_dict(cfg), indent=2))
    metrics_file = (out_dir / "metrics.jsonl").open("a")
    autocast = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]) if precision in AUTOCAST_DTYPES
                else contextlib.nullcontext())
    sums = torch.zeros(3, device=device)  # loss, dsm, mae since the last log line
    window_start, window_steps = time.perf_counter(), 0

    def checkpoint(step: int) -> None:
        save_training_state(out_dir, step, {
            "step": step, "model": net.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "config": config_to_dict(cfg)})
        save_safetensors(out_dir / "ema.safetensors", ema.state_dict(), cfg.model,
                         {"step": step, "vae": cfg.data.vae, "latent_scale": cfg.data.latent_scale,
                          "sample_config": config_to_dict(cfg.sample)})

    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, disable=not progress,
               desc="train", dynamic_ncols=True)
    for step in bar:
        idx = batches(step).to(device)
        x, y = images[idx], labels[idx]
        if cfg.data.flip:
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if cfg.model.num_classes == 0:
            y = None
        mask_ratio = cfg.model.mask_ratio if step < t.max_steps - t.unmasked_steps else 0.0
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            terms = edm_loss(net, x, y, mask_ratio, cfg.loss)
        loss = terms.loss.mean()
        scaler.scale(loss).backward()
        if t.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.update(net, step)
        sums += torch.stack([loss.detach(), terms.dsm.detach().mean(), terms.mae.detach().mean()]).float()
        window_steps += 1
        done = step + 1

        if done % t.log_every == 0 or done == t.max_steps:
            loss_avg, dsm_avg, mae_avg = (sums / window_steps).tolist()
            if not math.isfinite(loss_avg):
                raise FloatingPointError(f"loss became {loss_avg} by step {done}; lower train.lr or use train.precision=fp32")
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss_avg, "dsm": dsm_avg, "mae": mae_avg,
                      "img_per_s": window_steps * t.global_batch / elapsed, "lr": lr, "mask_ratio": mask_ratio,
                      "peak_mem_gb": peak_memory_gb(device)}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{record['img_per_s']:.0f}")
            sums.zero_()
            window_start, window_steps = time.perf_counter(), 0
        paused = time.perf_counter()  # sampling and checkpointing do not count towards img/s
        if done % t.sample_every == 0 or done == t.max_steps:
            write_sample_grid(cfg, ema.model, out_dir / "samples" / f"step-{done:07d}.png")
        if done % t.ckpt_every == 0 or done == t.max_steps:
            checkpoint(done)
        window_start += time.perf_counter() - paused
    metrics_file.close()
    return out_dir / "ema.safetensors"
