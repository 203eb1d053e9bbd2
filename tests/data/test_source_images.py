"""``data.source=images``: an image folder decoded, centre-cropped and VAE-encoded on the fly
(PIL, and DALI's CPU decoder when DALI is installed), with a tiny random AutoencoderKL."""
import json

import numpy as np
import pytest
import torch

from maskdit_fast.config import ConfigError
from maskdit_fast.data.images import UnreadableImage, decode_pil, list_image_folder, load_image
from maskdit_fast.data.latents import flip_coins, posterior_noise
from maskdit_fast.data.loader import ImageLoader, build_loader
from maskdit_fast.data.sampler import EpochBatches
from maskdit_fast.train.trainer import train
from tests.data.helpers import make_image_folder
from tests.helpers import assert_same_final_state, train_and_crash, tiny_config

diffusers = pytest.importorskip("diffusers", reason="data.source=images needs diffusers: pip install -e '.[vae]'")
SCALE = 0.18215
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("clean"))  # 12 images, 3 classes


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return diffusers.AutoencoderKL.from_pretrained(tiny_vae).eval().requires_grad_(False)


def image_loader(root, vae, rank=0, world=1, accumulation=1, decoder="pil", flip=True, global_batch=6, seed=3):
    _, items = list_image_folder(root)
    return ImageLoader(root, items, EpochBatches(len(items), global_batch, seed), vae, "tiny", 32, seed, SCALE, flip,
                       CPU, rank, world, accumulation, decoder=decoder, workers=2, dali_threads=1)


def collect(loader, start, steps):
    loader.start(start, start + steps)
    out = {step: list(loader.step(step)) for step in range(start, start + steps)}
    loader.close()
    return out


