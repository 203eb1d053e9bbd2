"""`python -m maskdit_fast.eval generate`: images fixed by their seeds whatever the batch size and the
number of ranks, resumption that regenerates only missing chunks, and refusal to mix settings in one DIR."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import maskdit_fast.eval.generate_samples as generate_samples_module
from maskdit_fast.checkpoint import save_safetensors
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.eval.__main__ import main
from maskdit_fast.eval.generate_samples import (
    GenerateError,
    GenerateRequest,
    checkpoint_sha256,
    generate_samples,
)
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
# sigma_max 2 keeps 2 Heun steps from saturating the images, so the comparisons below see real pixel values
SAMPLER = {"num_steps": 2, "solver": "heun", "cfg_scale": 2.0, "sigma_max": 2.0}
ARGS = ["--num", "10", "--chunk", "4", "--seed", "5", "--no-progress"]  # chunks of 4, 4 and 2 images


def write_checkpoint(path: Path, seed: int) -> Path:
    """A tiny untrained MaskDiT, its weights perturbed so that the network's output matters."""
    cfg = tiny_config().model
    torch.manual_seed(seed)
    net = build_net(cfg)
    for p in net.parameters():
        if p.requires_grad:
            p.data += 0.05 * torch.randn_like(p)
    save_safetensors(path, net.state_dict(), cfg, {"sample_config": SAMPLER})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory) -> Path:
    """One process, 3 images per batch."""
    out = tmp_path_factory.mktemp("gen") / "batch3"
    main(["generate", "--ckpt", str(ckpt), "--out", str(out), "--batch", "3", *ARGS])
    return out


def load(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "samples.npz") as data:
        return dict(data)


def test_samples_are_seeded_balanced_and_independent_of_the_batch_size(ckpt, reference, tmp_path):
    ref = load(reference)
    assert ref["arr_0"].shape == (10, 32, 32, 1) and ref["arr_0"].dtype == np.uint8
    assert ref["labels"].tolist() == [(5 + i) % 10 for i in range(10)]
    assert 0.3 < ((ref["arr_0"] > 0) & (ref["arr_0"] < 255)).mean()  # not saturated: a meaningful comparison
    assert np.array_equal(np.asarray(Image.open(reference / "images" / "000007.png")), ref["arr_0"][7, :, :, 0])
    assert sorted(p.name for p in (reference / "chunks").iterdir()) == [f"chunk-0000{i}.npz" for i in range(3)]

    summary = generate_samples(GenerateRequest(ckpt, tmp_path, num=10, chunk=4, seed=5, batch=10, png=False,
                                               progress=False))
    other = load(tmp_path)
    assert np.array_equal(other["arr_0"], ref["arr_0"]) and np.array_equal(other["labels"], ref["labels"])
    assert summary.generated_chunks == [0, 1, 2] and not (tmp_path / "images").exists()

    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == checkpoint_sha256(ckpt)
    assert (manifest["solver"], manifest["steps"], manifest["cfg_scale"], manifest["sigma_max"]) == ("heun", 2, 2.0, 2.0)
    assert (manifest["num"], manifest["seed_first"], manifest["seed_last"], manifest["chunk"]) == (10, 5, 14, 4)
    assert manifest["precision"] == "fp32" and manifest["world_size"] == 1 and manifest["maskdit_fast_version"]


def test_resume_regenerates_only_missing_chunks(ckpt, reference, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(reference, out)
    (out / "chunks" / "chunk-00001.npz").unlink()
    (out / "samples.npz").unlink()
    (out / "images" / "000009.png").unlink()  # chunk 2 is finished but lost a PNG: rewritten from the chunk
    kept = {name: (out / "chunks" / name).stat().st_mtime_ns for name in ("chunk-00000.npz", "chunk-00002.npz")}
    summary = generate_samples(GenerateRequest(ckpt, out, num=10, chunk=4, seed=5, batch=2, progress=False))
    assert summary.generated_chunks == [1]
    assert {name: (out / "chunks" / name).stat().st_mtime_ns for name in kept} == kept
    assert np.array_equal(load(out)["arr_0"], load(reference)["arr_0"])
    assert (out / "images" / "000009.png").is_file()
    assert json.loads((out / "manifest.json").read_text())["resumed_by"][0]["batch"] == 2
    # nothing missing: nothing sampled
    assert generate_samples(GenerateRequest(ckpt, out, num=10, chunk=4, seed=5, progress=False)).generated_chunks == []


def test_a_manifest_written_before_the_guidance_key_still_resumes(ckpt, reference, tmp_path):
    out = tmp_path / "older"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["guidance"]  # as written before DDPM sampling existed: guidance was always standard
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "chunks" / "chunk-00002.npz").unlink()
    summary = generate_samples(GenerateRequest(ckpt, out, num=10, chunk=4, seed=5, progress=False))
    assert summary.generated_chunks == [2]
    with pytest.raises(GenerateError, match="DDPM-trained"):  # the official DiT's guidance needs a DDPM model
        generate_samples(GenerateRequest(ckpt, out, num=10, chunk=4, seed=5, guidance="dit", progress=False))


