"""The DALI latent loader in DALI's CPU mode (device_id=None); skipped without nvidia-dali."""
import re

import numpy as np
import pytest
import torch

from maskdit_fast.data.latents import LatentFormatError, RecordLayout, write_meta, write_shard
from maskdit_fast.train.trainer import train
from tests.data.helpers import CORRUPTIONS, corrupt, make_latent_folder, read_steps
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


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_dali_names_the_bad_record_at_start_with_verify_else_when_read(tmp_path, kind):
    """As the PyTorch loader (tests/data/test_latents.py): 12 records, one pass of 3 steps of 4. DALI
    reads the members where its index points; a member of another size fails inside DALI and is
    reported as the index entry at fault. Only the runs without verify build a pipeline."""
    make_latent_folder(tmp_path, counts=(6, 6))
    where = corrupt(tmp_path, kind)
    for verify in (True, False):
        cfg = latent_config(tmp_path, "data.loader=dali", "data.dali_threads=1", "data.shuffle_buffer=8",
                            "train.global_batch=4", "train.micro_batch=4", f"data.verify={str(verify).lower()}")
        with pytest.raises(LatentFormatError, match=where) as err:
            read_steps(cfg, 3)
        assert err.value.local or verify or kind == "truncated"  # found in this rank's reads: it prints it


def test_dali_index_pointing_elsewhere_is_named(tmp_path):
    """Record 4's index entry points at record 5's bytes: a plausible latent, caught by where it comes from."""
    meta, *_ = make_latent_folder(tmp_path, counts=(6, 6))
    index = tmp_path / "shard-00001.idx"
    lines = index.read_text().splitlines()
    lines[5] = lines[6].replace("00001-0000005", "00001-0000004")
    index.write_text("\n".join(lines) + "\n")
    cfg = latent_config(tmp_path, "data.loader=dali", "data.dali_threads=1", "data.shuffle_buffer=8",
                        "train.global_batch=4", "train.micro_batch=4")
    with pytest.raises(LatentFormatError, match=r"shard-00001\.idx: the entry of 00001-0000004\.lat is corrupted"):
        read_steps(cfg, 3)
    read_steps(latent_config(tmp_path, "train.global_batch=4", "train.micro_batch=4"), 3)  # torch reads no index


def test_bad_data_stops_training_with_one_message_and_exit_2(tmp_path, capsys):
    from maskdit_fast.cli import train_main
    from tests.test_user_errors import RUN, fails

    make_latent_folder(tmp_path / "data", counts=(6, 6))
    where = corrupt(tmp_path / "data", "label")
    err = fails(capsys, train_main, ["--out", str(tmp_path / "run"), *RUN, "data.dataset=latents",
                                     f"data.path={tmp_path / 'data'}", "data.loader=dali", "data.dali_threads=1",
                                     "data.shuffle_buffer=8", "model.in_channels=4", "model.input_size=8",
                                     "model.patch_size=2", "model.num_classes=3", "train.global_batch=4",
                                     "train.micro_batch=4", "train.max_steps=3"], "label 7 outside 0..2")
    assert re.search(where, err)
