"""The one training loop: MaskDiT / DiT pre-training and the DyDiT fine-tune are two uses of it.

It is given the objective and the parameter groups; it owns what every run does the same way:
the run folder (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``ema.safetensors``),
resume (the whole config checked), the learning-rate schedule, micro-batches and gradient sync,
autocast and the grad scaler, the non-finite-loss policy, gradient clipping (sharding-aware, its
norm logged), the EMA, periodic samples and checkpoints.

The objective (``loss_fn``)::

    loss_fn(net, batch: MicroBatch, step: int) -> (loss, metrics)

``net`` is the module to call (DDP-wrapped or FSDP-sharded: call it, do not read its attributes;
capture what else you need, e.g. the unwrapped network, when you build the objective); ``batch``
one micro-batch, already flipped and seeded (:func:`prepare_micro_batch`); ``step`` the 0-based
optimizer step. ``loss`` is the scalar to minimise (this micro-batch's mean); ``metrics`` maps
names to scalar tensors, logged as their mean over the finite steps of a log window (keep them
on the device: the loop syncs with the host once per step). It runs under the loop's autocast;
everything random must draw from the global RNG (checkpointed for exact resume).

``step_values(step) -> dict`` (optional) adds per-step values to the log row (MaskDiT's mask ratio,
DyDiT's lambda); ``export(step, ema_weights)`` writes the sampling checkpoint on rank 0;
``sample(step, ema_net)`` (optional) writes a sample grid on rank 0 every ``train.sample_every``
steps and at the end, and returns its path (None: none written), which goes to ``train.loggers``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm

from ..config import Config
from ..data.sampler import micro_batch_seed
from ..dist import Dist, all_reduce_mean, any_rank
from ..errors import NonFiniteLoss, UserError
from ..files import atomic_write
from ..models.precision import autocast_for
from ..storage import (latest_intact_training_state, latest_training_state, load_into, process_state,
                       process_state_to_load, read_meta, remove_leftovers, restore_process_state, save_training_state,
                       set_training_state)
from .ema import EMA
from .loggers import Loggers, require_packages
from .optimizer import build_optimizer, set_learning_rate
from .parallel import clip_grad_norm, gradient_sync, parallelize
from .preemption import PREEMPTED_EXIT, Preempted, StopSignals, stop_signals
from .resume_config import check_resumable
from .run_lock import RunLock
from .spike_guard import SpikeGuard
from .watchdog import Watchdog

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


@dataclass
class MicroBatch:
    """One micro-batch of a step: ``index`` its place in the global batch, ``dataset_indices`` (m,)
    where its samples come from, ``images`` (m, C, H, W) float32, ``labels`` (m,) int64 or None
    (unconditional model)."""

    index: int
    dataset_indices: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor | None


LossFn = Callable[[nn.Module, MicroBatch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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


def check_run_dir(out_dir: Path, resume: bool, lock: RunLock) -> Path | None:
    """Collective: the training state to resume from (None: start from scratch), after refusing to
    start over a run. The run folder's lock is taken here if the folder exists (and what interrupted
    writes left in it is removed); the newest state whose checksums match is the one resumed."""
    if lock.acquire() and lock.is_main:
        remove_leftovers(out_dir)
    state_path = latest_training_state(out_dir)
    if not resume and (state_path is not None or (out_dir / "ema.safetensors").exists()):
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if resume and state_path is None and (out_dir / "ema.safetensors").exists():
        raise FileExistsError(f"cannot resume {out_dir}: it holds EMA weights but no training state (written by an "
                              "earlier version); start a new run in another --out")
    if resume and state_path is None:
        log.info("--resume: no training state in %s, starting from scratch", out_dir)
    return latest_intact_training_state(out_dir) if resume and state_path is not None else state_path


def resumed_micro_batch(state_path: Path | None, global_batch: int, world_size: int, micro_batch: int | None
                        ) -> int | None:
    """``train.micro_batch`` for this launch. As configured, except when it is None (one micro-batch per
    process) and the run resumes a state written by another number of processes (an elastic restart
    with a node less, a resume on fewer GPUs): then the micro-batch size that state was trained with, if
    it divides this launch's share of the global batch. The global batch is then cut into the same
    micro-batches, seeded by their place in it, so the run computes the same numbers up to the order
    of the gradient sums, and a process needs the memory it needed before."""
    if micro_batch is not None or state_path is None or not state_path.is_dir():
        return micro_batch
    meta = read_meta(state_path)
    # the size it was trained with (kept through earlier changes); states of earlier versions: from their config
    saved = meta.get("micro_batch") or meta["config"]["train"].get("micro_batch") or global_batch // meta["world_size"]
    if meta["world_size"] == world_size or global_batch % world_size or (global_batch // world_size) % saved:
        return None
    log.info("resuming a state of %d processes on %d: micro-batches of %d kept, %d per process and step "
             "(train.micro_batch=null)", meta["world_size"], world_size, saved, global_batch // world_size // saved)
    return saved


def _ema_for_sampling(ema: EMA, env: Dist, build: Callable[[], nn.Module]) -> tuple[nn.Module | None, dict | None]:
    """Collective under FSDP: (EMA network, its weights) on rank 0 as a plain module; (None, None)
    elsewhere. Sharded EMA weights are gathered here, at sample/checkpoint time only."""
    if not isinstance(ema.model, FSDPModule):
        return (ema.model, ema.state_dict()) if env.is_main else (None, None)
    weights = get_model_state_dict(ema.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None, None
    with torch.random.fork_rng(devices=[]):  # initialising a network draws random weights: keep the training RNG
        net = build()
    net.load_state_dict(weights)
    return net.to(env.device).eval().requires_grad_(False), weights


def _nonfinite_sources(data, batches: list[MicroBatch]) -> list[str]:
    """Where this rank's non-finite input samples come from (files, records): corrupted data."""
    sources = []
    for b in batches:
        bad = ~torch.isfinite(b.images).flatten(1).all(1)
        if bad.any():
            sources += data.describe(b.dataset_indices[bad].cpu().numpy())
    return sources


