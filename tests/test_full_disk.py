"""A full disk (or an I/O error) while a training state is written: the previous state stays intact
and loadable, the partial files are removed, the run stops with one message naming the path and the
space needed, and --resume after space is freed ends bit for bit like an uninterrupted run."""
from __future__ import annotations

import errno
import re
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from maskdit_fast.errors import UserError
from maskdit_fast.files import size_text
from maskdit_fast.storage import latest_intact_training_state, latest_training_state, load_training_state, state_bytes
from maskdit_fast.train.trainer import train
from tests.helpers import TINY_RUN, assert_same_final_state, tiny_config

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096  # tmpfs allocates whole pages


class FailingStream:
    def __init__(self, stream, code: int):
        self.stream, self.code = stream, code

    def write(self, data):
        raise OSError(self.code, "injected")

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_failed_checkpoint_write_keeps_the_previous_state(tmp_path, monkeypatch, code):
    cfg = tiny_config("train.max_steps=4", "train.ckpt_every=2")
    train(cfg, tmp_path / "straight", progress=False)
    real = dcp_fs.FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            yield FailingStream(stream, code) if "w" in mode and ".tmp-step-0000004" in str(path) else stream

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", create_stream)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write .*/step-0000004: .* free there; it needs at least .*iB\)"):
        train(cfg, run, progress=False)
    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", real)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]  # partial files gone
    assert latest_intact_training_state(run).name == "step-0000002"
    assert load_training_state(run / "checkpoints" / "step-0000002")["step"] == 2
    train(cfg, run, resume=True, progress=False)
    assert_same_final_state(tmp_path / "straight", run, 4, parts=("model", "ema"))


@contextmanager
def tmpfs(folder: Path, size: int):
    """A tmpfs of ``size`` bytes mounted on ``folder`` (root only; the test skips elsewhere)."""
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True) if shutil.which("mount") else None
    if mount is None or mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip() if mount else 'no mount command'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def train_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    overrides = [*TINY_RUN, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=1"]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(out), "--no-progress",
                           "--eval-samples", "0", *args, *overrides], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def pages(folder: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


def test_real_full_disk_stops_plainly_and_resumes_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    assert train_cli(straight).returncode == 0
    state = pages(latest_training_state(straight))
    # room for the whole finished run (one state kept) and half a state: the step-2 state fits, the
    # step-4 one cannot be written next to it (the old one goes only once the new one is committed)
    with tmpfs(tmp_path / "disk", pages(straight) + state // 2) as disk:
        run = disk / "run"
        failed = train_cli(run)
        assert failed.returncode == 2, failed.stderr
        assert "Traceback" not in failed.stderr
        errors = [line for line in failed.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, failed.stderr
        assert f"cannot write {run / 'checkpoints' / 'step-0000004'}: No space left on device" in errors[0]
        tensors = size_text(state_bytes(load_training_state(latest_training_state(straight))))
        assert re.search(rf"\(\d+\.\d\d KiB free there; it needs at least {tensors}\)", errors[0]), errors[0]

        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
        assert not [p for p in run.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".tmp-")]
        assert latest_intact_training_state(run).name == "step-0000002"
        assert load_training_state(run / "checkpoints" / "step-0000002")["step"] == 2

        subprocess.run(["mount", "-o", f"remount,size={8 * pages(straight)}", str(disk)], check=True)  # space freed
        resumed = train_cli(run, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        a, b = assert_same_final_state(straight, run, 4, parts=("model", "ema"))
        for name, moments in a["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, b["optimizer"]["state"][name][key]), f"optimizer {name}.{key} differs"


def test_safetensors_export_on_a_full_disk_names_its_size(tmp_path, monkeypatch):
    import maskdit_fast.checkpoint as checkpoint

    def full(tensors, filename, metadata):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "injected")

    monkeypatch.setattr(checkpoint, "save_file", full)
    weights = {"w": torch.zeros(256, 1024), "b": torch.zeros(1024, dtype=torch.bfloat16)}
    with pytest.raises(UserError, match=r"ema\.safetensors: No space left on device .* needs at least 1\.00 MiB\)"):
        checkpoint.save_safetensors(tmp_path / "ema.safetensors", weights, tiny_config().model)
    assert list(tmp_path.iterdir()) == []  # the temporary is gone


def test_other_writes_on_a_full_disk_are_user_errors(tmp_path):
    from maskdit_fast.files import disk_errors

    with pytest.raises(UserError, match=rf"cannot write {tmp_path / 'metrics.jsonl'}: Input/output error") as caught:
        with disk_errors(tmp_path):
            raise OSError(errno.EIO, "injected", str(tmp_path / "metrics.jsonl"))
    assert caught.value.local  # the rank that met it says it
    with pytest.raises(UserError, match=rf"cannot write {tmp_path}: No space left on device"):
        with disk_errors(tmp_path):
            raise OSError(errno.ENOSPC, "injected")  # a buffered write names no file
    with pytest.raises(PermissionError):  # not the disk's fault: left as it is
        with disk_errors(tmp_path):
            raise PermissionError(errno.EACCES, "injected")
