"""The ``torchbp`` command line: ``torchbp check``, ``torchbp demo``, ``torchbp report``.

- :mod:`torchbp.cli.main`: the parser and :func:`main`, the console script's entry point;
- :mod:`torchbp.cli.check`: the parity battery (its cases and tolerances, shared with the tests);
- :mod:`torchbp.cli.demo`: the sigmoid-vs-ReLU demo on the digits;
- :mod:`torchbp.cli.report`: what a TensorBoard log directory's δ statistics say (:mod:`torchbp.report`);
- :mod:`torchbp.cli._args`: argument types, one-line errors, exit statuses.

Nothing in the library imports this package.
"""

from .main import main

__all__ = ["main"]
