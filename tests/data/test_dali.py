"""The DALI latent loader in DALI's CPU mode (device_id=None); skipped without nvidia-dali."""
import json

import numpy as np
import pytest
import torch

from maskdit_fast.data.latents import LatentFormatError, RecordLayout, write_meta, write_shard
from maskdit_fast.train.trainer import train
from tests.data.helpers import make_latent_folder
from tests.data.test_train_latents import latent_config
from tests.helpers import assert_same_final_state, train_and_crash

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")
from maskdit_fast.data.dali import DaliLatentLoader  # noqa: E402

SCALE = 0.18215


def dali_loader(path, meta, rank, world=2, micro=4, accumulation=1, flip=False, seed=0):
    return DaliLatentLoader(path, meta, micro, accumulation, rank, world, seed=seed, flip=flip, scale=SCALE,
                            device=torch.device("cpu"), shuffle_buffer=8, threads=1)


def read(loader, start, steps, state=None, keep_state_after=None):
    loader.start(start, start + steps, state)
    out, saved = [], None
    for step in range(start, start + steps):
        out.append([(j, idx, x, y) for j, idx, x, y in loader.step(step)])
        if step == keep_state_after:
            saved = loader.state()
    return out, saved


def test_every_sample_once_per_epoch_across_two_ranks(tmp_path):
    meta, posterior, labels = make_latent_folder(tmp_path, counts=(10, 7, 7))  # 24 = 2 ranks x 3 steps x 4
    ranks = [read(dali_loader(tmp_path, meta, r), 0, 6)[0] for r in range(2)]
    for epoch in range(2):
        seen = [int(i) for r in range(2) for step in ranks[r][3 * epoch:3 * epoch + 3] for _, idx, _, _ in step
                for i in idx]
        assert sorted(seen) == list(range(24)), f"epoch {epoch}"
    for r in range(2):
        for step in ranks[r]:
            ((j, idx, x, y),) = step
            assert j == r and x.shape == (4, 4, 8, 8) and x.dtype == torch.float32
            assert torch.equal(y, torch.from_numpy(labels[idx.numpy()]))
            post = torch.from_numpy(posterior[idx.numpy()]).float()
            eps = (x / SCALE - post[:, 0]) / torch.exp(0.5 * post[:, 1])  # the posterior noise DALI drew
            assert eps.abs().max() < 6 and abs(eps.std().item() - 1) < 0.2


def test_resume_from_the_reader_state_continues_exactly(tmp_path):
    meta, *_ = make_latent_folder(tmp_path, counts=(10, 7, 7))
    straight, saved = read(dali_loader(tmp_path, meta, 1, accumulation=2, micro=2), 0, 5, keep_state_after=1)
    resumed, _ = read(dali_loader(tmp_path, meta, 1, accumulation=2, micro=2), 2, 3, state=saved)
    for a, b in zip(straight[2:], resumed):
        for (j, i, x, y), (j2, i2, x2, y2) in zip(a, b):
            assert j == j2 == j2 and torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)


def test_random_flip(tmp_path):
    layout = RecordLayout((2, 4, 4))
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((16, 1, 2, 4, 4))
    posterior = np.concatenate([mean, np.full_like(mean, -30.0)], axis=1)  # std ~ 3e-7: x = scale * mean
    summary = write_shard(tmp_path, 0, layout, posterior, np.zeros(16, np.int32))
    meta = write_meta(tmp_path, layout, [summary], latent_scale=SCALE, vae=None, resolution=32, flip_copies=False,
                      num_classes=1, seed=0, classes="classes.txt", unreadable=0)
    ((j, idx, x, _),), = read(dali_loader(tmp_path, meta, 0, world=1, micro=16, flip=True), 0, 1)[0]
    plain = SCALE * torch.from_numpy(mean[idx.numpy(), 0]).float().to(torch.float16).float()
    same = (x - plain).abs().flatten(1).amax(1) < 1e-3
    flipped = (x - plain.flip(-1)).abs().flatten(1).amax(1) < 1e-3
    assert (same | flipped).all() and same.any() and flipped.any()


def test_training_with_dali_resumes_exactly(tmp_path, monkeypatch):
    make_latent_folder(tmp_path / "data", counts=(10, 9))
    cfg = latent_config(tmp_path / "data", "data.loader=dali", "data.dali_threads=1", "data.shuffle_buffer=8",
                        "data.flip=true", "train.max_steps=5", "train.ckpt_every=2")
    train(cfg, tmp_path / "straight", progress=False)
    train_and_crash(cfg, tmp_path / "crashed", 3, monkeypatch)
    train(cfg, tmp_path / "crashed", resume=True, progress=False)
    a, _ = assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 5, parts=("model",))
    assert "loader" in a["rng"]["rank0"]


def stream(loader, steps):
    loader.start(0, steps)
    return [int(i) for step in range(steps) for _, idx, _, _ in loader.step(step) for i in idx]


def test_uneven_split_partitions_the_data_set_and_each_rank_cycles_through_all_slices(tmp_path):
    """25 samples over 2 ranks: DALI's contiguous slices [0, 12) and [12, 25); rank r reads slice r,
    then slice r + 1, ... each shuffled, nothing dropped or repeated within a pass."""
    meta, *_ = make_latent_folder(tmp_path, counts=(10, 8, 7))
    streams = [stream(dali_loader(tmp_path, meta, r, micro=3), 17) for r in range(2)]  # 51 samples per rank
    slices = [list(range(0, 12)), list(range(12, 25))]
    for r in range(2):
        s = streams[r]
        first, second = slices[r], slices[1 - r]
        assert sorted(s[:len(first)]) == first
        assert sorted(s[len(first):25]) == second
        assert sorted(s[25:25 + len(first)]) == first  # the next pass: a new shuffle of the same slice
        assert s[25:25 + len(first)] != s[:len(first)]
    assert sorted(streams[0][:12] + streams[1][:13]) == list(range(25))  # the first passes partition the data set


def test_a_reader_position_for_another_setup_is_not_restored(tmp_path, caplog):
    meta, *_ = make_latent_folder(tmp_path, counts=(10, 7, 7))
    _, saved = read(dali_loader(tmp_path, meta, 0, micro=4), 0, 2, keep_state_after=1)
    with caplog.at_level("WARNING"):
        read(dali_loader(tmp_path, meta, 0, micro=2), 2, 1, state=saved)
    assert "micro 4 -> 2" in caplog.text and "not exact" in caplog.text


def test_bad_shards_are_errors_that_name_the_file(tmp_path):
    make_latent_folder(tmp_path / "data", counts=(10, 9))
    cfg = latent_config(tmp_path / "data", "data.loader=dali", "data.dali_threads=1", "data.shuffle_buffer=8",
                        "train.max_steps=6")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    shard = tmp_path / "data" / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    record = 4
    start = record * meta["record_bytes"] + meta["latent_offset"]
    data[start:start + 2] = np.array([np.nan], "<f2").tobytes()  # a NaN in record 4's mean: the sizes are intact
    shard.write_bytes(bytes(data))
    with pytest.raises(FloatingPointError, match="shard-00001.tar record 4"):  # DALI does not parse values
        train(cfg, tmp_path / "run", progress=False)
    shard.write_bytes(bytes(data[:-600]))
    with pytest.raises(LatentFormatError, match="shard-00001.tar.*truncated"):
        train(cfg, tmp_path / "run2", progress=False)
