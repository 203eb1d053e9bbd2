"""``python -m maskdit_fast.dydit finetune``: the DyDiT command line (``sample.py`` samples DyDiT checkpoints)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskdit_fast.dydit",
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from ..errors import USER_ERRORS
    from .checkpoint import is_dydit
    from .config import load_dydit_config
    from .finetune import finetune
    try:
        cfg = load_dydit_config(args.config, args.overrides)
    except ConfigError as err:
        ft.error(str(err))
    if not Path(args.init).exists():
        ft.error(f"--init {args.init}: no such file")
    if is_dydit(args.init):
        ft.error(f"--init {args.init} is already a DyDiT; fine-tune from its base model (the checkpoint that was "
                 "its --init) with another dydit.target")
    try:
        final = finetune(cfg, args.init, args.out, progress=not args.no_progress, resume=args.resume)
    except (*USER_ERRORS, ConfigError) as err:  # ConfigError: settings that do not fit the --init checkpoint
        ft.error(str(err))
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
