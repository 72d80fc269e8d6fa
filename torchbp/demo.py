"""``python -m torchbp.demo``: the same as ``torchbp demo`` (the demo is :mod:`torchbp.cli.demo`)."""

import sys

from torchbp.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
