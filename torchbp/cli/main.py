"""The ``torchbp`` command: one parser whose subcommands are :mod:`torchbp.cli.demo`, :mod:`torchbp.cli.check`
and :mod:`torchbp.cli.report`.

Each subcommand module has an ``add_parser(subparsers)`` that registers its parser and sets ``func``
(called with the parsed arguments, returns the exit status); :data:`SUBCOMMANDS` lists them. Imports flow
one way: this module imports the subcommands, they import :mod:`torchbp.cli._args` and the library, and
nothing in the library imports :mod:`torchbp.cli`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import torchbp

from . import check, demo, report
from ._args import Parser, dispatch

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

#: One ``add_parser(subparsers)`` per subcommand, in the order ``torchbp --help`` lists them.
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (demo.add_parser, check.add_parser, report.add_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="torchbp",
        description="torchbp: backpropagation written by hand (BP1-BP4) as PyTorch autograd Functions.",
        epilog="Exit status: 0 done, 1 a failure, 2 a usage error, 130 interrupted (Ctrl-C).",
    )
    parser.add_argument(
        "--version", action="version", version=f"torchbp {torchbp.__version__} (torch {torch.__version__})"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchbp`` console script; returns the exit status (see :func:`torchbp.cli._args.dispatch`)."""
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
