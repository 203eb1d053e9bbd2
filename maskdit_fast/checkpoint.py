"""Sampling checkpoints: one safetensors file of EMA weights with the model config in its metadata.

``load_checkpoint(path)`` returns a :class:`Denoiser` in eval mode (an :class:`EDMPrecond`, or a
:class:`DDPMPrecond` for ``model.diffusion=ddpm`` networks such as converted official DiTs), ready
for ``net(x, sigma, class_labels=None, cfg_scale=None)``. It also reads a training state
(``checkpoints/step-*/``, sharded, or an earlier version's ``step-*.pt``), taking its EMA weights.

Export a training state (or a run's newest one) to the single file ``sample.py`` reads::

    python -m maskdit_fast.checkpoint export runs/in256 runs/in256/ema-step-100000.safetensors
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, config_to_dict, model_config_from_dict, router_config_from_dict
from .data.vae import LATENT_SCALE
from .diffusion.denoiser import Denoiser
from .diffusion.edm import build_net
from .errors import ArgumentParser, UserError
from .files import atomic_write
from .integrity import DIGEST_KEY, tensors_sha256
from .storage import latest_training_state, load_training_state

FORMAT = "maskdit_fast/edm-precond-v1"


def save_safetensors(path: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig, extra: dict | None = None) -> None:
    """Write ``state`` (a Denoiser's state dict) with the model config as metadata, atomically."""
    metadata = {"format": FORMAT, "model_config": json.dumps(config_to_dict(cfg))}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata[DIGEST_KEY] = tensors_sha256(tensors, metadata)
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                 needed=sum(t.numel() * t.element_size() for t in tensors.values()))


def ema_metadata(config: dict, step: int) -> dict:
    """Extra safetensors metadata of an EMA export: step, VAE and sampler settings of the run
    (``config``: the run's config as a plain dict)."""
    return {"step": step, "vae": config["data"]["vae"], "latent_scale": config["data"]["latent_scale"],
            "sample_config": config["sample"]}


def export_ema(state_path: str | Path, out: str | Path) -> Path:
    """Write the EMA weights of a training state (a ``checkpoints/step-*`` entry, or a run directory
    for its newest one) as a safetensors file; returns the state exported. One process; sharded
    states are gathered."""
    state_path = Path(state_path)
    if (state_path / "checkpoints").is_dir():
        run_dir, state_path = state_path, latest_training_state(state_path)
        if state_path is None:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint yet")
    if not state_path.exists():
        raise FileNotFoundError(f"training state {state_path} does not exist")
    state = load_training_state(state_path, parts=("ema",))
    config = state["config"]
    save_safetensors(out, state["ema"], model_config_from_dict(config["model"]), ema_metadata(config, state["step"]))
    return state_path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, str]]:
    """(state dict, model config, raw metadata) of a file written by :func:`save_safetensors`."""
    metadata, state = read_safetensors_file(path)
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a maskdit_fast checkpoint (metadata format={metadata.get('format')!r}); "
                        "official MaskDiT / DiT .pt files must be converted first: "
                        "python -m maskdit_fast.convert official-maskdit|official-dit IN.pt OUT.safetensors")
    return state, model_config_from_dict(json.loads(metadata["model_config"])), metadata


def read_safetensors_file(path: str | Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of any safetensors file, its checksum verified when it has one (only with
    ``tensors``); a damaged file is a UserError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}): it is empty, truncated or damaged; "
                        "export or download it again") from None
    if tensors and DIGEST_KEY in metadata and tensors_sha256(state, metadata) != metadata[DIGEST_KEY]:
        raise UserError(f"{path} is damaged: its contents do not match the checksum written with them; export it "
                        "again from a training state (python -m maskdit_fast.checkpoint export RUN OUT)")
    return metadata, state


def check_weights_fit(net: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """A UserError naming what differs (missing, unexpected, reshaped tensors) unless ``weights``
    load into ``net`` exactly."""
    ours = net.state_dict()
    missing, unexpected = sorted(ours.keys() - weights.keys()), sorted(weights.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & weights.keys() if ours[k].shape != weights[k].shape)
    if not (missing or unexpected or reshaped):
        return
    parts = [f"{len(names)} {kind} (e.g. {', '.join(names[:3])})" for kind, names in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if names]
    raise UserError(f"{source}: its weights do not fit this model: {'; '.join(parts)} tensors; it is another "
                    "architecture or size: use the --config and model overrides it was trained with")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Denoiser:
    """The EMA network of a safetensors checkpoint or training state, in eval mode on ``device``.

    A DyDiT fine-tune's safetensors (a ``dydit`` metadata entry) gives the DyDiT network, whose
    eval mode runs the sliced / packed fast path (:mod:`maskdit_fast.dydit`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        state, cfg, metadata = read_safetensors(path)
    elif path.is_dir() or path.suffix == ".pt":
        training = load_training_state(path, parts=("ema",))
        state, cfg = training["ema"], model_config_from_dict(training["config"]["model"])
    else:
        raise UserError(f"{path} is not a checkpoint: pass an .safetensors file (a run's ema.safetensors) or a "
                        "training state folder (checkpoints/step-XXXXXXX)")
    router = router_config_from_dict(json.loads(metadata["dydit"])) if "dydit" in metadata else None
    net = build_net(cfg, router)
    check_weights_fit(net, state, str(path))
    net.load_state_dict(state)
    return net.to(device).eval().requires_grad_(False)


class StoredSampling(NamedTuple):
    """What a checkpoint says about sampling it: sampler settings (a ``SampleConfig`` dict), the VAE
    that decodes a latent model (hub id or folder; None for pixel models) and its latent scale."""

    sampler: dict
    vae: str | None
    latent_scale: float


def sample_settings(path: str | Path) -> StoredSampling:
    """Sampler settings, VAE and latent scale stored with a checkpoint (defaults: 18 Heun steps, no
    guidance, Stable Diffusion's scale 0.18215)."""
    settings = {"num_steps": 18, "cfg_scale": 1.0}
    if Path(path).suffix == ".safetensors":
        _, _, metadata = read_safetensors(path)
        settings.update(json.loads(metadata.get("sample_config", "{}")))
        return StoredSampling(settings, json.loads(metadata.get("vae", "null")),
                              float(json.loads(metadata.get("latent_scale", "null")) or LATENT_SCALE))
    config = load_training_state(path, parts=())["config"]
    return StoredSampling({**settings, **config["sample"]}, config["data"].get("vae"),
                          float(config["data"].get("latent_scale") or LATENT_SCALE))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m maskdit_fast.checkpoint",
                                     description="Checkpoint tools. export: a training state's EMA weights + config "
                                                 "as the single safetensors file that sample.py and load_checkpoint read.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="training state (or run directory: its newest) -> EMA safetensors")
    export.add_argument("state", help="checkpoints/step-XXXXXXX of a run, or the run directory")
    export.add_argument("out", help="output .safetensors path")
    args = parser.parse_args(argv)
    with parser.user_errors():
        exported = export_ema(args.state, args.out)
    print(f"wrote {args.out} (EMA weights of {exported})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
