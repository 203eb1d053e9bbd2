"""Sample a trained checkpoint into a PNG grid and an ADM-layout .npz; see --help."""
import sys

from maskdit_fast.cli import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())
