"""Train MaskDiT / DiT.  ``python train.py`` trains MaskDiT on the bundled MNIST; see --help."""
import sys

from maskdit_fast.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
