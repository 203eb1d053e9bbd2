"""``python -m maskdit_fast.dydit finetune``: the DyDiT command line (``sample.py`` samples DyDiT checkpoints)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import ArgumentParser


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m maskdit_fast.dydit",
                            description="DyDiT: dynamic width (TDW) and dynamic tokens (SDT) for DiT / MaskDiT.")
    commands = parser.add_subparsers(dest="command", required=True)
    ft = commands.add_parser("finetune", help="fine-tune a DiT/MaskDiT checkpoint into a DyDiT",
                             epilog="Overrides are key=value pairs, e.g. dydit.target=0.3 train.max_steps=500")
    ft.add_argument("--init", required=True, metavar="CKPT", help="base EMA .safetensors (or training state)")
    ft.add_argument("--out", required=True, help="run directory")
    ft.add_argument("--config", default="dydit-0.5", help="preset in configs/ or a YAML path (default: dydit-0.5)")
    ft.add_argument("--resume", action="store_true", help="continue the run in --out from its newest training state")
    ft.add_argument("--no-progress", action="store_true")
    ft.add_argument("overrides", nargs="*", help="key=value config overrides")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["finetune"]:
        parser.parse_args(argv)  # help, or the error of a missing or unknown command
    args = ft.parse_intermixed_args(argv[1:])  # overrides before and after the options (no subcommands there)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not Path(args.init).exists():
        ft.error(f"--init {args.init}: no such file")
    with ft.user_errors():  # bad input found at any time, said plainly: no traceback
        return _finetune(args, ft)


def _finetune(args: argparse.Namespace, ft: ArgumentParser) -> int:
    from ..train.preemption import PREEMPTED_EXIT, Preempted
    from .checkpoint import is_dydit
    from .config import load_dydit_config
    from .finetune import finetune

    cfg = load_dydit_config(args.config, args.overrides)
    if is_dydit(args.init):
        ft.error(f"--init {args.init} is already a DyDiT; fine-tune from its base model (the checkpoint that was "
                 "its --init) with another dydit.target")
    try:
        final = finetune(cfg, args.init, args.out, progress=not args.no_progress, resume=args.resume)
    except Preempted:
        return PREEMPTED_EXIT  # rank 0 has said where it stopped and what is saved
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 reports
        return 0
    samples = Path(args.out) / "samples"
    flops = json.loads((samples / "final-flops.json").read_text())
    grid = f"samples: {samples / 'final.png'}, " if (samples / "final.png").exists() else "final sampling run: "
    print(f"DyDiT EMA weights: {final}\n{grid}measured FLOPs {flops['ratio']:.3f}x the base model's\n"
          f"sample it: python sample.py --ckpt {final} --out OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
