"""``python -m maskdit_fast.plan``: the memory planner's command line (also ``python -m benchmarks.plan``)."""
import sys

from .cli import main

sys.exit(main())
