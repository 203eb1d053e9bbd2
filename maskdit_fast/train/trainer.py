"""MaskDiT (or the plain DiT baseline) with EDM: the objective and the run, on the one training loop.

One step: batch -> EDM noise -> (mask) -> loss -> backward -> AdamW -> EMA, on one process or on
several launched by torchrun (``train.parallel=ddp|fsdp``), each running ``accumulation``
micro-batches per step (:mod:`maskdit_fast.train.loop`). Everything random (noise, masks, label
dropout, flips) draws from the global RNG and the batch order is a function of the step. One process
with one micro-batch per step draws from one continuous stream whose state is checkpointed; otherwise
every micro-batch reseeds from (seed, step, its place in the global batch), so the numbers do not
depend on how many processes share the batch. Either way ``resume=True`` continues exactly where a
crashed run stopped: the final parameters equal those of an uninterrupted run.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

import kernels

from ..checkpoint import check_weights_fit, ema_metadata, load_checkpoint, save_safetensors
from ..config import Config, ConfigError, config_to_dict
from ..data.loader import build_loader
from ..data.sampler import split_global_batch
from ..diffusion.edm import build_net, check_kernels
from ..dist import Dist, processes, select_device
from ..generate import write_sample_grid
from ..models.precision import resolve_precision
from ..plan.auto import MemoryCheck, choose_micro_batch
from ..storage import load_training_state, read_meta
from .ema import EMA
from .loop import Run, check_run_dir, learning_rate, replace_data_vae, resumed_micro_batch, train_loop
from .objective import maskdit_objective
from .optimizer import check_optimizer
from .preemption import resume_after_restart
from .run_lock import RunLock

log = logging.getLogger(__name__)
__all__ = ["learning_rate", "select_device", "train"]
StepHook = Callable[[int, torch.nn.Module], str | None]  # see train()


def _sample_grid(cfg: Config, ema_net: torch.nn.Module, path: Path, progress: bool) -> Path | None:
    """The sample grid at ``path``; its path if written (see :func:`write_sample_grid`)."""
    return path if write_sample_grid(cfg, ema_net, path, progress=progress) else None


def _initialise_from(path: str, net, ema: EMA) -> None:
    """Unmasked fine-tune start: weights from a pretrained checkpoint (model + EMA of a training
    state, or the EMA weights of a safetensors file for both)."""
    if Path(path).suffix == ".safetensors":
        model = ema_weights = load_checkpoint(path).state_dict()
    else:
        state = load_training_state(Path(path), parts=("model", "ema"))
        model, ema_weights = state["model"], state["ema"]
    check_weights_fit(net, model, f"--init-from {path}")
    net.load_state_dict(model)
    ema.load_state_dict(ema_weights)


def train(cfg: Config, out_dir: str | Path, resume: bool = False, init_from: str | None = None,
          progress: bool = True, step_hook: StepHook | None = None) -> Path:
    """Train per ``cfg`` into ``out_dir``; returns the path of the final EMA safetensors.

    With ``train.parallel=ddp|fsdp`` every process launched by torchrun calls this; it joins the
    default process group (creating it from torchrun's environment, or a group of one in a plain
    ``python`` launch) and destroys it at the end if it created it.

    ``step_hook(step, ema_network)`` (one process only), if given, runs after every step, outside the
    img/s clock; it returns None, ``"unmask"`` (train unmasked from the next step on) or ``"stop"``
    (end the run after this step, without a final checkpoint). ``benchmarks/time_to_quality.py``
    drives wall-clock-budgeted runs with it.

    A stop signal (``train.preempt_signals``) saves the training state of the current step and raises
    :class:`~maskdit_fast.train.preemption.Preempted`. Restarted by torchrun (``--max-restarts``), the
    run resumes from the newest training state in ``out_dir`` without ``resume``.
    """
    with processes(cfg.train.parallel, cfg.train.device, "parallel=ddp or parallel=fsdp",
                   cfg.train.collective_timeout_s) as env, RunLock(Path(out_dir), env.is_main) as lock:
        resume = resume_after_restart(Path(out_dir), resume)
        return _train(cfg, Path(out_dir), env, lock, resume, init_from, progress, step_hook)


def _train(cfg: Config, out_dir: Path, env: Dist, lock: RunLock, resume: bool, init_from: str | None, progress: bool,
           step_hook: StepHook | None = None) -> Path:
    t = cfg.train
    device = env.device
    precision = resolve_precision(t.precision, device)
    if t.fsdp_cpu_offload and device.type != "cuda":
        raise ConfigError("train.fsdp_cpu_offload: offloads GPU memory, but this run is on the CPU")
    if cfg.model.kernels != "auto":
        kernels.set_backend(cfg.model.kernels)
    check_kernels()  # forced Triton kernels without Triton: a user error before data or model are built
    check_optimizer(t, device)  # likewise apex_fused_adam without apex or a GPU
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    torch.manual_seed(t.seed)  # the same initial weights on every rank

    state_path = check_run_dir(out_dir, resume, lock)
    memory_check = None
    if t.micro_batch == "auto":  # the planner's largest micro-batch that fits this device
        meta = read_meta(state_path) if state_path is not None and state_path.is_dir() else {}
        first_step = meta.get("step", 0)
        first_ratio = cfg.model.mask_ratio if first_step < t.max_steps - t.unmasked_steps else 0.0
        chosen = choose_micro_batch(cfg, env, meta.get("micro_batch"), first_ratio)
        micro_batch = chosen["micro_batch"]
        memory_check = MemoryCheck(chosen["first_peak"], device)
    else:
        micro_batch = resumed_micro_batch(state_path, t.global_batch, env.world_size, t.micro_batch)
    micro, accumulation = split_global_batch(t.global_batch, env.world_size, micro_batch)
    data = build_loader(cfg, device, env.rank, env.world_size, micro, accumulation)
    cfg = replace_data_vae(cfg, data.vae)  # grids and sample.py decode with the VAE that made the latents
    raw = build_net(cfg.model).to(device).train()
    ema = EMA(raw, t.ema_decay, t.ema_warmup)
    if init_from and not resume:
        _initialise_from(init_from, raw, ema)
    run_config = config_to_dict(cfg)
    unmasked_from = t.max_steps - t.unmasked_steps  # a step hook may start the unmasked phase earlier

    def mask_ratio(step: int) -> float:
        """The model's mask ratio, 0 in the last ``train.unmasked_steps`` steps (the in-run unmasked fine-tune)."""
        return cfg.model.mask_ratio if step < unmasked_from else 0.0

    def after_step(step: int, ema_net: torch.nn.Module) -> bool:
        nonlocal unmasked_from
        action = step_hook(step, ema_net)
        if action == "unmask":
            unmasked_from = min(unmasked_from, step)
        return action == "stop"

    run = Run(
        cfg=cfg, run_config=run_config, raw=raw, ema=ema,
        param_groups=lambda net: [{"params": list(net.parameters())}],
        loss_fn=maskdit_objective(cfg, mask_ratio),
        export=lambda step, weights: save_safetensors(out_dir / "ema.safetensors", weights, cfg.model,
                                                      ema_metadata(run_config, step)),
        build=lambda: build_net(cfg.model),
        step_values=lambda step: {"mask_ratio": mask_ratio(step)},
        sample=lambda step, ema_net: _sample_grid(cfg, ema_net, out_dir / "samples" / f"step-{step:07d}.png",
                                                  progress and step == t.max_steps),  # the last: a bar
        after_step=None if step_hook is None else after_step,
        memory_check=memory_check,
    )
    train_loop(run, out_dir, env, data, precision, accumulation, state_path, lock, progress)
    return out_dir / "ema.safetensors"
