"""Plan a GPU run without a GPU: ``python -m benchmarks.plan --help`` (the command of
:mod:`maskdit_fast.plan.cli`, which the installed package also runs as ``python -m maskdit_fast.plan``)."""
import sys

from maskdit_fast.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