def test_other_settings_or_checkpoint_in_the_same_dir_are_refused(ckpt, reference, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in (reference / "manifest.json", reference / "samples.npz")}
    with pytest.raises(GenerateError, match=r"cfg_scale: 2\.0 there, 1\.5 now.*another --out"):
        generate_samples(GenerateRequest(ckpt, reference, num=10, chunk=4, seed=5, cfg_scale=1.5, progress=False))
    with pytest.raises(GenerateError, match="seed_first"):
        generate_samples(GenerateRequest(ckpt, reference, num=10, chunk=4, seed=6, progress=False))
    other = write_checkpoint(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", str(other), "--out", str(reference), *ARGS])
    assert exit_info.value.code == 2 and "checkpoint_sha256" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (reference / "manifest.json", reference / "samples.npz")} == before


@pytest.mark.parametrize("args, message", [
    (["--num", "0"], "--num must be >= 1"),
    (["--chunk", "0"], "--chunk must be >= 1"),
    (["--ckpt", "missing.safetensors"], "missing.safetensors does not exist"),
])
def test_bad_requests_are_clear_errors(ckpt, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_checkpoint_directory_hash_covers_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    (tmp_path / "a" / "y.bin").write_bytes(b"2")
    first = checkpoint_sha256(tmp_path / "a")
    (tmp_path / "a" / "y.bin").write_bytes(b"3")
    assert checkpoint_sha256(tmp_path / "a") != first
    (tmp_path / "a" / "y.bin").write_bytes(b"2")
    assert checkpoint_sha256(tmp_path / "a") == first
    (tmp_path / "a" / "y.bin").rename(tmp_path / "a" / "z.bin")
    assert checkpoint_sha256(tmp_path / "a") != first


def test_two_gloo_ranks_give_the_same_samples_as_one_process(ckpt, reference, tmp_path):
    out = tmp_path / "two-ranks"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "maskdit_fast.eval", "generate", "--ckpt", str(ckpt), "--out", str(out),
                          "--batch", "4", "--device", "cpu", "--num-samples", "10", *ARGS[2:]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    # gloo may abort at process exit: judge by the files written, not the return code
    assert (out / "samples.npz").is_file(), run.stdout[-2000:] + run.stderr[-4000:]
    two, one = load(out), load(reference)
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["labels"], one["labels"])
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    assert len(list((out / "images").glob("*.png"))) == 10


def test_generate_options_pass_through_torchruns_parser():
    """torchrun's parser sees the script's options too and rejects ambiguous prefixes of its own."""
    from torch.distributed.run import get_args_parser

    from maskdit_fast.eval.__main__ import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    options = [o for action in generate._actions for o in action.option_strings if o not in ("-h", "--help", "--num")]
    args = get_args_parser().parse_args(["--standalone", "-m", "maskdit_fast.eval", "generate", *options])
    assert args.training_script_args == ["generate", *options]


class FakeVAE(torch.nn.Module):
    """Stands in for diffusers' AutoencoderKL: decode(z).sample is a fixed 4 -> 3 channel map, upsampled x8."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(4, 3, 1)

    def decode(self, z: torch.Tensor):
        return type("Decoded", (), {"sample": torch.tanh(F.interpolate(self.proj(z), scale_factor=8))})()


def test_latent_models_are_decoded_by_the_vae(tmp_path, monkeypatch):
    cfg = tiny_config("model.in_channels=4", "model.input_size=8").model
    save_safetensors(tmp_path / "latent.safetensors", build_net(cfg).state_dict(), cfg, {"sample_config": SAMPLER})
    request = GenerateRequest(tmp_path / "latent.safetensors", tmp_path / "out", num=3, progress=False)
    with pytest.raises(GenerateError, match="pass --vae"):
        generate_samples(request)
    loaded = []
    monkeypatch.setattr(generate_samples_module, "load_vae", lambda name, device: loaded.append(name) or FakeVAE())
    request.vae = "some/vae"
    generate_samples(request)
    images = load(tmp_path / "out")["arr_0"]
    assert loaded == ["some/vae"] and images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["vae"] == "some/vae"
