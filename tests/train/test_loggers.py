"""train.loggers through real short trainings: TensorBoard's own reader and W&B's offline run files
return what metrics.jsonl holds, at the same steps, also across a SIGKILL and --resume (each step once:
the rows up to the checkpoint in the killed process's files, the others from the resumed process)."""
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdit_fast.cli import train_main
from maskdit_fast.train.loggers import WandbRecords
from maskdit_fast.train.trainer import train
from tests.helpers import tiny_config

pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install -e \".[tensorboard]\")")
pytest.importorskip("wandb", reason="wandb not installed (pip install -e \".[wandb]\")")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

RUN = ["train.loggers=[jsonl,tensorboard,wandb]", "train.max_steps=6", "train.log_every=1", "train.sample_every=3",
       "train.ckpt_every=3"]
EXACT = ("loss", "dsm", "mae", "lr", "mask_ratio")  # the same bits in a resumed run (not so img/s, memory)


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, silent, with its files under tmp: nothing reaches the network."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_ERROR_REPORTING": "false",
                       "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(key, value)


def jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(acc: EventAccumulator, key: str) -> dict[int, float]:
    events = acc.Scalars(f"train/{key}")
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"train/{key}: a step returned twice: {steps}"
    return {e.step: e.value for e in events}


def assert_tensorboard_holds(out: Path, rows: list[dict]) -> EventAccumulator:
    """Every number of every row, at its step, once (TensorBoard stores float32)."""
    acc = tensorboard(out)
    for key in {k for row in rows for k in row} - {"step"}:
        logged = tb_scalars(acc, key)
        assert logged == {r["step"]: pytest.approx(np.float32(r[key]), rel=1e-7) for r in rows if key in r}, key
    return acc


def wandb_records(out: Path) -> list[list]:
    """The records of each offline W&B run file in ``out`` (oldest first), read with wandb's protobuf
    definitions from its LevelDB-log framing (32 KiB blocks; 7-byte record headers: crc, length, type;
    wandb 0.31 ships no Python reader of it any more)."""
    runs = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, block, chunk, records = path.read_bytes(), 7, 32768, b"", []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # the rest of a block too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # full, last
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
        runs.append(records)
    return runs


def wandb_history(records: list) -> dict[int, dict]:
    """step -> {key: value} of a run's history records (image entries under "samples/...")."""
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item}
            assert r.history.step.num not in history
            history[r.history.step.num] = items
    return history


def wandb_run_ids(records: list) -> list[str]:
    return [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run with every logger."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                           "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                           "WANDB_ERROR_REPORTING": "false", "WANDB_DIR": str(out.parent)}.items():
            mp.setenv(key, value)
        train(tiny_config(*RUN), out, progress=False)
    return out


def test_tensorboard_and_wandb_return_the_logged_rows_grids_and_config(straight):
    rows = jsonl(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "dsm", "mae", "lr", "img_per_s", "peak_mem_gb", "mask_ratio"} <= set(rows[0])

    acc = assert_tensorboard_holds(straight, rows)
    images = acc.Images("samples")
    assert [e.step for e in images] == [3, 6]
    for event in images:
        from io import BytesIO
        logged = np.asarray(Image.open(BytesIO(event.encoded_image_string)).convert("RGB"))
        written = np.asarray(Image.open(straight / "samples" / f"step-{event.step:07d}.png").convert("RGB"))
        assert np.array_equal(logged, written)
    config = json.loads((straight / "config.json").read_text())
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == config
    assert acc.PluginTagToContent("hparams")  # the hparams plugin's session start info

    (records,) = wandb_records(straight)
    assert wandb_run_ids(records) == [(straight / "wandb_id.txt").read_text().strip()]
    history = wandb_history(records)
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value, rel=1e-12), (row["step"], key)
    assert [s for s, items in history.items() if items.get("samples/_type") == "image-file"] == [3, 6]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config["train"] == config["train"]


