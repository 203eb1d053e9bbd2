"""One rank of the multi-process tests, launched by ``torchrun``: runs the jobs of a JSON file in order.

Each job is ``{"train": OUT, "overrides": [...], "resume": bool, "kill_at": step | null}``,
``{"sample": [sample.py arguments]}`` or ``{"dydit": [python -m maskdit_fast.dydit arguments]}``. ``kill_at`` SIGKILLs this process when the EMA update of
that (0-based) step starts: a crash, not a clean exit. The group is created here and shared by the
jobs; results are checked by the test from the files the jobs write.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import torch.distributed as dist

from maskdit_fast.cli import sample_main
from maskdit_fast.dydit.__main__ import main as dydit_main
from maskdit_fast.train.ema import EMA
from maskdit_fast.train.trainer import train
from tests.helpers import tiny_config


def kill_at(step: int) -> None:
    real_update = EMA.update

    def update(self, model, current: int) -> None:
        if current == step:
            os.kill(os.getpid(), signal.SIGKILL)
        real_update(self, model, current)

    EMA.update = update


def main(jobs_file: str) -> None:
    dist.init_process_group("gloo")
    for job in json.loads(open(jobs_file).read()):
        if "sample" in job:
            assert sample_main(job["sample"]) == 0
            continue
        if "dydit" in job:
            assert dydit_main(job["dydit"]) == 0
            continue
        if job.get("kill_at") is not None:
            kill_at(job["kill_at"])
        train(tiny_config(*job["overrides"]), job["train"], resume=job.get("resume", False), progress=False)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