def _save_batch(out_dir: Path, step: int, rank: int, value: float, batches: list[MicroBatch],
                folder: str = "nonfinite") -> Path:
    """This rank's micro-batches of a step whose loss was not finite (or a spike), for a post-mortem."""
    path = out_dir / folder / f"step-{step:07d}-rank{rank}.pt"
    saved = [{"index": b.index, "dataset_indices": b.dataset_indices.cpu(), "images": b.images.cpu(),
              "labels": None if b.labels is None else b.labels.cpu()} for b in batches]
    atomic_write(path, lambda tmp: torch.save({"step": step, "loss": value, "micro_batches": saved}, tmp))
    return path


@dataclass
class Run:
    """What a use of the loop provides. ``cfg``: the run's config (``cfg.train`` drives the loop);
    ``run_config``: what is saved with every state and checked on resume (the config as a dict, plus
    e.g. the DyDiT fine-tune's ``init``); ``raw``/``ema``: the network (initialised) and its EMA;
    ``param_groups(raw)``: the optimizer's groups (an ``lr_scale`` entry scales a group's learning rate,
    :mod:`.optimizer`), called after sharding; ``build``: a fresh unsharded network (rank 0 gathers a
    sharded EMA into it);
    ``after_step(step, ema_net)`` (one process only): called after every step, outside the img/s clock;
    True ends the run after that step, without a final checkpoint (wall-clock-budgeted runs);
    ``memory_check``: compares the first steps' real peak with the memory planner's."""

    cfg: Config
    run_config: dict[str, Any]
    raw: nn.Module
    ema: EMA
    param_groups: Callable[[nn.Module], list[dict]]
    loss_fn: LossFn
    export: Callable[[int, dict], None]
    build: Callable[[], nn.Module]
    step_values: Callable[[int], dict[str, float]] = lambda step: {}
    sample: Callable[[int, nn.Module], Path | None] | None = None
    desc: str = "train"
    after_step: Callable[[int, nn.Module], bool] | None = None
    memory_check: Any = None  # train.micro_batch=auto: a maskdit_fast.plan.auto.MemoryCheck


