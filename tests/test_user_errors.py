"""Every user error, found at parse time or at run time, ends as one message naming the problem and
what to do, exit status 2, no traceback; unexpected errors keep theirs. Also: overrides anywhere on
the command line, the run-folder lock, checksums with fallback, no leftovers, file modes."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdit_fast.checkpoint import main as checkpoint_main
from maskdit_fast.cli import sample_main, train_main
from maskdit_fast.data.latents import LatentFormatError, LatentShards
from maskdit_fast.data.loader import build_loader
from maskdit_fast.dydit.__main__ import main as dydit_main
from maskdit_fast.eval.__main__ import main as eval_main
from maskdit_fast.train import objective as objective_module
from maskdit_fast.train import trainer as trainer_module
from maskdit_fast.storage import latest_training_state, load_training_state
from tests.data.helpers import make_latent_folder
from tests.helpers import TINY_RUN, tiny_config

RUN = ["--no-progress", "--eval-samples", "0", *TINY_RUN, "train.max_steps=2", "train.ckpt_every=1"]


def fails(capsys, main, args: list[str], *expected: str) -> str:
    """``main(args)`` exits with status 2 and prints one message holding ``expected``, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints of steps 1 and 2."""
    out = tmp_path_factory.mktemp("errors") / "run"
    assert train_main(["--out", str(out), *RUN]) == 0
    return out


@pytest.fixture()
def copy(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_resume_names_every_changed_key(copy, capsys):
    base = ["--out", str(copy), "--resume", *RUN]
    fails(capsys, train_main, [*base, "train.lr=3e-4"], "train.lr (0.002 then, 0.0003 now)", "only ")
    fails(capsys, train_main, [*base, "model.mask_ratio=0.25", "train.global_batch=16"],
          "model.mask_ratio (0.5 then, 0.25 now)", "train.global_batch (8 then, 16 now)")
    fails(capsys, train_main, [*base, "model.hidden_size=48"], "model.hidden_size (32 then, 48 now)")
    # the allowed changes resume; options after the overrides too
    assert train_main([*RUN, "--out", str(copy), "train.max_steps=3", "--resume", "train.log_every=1"]) == 0
    assert load_training_state(latest_training_state(copy))["step"] == 3


def test_run_time_config_errors(tmp_path, capsys):
    fails(capsys, train_main, ["--out", str(tmp_path / "a"), *RUN, "parallel=fsdp", "train.fsdp_cpu_offload=true"],
          "train.fsdp_cpu_offload", "on the CPU")
    fails(capsys, train_main, ["--out", str(tmp_path / "b"), *RUN, "data.dataset=latents",
                               f"data.path={tmp_path / 'none'}", "model.in_channels=4"], "meta.json: not found")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no empty run folders
    (tmp_path / "file").write_text("x")
    fails(capsys, train_main, ["--out", str(tmp_path / "file"), *RUN], "is a file")
    fails(capsys, sample_main, ["--ckpt", str(tmp_path / "file"), "--out", str(tmp_path / "file")], "is a file")


def test_bad_checkpoint_files(run, tmp_path, capsys):
    empty, garbage, truncated = tmp_path / "empty.safetensors", tmp_path / "garbage.safetensors", tmp_path / "t.safetensors"
    empty.write_bytes(b"")
    garbage.write_bytes(os.urandom(300))
    truncated.write_bytes((run / "ema.safetensors").read_bytes()[:-100])
    for bad in (empty, garbage, truncated):
        fails(capsys, sample_main, ["--ckpt", str(bad), "--out", str(tmp_path / "s")], str(bad), "export or download")
        fails(capsys, train_main, ["--out", str(tmp_path / "x"), "--init-from", str(bad), *RUN], str(bad))
        fails(capsys, dydit_main, ["finetune", "--init", str(bad), "--out", str(tmp_path / "d")], str(bad))
        fails(capsys, eval_main, ["generate", "--ckpt", str(bad), "--out", str(tmp_path / "g")], str(bad))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    fails(capsys, sample_main, ["--ckpt", str(notes), "--out", str(tmp_path / "s")], "is not a checkpoint")
    fails(capsys, sample_main, ["--ckpt", str(run / "ema.safetensors"), "--out", str(tmp_path / "s"), "--batch", "0"],
          "--batch")
    err = fails(capsys, train_main, ["--out", str(tmp_path / "x"), "--init-from", str(run / "ema.safetensors"), *RUN,
                                     "model.hidden_size=48"], "of another shape")
    assert len(err.splitlines()) == 1  # the message alone: no key list, no usage


def test_flipped_byte_in_ema_weights_is_named(run, tmp_path, capsys):
    damaged = tmp_path / "ema.safetensors"
    data = bytearray((run / "ema.safetensors").read_bytes())
    data[-5] ^= 0x10
    damaged.write_bytes(bytes(data))
    fails(capsys, sample_main, ["--ckpt", str(damaged), "--out", str(tmp_path / "s")], "is damaged")
    fails(capsys, eval_main, ["generate", "--ckpt", str(damaged), "--out", str(tmp_path / "g")], "is damaged")
    fails(capsys, eval_main, ["mnist", str(tmp_path / "missing.npz")], "missing.npz")


@pytest.mark.parametrize("damage", ["deleted", "truncated", "metadata"])
def test_damaged_newest_state_is_named_and_resume_falls_back(copy, capsys, caplog, damage):
    newest = latest_training_state(copy)
    assert newest.name == "step-0000002"
    victim = {"deleted": next(newest.glob("*.distcp")), "truncated": next(newest.glob("*.distcp")),
              "metadata": newest / ".metadata"}[damage]
    if damage == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    fails(capsys, sample_main, ["--ckpt", str(newest), "--out", str(copy / "s")], str(newest), "damaged")
    fails(capsys, checkpoint_main, ["export", str(copy), str(copy / "e.safetensors")], "damaged")
    with caplog.at_level(logging.WARNING):
        assert train_main(["--out", str(copy), "--resume", *RUN, "train.max_steps=3"]) == 0
    assert f"{newest} is damaged" in caplog.text and "step-0000001, the newest complete" in caplog.text
    assert load_training_state(latest_training_state(copy))["step"] == 3


def test_nan_loss_ends_as_a_message(tmp_path, monkeypatch, capsys):
    real = objective_module.edm_loss

    def nan_loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(objective_module, "edm_loss", nan_loss)
    fails(capsys, train_main, ["--out", str(tmp_path / "x"), *RUN], "loss is nan at step 1", "train.nonfinite=skip")


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer_module, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train_main(["--out", str(tmp_path / "x"), *RUN])


def test_latent_label_out_of_range_names_the_shard_and_record(tmp_path):
    make_latent_folder(tmp_path, counts=(4, 4), num_classes=3)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["num_classes"] = 2  # records labelled 2 are now out of range
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    shards = LatentShards(tmp_path)
    with pytest.raises(LatentFormatError, match=r"shard.* record \d+ .*label \d+ outside 0..1") as err:
        shards.read(np.arange(8))
    assert err.value.local  # printed by the rank that read it


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_label_found_by_a_loader_worker_is_one_clean_message(tmp_path, workers):
    make_latent_folder(tmp_path, counts=(4, 4), num_classes=3)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["num_classes"] = 2
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = tiny_config("data.dataset=latents", f"data.path={tmp_path}", "model.num_classes=3", "model.in_channels=4",
                      "model.input_size=8", f"data.num_workers={workers}")
    data = build_loader(cfg, torch.device("cpu"), 0, 1, 8, 1)
    data.start(0, 2)
    with pytest.raises(LatentFormatError) as err:
        for step in range(2):
            list(data.step(step))
    data.close()
    assert str(err.value).startswith(str(tmp_path)) and "Traceback" not in str(err.value) and err.value.local


def test_live_lock_holder_is_named(copy, capsys):
    lock = os.open(copy / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(lock, json.dumps({"host": "node7", "pid": 4242, "since": "today"}).encode())
    fcntl.flock(lock, fcntl.LOCK_EX)  # another open file description: conflicts with the run's
    try:
        fails(capsys, train_main, ["--out", str(copy), "--resume", *RUN, "train.max_steps=3"],
              "in use by another live run (host node7, PID 4242")
    finally:
        os.close(lock)


def test_stale_lock_and_leftovers_are_taken_over(copy, caplog):
    (copy / ".lock").write_text(json.dumps({"host": "node7", "pid": 4242, "since": "yesterday"}))
    leftovers = [copy / ".ema.safetensors.ab12cd34", copy / ".metrics.jsonl.x1.partial",
                 copy / "samples" / ".step-0000001.png.y2.partial"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    (copy / "checkpoints" / ".tmp-step-0000009").mkdir()
    os.replace(copy / "checkpoints" / "step-0000001", copy / "checkpoints" / ".old-step-0000001")  # mid-replace
    old_mask = os.umask(0o022)
    try:
        with caplog.at_level(logging.WARNING):
            assert train_main(["--out", str(copy), "--resume", *RUN, "train.max_steps=3"]) == 0
    finally:
        os.umask(old_mask)
    assert "taking over the lock of a run that ended without releasing it (host node7, PID 4242" in caplog.text
    assert not any(path.exists() for path in leftovers) and not (copy / "checkpoints" / ".tmp-step-0000009").exists()
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == [f"step-000000{i}" for i in (1, 2, 3)]
    assert (copy / ".lock").read_text() == ""  # released at the end
    for name in ("ema.safetensors", "metrics.jsonl", "config.json"):
        assert stat.S_IMODE((copy / name).stat().st_mode) == 0o644, name
