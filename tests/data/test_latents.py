"""The latent shard format: round trip, layout, checksums, corruption errors, posterior noise."""
import hashlib
import json
import re
import tarfile

import numpy as np
import pytest
import torch

from maskdit_fast.data.latents import (LatentFormatError, LatentShards, RecordLayout, main, posterior_noise,
                                       sample_posterior, verify)
from tests.data.helpers import CORRUPTIONS, corrupt, make_latent_folder, read_steps
from tests.data.test_train_latents import latent_config


def test_round_trip_meta_and_checksums(tmp_path):
    meta, posterior, labels = make_latent_folder(tmp_path, counts=(7, 5, 6))
    shards = LatentShards(tmp_path, verify=True)
    assert len(shards) == meta["count"] == 18 and shards.shape == (4, 8, 8)
    assert [s["first"] for s in meta["shards"]] == [0, 7, 12]
    assert meta["record_bytes"] == RecordLayout((4, 8, 8)).record_bytes == 512 + 1024 + 512 + 512
    order = np.random.default_rng(1).permutation(18)
    got_post, got_labels = shards.read(order)
    assert np.array_equal(got_post, posterior[order]) and np.array_equal(got_labels, labels[order])
    for s in meta["shards"]:
        data = (tmp_path / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert verify(tmp_path) == [] and main(["verify", str(tmp_path)]) == 0


def test_shards_are_plain_tar_files_with_a_dali_index(tmp_path):
    meta, posterior, labels = make_latent_folder(tmp_path, counts=(3,))
    with tarfile.open(tmp_path / "shard-00000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["00000-0000000.lat", "00000-0000000.lbl", "00000-0000001.lat",
                                             "00000-0000001.lbl", "00000-0000002.lat", "00000-0000002.lbl"]
        raw = tar.extractfile(members[2]).read()
        assert np.array_equal(np.frombuffer(raw, "<f2").reshape(2, 4, 8, 8), posterior[1])
        assert np.frombuffer(tar.extractfile(members[3]).read(), "<i4")[0] == labels[1]
    lines = (tmp_path / "shard-00000.idx").read_text().splitlines()
    assert lines[0] == "v1.2 3"
    ext, offset, size = lines[2].split()[:3]
    assert (ext, int(offset), int(size)) == ("lat", members[2].offset_data, members[2].size)
    assert lines[2].split()[5] == str(members[3].offset_data)


def test_truncated_shard_error_names_the_file(tmp_path):
    make_latent_folder(tmp_path)
    shard = tmp_path / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[:-700])
    with pytest.raises(LatentFormatError, match="shard-00001.tar.*truncated"):
        LatentShards(tmp_path)
    assert verify(tmp_path) and main(["verify", str(tmp_path)]) == 1


def test_corrupted_records_are_detected(tmp_path):
    meta, *_ = make_latent_folder(tmp_path)
    record = meta["record_bytes"]
    shard = tmp_path / "shard-00002.tar"
    data = bytearray(shard.read_bytes())
    data[record + 257] ^= 0xFF  # record 1's tar header
    shard.write_bytes(bytes(data))
    shards = LatentShards(tmp_path)  # sizes are fine
    shards.read([0, 1, 2])  # the bad record is in shard 2 only
    with pytest.raises(LatentFormatError, match="shard-00002.tar: record 1"):
        shards.read([12, 13])
    with pytest.raises(LatentFormatError, match="shard-00002.tar: record 1 is corrupted .*tar header"):
        LatentShards(tmp_path, verify=True)
    # non-finite values in a record are reported too
    data = bytearray((tmp_path / "shard-00000.tar").read_bytes())
    data[2 * record + 512:2 * record + 514] = np.array([np.inf], "<f2").tobytes()
    (tmp_path / "shard-00000.tar").write_bytes(bytes(data))
    with pytest.raises(LatentFormatError, match="shard-00000.tar: record 2"):
        LatentShards(tmp_path).read([2])


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_torch_loader_names_the_bad_record_at_start_with_verify_else_when_read(tmp_path, kind):
    """12 records, 4 per step: 3 steps read every record. A truncated shard is found at start either way."""
    make_latent_folder(tmp_path, counts=(6, 6))
    where = corrupt(tmp_path, kind)
    for verify_at_start in (True, False):
        cfg = latent_config(tmp_path, "train.global_batch=4", "train.micro_batch=4",
                            f"data.verify={str(verify_at_start).lower()}")
        if verify_at_start or kind == "truncated":
            with pytest.raises(LatentFormatError, match=where):
                LatentShards(tmp_path, verify=verify_at_start)  # what build_loader opens first
        with pytest.raises(LatentFormatError, match=where) as err:
            read_steps(cfg, 3)
        assert "prepare again" in str(err.value)
    assert re.search(where, verify(tmp_path)[0])  # the command line's check names it too


def test_verify_finds_changed_values_by_the_checksum(tmp_path):
    """A finite value changed: every record is well-formed, the sha256 tells."""
    meta, *_ = make_latent_folder(tmp_path, counts=(6, 6))
    shard = tmp_path / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    data[3 * meta["record_bytes"] + meta["latent_offset"]] ^= 0x01  # the lowest mantissa bit of a mean
    shard.write_bytes(bytes(data))
    LatentShards(tmp_path).read(np.arange(12))
    with pytest.raises(LatentFormatError, match="shard-00001.tar: sha256 .* does not match"):
        LatentShards(tmp_path, verify=True)


def test_missing_or_foreign_meta(tmp_path):
    with pytest.raises(LatentFormatError, match="meta.json: not found"):
        LatentShards(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LatentFormatError, match="format 'other'"):
        LatentShards(tmp_path)


def test_posterior_noise_is_a_function_of_seed_epoch_and_index():
    idx = torch.tensor([3, 9, 4])
    a = posterior_noise(0, 0, idx, 100)
    assert a.shape == (3, 100) and a.dtype == torch.float32
    assert torch.equal(posterior_noise(0, 0, torch.tensor([4, 3]), 100), a[[2, 0]])  # batch-independent
    assert not torch.equal(posterior_noise(0, 1, idx, 100), a)  # fresh each epoch
    assert not torch.equal(posterior_noise(1, 0, idx, 100), a)
    big = posterior_noise(5, 2, torch.arange(512), 256)
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01


def test_sample_posterior_formula():
    post = torch.randn(2, 2, 4, 3, 3)
    noise = torch.randn(2, 36)
    x = sample_posterior(post.half(), noise, 0.5)
    mean, logvar = post.half().float().unbind(1)
    assert torch.allclose(x, 0.5 * (mean + torch.exp(logvar / 2) * noise.view(2, 4, 3, 3)))
