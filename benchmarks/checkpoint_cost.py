"""What a training state costs on this machine at a model's size: the save as the trainer writes it
(DCP: model, AdamW moments, EMA, RNG; then meta.json and the sha256 manifest), the manifest's part
of it, a plain sha256 pass over the files for scale, and a resume (the checksum check, then DCP's
load into the live tensors, as ``--resume`` does), read back from a cold page cache.

    python benchmarks/checkpoint_cost.py --dir /tmp/ckpt-cost                 # MaskDiT-XL/2: 730M parameters
    python benchmarks/checkpoint_cost.py --dir /tmp/c --config mnist model.size=S

The optimizer's moments are filled with random numbers (an AdamW state of the real layout, as
after a step, without the memory of a backward pass). Prints one JSON line; leaves no files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

from maskdit_fast import storage
from maskdit_fast.config import load_config
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.integrity import file_sha256
from maskdit_fast.train.ema import EMA


@contextmanager
def timed(owner: object, name: str, spent: dict[str, float]) -> Iterator[None]:
    """Add the time spent in ``owner.name`` (called inside) to ``spent[name]``."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, real)


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (they are on disk: DCP and the manifest fsync)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def training_objects(config: str, overrides: list[str]):
    """The model, its EMA copy and an AdamW whose state has the layout of one after a step."""
    cfg = load_config(config, overrides)
    net = build_net(cfg.model).train()
    ema = EMA(net, 0.9999).model
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    for p in net.parameters():  # filled in place, one tensor at a time: no temporaries of the model's size
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.empty_like(p).normal_(),
                              "exp_avg_sq": torch.empty_like(p).uniform_()}
    return cfg, net, ema, optimizer


def measure(config: str, overrides: list[str], folder: Path) -> dict:
    cfg, net, ema, optimizer = training_objects(config, overrides)
    model_sd, optim_sd = get_state_dict(net, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "ema": get_model_state_dict(ema),
             "rng": {"rank0": storage.process_state(torch.device("cpu"), None)}}
    meta = {"step": 1, "world_size": 1, "config": {"config": config, "overrides": overrides}}
    run_dir = folder / "run"
    spent: dict[str, float] = {}
    with timed(storage.dcp, "save", spent), timed(storage, "write_manifest", spent):
        start = time.perf_counter()
        path = storage.save_training_state(run_dir, 1, state, meta, keep_last=1, is_main=True)
        save_s = time.perf_counter() - start
    files = sorted(p for p in path.iterdir() if p.is_file())
    start = time.perf_counter()
    for p in files:
        file_sha256(p)
    sha256_warm_s = time.perf_counter() - start

    evict(path)
    start = time.perf_counter()
    assert storage.latest_intact_training_state(run_dir) == path
    verify_s = time.perf_counter() - start
    evict(path)
    start = time.perf_counter()
    storage.load_into(path, state)
    load_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in files)
    shutil.rmtree(run_dir)
    return {
        "config": config, "overrides": overrides, "parameters": sum(p.numel() for p in net.parameters()),
        "state_bytes": storage.state_bytes(state), "file_bytes": size, "files": len(files),
        "save_s": save_s, "dcp_save_s": spent["save"], "manifest_s": spent["write_manifest"],
        "manifest_share_of_save": spent["write_manifest"] / save_s, "sha256_pass_warm_s": sha256_warm_s,
        "resume_verify_cold_s": verify_s, "resume_load_cold_s": load_s,
        "write_GBps": size / spent["save"] / 1e9, "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}", "dir": str(folder),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="where to write the state (removed after)")
    parser.add_argument("--config", default="imagenet256-pretrain", help="preset (default: MaskDiT-XL/2 at 256px)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(json.dumps(measure(args.config, args.overrides, args.dir)))


if __name__ == "__main__":
    main()