@torch.no_grad()
def expected_x(root, vae, idx, epoch, seed=3, flip=True):
    """The latent the loader must give: ADM crop (flipped by the sample's coin), encoded one by one."""
    _, items = list_image_folder(root)
    crops = [load_image(root / items[i][0], 32) for i in idx.tolist()]
    if flip:
        crops = [c[:, ::-1] if coin else c for c, coin in zip(crops, flip_coins(seed, epoch, idx))]
    x = torch.from_numpy(np.stack(crops).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    dist = vae.encode(x).latent_dist
    noise = posterior_noise(seed, epoch, idx, dist.mean[0].numel()).view_as(dist.mean)
    return SCALE * (dist.mean + torch.exp(0.5 * dist.logvar) * noise)


def test_two_ranks_read_each_image_once_per_epoch_as_encoded_adm_crops(folder, vae):
    batches = EpochBatches(12, 6, 3)  # 2 steps per epoch
    per_rank = [collect(image_loader(folder, vae, rank=r, world=2), 0, 4) for r in range(2)]
    labels = torch.tensor([label for _, label in list_image_folder(folder)[1]])
    for step in range(4):
        parts = sorted((j, idx, x, y) for r in range(2) for j, idx, x, y in per_rank[r][step])
        assert [j for j, *_ in parts] == [0, 1]
        idx = torch.cat([p[1] for p in parts])
        assert torch.equal(idx, batches(step))  # the global batch, split between the ranks
        x, y = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
        assert x.shape == (6, 4, 4, 4) and x.dtype == torch.float32
        torch.testing.assert_close(x, expected_x(folder, vae, idx, step // 2), atol=1e-5, rtol=1e-4)
        assert torch.equal(y, labels[idx])
    for epoch in range(2):
        seen = [int(i) for step in (2 * epoch, 2 * epoch + 1) for r in range(2) for _, idx, _, _ in per_rank[r][step]
                for i in idx]
        assert sorted(seen) == list(range(12)), f"epoch {epoch}"
    coins = flip_coins(3, 0, torch.arange(12))
    assert coins.any() and not coins.all()  # both flipped and plain images were checked


def test_resume_mid_epoch_with_accumulation_gives_the_same_micro_batches(folder, vae):
    straight = collect(image_loader(folder, vae, accumulation=2), 0, 4)
    resumed = collect(image_loader(folder, vae, accumulation=2), 1, 3)  # step 1: 2nd batch of epoch 0
    for step in (1, 2, 3):
        for (j, i, x, y), (j2, i2, x2, y2) in zip(straight[step], resumed[step], strict=True):
            assert j == j2 and torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)
    data = image_loader(folder, vae)
    data.start(0, 4)
    list(data.step(0))
    with pytest.raises(RuntimeError, match="out of step"):
        list(data.step(2))
    data.close()


def test_dali_decoder_gives_the_same_latents_as_pil(folder, vae):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    pil = collect(image_loader(folder, vae, world=1, accumulation=2), 0, 2)
    dali = collect(image_loader(folder, vae, world=1, accumulation=2, decoder="dali"), 0, 2)  # DALI's CPU decoder
    for step in (0, 1):
        for (j, i, x, y), (j2, i2, x2, y2) in zip(pil[step], dali[step], strict=True):
            assert j == j2 and torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)  # PNG: same pixels


def test_an_unreadable_image_stops_with_its_name(image_dir, vae):
    data = image_loader(image_dir, vae, global_batch=13)  # one epoch is one batch: it holds broken.png
    data.start(0, 1)
    with pytest.raises(UnreadableImage, match=r"n02/broken.png.*prepare"):
        list(data.step(0))
    data.close()


def images_config(root, vae_path, *overrides):
    return tiny_config("data.dataset=latents", "data.source=images", f"data.path={root}", f"data.vae={vae_path}",
                       "data.num_workers=1", "model.in_channels=4", "model.input_size=4", "model.patch_size=2",
                       "model.num_classes=3", "train.global_batch=4", *overrides)


def test_config_keys_and_checks_name_the_key(folder, tiny_vae):
    with pytest.raises(ConfigError, match="data.source"):
        tiny_config("data.source=jpegs")
    with pytest.raises(ConfigError, match="data.source.*dataset=latents"):
        tiny_config("data.source=images", "data.vae=x")
    with pytest.raises(ConfigError, match="data.vae.*source=images"):
        tiny_config("data.dataset=latents", "data.source=images", f"data.path={folder}")
    with pytest.raises(ConfigError, match="data.vae.*4-channel latents, but model.in_channels=1"):
        build_loader(images_config(folder, tiny_vae, "model.in_channels=1"), CPU, 0, 1, 4, 1)
    with pytest.raises(ConfigError, match="data.latent_scale.*0.13025"):
        build_loader(images_config(folder, tiny_vae, "data.latent_scale=0.13025"), CPU, 0, 1, 4, 1)
    with pytest.raises(ConfigError, match="3 class folders, more than model.num_classes=2"):
        build_loader(images_config(folder, tiny_vae, "model.num_classes=2"), CPU, 0, 1, 4, 1)
    loader = build_loader(images_config(folder, tiny_vae, "model.input_size=8"), CPU, 0, 1, 4, 1)
    assert isinstance(loader, ImageLoader) and len(loader) == 12 and loader.resolution == 64  # 8 x the VAE's 8
    assert loader.decode is decode_pil and loader.vae == str(tiny_vae)


def test_dali_decoding_falls_back_to_pil_without_dali(folder, tiny_vae, monkeypatch, caplog):
    import maskdit_fast.data.dali as dali
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    with caplog.at_level("WARNING"):
        loader = build_loader(images_config(folder, tiny_vae, "data.loader=dali"), CPU, 0, 1, 4, 1)
    assert loader.decode is decode_pil and "decoded with PIL" in caplog.text


def test_training_from_images_resumes_exactly(tmp_path, folder, tiny_vae, monkeypatch):
    cfg = images_config(folder, tiny_vae, "data.flip=true", "train.max_steps=5", "train.ckpt_every=2",
                        "train.log_every=1")
    train(cfg, tmp_path / "straight", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5] and all(np.isfinite(r["loss"]) for r in lines)
    assert (tmp_path / "straight" / "samples" / "step-0000005.png").is_file()  # decoded with data.vae
    train_and_crash(cfg, tmp_path / "crashed", 3, monkeypatch)
    train(cfg, tmp_path / "crashed", resume=True, progress=False)
    assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 5)
