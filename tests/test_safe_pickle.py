"""Crafted pickles at every place a file is read: the marker file is never created, and the reader
fails with a message (exit status 2 on the command lines)."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from maskdit_fast import load_checkpoint
from maskdit_fast.checkpoint import export_ema
from maskdit_fast.checkpoint import main as checkpoint_main
from maskdit_fast.cli import sample_main
from maskdit_fast.convert import main as convert_main
from maskdit_fast.convert import read_official
from maskdit_fast.integrity import write_manifest
from maskdit_fast.safe_pickle import UnsafePickleError
from maskdit_fast.storage import latest_training_state
from maskdit_fast.train.trainer import train
from tests.helpers import tiny_config


class Payload:
    """Creates ``marker`` when unpickled by a plain unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_payload_really_runs_when_unpickled_naively(tmp_path):  # the tests below would prove nothing otherwise
    pickle.loads(pickle.dumps(Payload(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("layout", ["payload_first", "magic_then_payload"])
def test_converter_reads_every_pickle_of_a_legacy_file_safely(tmp_path, layout, capsys):
    marker, src = tmp_path / "marker", tmp_path / "legacy.pt"
    head = b"" if layout == "payload_first" else pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
    src.write_bytes(head + pickle.dumps(Payload(marker), protocol=2) + b"\0" * 64)
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_official(src)
    with pytest.raises(SystemExit) as exit_:
        convert_main(["official-maskdit", str(src), str(tmp_path / "out.safetensors")])
    assert exit_.value.code == 2 and "not a readable torch checkpoint" in capsys.readouterr().err
    assert not marker.exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safe") / "run"
    train(tiny_config("train.max_steps=1"), out, progress=False)
    return out


def copy_with_bad_metadata(run: Path, dst: Path, marker: Path) -> Path:
    shutil.copytree(run, dst)
    state = latest_training_state(dst)
    (state / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(state)  # an attacker rewrites the checksums too
    return state


def test_metadata_payload_never_runs_in_any_reader(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    state = copy_with_bad_metadata(run, tmp_path / "run", marker)
    cfg = tiny_config("train.max_steps=2")
    readers = {
        "load_checkpoint": lambda: load_checkpoint(state),
        "export": lambda: export_ema(tmp_path / "run", tmp_path / "ema.safetensors"),
        "resume": lambda: train(cfg, tmp_path / "run", resume=True, progress=False),
        "init_from": lambda: train(cfg, tmp_path / "other", init_from=str(state), progress=False),
    }
    for name, read in readers.items():
        with pytest.raises(UnsafePickleError, match="could run code"):
            read()
        assert not marker.exists(), name
    for main, args in ((sample_main, ["--ckpt", str(state), "--out", str(tmp_path / "s")]),
                       (checkpoint_main, ["export", str(state), str(tmp_path / "e.safetensors")])):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and "could run code" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_metadata_is_named(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    metadata = latest_training_state(tmp_path / "run") / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"step-0000001 is damaged \(\.metadata has 100 bytes"):
        load_checkpoint(metadata.parent)  # found by the checksums
    (metadata.parent / "manifest.json").unlink()  # as in a state written before checksums existed
    with pytest.raises(ValueError, match=r"\.metadata is damaged"):
        load_checkpoint(metadata.parent)  # found by the reader


def test_payload_as_the_optimizers_lr_never_runs(run, tmp_path):
    marker = tmp_path / "marker"
    shutil.copytree(run, tmp_path / "run")
    state_dir = latest_training_state(tmp_path / "run")
    dcp_to_torch_save(state_dir, tmp_path / "whole.pt")  # our own file: safe to read whole
    state = torch.load(tmp_path / "whole.pt", weights_only=False)
    state["optimizer"]["param_groups"][0]["lr"] = Payload(marker)
    for item in state_dir.glob("*.distcp"):
        item.unlink()
    dcp.save(state, checkpoint_id=state_dir, no_dist=True)
    write_manifest(state_dir)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="could run code"):
        train(tiny_config("train.max_steps=2"), tmp_path / "run", resume=True, progress=False)
    assert not marker.exists()
