"""Typed configuration: dataclasses, YAML presets and ``key=value`` command-line overrides.

``load_config("mnist", ["model.mask_ratio=0.25"])`` merges, in order: the defaults below, the
YAML preset (a name from ``configs/`` or a path), then the overrides. Unknown keys, values of
the wrong type and values out of range raise :class:`ConfigError` naming the key.
``parallel=fsdp`` on the command line is short for ``train.parallel=fsdp``.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

# configs/ of a source checkout (or editable install), else the copy a regular install puts in share/.
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parent.parent / "configs",
                               Path(sys.prefix) / "share" / "maskdit_fast" / "configs") if d.is_dir()),
                  Path(__file__).resolve().parent.parent / "configs")
DIT_SIZES: dict[str, tuple[int, int, int]] = {  # width, depth, heads (DiT paper)
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


class ConfigError(UserError):
    """A bad configuration value; the message names the key and what is allowed."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {list(allowed)}")


@dataclass
class ModelConfig:
    arch: str = "maskdit"              # dit | maskdit
    size: Optional[str] = "XL"         # S | B | L | XL sets the width/depth/heads left unset
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: int = 2
    input_size: int = 32               # latent or image side
    in_channels: int = 4
    num_classes: int = 1000            # 0 = unconditional
    class_dropout: float = 0.1         # label dropout for classifier-free guidance
    class_embed_init_std: float = 0.02 # DiT's init; short runs learn the class signal faster from ~1
    noise_embed_scale: float = 1.0     # c_noise = scale * ln(sigma) / 4 into the timestep embedder (1 = official)
    mlp_ratio: float = 4.0
    decoder_hidden_size: int = 512     # MaskDiT decoder
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.5            # fraction of tokens hidden from the encoder in training
    sigma_data: float = 0.5            # EDM
    diffusion: str = "edm"             # what the network is trained as: edm (MaskDiT: F of EDM's preconditioning) |
                                       # ddpm (DiT: eps from x_t at step index t of DiT's 1000-step linear schedule)
    learn_sigma: bool = False          # ddpm: the final layer also outputs the learned-variance values (2C channels)
    null_class: str = "zero"           # no-class embedding: zero (MaskDiT) | learned (DiT: table row num_classes)
    kernels: str = "auto"              # auto | triton | reference

    def __post_init__(self) -> None:
        _one_of(self.arch, "model.arch", ("dit", "maskdit"))
        if self.size is not None:
            _one_of(self.size, "model.size", tuple(DIT_SIZES))
            width, depth, heads = DIT_SIZES[self.size]
            self.hidden_size = self.hidden_size or width
            self.depth = self.depth or depth
            self.num_heads = self.num_heads or heads
        for key in ("hidden_size", "depth", "num_heads"):
            value = getattr(self, key)
            _require(value is not None and value > 0, f"model.{key}", f"must be a positive integer (or set model.size), got {value}")
        _require(self.hidden_size % self.num_heads == 0, "model.hidden_size",
                 f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        _require(self.hidden_size % 4 == 0, "model.hidden_size", "must be a multiple of 4 (sin-cos position embedding)")
        _require(self.patch_size > 0 and self.input_size % self.patch_size == 0, "model.patch_size",
                 f"{self.patch_size} must be positive and divide model.input_size={self.input_size}")
        _require(self.in_channels > 0, "model.in_channels", "must be positive")
        _require(self.num_classes >= 0, "model.num_classes", "must be >= 0 (0 = unconditional)")
        _require(0.0 <= self.class_dropout < 1.0, "model.class_dropout", f"must be in [0, 1), got {self.class_dropout}")
        _require(self.class_embed_init_std > 0, "model.class_embed_init_std", "must be positive")
        _require(self.noise_embed_scale > 0, "model.noise_embed_scale", "must be positive")
        _require(self.mlp_ratio > 0, "model.mlp_ratio", "must be positive")
        _require(0.0 <= self.mask_ratio < 1.0, "model.mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        _require(self.arch == "maskdit" or self.mask_ratio == 0.0, "model.mask_ratio",
                 "the plain DiT (model.arch=dit) has no decoder; masking needs model.arch=maskdit")
        if self.arch == "maskdit":
            _require(self.decoder_depth > 0, "model.decoder_depth", "must be positive")
            _require(self.decoder_hidden_size % self.decoder_num_heads == 0 and self.decoder_hidden_size % 4 == 0,
                     "model.decoder_hidden_size",
                     f"{self.decoder_hidden_size} must be a multiple of 4 and of decoder_num_heads={self.decoder_num_heads}")
        _require(self.sigma_data > 0, "model.sigma_data", "must be positive")
        _one_of(self.diffusion, "model.diffusion", ("edm", "ddpm"))
        _require(not self.learn_sigma or self.diffusion == "ddpm", "model.learn_sigma",
                 "a learned variance needs model.diffusion=ddpm (EDM samplers do not use one)")
        _one_of(self.null_class, "model.null_class", ("zero", "learned"))
        _one_of(self.kernels, "model.kernels", ("auto", "triton", "reference"))

    @property
    def out_channels(self) -> int:
        """Output channels of the raw network: C, or 2C with a learned variance (eps, then variance values)."""
        return self.in_channels * (2 if self.learn_sigma else 1)


@dataclass
class RouterConfig:
    """What a DyDiT network is (saved in checkpoint metadata)."""

    tdw: bool = True                   # timestep-wise dynamic width (heads + MLP channel groups)
    sdt: bool = True                   # spatial-wise dynamic tokens (MLP skipped per token)
    decoder: bool = True               # MaskDiT: routers in the decoder blocks too (else they stay static)
    temperature: float = 5.0           # Gumbel-sigmoid temperature in training
    width_bias: float = 15.0           # TDW router bias at conversion (all heads/groups on)
    token_bias: float = 35.0           # SDT router output bias at conversion (all tokens on)
    token_ratio: int = 16              # SDT router hidden width = D / token_ratio

    def __post_init__(self) -> None:
        _require(self.temperature > 0, "dydit.temperature", "must be positive")
        _require(self.width_bias > 0, "dydit.width_bias", "must be positive (the converted model starts all on)")
        _require(self.token_bias > 0, "dydit.token_bias", "must be positive (the converted model starts all on)")
        _require(self.token_ratio >= 1, "dydit.token_ratio", "must be >= 1")


@dataclass
class DataConfig:
    dataset: str = "mnist"             # mnist (bundled) | latents (VAE latents, see docs/data.md)
    source: str = "shards"             # dataset=latents: shards (pre-encoded by maskdit_fast.data.prepare) |
                                       # images (an image folder, encoded on the fly with data.vae)
    path: Optional[str] = None         # dataset=latents: the latent folder (source=shards) or image folder (images)
    flip: bool = False                 # random horizontal flips
    vae: Optional[str] = None          # AutoencoderKL id or local folder: decodes samples; encodes for source=images
                                       # (None with source=shards: the one named in the folder's meta.json)
    latent_scale: float = 0.18215      # latent = scale * VAE posterior sample (must match the folder's / VAE's)
    loader: str = "torch"              # dataset=latents: torch (memory-mapped shards; PIL for images) |
                                       # dali (NVIDIA DALI reader; DALI's image decoder for images)
    num_workers: int = 2               # loader=torch: DataLoader worker processes (0 = read in the training process);
                                       # source=images: decoding / crop threads
    verify: bool = False               # source=shards: check every record, sha256 and index at start (reads the whole set)
    shuffle_buffer: int = 8192         # loader=dali: samples in the reader's shuffle buffer (initial_fill)
    dali_threads: int = 4              # loader=dali: CPU threads of the pipeline

    def __post_init__(self) -> None:
        _one_of(self.dataset, "data.dataset", ("mnist", "latents"))
        _one_of(self.source, "data.source", ("shards", "images"))
        _require(self.latent_scale > 0, "data.latent_scale", "must be positive")
        _require(self.dataset != "latents" or self.path is not None, "data.path",
                 "dataset=latents needs data.path (a folder written by prepare, or an image folder with source=images)")
        _require(self.source == "shards" or self.dataset == "latents", "data.source",
                 "images are encoded to VAE latents: source=images needs data.dataset=latents")
        _require(self.source == "shards" or self.vae is not None, "data.vae",
                 "source=images encodes with the VAE: set data.vae (e.g. stabilityai/sd-vae-ft-ema or a local folder)")
        _one_of(self.loader, "data.loader", ("torch", "dali"))
        _require(self.loader == "torch" or self.dataset == "latents", "data.loader",
                 "dali reads latent shards or decodes images: it needs data.dataset=latents")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.shuffle_buffer > 0, "data.shuffle_buffer", "must be positive")
        _require(self.dali_threads > 0, "data.dali_threads", "must be positive")


