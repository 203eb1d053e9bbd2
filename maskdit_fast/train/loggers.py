"""Where the training loop's log rows and sample grids go (``train.loggers``), on rank 0 only.

- ``jsonl``: ``RUN/metrics.jsonl``, one JSON row per log step.
- ``progress``: the loop's tqdm bar (drawn by the loop itself; ``--no-progress`` removes it).
- ``tensorboard``: event files in ``RUN/tensorboard/``: every number of a row as the scalar ``train/<key>``,
  the sample grids as the image ``samples``, the config as the text ``config`` and as hparams.
- ``wandb``: a W&B run (``train.wandb_project``, ``train.wandb_entity``; ``WANDB_MODE=offline`` works as
  wandb defines it) with the rows as history, the grids as images and the config as its config; its id is
  kept in ``RUN/wandb_id.txt``.

A resumed run continues in the same places: ``metrics.jsonl`` loses the rows after the training state,
TensorBoard's writer opens the same folder with ``purge_step`` (readers drop the older events from that
step on) and W&B resumes the run of the stored id.

Before every training state the loop flushes the loggers, so that what was logged up to that state
survives a crash after it (a SIGKILL included): the JSONL file and TensorBoard's events are written by
this process; W&B's rows are written by its service process (wandb-core), which keeps them in a buffer
and dies with this process. Its flush therefore sends the last step's row (wandb holds a step's row
until the next step begins) and waits until the service has written it to the run's ``.wandb`` file.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import secrets
import string
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..files import atomic_write

log = logging.getLogger(__name__)

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package (and the extra) it needs
WANDB_ID_FILE = "wandb_id.txt"
WANDB_WRITE_INTERVAL_S = 0.5  # wandb-core writes its buffered records to the .wandb file this often (default 15)
WANDB_FLUSH_TIMEOUT_S = 10.0  # how long a flush waits for them before it warns and lets the run go on


def require_packages(names: list[str]) -> None:
    """Raise a UserError naming the extra to install if a logger in ``names`` lacks its package."""
    for name in names:
        package = _PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise UserError(f"train.loggers: {name} needs the {package} package: pip install -e \".[{package}]\"")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows of a ``metrics.jsonl`` logged after ``step``: on resume from the checkpoint of
    ``step`` those steps run again and log again. Rows that are not complete JSON (a crash mid-write)
    are dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


class JsonlLogger:
    def __init__(self, out_dir: Path, start: int) -> None:
        trim_metrics(out_dir / "metrics.jsonl", start)  # rows past the training state are logged again
        self.file = (out_dir / "metrics.jsonl").open("a")

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        pass  # the grid is a file in samples/ already

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a.b": value} with values TensorBoard's hparams take (lists and None as text)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class TensorBoardLogger:
    def __init__(self, out_dir: Path, start: int, run_config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = out_dir / "tensorboard"
        fresh = not log_dir.exists()
        # purge_step: events of steps >= start + 1 written before a crash are dropped by readers; they run again
        self.writer = SummaryWriter(str(log_dir), purge_step=None if start == 0 else start + 1)
        self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2) + "\n```", start)
        if fresh:
            for summary in hparams(_flat(run_config), {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbRecords:
    """The history steps in a W&B run's ``.wandb`` file, as far as wandb-core has written it. The file is
    LevelDB's log format: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, length, type: FULL=1, FIRST=2, MIDDLE=3, LAST=4; a block's tail too short for a header is
    padding); a record, one FULL chunk or FIRST, MIDDLE..., LAST, is a protobuf ``Record``."""

    BLOCK, HEADER = 32768, 7

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = self.HEADER  # where the next whole record starts (read on from here)
        self.last_step = -1

    def last_history_step(self) -> int:
        """The largest step of the history records on disk so far (-1: none)."""
        from wandb.proto.wandb_internal_pb2 import Record

        base = self.pos  # the file offset of data[0]
        try:
            with self.path.open("rb") as f:
                f.seek(base)
                data = f.read()
        except FileNotFoundError:
            return self.last_step
        pos, record = base, b""
        while True:
            room = self.BLOCK - pos % self.BLOCK
            if room < self.HEADER:
                pos += room
                continue
            at = pos - base
            if at + self.HEADER > len(data):
                break
            length, kind = struct.unpack("<HB", data[at + 4:at + self.HEADER])
            if kind == 0 or at + self.HEADER + length > len(data):  # not (all) on disk yet
                break
            record += data[at + self.HEADER:at + self.HEADER + length]
            pos += self.HEADER + length
            if kind in (1, 4):
                parsed = Record.FromString(record)
                if parsed.WhichOneof("record_type") == "history":
                    self.last_step = max(self.last_step, parsed.history.step.num)
                record, self.pos = b"", pos
        return self.last_step


class WandbLogger:
    def __init__(self, out_dir: Path, run_config: dict[str, Any], project: str, entity: str | None) -> None:
        import wandb

        id_file = out_dir / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's form
            atomic_write(id_file, lambda tmp: tmp.write_text(run_id + "\n"))
        self.wandb = wandb
        # wandb-core writes the .wandb file periodically where wandb has this setting (0.31 has, 0.28 had not;
        # without it: when a 32 KiB block fills, or at the end)
        periodic = "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {})
        settings = wandb.Settings(x_transaction_log_flush_interval=WANDB_WRITE_INTERVAL_S) if periodic else None
        self.run = wandb.init(project=project, entity=entity, id=run_id, resume="allow", dir=str(out_dir),
                              name=out_dir.name, config=run_config, settings=settings)
        written = periodic and not getattr(self.run.settings, "x_skip_transaction_log", False)
        self.records = WandbRecords(Path(self.run.settings.sync_file)) if written else None
        self.unsent: int | None = None  # the step logged last, until flush() sends it

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({key: value for key, value in row.items() if key != "step"}, step=row["step"])
        self.unsent = row["step"]

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)
        self.unsent = step

    def flush(self) -> None:
        """Send the last step's row and wait until wandb-core has written it to the ``.wandb`` file (nothing
        may be logged at that step afterwards: wandb drops it)."""
        if self.unsent is None:
            return
        step, self.unsent = self.unsent, None
        self.run.log({}, commit=True)  # only when there is a row: a commit of nothing is an empty row
        if self.records is None:
            return
        deadline = time.monotonic() + WANDB_FLUSH_TIMEOUT_S
        while self.records.last_history_step() < step:
            if time.monotonic() > deadline:
                log.warning("W&B: step %d is not in %s after %.0f s; a crash now would lose its rows", step,
                            self.records.path, WANDB_FLUSH_TIMEOUT_S)
                return
            time.sleep(0.02)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The loggers of a run (none on ranks other than 0): each row and grid goes to all of them."""

    def __init__(self, loggers: list) -> None:
        self.loggers = loggers

    @classmethod
    def open(cls, names: list[str], out_dir: Path, start: int, run_config: dict[str, Any], project: str,
             entity: str | None, is_main: bool) -> Loggers:
        """Open the loggers named in ``names`` for a run in ``out_dir`` that starts after step ``start``."""
        if not is_main:
            return cls([])
        opened: list = []
        if "jsonl" in names:
            opened.append(JsonlLogger(out_dir, start))
        if "tensorboard" in names:
            opened.append(TensorBoardLogger(out_dir, start, run_config))
        if "wandb" in names:
            opened.append(WandbLogger(out_dir, run_config, project, entity))
        return cls(opened)

    def log(self, row: dict[str, Any]) -> None:
        """One log row (``row["step"]``: the number of steps done); every number in it is logged."""
        for logger in self.loggers:
            logger.log(row)

    def image(self, tag: str, path: Path, step: int) -> None:
        """The image file ``path`` (a sample grid) at ``step``."""
        for logger in self.loggers:
            logger.image(tag, path, step)

    def flush(self) -> None:
        """Everything logged so far onto disk (before a checkpoint: a crash after it loses none of it)."""
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