def _restore(path: Path, run: Run, net: nn.Module, optimizer, scaler, env: Dist, guard: SpikeGuard | None
             ) -> tuple[int, bytes | None]:
    """Collective: load the training state ``path`` (its config checked first) into the (wrapped, maybe
    sharded) objects; returns its step and this rank's saved loader state (None if there is none)."""
    if path.is_file():
        raise UserError(f"cannot resume {path}: it is a single-file state of an earlier version; resume it "
                        "with that version, or start a new run from its weights with --init-from")
    check_resumable(path, read_meta(path)["config"], run.run_config)
    rank_key = f"rank{env.rank}"
    model_sd, optim_sd = get_state_dict(net, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(run.ema.model),
             "rng": {rank_key: process_state_to_load(path, rank_key, env.device)}}
    meta = load_into(path, state)
    set_training_state(net, optimizer, run.ema.model, state)
    if "scaler" in meta:
        scaler.load_state_dict(meta["scaler"])
    if guard is not None and "spike_guard" in meta:
        guard.load_state_dict(meta["spike_guard"])
    log.info("resumed from %s at step %d (written by %d processes)", path, meta["step"], meta["world_size"])
    return meta["step"], restore_process_state(state, rank_key, env.device)  # the loader checks it fits this split


def train_loop(run: Run, out_dir: Path, env: Dist, data, precision: str, accumulation: int, state_path: Path | None,
               lock: RunLock, progress: bool = True) -> None:
    """Collective: train ``run`` from its newest state ``state_path`` (None: from scratch) to
    ``train.max_steps`` in ``out_dir`` (``lock``: its lock, from :func:`check_run_dir`). ``data``: the
    step-indexed loader (:mod:`maskdit_fast.data.loader`), ``accumulation`` micro-batches per step and
    process; ``precision`` resolved (bf16 | fp16 | fp32). A stop signal (``train.preempt_signals``)
    saves the state of the step it arrives in and raises :class:`Preempted`; with several processes a
    rank without progress for ``train.collective_timeout_s`` stops the run (:mod:`.watchdog`)."""
    with stop_signals(run.cfg.train.preempt_signals) as stop, Watchdog(env, run.cfg.train.collective_timeout_s) as watch:
        try:
            _train_steps(run, out_dir, env, data, precision, accumulation, state_path, lock, progress, stop, watch)
        finally:
            if run.memory_check is not None:
                run.memory_check.close()


