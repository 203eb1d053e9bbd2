"""Training-data loaders: one interface for the in-memory MNIST set, the PyTorch latent loader, the
DALI latent loader (``data/dali.py``) and images encoded on the fly (``data.source=images``).

A loader is asked for the micro-batches of one step at a time, in step order from the step it
was started at::

    loader.start(step, max_steps, state=None)
    for j, idx, x, y in loader.step(step): ...   # this rank's ``accumulation`` micro-batches
    loader.state()                               # bytes to checkpoint (None: a pure function of the step)
    loader.describe(idx)                         # where samples come from (file, record), for errors
    loader.close()

``j`` is the micro-batch's place in the global batch, ``idx`` (m,) int64 the dataset indices,
``x`` (m, C, H, W) float32 and ``y`` (m,) int64 on the training device. ``loader.flips`` says
whether the loader applies ``data.flip`` itself (DALI, images) or leaves it to the trainer;
``loader.vae`` names the VAE that encoded the latents (None: unknown, or not latents).

All but the DALI loader follow :class:`EpochBatches`: one seeded permutation of the whole data set
per epoch, each global batch cut into ``world_size * accumulation`` micro-batches, rank r taking
micro-batches ``r * accumulation ... + accumulation - 1``. The order is a pure function of
(seed, step), so resume is exact and independent of the number of processes.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import Config, ConfigError
from .images import UnreadableImage, choose_decoder, list_image_folder
from .latents import LatentFormatError, LatentShards, flip_coins, posterior_noise, sample_posterior
from .sampler import EpochBatches
from .vae import encode_posterior

log = logging.getLogger(__name__)

MicroBatch = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


class TensorLoader:
    """A data set held in memory on the device (the bundled MNIST)."""
    flips = False
    vae = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batches: EpochBatches, rank: int, world_size: int,
                 accumulation: int):
        self.images, self.labels, self.batches = images, labels, batches
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation

    def __len__(self) -> int:
        return self.images.shape[0]

    def start(self, step: int, max_steps: int, state: bytes | None = None) -> None:
        pass

    def step(self, step: int) -> Iterator[MicroBatch]:
        for j, idx in self.batches.micro_batches(step, self.rank, self.world_size, self.accumulation):
            idx = idx.to(self.images.device)
            yield j, idx, self.images[idx], self.labels[idx]

    def state(self) -> bytes | None:
        return None

    def describe(self, indices) -> list[str]:
        return [f"sample {int(i)}" for i in np.asarray(indices).reshape(-1)]

    def close(self) -> None:
        pass


class _Latents(torch.utils.data.Dataset):
    """Latent shards for torch's DataLoader: a micro-batch ``[(epoch, index), ...]`` -> (x float32
    (m, C, H, W), labels (m,) int64, indices (m,) int64), the posterior sampled in the worker."""

    def __init__(self, shards: LatentShards, seed: int, scale: float):
        self.shards, self.seed, self.scale = shards, seed, scale

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item: tuple[int, int]):
        return self.__getitems__([item])

    def __getitems__(self, items: list[tuple[int, int]]):
        epoch = items[0][0]
        indices = np.array([i for _, i in items], dtype=np.int64)
        posterior, labels = self.shards.read(indices)
        posterior = torch.from_numpy(posterior)
        noise = posterior_noise(self.seed, epoch, indices, posterior[0, 0].numel())
        return (sample_posterior(posterior, noise, self.scale), torch.from_numpy(labels), torch.from_numpy(indices))


class _StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches from ``start`` to ``stop`` in training order, as lists of (epoch, index)."""

    def __init__(self, batches: EpochBatches, start: int, stop: int, rank: int, world_size: int, accumulation: int):
        self.batches, self.start, self.stop = batches, start, stop
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation

    def __iter__(self):
        for step in range(self.start, self.stop):
            epoch = step // self.batches.batches_per_epoch
            for _, idx in self.batches.micro_batches(step, self.rank, self.world_size, self.accumulation):
                yield [(epoch, i) for i in idx.tolist()]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulation


def _identity(batch):
    return batch