@dataclass
class LossConfig:
    P_mean: float = -1.2               # ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.2
    mae_coef: float = 0.1              # weight of the MAE loss on masked patches

    def __post_init__(self) -> None:
        _require(self.P_std > 0, "loss.P_std", "must be positive")
        _require(self.mae_coef >= 0, "loss.mae_coef", "must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = 2_000_000
    global_batch: int = 1024
    lr: float = 1e-4
    lr_schedule: str = "constant"      # constant | cosine (to min_lr at max_steps)
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    optimizer: str = "adamw"           # adamw (torch's, fused on CUDA) | apex_fused_adam (NVIDIA apex's FusedAdam,
                                       # the official MaskDiT's; CUDA, apex built from source: docs/install.md)
    grad_clip: float = 0.0             # 0 = off
    ema_decay: float = 0.9999
    ema_warmup: bool = False           # decay = min(ema_decay, (1+step)/(10+step)) for short runs
    unmasked_steps: int = 0            # last steps trained with mask_ratio 0 (in-run unmasked fine-tune);
                                       # more than max_steps = the whole (short) run unmasked
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    tf32: bool = True
    device: str = "auto"               # auto | cpu | cuda
    seed: int = 0
    log_every: int = 50
    sample_every: int = 5000           # sample grid PNG (also written at the end)
    ckpt_every: int = 5000             # training state + EMA safetensors (also written at the end)
    keep_last: int = 0                 # training states kept on disk (0 = all)
    parallel: str = "none"             # none | ddp | fsdp (several processes: launch with torchrun)
    micro_batch: Any = None            # samples per process per forward/backward: an integer; None = global_batch /
                                       # processes; auto = the largest the memory planner says fits (docs/planning.md)
    activation_checkpointing: bool = False  # recompute each DiT block in the backward pass
    compile: bool = False              # torch.compile each DiT block
    ddp_bucket_mb: int = 25            # ddp: gradient all-reduce bucket size
    fsdp_reduce_dtype: str = "fp32"    # fsdp + bf16: dtype of the gradient reduce-scatter (fp32 | bf16)
    fsdp_cpu_offload: bool = False     # fsdp: sharded parameters, gradients and optimizer state in CPU memory
    nonfinite: str = "stop"            # NaN/inf loss: stop (and save the batch) | skip the step
    spike_zscore: float = 0.0          # loss spike: this many running std above the running mean (0 = no guard)
    spike_min_ratio: float = 2.0       # ... and at least this times the running mean
    spike_warmup: int = 200            # steps before the guard judges (its statistics settle)
    spike_decay: float = 0.99          # decay of the running mean / variance of the loss
    spike_action: str = "log"          # log (and save the batch) | skip the step | rollback to the newest
                                       # training state and go on after the spike (see train/spike_guard.py)
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "progress"])  # + tensorboard | wandb (docs/logging.md)
    wandb_project: str = "maskdit_fast"
    wandb_entity: Optional[str] = None # None: wandb's default entity
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save the state at
                                       # the next step and exit 75 (docs/fault-tolerance.md); [] = default actions
    collective_timeout_s: float = 600.0  # several processes: a rank without progress this long stops the run

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch", "log_every", "sample_every", "ckpt_every", "ddp_bucket_mb"):
            _require(getattr(self, key) > 0, f"train.{key}", f"must be positive, got {getattr(self, key)}")
        _require(self.lr > 0, "train.lr", "must be positive")
        _one_of(self.lr_schedule, "train.lr_schedule", ("constant", "cosine"))
        _require(0 <= self.min_lr <= self.lr, "train.min_lr", "must be in [0, train.lr]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", "needs two values in [0, 1)")
        _one_of(self.optimizer, "train.optimizer", ("adamw", "apex_fused_adam"))
        # FSDP2's parameters are DTensors; apex's multi-tensor kernels take plain CUDA tensors
        _require(self.optimizer == "adamw" or self.parallel != "fsdp", "train.optimizer",
                 "apex_fused_adam updates plain CUDA tensors, not FSDP2's sharded DTensors: use train.optimizer=adamw "
                 "with train.parallel=fsdp")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _require(self.unmasked_steps >= 0, "train.unmasked_steps", "must be >= 0")
        _one_of(self.precision, "train.precision", ("auto", "bf16", "fp16", "fp32"))
        _one_of(self.device, "train.device", ("auto", "cpu", "cuda"))
        _require(self.keep_last >= 0, "train.keep_last", "must be >= 0 (0 = keep all)")
        _one_of(self.parallel, "train.parallel", ("none", "ddp", "fsdp"))
        if isinstance(self.micro_batch, str) and self.micro_batch.strip().isdigit():
            self.micro_batch = int(self.micro_batch)  # an override gives text
        if self.micro_batch is not None and self.micro_batch != "auto":
            _require(isinstance(self.micro_batch, int) and not isinstance(self.micro_batch, bool),
                     "train.micro_batch", f"{self.micro_batch!r} is not an integer, null or auto")
            _require(0 < self.micro_batch <= self.global_batch and self.global_batch % self.micro_batch == 0,
                     "train.micro_batch", f"{self.micro_batch} must be positive and divide train.global_batch={self.global_batch}")
        _one_of(self.fsdp_reduce_dtype, "train.fsdp_reduce_dtype", ("fp32", "bf16"))
        _require(not self.fsdp_cpu_offload or self.parallel == "fsdp", "train.fsdp_cpu_offload", "needs train.parallel=fsdp")
        # FSDP2 has no sharded grad scaler here; bf16 needs none.
        _require(not (self.parallel == "fsdp" and self.precision == "fp16"), "train.precision",
                 "fp16 (grad scaler) is not supported with train.parallel=fsdp; use bf16")
        _one_of(self.nonfinite, "train.nonfinite", ("stop", "skip"))
        _require(self.spike_zscore >= 0, "train.spike_zscore", "must be >= 0 (0 = no spike guard)")
        _require(self.spike_min_ratio >= 1, "train.spike_min_ratio", "must be >= 1")
        _require(self.spike_warmup >= 0, "train.spike_warmup", "must be >= 0")
        _require(0 < self.spike_decay < 1, "train.spike_decay", "must be in (0, 1)")
        _one_of(self.spike_action, "train.spike_action", ("log", "skip", "rollback"))
        for name in self.loggers:
            _one_of(name, "train.loggers", ("jsonl", "progress", "tensorboard", "wandb"))
        for name in self.preempt_signals:
            full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
            _require(hasattr(signal.Signals, full) and full not in ("SIGKILL", "SIGSTOP"), "train.preempt_signals",
                     f"{name!r} is not a signal a process can catch (e.g. SIGTERM, SIGUSR1, SIGINT)")
        _require(self.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive (seconds)")


SOLVERS = ("heun", "euler", "ddpm", "ddim")


@dataclass
class SampleConfig:
    num_steps: int = 40                # EDM time steps (Heun uses 2*steps-1 network evaluations); ddpm / ddim:
                                       # steps respaced out of DiT's 1000 (the official sampling uses 250)
    solver: str = "heun"               # heun | euler (EDM ODE) | ddpm (ancestral) | ddim (the --sampler flag)
    cfg_scale: float = 1.5             # classifier-free guidance; 1 = off
    guidance: str = "standard"         # standard (every eps channel) | dit (the official DiT's: first 3 channels;
                                       # DDPM-trained checkpoints only)
    ddim_eta: float = 0.0              # ddim: 0 = deterministic
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    grid_per_class: int = 8            # training-time grid: this many samples of each class shown

    def __post_init__(self) -> None:
        _require(self.num_steps >= 1, "sample.num_steps", "must be >= 1")
        _one_of(self.solver, "sample.solver", SOLVERS)
        _require(self.cfg_scale >= 0, "sample.cfg_scale", "must be >= 0")
        _one_of(self.guidance, "sample.guidance", ("standard", "dit"))
        _require(self.ddim_eta >= 0, "sample.ddim_eta", "must be >= 0")
        _require(0 < self.sigma_min < self.sigma_max, "sample.sigma_min", "needs 0 < sigma_min < sigma_max")
        _require(self.rho > 0, "sample.rho", "must be positive")
        _require(self.grid_per_class >= 1, "sample.grid_per_class", "must be >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (``mnist``) or a YAML path -> an existing file, else a ConfigError listing presets."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset; presets: {known}")


SIZE_DERIVED = ("hidden_size", "depth", "num_heads")  # filled from model.size unless given


def _build(*sources: Any) -> Config:
    try:
        merged = OmegaConf.structured(Config)
        for source in sources:
            # A later model.size replaces the shape an earlier size filled in (model.size=S over an XL
            # preset), but not a width/depth/heads that the same source gives explicitly.
            model = source.get("model") or {}
            if "size" in model:
                for key in SIZE_DERIVED:
                    if key not in model:
                        merged.model[key] = None
            merged = OmegaConf.merge(merged, source)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None


SHORTHANDS = {"parallel": "train.parallel"}  # command-line key -> full key


def load_config(name_or_path: str | None = "mnist", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML preset or file (None: defaults only) <- ``key=value`` overrides."""
    full = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=500)")
        key, value = item.split("=", 1)
        full.append(f"{SHORTHANDS.get(key, key)}={value}")
    sources = [] if name_or_path is None else [OmegaConf.load(resolve_config_path(name_or_path))]
    return _build(*sources, OmegaConf.from_dotlist(full))


def config_to_dict(cfg: Config | ModelConfig) -> dict:
    """Plain nested dict of a config (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict) -> Config:
    """A validated Config from a plain nested dict (:func:`config_to_dict`'s output)."""
    return _build(values)


def model_config_from_dict(values: dict) -> ModelConfig:
    """A validated ModelConfig from a plain dict (e.g. a checkpoint's metadata)."""
    return _build({"model": values}).model


def router_config_from_dict(values: dict) -> RouterConfig:
    """A RouterConfig from a plain dict (a DyDiT checkpoint's ``dydit`` metadata), ignoring other keys."""
    known = {f.name for f in dataclasses.fields(RouterConfig)}
    return RouterConfig(**{k: v for k, v in values.items() if k in known})
