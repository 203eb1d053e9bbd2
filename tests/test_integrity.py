"""Manifest digests computed while a training state is written: equal to a plain sha256 pass over
the finished files, and damage is still found when the state is checked."""
from __future__ import annotations

import hashlib
import io
import json

import torch

import maskdit_fast.integrity as integrity
from maskdit_fast.integrity import MANIFEST, DigestingStream, write_manifest
from maskdit_fast.storage import save_training_state, training_state_damage


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved_state(tmp_path):
    state = {"model": {"w": torch.randn(600, 1000), "b": torch.randn(7)},  # w: a write large enough to overlap
             "optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(600, 1000)}}},
             "rng": {"rank0": {"cpu": torch.get_rng_state()}}}
    return save_training_state(tmp_path, 3, state, {"step": 3}, keep_last=0, is_main=True)


def test_streamed_digests_equal_a_plain_pass_and_spare_the_reread(tmp_path, monkeypatch):
    read_back = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda p: read_back.append(p.name) or real(p))
    path = saved_state(tmp_path)
    assert read_back == ["meta.json"]  # the DCP files (data and .metadata) were hashed as they were written
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in path.iterdir()} - {MANIFEST} and len(files) == 3
    for name, entry in files.items():
        assert entry == {"bytes": (path / name).stat().st_size, "sha256": sha256(path / name)}, name
    assert training_state_damage(path) is None


def test_damage_is_still_found(tmp_path):
    path = saved_state(tmp_path)
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(raw)
    assert training_state_damage(path) == f"{data.name} does not match its checksum"
    data.write_bytes(raw[:-1])
    assert training_state_damage(path) == f"{data.name} has {len(raw) - 1} bytes, {len(raw)} were written"


def test_a_stream_written_out_of_order_is_hashed_from_the_file(tmp_path):
    stream = DigestingStream(io.BytesIO())
    stream.write(b"abc" * 1000)
    assert stream.digest() == (3000, hashlib.sha256(b"abc" * 1000).hexdigest())
    stream.seek(0)
    stream.write(b"x")
    assert stream.digest() is None
    (tmp_path / "a.bin").write_bytes(b"0123")
    write_manifest(tmp_path, {"a.bin": (3, "0" * 64)})  # a size that is not the file's: not trusted
    assert json.loads((tmp_path / MANIFEST).read_text())["files"]["a.bin"]["sha256"] == sha256(tmp_path / "a.bin")
