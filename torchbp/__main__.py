"""``python -m torchbp``: the ``torchbp`` command (see :mod:`torchbp.cli`)."""

import sys

from torchbp.cli.main import main

sys.exit(main())
