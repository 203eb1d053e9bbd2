"""`python -m maskdit_fast.eval generate`: the sample batch an FID is computed from, made reproducible.

    python -m maskdit_fast.eval generate --ckpt C --num 50000 --cfg-scale 1.5 --steps 40 --out DIR
    torchrun --nproc_per_node 8 -m maskdit_fast.eval generate --num-samples 50000 ...   # same images

(torchrun parses its own options first and rejects ``--num`` as an ambiguous prefix of its
``--numa-binding``; ``--num-samples`` is the same option under a name it leaves alone.)

Image i (0 <= i < num) is a pure function of the checkpoint, the sampler settings and i: its noise
comes from its own generator seeded ``SEED + i`` and its class is ``(SEED + i) % num_classes``
(``maskdit_fast.generate.seed_labels``: consecutive seeds are class-balanced). So the result does
not depend on the batch size, the number of processes or how often the run was interrupted.

The work is cut into chunks of ``--chunk`` consecutive images. Rank 0 decides which chunks are
missing and the processes take them round-robin. A chunk is written as ``DIR/chunks/chunk-XXXXX.npz``
(``arr_0``, ``labels``, ``seeds``) by an atomic rename once complete, after its PNGs, so a chunk file
exists only when the chunk is finished and a rerun skips it. At the end rank 0 merges the chunks
into ``DIR/samples.npz`` (ADM layout: ``arr_0`` uint8 (N, H, W, C), plus ``labels`` for conditional
models, as ``maskdit_fast.generate.save_npz`` writes), also atomically.

``DIR/manifest.json`` records what made the images (checkpoint SHA-256, sampler, steps, guidance,
precision, seeds, label scheme, chunk size, VAE, package and torch versions, world size). The keys
in ``RESUME_KEYS`` must match for a rerun to resume in the same DIR; otherwise it stops and asks for
another ``--out``, so one DIR never mixes images of two settings.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from maskdit_fast._version import __version__
from maskdit_fast.config import SOLVERS, SampleConfig
from maskdit_fast.data.vae import decode_latents, load_vae
from maskdit_fast.dist import processes
from maskdit_fast.errors import UserError
from maskdit_fast.files import atomic_write
from maskdit_fast.generate import generate, open_for_sampling, seed_labels, to_uint8_nhwc
from maskdit_fast.models.precision import resolve_precision

MANIFEST_FORMAT = "maskdit_fast/eval-generate-v1"
PRECISIONS = ("auto", "bf16", "fp32")
# Everything that changes the images; a rerun must agree on all of them to resume in the same DIR.
RESUME_KEYS = ("format", "checkpoint_sha256", "sampler", "solver", "steps", "cfg_scale", "guidance", "sigma_min",
               "sigma_max", "rho", "precision", "num", "seed_first", "seed_last", "label_scheme", "chunk", "vae",
               "latent_scale")


KEYS_ADDED_SINCE_V1 = {"guidance": "standard"}  # what a manifest written before the key existed used
SAMPLER_NAMES = {"heun": "edm-deterministic", "euler": "edm-deterministic",  # EDM probability-flow ODE, no churn
                 "ddpm": "ddpm-ancestral", "ddim": "ddim"}  # DiT's schedule respaced to `steps`


class GenerateError(UserError):
    """A bad request or an output folder that cannot be resumed; the message says what to do."""


@dataclass
class GenerateRequest:
    ckpt: str | Path
    out: str | Path
    num: int = 50_000
    seed: int = 0                    # image i uses seed SEED + i
    chunk: int = 1000                # images per chunk file (the unit of work and of resumption)
    batch: int = 64                  # images per network batch, per process
    steps: int | None = None         # None: the checkpoint's sampler settings
    cfg_scale: float | None = None
    solver: str | None = None        # heun | euler | ddpm | ddim (the --sampler flag)
    guidance: str | None = None      # standard | dit (DDPM checkpoints)
    precision: str = "auto"          # auto = bf16 autocast on CUDA, fp32 elsewhere
    vae: str | None = None           # None: the checkpoint's VAE (latent models only)
    png: bool = True                 # also write DIR/images/XXXXXX.png
    device: str = "auto"
    progress: bool = True


@dataclass
class GenerateSummary:
    out: Path
    samples: Path | None             # DIR/samples.npz (on rank 0; None on the other ranks)
    generated_chunks: list[int] = field(default_factory=list)  # chunks this process sampled in this run
    manifest: dict = field(default_factory=dict)


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint file; for a directory (a sharded training state), of its files in sorted
    order: each contributes its relative path, a NUL byte and its own SHA-256 digest."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + _file_sha256(file).digest())
    return digest.hexdigest()


def _file_sha256(path: Path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest


def chunk_range(index: int, chunk: int, num: int) -> range:
    """Sample indices of chunk ``index``."""
    return range(index * chunk, min(num, (index + 1) * chunk))


def chunk_path(out: Path, index: int) -> Path:
    return out / "chunks" / f"chunk-{index:05d}.npz"


def png_path(out: Path, i: int) -> Path:
    return out / "images" / f"{i:06d}.png"


def generate_samples(request: GenerateRequest) -> GenerateSummary:
    """Generate (or finish) ``request.num`` images in ``request.out``; see the module docstring.
    Joins torchrun's process group when launched by torchrun."""
    _validate(request)
    with processes("auto", request.device) as env:
        return _generate(request, Path(request.out), env.rank, env.world_size, env.device)