def _train_steps(run: Run, out_dir: Path, env: Dist, data, precision: str, accumulation: int, state_path: Path | None,
                 lock: RunLock, progress: bool, stop: StopSignals, watch: Watchdog) -> None:
    cfg, t, device = run.cfg, run.cfg.train, env.device
    require_packages(t.loggers)  # before anything is built or written
    split = env.world_size * accumulation > 1  # else: one continuous RNG stream, as in a plain run
    raw, ema = run.raw, run.ema
    net = parallelize(raw, ema.model, cfg, precision, device, env.world_size, accumulation)
    optimizer = build_optimizer(run.param_groups(raw), t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    rank_key = f"rank{env.rank}"

    start, loader_state = 0, None
    guard = SpikeGuard.from_config(t)
    if state_path is not None:
        start, loader_state = _restore(state_path, run, net, optimizer, scaler, env, guard)
    data.start(start, t.max_steps, loader_state)
    lock.acquire(create=True)  # the inputs checked out: the run folder is made (and owned) only now

    if env.is_main:
        (out_dir / CONFIG_FILE).write_text(json.dumps(run.run_config, indent=2))
    loggers = Loggers.open(t.loggers, out_dir, start, run.run_config, t.wandb_project, t.wandb_entity, env.is_main)
    if run.memory_check is not None:  # what the first step finds allocated, as the planner counts it
        run.memory_check.start([*net.parameters(), *net.buffers(), *ema.model.parameters(), *ema.model.buffers(),
                                *(v for state in optimizer.state.values() for v in state.values())])

    def checkpoint(step: int, ema_weights: dict | None) -> None:
        model_sd, optim_sd = get_state_dict(net, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(ema.model),
                 "rng": {rank_key: process_state(device, data.state())}}
        meta = {"step": step, "world_size": env.world_size, "scaler": scaler.state_dict(), "config": run.run_config,
                "spike_guard": guard.state_dict(), "micro_batch": t.global_batch // (env.world_size * accumulation)}
        save_training_state(out_dir, step, state, meta, t.keep_last, env.is_main)
        if env.is_main:
            run.export(step, ema_weights)

    autocast = autocast_for(precision, device)
    sums: dict[str, torch.Tensor] = {}  # metrics since the last log line (finite steps only)
    grad_norms = torch.zeros((), device=device)
    window_start, window_steps, window_skipped, skipped = time.perf_counter(), 0, 0, 0
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, desc=run.desc, dynamic_ncols=True,
               disable=not (progress and "progress" in t.loggers and env.is_main))
    preempted_at = None
    for step in bar:
        done = step + 1
        lr = learning_rate(cfg, step)
        set_learning_rate(optimizer, lr)
        step_metrics: dict[str, torch.Tensor] = {}
        batches = []  # this rank's micro-batches, saved if the loss is not finite
        watch.mark(done, "reading its batch")
        for a, (j, idx, x, y) in enumerate(data.step(step)):
            x, y = prepare_micro_batch(cfg, data, step, j, x, y, split)
            batch = MicroBatch(j, idx, x, y)
            with gradient_sync(net, a == accumulation - 1):
                watch.mark(done, "forward pass")
                with autocast:
                    loss, metrics = run.loss_fn(net, batch, step)
                watch.mark(done, "backward pass")
                scaler.scale(loss / accumulation).backward()
            for key, value in {"loss": loss, **metrics}.items():  # on the device: no host sync but the one below
                step_metrics[key] = step_metrics.get(key, 0) + value.detach().float() / accumulation
            batches.append(batch)
            watch.mark(done, "reading its batch")

        watch.mark(done, "loss all-reduce")
        # the stop flag rides on the step's one host sync: every rank stops after the same step
        flag = torch.full((1,), float(stop.requested), device=device)
        value, stopping = all_reduce_mean(torch.cat([step_metrics["loss"].reshape(1), flag])).tolist()
        stopping = stopping > 0
        spike = math.isfinite(value) and guard.is_spike(value)
        if spike:
            path = _save_batch(out_dir, done, env.rank, value, batches, folder="spikes")
            log.warning("step %d: %s; its batch is saved as %s (train.spike_action=%s)", done, guard.describe(value),
                        path, t.spike_action)
        if spike and t.spike_action != "log":
            optimizer.zero_grad(set_to_none=True)
            window_skipped += 1
            skipped += 1
            if t.spike_action == "rollback":
                _roll_back(out_dir, run, net, optimizer, scaler, env)
        elif math.isfinite(value):
            watch.mark(done, "optimizer step")
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norms += clip_grad_norm(net.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(net, step)
            for key, v in step_metrics.items():
                sums[key] = sums.get(key, 0) + v
        elif t.nonfinite == "stop":
            path = _save_batch(out_dir, done, env.rank, value, batches)
            sources = _nonfinite_sources(data, batches)
            if sources:
                err = NonFiniteLoss(f"loss is {value} at step {done}: the input latents of {len(sources)} "
                                    f"sample(s) are not finite, the data is corrupted: {', '.join(sources[:5])}; "
                                    "check it with python -m maskdit_fast.data.latents verify DIR")
                err.local = True  # this rank's data
                raise err
            raise NonFiniteLoss(f"loss is {value} at step {done}; its batch is saved as "
                                f"{path.parent}/step-{done:07d}-rank*.pt; lower train.lr, use "
                                "train.precision=fp32, or set train.nonfinite=skip to skip such steps")
        else:
            optimizer.zero_grad(set_to_none=True)
            window_skipped += 1
            skipped += 1
            log.warning("step %d: loss is %s, step skipped (train.nonfinite=skip)%s", done, value,
                        "".join(f"; non-finite input: {s}" for s in _nonfinite_sources(data, batches)[:5]))
        window_steps += 1
        if run.memory_check is not None:
            run.memory_check.after_step()

        if done % t.log_every == 0 or done == t.max_steps:
            finite_steps = max(window_steps - window_skipped, 1)
            keys = sorted(step_metrics)
            stacked = torch.stack([torch.as_tensor(sums.get(k, 0.0), device=device, dtype=torch.float32) for k in keys])
            means = dict(zip(keys, (all_reduce_mean(stacked) / finite_steps).tolist()))
            elapsed = time.perf_counter() - window_start
            record = {"step": done, **means, **run.step_values(step), "lr": lr,
                      "img_per_s": window_steps * t.global_batch / elapsed, "peak_mem_gb": peak_memory_gb(device)}
            if t.grad_clip > 0:
                record["grad_norm"] = grad_norms.item() / finite_steps  # global norm before clipping
            if t.nonfinite == "skip" or t.spike_zscore > 0:
                record["skipped"] = skipped
            loggers.log(record)
            bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
            sums = {}
            grad_norms.zero_()
            window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
        paused = time.perf_counter()  # sampling and checkpointing do not count towards img/s
        sample_now = run.sample is not None and (done % t.sample_every == 0 or done == t.max_steps)
        ckpt_now = done % t.ckpt_every == 0 or done == t.max_steps
        if sample_now or ckpt_now or stopping:
            watch.mark(done, "sample grid / checkpoint")
            ema_net, ema_weights = _ema_for_sampling(ema, env, run.build)
            if sample_now and env.is_main:
                grids: list[Path] = []
                if stop.cut_short(lambda: grids.append(run.sample(done, ema_net))):
                    log.warning("step %d: the sample grid was cut short by the stop signal", done)
                elif grids[0] is not None:
                    loggers.image("samples", grids[0], done)
            saved = ckpt_now or stopping
            if saved:
                loggers.flush()  # what was logged up to this state survives a crash after it
                checkpoint(done, ema_weights)
            stopping = any_rank(stop.requested, device)  # (in place of a barrier) a signal during the phase counts
            if stopping and not saved:
                loggers.flush()
                checkpoint(done, ema_weights)
        if stopping:
            preempted_at = done
            break
        watch.mark(done, "after the step")
        ended = run.after_step is not None and run.after_step(done, ema.model)
        window_start += time.perf_counter() - paused
        if ended:
            break
    loggers.close()
    data.close()
    if preempted_at is not None:
        message = (f"preempted ({stop.received.name if stop.received else 'another rank was signalled'}): stopped "
                   f"after step {preempted_at}, its training state is saved in "
                   f"{out_dir / 'checkpoints' / f'step-{preempted_at:07d}'}; continue with --resume "
                   f"(exit status {PREEMPTED_EXIT})")
        if env.is_main:
            log.warning("%s", message)
        raise Preempted(message, preempted_at)


def _roll_back(out_dir: Path, run: Run, net: nn.Module, optimizer, scaler, env: Dist) -> None:
    """Collective: return the parameters, optimizer, EMA and grad scaler to the newest training state;
    the loop goes on with the next step, so the steps since that state are undone, and the run then
    equals one that skipped them. The data and the RNG go on: the loader is not touched (its
    position is the step after the spike: a function of the step, or DALI's reader already there)
    and the RNG keeps its stream (a single-stream run draws the noise and flips of a skipping run)."""
    path = latest_intact_training_state(out_dir)
    if path is None:
        log.warning("train.spike_action=rollback: no training state yet to return to; the step is skipped")
        return
    rng, rank_key = process_state(env.device, None), f"rank{env.rank}"
    _restore(path, run, net, optimizer, scaler, env, guard=None)  # the guard keeps what it has seen
    restore_process_state({"rng": {rank_key: rng}}, rank_key, env.device)
    log.warning("rolled back to %s after the spike", path)


def replace_data_vae(cfg: Config, vae: str | None) -> Config:
    """``cfg`` with ``data.vae`` set to ``vae`` (the VAE that made the latents) when the config names none; the
    caller's object is left as it was."""
    if cfg.data.vae or not vae:
        return cfg
    log.info("data.vae: %s (from %s/meta.json)", vae, cfg.data.path)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, vae=vae))
