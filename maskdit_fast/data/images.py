"""Image folders, decoding (PIL or NVIDIA DALI) and the ADM centre crop used before VAE encoding."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".jpe", ".jfif"}


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """An ImageNet-style tree ``root/CLASS/**/IMAGE`` -> (class names sorted, [(path relative to
    root, label)] sorted by path); label i is the i-th class. Files directly under ``root`` are
    not part of any class and are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected ROOT/CLASS/IMAGE files, as ImageNet's train/)")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                items.append((path.relative_to(root).as_posix(), label))
    if not items:
        raise ValueError(f"{root}: the class folders hold no images ({sorted(IMAGE_SUFFIXES)})")
    return classes, items


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``image_datasets.center_crop_arr``): halve with a BOX
    filter while the short side is at least ``2 * size``, resize with BICUBIC so that the short side
    is ``size``, then crop the centre ``size x size``. Returns an (size, size, C) uint8 array."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode with PIL, convert to RGB and centre-crop: (size, size, 3) uint8. Raises on bad files."""
    with Image.open(path) as image:
        image.load()
        return center_crop_arr(image.convert("RGB"), size)


class UnreadableImage(RuntimeError):
    """An image file that cannot be decoded; the message names it."""


Decoded = list[tuple[np.ndarray | None, str | None]]


def decode_pil(paths: list[Path], size: int, pool: ThreadPoolExecutor, strict: bool) -> Decoded:
    """Decode and centre-crop with PIL in ``pool``'s threads: [(array (size, size, 3) uint8, None) or
    (None, error)] in the order of ``paths``; ``strict`` raises :class:`UnreadableImage` instead."""
    def one(path):
        try:
            return load_image(path, size), None
        except Exception as err:  # PIL raises many kinds of errors for bad files
            if strict:
                raise UnreadableImage(f"{path}: {type(err).__name__}: {err}") from err
            return None, f"{type(err).__name__}: {err}"
    return list(pool.map(one, paths))


class DaliDecoder:
    """Decode batches of encoded files with DALI (``mixed`` = nvJPEG on the GPU ``device_id``, or
    DALI's CPU decoder when ``device_id`` is None), then crop with PIL so that the crop is exactly
    :func:`center_crop_arr` (DALI's resize filters differ from PIL's). A batch that DALI cannot
    decode is decoded again file by file with PIL to find the bad files. Calls must not overlap
    (one DALI pipeline); ``batch`` is the largest number of files per call."""

    def __init__(self, batch: int, device_id: int | None, threads: int):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
        def pipe():
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(data, device="cpu" if device_id is None else "mixed", output_type=types.RGB)

        self.pipe = pipe()
        self.pipe.build()
        self.batch = batch

    def __call__(self, paths: list[Path], size: int, pool: ThreadPoolExecutor, strict: bool) -> Decoded:
        if len(paths) > self.batch:
            raise ValueError(f"{len(paths)} files for a DALI decoder built for batches of {self.batch}")
        encoded = [np.fromfile(p, dtype=np.uint8) for p in paths]
        encoded += [encoded[-1]] * (self.batch - len(encoded))  # the pipeline's batch size is fixed
        try:
            self.pipe.feed_input("encoded", encoded)
            (out,) = self.pipe.run()
            if hasattr(out, "as_cpu"):
                out = out.as_cpu()
            decoded = [np.array(out[i]) for i in range(len(paths))]
        except Exception:  # some file in the batch is bad: find it with PIL
            return decode_pil(paths, size, pool, strict)
        return list(pool.map(lambda a: (center_crop_arr(Image.fromarray(a), size), None), decoded))


def choose_decoder(name: str, batch: int, device: torch.device, threads: int):
    """``decode_pil`` or a :class:`DaliDecoder` (same call signature). ``name``: ``pil``, ``dali``
    (DALI's GPU decoder on a CUDA ``device``, else its CPU decoder) or ``auto`` (DALI on a GPU when
    it is installed, else PIL: DALI's CPU decoder is no faster than PIL's)."""
    from .dali import dali_available

    if name == "pil":
        return decode_pil
    if not dali_available():
        if name == "dali":
            raise RuntimeError("the DALI image decoder needs NVIDIA DALI: pip install 'maskdit_fast[dali]' "
                               "(nvidia-dali-cuda120), or decode with PIL")
        return decode_pil
    if device.type != "cuda" and name == "auto":
        return decode_pil
    if device.type != "cuda":
        return DaliDecoder(batch, None, threads)
    return DaliDecoder(batch, torch.cuda.current_device() if device.index is None else device.index, threads)
