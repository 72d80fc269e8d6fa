"""``python -m torchbp``: the ``torchbp`` command (see :mod:`torchbp.cli`)."""

import sys

from torchbp.cli import main

sys.exit(main())
