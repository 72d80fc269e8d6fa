"""What every ``torchbp`` subcommand shares: argument types, the parser with plain one-line errors, and the
call of a subcommand (its exit status, Ctrl-C and a closed pipe without a traceback)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence

__all__ = ["Parser", "dispatch", "integer", "positive_float", "positive_int", "plain_message"]

#: What argparse's own messages mean by a type's name.
_TYPE_WORDS = {"int": "an integer", "float": "a number"}


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def plain_message(message: str) -> str:
    """argparse's message in the house style: ``--epochs: expected a positive integer, got 'abc'``."""
    message = message.removeprefix("argument ")
    choice = re.search(r"invalid choice: (.*?) \(choose from (.*)\)$", message)
    if choice:
        message = f"{message[: choice.start()]}expected one of {choice[2].replace(chr(39), '')}, got {choice[1]}"
    value = re.search(r"invalid (\w+) value: (.*)$", message)
    if value:
        kind = _TYPE_WORDS.get(value[1], f"a value of type {value[1]}")
        message = f"{message[: value.start()]}expected {kind}, got {value[2]}"
    return message


class Parser(argparse.ArgumentParser):
    """argparse, with every usage error as one line: ``torchbp <command>: error: <message>``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {plain_message(message)} (see {self.prog} --help)\n")


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and call the chosen subcommand's ``func``; returns the exit status.

    0: done; 1: a failure (a mismatch, a missing package); 2: a usage error (argparse raises
    ``SystemExit(2)`` after printing ``torchbp <command>: error: <message>``); 130: interrupted by Ctrl-C,
    which prints one line, ``torchbp <command>: interrupted``, instead of a traceback.
    """
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    if extra:  # named by the subcommand that was given them, not by "torchbp"
        prog = f"torchbp {command}" if command else "torchbp"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)\n")
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"torchbp {command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (torchbp check | head): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's docs' recipe: no error at exit
        return 1