class LatentLoader:
    """Latent shards through torch's DataLoader: workers read memory-mapped records and draw the
    posterior sample ``x = scale * (mean + std * eps)`` with eps a pure function of (seed, epoch,
    sample index) (:func:`posterior_noise`), so every epoch sees a fresh latent of each image and a
    resumed run sees exactly the latents of an uninterrupted one; the training process only copies
    the batch to its device."""
    flips = False

    def __init__(self, shards: LatentShards, batches: EpochBatches, seed: int, scale: float, device: torch.device,
                 rank: int, world_size: int, accumulation: int, num_workers: int = 2, prefetch: int = 4):
        self.shards, self.batches, self.seed, self.scale, self.device = shards, batches, seed, scale, device
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.num_workers, self.prefetch = num_workers, prefetch
        self.vae = shards.meta.get("vae")
        self._it = None

    def __len__(self) -> int:
        return len(self.shards)

    def start(self, step: int, max_steps: int, state: bytes | None = None) -> None:
        self.close()
        sampler = _StepSampler(self.batches, step, max_steps, self.rank, self.world_size, self.accumulation)
        loader = torch.utils.data.DataLoader(
            _Latents(self.shards, self.seed, self.scale), batch_sampler=sampler, num_workers=self.num_workers, collate_fn=_identity,
            pin_memory=self.device.type == "cuda", prefetch_factor=self.prefetch if self.num_workers else None,
            generator=torch.Generator(),  # creating the iterator draws a seed: not from the training RNG
        )
        self._it = iter(loader)

    def step(self, step: int) -> Iterator[MicroBatch]:
        if self._it is None:
            raise RuntimeError("LatentLoader.start(step, max_steps) must be called before step()")
        for j, expected in self.batches.micro_batches(step, self.rank, self.world_size, self.accumulation):
            try:
                x, labels, idx = next(self._it)
            except LatentFormatError as err:  # re-raised from a worker, its traceback inside the message
                clean = LatentFormatError(str(err).strip().splitlines()[-1].split("LatentFormatError: ", 1)[-1])
                clean.local = True  # found in this rank's data
                raise clean from None
            if not torch.equal(idx, expected):
                raise RuntimeError(f"data loader out of step at step {step}: asked for steps in order from start()")
            to = dict(device=self.device, non_blocking=True)
            yield j, idx.to(**to), x.to(**to), labels.to(**to)

    def state(self) -> bytes | None:
        return None

    def describe(self, indices) -> list[str]:
        return self.shards.describe(indices)

    def close(self) -> None:
        self._it = None


# images per VAE forward pass: bounds memory (SD's encoder: ~0.1-0.2 GB of activations per 256 px image)
ENCODE_CHUNK = 32