def test_a_killed_and_resumed_run_logs_each_step_once_with_the_uninterrupted_values(straight, tmp_path):
    out = tmp_path / "run"
    # a real process killed by SIGKILL at the EMA update of step 5: after the checkpoint of step 3 and the row
    # of step 4, which the resumed run logs again
    script = ("import os, signal, sys\n"
              "from maskdit_fast.train.ema import EMA\n"
              "from maskdit_fast.train.trainer import train\n"
              "from tests.helpers import tiny_config\n"
              "real = EMA.update\n"
              "def update(self, model, step):\n"
              "    if step == 4:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    real(self, model, step)\n"
              "EMA.update = update\n"
              "train(tiny_config(*sys.argv[2:]), sys.argv[1], progress=False)\n")
    # its own wandb-core (WANDB_SERVICE would make it use this process's, which outlives the kill holding the run)
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script, str(out), *RUN], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {1, 2, 3} <= set(tb_scalars(tensorboard(out), "loss"))  # flushed at the checkpoint, before the kill
    train(tiny_config(*RUN), out, resume=True, progress=False)

    rows, reference = jsonl(out), jsonl(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    acc = assert_tensorboard_holds(out, rows)  # each step once: the events of step 4 before the kill are purged
    straight_acc = tensorboard(straight)
    for key in EXACT:
        assert tb_scalars(acc, key) == tb_scalars(straight_acc, key), key
    assert [e.step for e in acc.Images("samples")] == [3, 6]

    before, after = wandb_records(out)
    stored = (out / "wandb_id.txt").read_text().strip()
    assert wandb_run_ids(before) == wandb_run_ids(after) == [stored]
    # the killed process's offline file holds every row up to the checkpoint of step 3, which the flush
    # before it made wandb-core write (the row of step 4 was still held by wandb); the resumed run logs the rest
    first, resumed = wandb_history(before), wandb_history(after)
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    assert [s for s, items in first.items() if items.get("samples/_type") == "image-file"] == [3]
    expected = {r["step"]: r for r in reference}
    for history in (first, resumed):
        for step, items in history.items():
            assert all(items[key] == expected[step][key] for key in EXACT), step


def leveldb_log(records: list[bytes]) -> tuple[bytes, list[int]]:
    """``records`` framed as wandb-core writes its .wandb file (written here from the format: 32 KiB blocks,
    7-byte chunk headers, FULL=1 FIRST=2 MIDDLE=3 LAST=4, zero padding), and the offset where each ends."""
    out, ends = bytearray(b":W&B\xe1\xbe\x00"), []
    for data in records:
        first = True
        while True:
            room = 32768 - len(out) % 32768
            if room < 7:
                out += bytes(room)
                continue
            chunk, data = data[:room - 7], data[room - 7:]
            kind = (1 if not data else 2) if first else (4 if not data else 3)
            out += struct.pack("<IHB", 0, len(chunk), kind) + chunk
            first = False
            if not data:
                break
        ends.append(len(out))
    return bytes(out), ends


def test_wandb_records_reads_on_as_the_file_grows(tmp_path):
    records = []
    for step in range(1, 41):  # rows of ~3 KiB: records cross block boundaries
        history = wandb_internal_pb2.Record()
        history.history.step.num = step
        history.history.item.add(key="loss", value_json=json.dumps([step] * 1000))
        records += [history.SerializeToString(), wandb_internal_pb2.Record(summary={}).SerializeToString()]
    data, ends = leveldb_log(records)
    assert len(data) > 3 * 32768
    path, reader = tmp_path / "run.wandb", WandbRecords(tmp_path / "run.wandb")
    assert reader.last_history_step() == -1  # no file yet
    for cut in (50_000, 50_001, 70_000, len(data)):  # what a periodic write may have put on disk
        path.write_bytes(data[:cut])
        whole = sum(end <= cut for end in ends[::2])  # history records wholly on disk
        assert reader.last_history_step() == whole, cut


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_main(["--out", str(out), "--no-progress", "--eval-samples", "0", *RUN])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert 'train.loggers: wandb needs the wandb package: pip install -e ".[wandb]"' in err
    assert not out.exists()  # refused before anything was written


def test_dydit_finetune_logs_its_flops_ratio_and_router_terms(tmp_path):
    from maskdit_fast.checkpoint import save_safetensors
    from maskdit_fast.dydit.__main__ import main
    from tests.dydit.helpers import random_base
    from tests.dydit.test_finetune import TINY_RUN

    net = random_base("maskdit")
    save_safetensors(tmp_path / "base.safetensors", net.state_dict(), net.model.cfg)
    out = tmp_path / "run"
    assert main(["finetune", "--init", str(tmp_path / "base.safetensors"), "--out", str(out), "--no-progress",
                 *TINY_RUN, "train.loggers=[jsonl,tensorboard]"]) == 0
    rows = jsonl(out)
    assert {"flops_ratio", "flops_loss", "min_tokens", "tokens", "heads", "groups", "lambda"} <= set(rows[0])
    assert_tensorboard_holds(out, rows)
    assert not (out / "wandb").exists()