def _validate(req: GenerateRequest) -> None:
    for name in ("num", "chunk", "batch"):
        if getattr(req, name) < 1:
            raise GenerateError(f"--{name} must be >= 1, got {getattr(req, name)}")
    if req.steps is not None and req.steps < 1:
        raise GenerateError(f"--steps must be >= 1, got {req.steps}")
    if req.seed < 0:
        raise GenerateError(f"--seed must be >= 0, got {req.seed}")
    if not Path(req.ckpt).exists():
        raise GenerateError(f"checkpoint {req.ckpt} does not exist")
    if req.device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda, but no CUDA device is visible")
    if req.precision not in PRECISIONS:
        raise GenerateError(f"--precision must be one of {', '.join(PRECISIONS)}, got {req.precision!r}")


def _generate(req: GenerateRequest, out: Path, rank: int, world: int, device: torch.device) -> GenerateSummary:
    try:
        opened = open_for_sampling(req.ckpt, device, req.steps, req.cfg_scale, req.solver, req.vae, req.guidance)
    except ValueError as err:
        raise GenerateError(str(err)) from err
    net, sample_cfg, vae, latent_scale = opened.net, opened.sample, opened.vae, opened.latent_scale
    model_cfg = net.model.cfg
    precision = resolve_precision(req.precision, device)
    n_chunks = -(-req.num // req.chunk)

    # Rank 0 checks or writes the manifest and lists the missing work; every rank learns the outcome.
    plan: dict = {}
    if rank == 0:
        try:
            manifest = _manifest(req, sample_cfg, model_cfg.num_classes, vae, latent_scale, precision, world, device)
            plan = {"manifest": _prepare_out_dir(out, manifest), **_missing_work(out, req, n_chunks)}
        except GenerateError as err:
            plan = {"error": str(err)}
    if world > 1:
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    if "error" in plan:
        raise GenerateError(plan["error"])
    if rank == 0 and req.progress:
        print(f"{out}: {n_chunks - len(plan['todo'])} of {n_chunks} chunks done; sampling {len(plan['todo'])} "
              f"on {world} process(es)", file=sys.stderr)

    mine, pngs_only = plan["todo"][rank::world], plan["png_todo"][rank::world]
    vae_model = None
    if vae and mine:
        try:
            vae_model = load_vae(vae, device)
        except RuntimeError as err:
            raise GenerateError(str(err)) from err
    total = sum(len(chunk_range(c, req.chunk, req.num)) for c in mine)
    bar = tqdm(total=total, unit="img", desc=f"rank 0 of {world}", disable=not (req.progress and rank == 0))
    for index in mine:
        indices = chunk_range(index, req.chunk, req.num)
        seeds = [req.seed + i for i in indices]
        labels = seed_labels(seeds, net.num_classes)
        images = []
        for start in range(0, len(seeds), req.batch):
            batch_seeds = seeds[start:start + req.batch]
            batch_labels = None if labels is None else labels[start:start + len(batch_seeds)]
            x = generate(net, batch_seeds, batch_labels, sample_cfg, batch_size=len(batch_seeds), precision=precision)
            if vae_model is not None:
                x = decode_latents(vae_model, x, latent_scale)  # outside autocast: the VAE decodes in fp32
            images.append(to_uint8_nhwc(x))
            bar.update(len(batch_seeds))
        images = np.concatenate(images)
        if req.png:
            _write_pngs(out, indices, images)
        arrays = {"arr_0": images, "seeds": np.asarray(seeds, dtype=np.int64)}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        _save_npz_atomic(chunk_path(out, index), arrays)
    bar.close()
    for index in pngs_only:
        with np.load(chunk_path(out, index)) as data:
            _write_pngs(out, chunk_range(index, req.chunk, req.num), data["arr_0"], missing_only=True)

    if world > 1:
        dist.barrier()
    summary = GenerateSummary(out, None, list(mine), plan["manifest"])
    if rank == 0:
        summary.samples = out / "samples.npz"
        if plan["todo"] or not summary.samples.exists():
            _merge(out, req, n_chunks)
        if req.progress:
            print(f"wrote {summary.samples} ({req.num} images)", file=sys.stderr)
    return summary


def _manifest(req: GenerateRequest, cfg: SampleConfig, num_classes: int, vae: str | None, latent_scale: float,
              precision: str, world: int, device: torch.device) -> dict:
    labels = (f"class of image i = (seed_first + i) mod {num_classes} (seed_labels: class-balanced)" if num_classes
              else "none (unconditional model)")
    return {
        "format": MANIFEST_FORMAT,
        "checkpoint": str(Path(req.ckpt).resolve()),
        "checkpoint_sha256": checkpoint_sha256(req.ckpt),
        "sampler": SAMPLER_NAMES[cfg.solver] + (f" eta={cfg.ddim_eta}" if cfg.solver == "ddim" else ""),
        "solver": cfg.solver,
        "steps": cfg.num_steps,
        "cfg_scale": cfg.cfg_scale,
        "guidance": cfg.guidance,
        "sigma_min": cfg.sigma_min,
        "sigma_max": cfg.sigma_max,
        "rho": cfg.rho,
        "precision": precision,
        "num": req.num,
        "seed_first": req.seed,
        "seed_last": req.seed + req.num - 1,
        "label_scheme": labels,
        "num_classes": num_classes,
        "chunk": req.chunk,
        "vae": vae,
        "latent_scale": latent_scale if vae else None,
        "quantisation": "uint8 = clip(x * 127.5 + 128, 0, 255), truncated (x in [-1, 1])",
        **_environment(req, world, device),
    }


def _environment(req: GenerateRequest, world: int, device: torch.device) -> dict:
    """Facts about one invocation (not compared on resume)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"maskdit_fast_version": __version__, "torch_version": torch.__version__,
            "world_size": world, "batch": req.batch, "device": name, "precision_requested": req.precision}


def _prepare_out_dir(out: Path, manifest: dict) -> dict:
    """Write the manifest of a new DIR, or check that an existing one matches (then log the resume in it)."""
    path = out / "manifest.json"
    if not path.exists():
        if any(chunk_path(out, 0).parent.glob("chunk-*.npz")):
            raise GenerateError(f"{out} holds chunks but no manifest.json, so their settings are unknown; "
                                "use another --out")
        _write_json_atomic(path, manifest)
        return manifest
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GenerateError(f"{path} cannot be read ({err}); use another --out") from err
    old = {**KEYS_ADDED_SINCE_V1, **old}
    differences = [f"{key}: {old.get(key)!r} there, {manifest[key]!r} now" for key in RESUME_KEYS
                   if old.get(key) != manifest[key]]
    if differences:
        raise GenerateError(f"{out} holds samples made with other settings ({'; '.join(differences)}). "
                            "Refusing to mix them: use another --out (or delete that directory to start over).")
    environment = _environment_keys(manifest)
    if any(old.get(key) != value for key, value in environment.items()):
        old.setdefault("resumed_by", []).append(environment)
        _write_json_atomic(path, old)
    return old


def _environment_keys(manifest: dict) -> dict:
    keys = ("maskdit_fast_version", "torch_version", "world_size", "batch", "device", "precision_requested")
    return {key: manifest[key] for key in keys}


def _missing_work(out: Path, req: GenerateRequest, n_chunks: int) -> dict:
    """Chunks to sample (no chunk file yet) and finished chunks whose PNGs are incomplete."""
    todo = [c for c in range(n_chunks) if not chunk_path(out, c).exists()]
    png_todo = []
    if req.png:
        png_todo = [c for c in sorted(set(range(n_chunks)) - set(todo))
                    if not all(png_path(out, i).exists() for i in chunk_range(c, req.chunk, req.num))]
    return {"todo": todo, "png_todo": png_todo}


def _write_pngs(out: Path, indices: range, images: np.ndarray, missing_only: bool = False) -> None:
    png_path(out, 0).parent.mkdir(parents=True, exist_ok=True)
    for i, image in zip(indices, images):
        path = png_path(out, i)
        if not (missing_only and path.exists()):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def _merge(out: Path, req: GenerateRequest, n_chunks: int) -> None:
    """Concatenate the chunks, in order, into DIR/samples.npz (checking each chunk's seeds)."""
    images, labels = None, None
    for index in range(n_chunks):
        indices = chunk_range(index, req.chunk, req.num)
        path = chunk_path(out, index)
        if not path.exists():
            raise GenerateError(f"{path} is missing after all processes finished; rerun to resume")
        with np.load(path) as data:
            if not np.array_equal(data["seeds"], np.arange(req.seed + indices.start, req.seed + indices.stop)):
                raise GenerateError(f"{path} holds other seeds than expected; use another --out")
            if images is None:
                images = np.empty((req.num, *data["arr_0"].shape[1:]), dtype=np.uint8)
                labels = np.empty(req.num, dtype=np.int64) if "labels" in data else None
            images[indices.start:indices.stop] = data["arr_0"]
            if labels is not None:
                labels[indices.start:indices.stop] = data["labels"]
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["labels"] = labels
    _save_npz_atomic(out / "samples.npz", arrays)


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)

    atomic_write(path, write, needed=sum(a.nbytes for a in arrays.values()))


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


# ---- command line (registered in maskdit_fast/eval/__main__.py) ----

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="EMA .safetensors (or a training state checkpoints/step-*)")
    parser.add_argument("--out", required=True, help="output directory (rerun with the same settings to resume)")
    # torchrun's own parser rejects "--num" (an ambiguous prefix of its --numa-binding): spell it --num-samples there
    parser.add_argument("--num", "--num-samples", dest="num", type=int, default=50_000,
                        help="number of images (default 50000); under torchrun write --num-samples")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i and class (SEED+i) %% classes")
    parser.add_argument("--steps", type=int, default=None,
                        help="EDM time steps, or DDPM/DDIM steps out of 1000 (default: the checkpoint's)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    parser.add_argument("--sampler", "--solver", dest="solver", choices=SOLVERS, default=None,
                        help="heun | euler (EDM) | ddpm (ancestral, DiT's) | ddim (default: the checkpoint's)")
    parser.add_argument("--guidance", choices=("standard", "dit"), default=None,
                        help="standard: every eps channel guided; dit: the official DiT's first 3 channels "
                             "(DDPM checkpoints; default: the checkpoint's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="network autocast: auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=64, help="images per network batch, per process (default 64)")
    parser.add_argument("--chunk", type=int, default=1000, help="images per chunk file (unit of resumption)")
    parser.add_argument("--vae", default=None, help="AutoencoderKL id or local folder for latent models "
                                                     "(default: the checkpoint's)")
    parser.add_argument("--png", action=argparse.BooleanOptionalAction, default=True,
                        help="also write DIR/images/XXXXXX.png (default: yes)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def request_from_args(args: argparse.Namespace) -> GenerateRequest:
    names = GenerateRequest.__dataclass_fields__
    return GenerateRequest(**{name: getattr(args, name) for name in names})