class ImageLoader:
    """An ImageNet-style image folder encoded on the fly (``data.source=images``).

    Order and sharding as :class:`LatentLoader` (:class:`EpochBatches`: pure function of the step,
    exact resume, ranks split each global batch). Per micro-batch, a background thread reads and
    decodes the files (``decoder="pil"``, or ``"dali"``: DALI's decoder, nvJPEG on a GPU) and applies
    ADM's centre crop with PIL in ``workers`` threads (exactly :func:`center_crop_arr`), a few
    micro-batches ahead of training; flips (``flip``) are a per-sample coin of (seed, epoch, index)
    applied to the pixels. The training process then encodes with ``vae`` on its device and draws
    ``x = scale * (mean + std * eps)`` with the same noise as :class:`LatentLoader`
    (:func:`posterior_noise`). An unreadable image stops training with an error naming it.
    """
    flips = True  # flips the pixels itself, before encoding

    def __init__(self, root: str | Path, items: list[tuple[str, int]], batches: EpochBatches, vae, vae_name: str,
                 resolution: int, seed: int, scale: float, flip: bool, device: torch.device, rank: int,
                 world_size: int, accumulation: int, decoder: str = "pil", workers: int = 2, dali_threads: int = 2):
        self.root, self.items, self.batches, self.encoder, self.vae = Path(root), items, batches, vae, vae_name
        self.resolution, self.seed, self.scale, self.flip, self.device = resolution, seed, scale, flip, device
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        micro = batches.batch_size // (world_size * accumulation)
        self.decode = choose_decoder(decoder, micro, device, dali_threads)
        self.workers, self.prefetch = workers, accumulation + 1  # the next step's first micro-batch is in flight
        self._reader = self._pool = None
        self._plan, self._queue = iter(()), deque()

    def __len__(self) -> int:
        return len(self.items)

    def _plan_from(self, start: int, stop: int):
        for step in range(start, stop):
            epoch = step // self.batches.batches_per_epoch
            for j, idx in self.batches.micro_batches(step, self.rank, self.world_size, self.accumulation):
                yield step, j, epoch, idx

    def _pixels(self, epoch: int, idx: torch.Tensor) -> torch.Tensor:
        """(m, R, R, 3) uint8: decoded, centre-cropped and maybe flipped images (reader thread)."""
        decoded = self.decode([self.root / self.items[i][0] for i in idx.tolist()], self.resolution, self._pool,
                              strict=True)
        pixels = np.stack([array for array, _ in decoded])
        if self.flip:
            coins = flip_coins(self.seed, epoch, idx)
            pixels[coins] = pixels[coins, :, ::-1]
        pixels = torch.from_numpy(pixels)
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def _fill(self) -> None:
        while len(self._queue) < self.prefetch:
            planned = next(self._plan, None)
            if planned is None:
                return
            step, j, epoch, idx = planned
            self._queue.append((step, j, epoch, idx, self._reader.submit(self._pixels, epoch, idx)))

    def start(self, step: int, max_steps: int, state: bytes | None = None) -> None:
        self.close()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="maskdit-images")
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="maskdit-crop")
        self._plan = self._plan_from(step, max_steps)
        self._fill()

    def step(self, step: int) -> Iterator[MicroBatch]:
        if self._reader is None:
            raise RuntimeError("ImageLoader.start(step, max_steps) must be called before step()")
        for _ in range(self.accumulation):
            if not self._queue or self._queue[0][0] != step:
                raise RuntimeError(f"data loader out of step at step {step}: asked for steps in order from start()")
            _, j, epoch, idx, pending = self._queue.popleft()
            self._fill()
            try:
                pixels = pending.result()
            except UnreadableImage as err:
                raise UnreadableImage(f"{err}. Training from images needs every image to decode: remove or replace "
                                      "the file, or pre-encode with python -m maskdit_fast.data.prepare, which skips "
                                      "unreadable images") from None
            mean, logvar = encode_posterior(self.encoder, pixels, batch_size=ENCODE_CHUNK)
            noise = posterior_noise(self.seed, epoch, idx, mean[0].numel()).to(self.device, non_blocking=True)
            x = sample_posterior(torch.stack([mean, logvar], dim=1), noise, self.scale)
            yield j, idx.to(self.device), x, self.labels[idx].to(self.device)

    def state(self) -> bytes | None:
        return None

    def describe(self, indices) -> list[str]:
        return [str(self.root / self.items[int(i)][0]) for i in np.asarray(indices).reshape(-1)]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._reader = self._pool = None
        self._plan, self._queue = iter(()), deque()


def check_latent_shapes(cfg: Config, meta: dict) -> None:
    """The latents in ``meta`` must fit the model config; raises ConfigError naming the keys."""
    m, path = cfg.model, cfg.data.path
    channels, height, width = meta["shape"]
    if height != width:
        raise ConfigError(f"data.path: {path} holds {channels}x{height}x{width} latents; the model needs square inputs")
    if (channels, height) != (m.in_channels, m.input_size):
        raise ConfigError(f"data.path: {path} holds {channels}x{height}x{width} latents (meta.json), but the model "
                          f"expects model.in_channels={m.in_channels}, model.input_size={m.input_size}")
    if m.num_classes and meta["num_classes"] > m.num_classes:
        raise ConfigError(f"data.path: {path} has {meta['num_classes']} classes, more than model.num_classes={m.num_classes}")
    if abs(meta["latent_scale"] - cfg.data.latent_scale) > 1e-9 * meta["latent_scale"]:
        raise ConfigError(f"data.latent_scale: {cfg.data.latent_scale}, but {path}/meta.json says the VAE's scale is "
                          f"{meta['latent_scale']}; set data.latent_scale={meta['latent_scale']}")


