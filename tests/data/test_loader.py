"""The PyTorch latent loader: exactly the EpochBatches split, fresh posterior samples per epoch,
resume by step; config validation and shape checks."""
import pytest
import torch

from maskdit_fast.config import ConfigError
from maskdit_fast.data.latents import LatentShards, posterior_noise
from maskdit_fast.data.loader import LatentLoader, build_loader
from maskdit_fast.data.sampler import EpochBatches
from tests.data.helpers import make_latent_folder
from tests.helpers import tiny_config

SCALE = 0.18215


@pytest.fixture
def folder(tmp_path):
    meta, posterior, labels = make_latent_folder(tmp_path, counts=(7, 5, 6))  # 18 samples
    return tmp_path, posterior, labels


def loader(path, rank=0, world=1, accumulation=1, workers=0, global_batch=8, seed=3):
    shards = LatentShards(path)
    return LatentLoader(shards, EpochBatches(len(shards), global_batch, seed), seed, SCALE, torch.device("cpu"),
                        rank, world, accumulation, num_workers=workers)


def expected_x(posterior, idx, epoch, seed=3):
    post = torch.from_numpy(posterior[idx.numpy()]).float()
    noise = posterior_noise(seed, epoch, idx, post[0, 0].numel()).view(len(idx), *post.shape[2:])
    return SCALE * (post[:, 0] + torch.exp(0.5 * post[:, 1]) * noise)


def collect(path, steps, start=0, **kwargs):
    data = loader(path, **kwargs)
    data.start(start, start + steps)
    out = {step: list(data.step(step)) for step in range(start, start + steps)}
    data.close()
    return out


@pytest.mark.parametrize("world,accumulation", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_ranks_together_read_exactly_the_global_batch(folder, world, accumulation):
    path, posterior, labels = folder
    batches = EpochBatches(18, 8, 3)  # 2 batches per epoch, 2 samples dropped per epoch
    per_rank = [collect(path, 5, rank=r, world=world, accumulation=accumulation) for r in range(world)]
    for step in range(5):
        parts = sorted((j, idx, x, y) for r in range(world) for j, idx, x, y in per_rank[r][step])
        assert [j for j, *_ in parts] == list(range(world * accumulation))
        idx = torch.cat([p[1] for p in parts])
        assert torch.equal(idx, batches(step))  # the global batch, in order
        x, y = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
        assert torch.allclose(x, expected_x(posterior, idx, step // 2), atol=1e-6)
        assert torch.equal(y, torch.from_numpy(labels[idx.numpy()]))


def test_fresh_posterior_sample_each_epoch(folder):
    path, posterior, _ = folder
    steps = collect(path, 4)  # epochs 0, 0, 1, 1
    seen = {}
    for step, ((_, idx, x, _),) in steps.items():
        for i, row in zip(idx.tolist(), x):
            seen.setdefault(i, []).append((step // 2, row))
    repeated = [rows for rows in seen.values() if len(rows) == 2]
    assert repeated, "some sample must appear in both epochs"
    for (e0, a), (e1, b) in repeated:
        assert e0 != e1 and not torch.allclose(a, b)
        assert torch.allclose(a.mean(), b.mean(), atol=1.0)  # same image, other posterior sample


def test_resume_mid_epoch_continues_with_the_remaining_samples_and_workers_agree(folder):
    path, *_ = folder
    straight = collect(path, 6, world=2, accumulation=2, rank=1)
    resumed = collect(path, 3, start=3, world=2, accumulation=2, rank=1, workers=1)  # step 3: 2nd batch of epoch 1
    for step in (3, 4, 5):
        for (j, i, x, y), (j2, i2, x2, y2) in zip(straight[step], resumed[step], strict=True):
            assert j == j2 and torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)
    # across both ranks, step 2 (read before the stop) and step 3 (after it) are epoch 1 without repeats
    ranks = [collect(path, 1, start=2, world=2, accumulation=2, rank=r) for r in range(2)]
    ranks += [collect(path, 1, start=3, world=2, accumulation=2, rank=r, workers=1) for r in range(2)]
    seen = [int(i) for data in ranks for batch in data.values() for _, idx, _, _ in batch for i in idx]
    assert len(seen) == 16 and sorted(seen) == sorted(EpochBatches(18, 8, 3).epoch_permutation(1)[:16].tolist())


def test_steps_must_be_asked_in_order(folder):
    data = loader(folder[0])
    data.start(0, 5)
    list(data.step(0))
    with pytest.raises(RuntimeError, match="out of step"):
        list(data.step(3))


def test_config_validation_and_shape_checks(folder):
    path, *_ = folder
    with pytest.raises(ConfigError, match="data.loader"):
        tiny_config("data.loader=fast")
    with pytest.raises(ConfigError, match="data.loader.*dataset=latents"):
        tiny_config("data.loader=dali")
    with pytest.raises(ConfigError, match="data.num_workers"):
        tiny_config("data.num_workers=-1")
    latent = ["data.dataset=latents", f"data.path={path}", "model.num_classes=3"]
    with pytest.raises(ConfigError, match=r"4x8x8 latents.*model.in_channels=1, model.input_size=32"):
        build_loader(tiny_config(*latent), torch.device("cpu"), 0, 1, 8, 1)
    shaped = [*latent, "model.in_channels=4", "model.input_size=8", "model.patch_size=2"]
    assert len(build_loader(tiny_config(*shaped), torch.device("cpu"), 0, 1, 8, 1)) == 18
    with pytest.raises(ConfigError, match="3 classes, more than model.num_classes=2"):
        build_loader(tiny_config(*shaped, "model.num_classes=2"), torch.device("cpu"), 0, 1, 8, 1)
    with pytest.raises(ConfigError, match="data.latent_scale"):
        build_loader(tiny_config(*shaped, "data.latent_scale=0.13025"), torch.device("cpu"), 0, 1, 8, 1)