def build_image_loader(cfg: Config, device: torch.device, rank: int, world_size: int, accumulation: int) -> ImageLoader:
    """``data.source=images``: the image folder ``data.path`` encoded with ``data.vae``; checks the VAE
    against the model (latent channels, ``data.latent_scale``) and the classes against
    ``model.num_classes``; the crop side is ``model.input_size`` times the VAE's downsampling."""
    from .vae import load_vae, vae_downsampling, vae_scale  # noqa: deferred like diffusers itself

    m, d, t = cfg.model, cfg.data, cfg.train
    classes, items = list_image_folder(d.path)
    if m.num_classes and len(classes) > m.num_classes:
        raise ConfigError(f"data.path: {d.path} has {len(classes)} class folders, more than "
                          f"model.num_classes={m.num_classes}")
    vae = load_vae(d.vae, device)
    if vae.config.latent_channels != m.in_channels:
        raise ConfigError(f"data.vae: {d.vae} makes {vae.config.latent_channels}-channel latents, but "
                          f"model.in_channels={m.in_channels}")
    if abs(vae_scale(vae) - d.latent_scale) > 1e-9 * vae_scale(vae):
        raise ConfigError(f"data.latent_scale: {d.latent_scale}, but the VAE {d.vae} has scaling_factor "
                          f"{vae_scale(vae)}; set data.latent_scale={vae_scale(vae)}")
    resolution = m.input_size * vae_downsampling(vae)
    decoder = "pil"
    if d.loader == "dali":
        from .dali import dali_available
        if dali_available():
            decoder = "dali"
        else:  # the crop is PIL's either way: only the decoding moves
            log.warning("data.loader=dali: NVIDIA DALI is not installed (pip install 'maskdit_fast[dali]'); the "
                        "images are decoded with PIL")
    log.info("data.source=images: %d images in %d classes under %s, centre-cropped to %d px and encoded by %s",
             len(items), len(classes), d.path, resolution, d.vae)
    return ImageLoader(d.path, items, EpochBatches(len(items), t.global_batch, t.seed), vae, d.vae, resolution,
                       t.seed, d.latent_scale, d.flip, device, rank, world_size, accumulation,
                       decoder=decoder, workers=max(d.num_workers, 1),
                       dali_threads=d.dali_threads)


def build_loader(cfg: Config, device: torch.device, rank: int, world_size: int, micro: int, accumulation: int):
    """The loader that ``cfg.data`` asks for (shapes checked against ``cfg.model``)."""
    from .mnist import load_mnist  # noqa: deferred import keeps the module light

    t, d = cfg.train, cfg.data
    if d.dataset == "mnist":
        images, labels = load_mnist(device)
        m = cfg.model
        if (m.in_channels, m.input_size) != tuple(images.shape[1:3]) or m.num_classes not in (0, 10):
            raise ValueError(f"the bundled MNIST is 1x32x32 with 10 classes; the model expects in_channels={m.in_channels}, "
                             f"input_size={m.input_size}, num_classes={m.num_classes} (use --config mnist)")
        return TensorLoader(images, labels, EpochBatches(images.shape[0], t.global_batch, t.seed), rank, world_size,
                            accumulation)
    if d.source == "images":
        return build_image_loader(cfg, device, rank, world_size, accumulation)
    shards = LatentShards(d.path, verify=d.verify)
    check_latent_shapes(cfg, shards.meta)
    if d.loader == "dali":
        from .dali import DaliLatentLoader
        return DaliLatentLoader(d.path, shards.meta, micro, accumulation, rank, world_size, seed=t.seed, flip=d.flip,
                                scale=d.latent_scale, device=device, shuffle_buffer=d.shuffle_buffer,
                                threads=d.dali_threads)
    batches = EpochBatches(len(shards), t.global_batch, t.seed)
    return LatentLoader(shards, batches, t.seed, d.latent_scale, device, rank, world_size, accumulation, d.num_workers)
