"""``torchbp report LOGDIR``: what a DeltaMonitor's TensorBoard logs say, per run (the analysis is
:mod:`torchbp.report`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Read the TensorBoard event files under LOGDIR (each directory holding event files is a run) and say, per run, "
    "what the δ statistics a torchbp.DeltaMonitor logged show: δ vanishing toward the input, δ exploding, dead ReLU "
    "units, the first step and layer where δ was not finite, a layer whose δ stopped moving; or that nothing is "
    "wrong. Each finding gives its evidence (layers, values, steps) and the norm it was judged on."
)

EPILOG = (
    "Thresholds and their sources: the docstring of torchbp.report (docs/report.md). "
    "Exit status: 0 the report was made (whatever it found), 1 unreadable input (LOGDIR missing, no event files, "
    "no δ statistics), 2 a usage error."
)


def run(args: argparse.Namespace) -> int:
    from torchbp import report

    try:
        runs = report.read_logdir(args.logdir)
    except report.ReportError as e:
        print(f"torchbp report: error: {e}", file=sys.stderr)
        return 1
    findings = {name: report.analyze(history) for name, history in runs.items()}
    if args.json:
        print(json.dumps(report.to_json(runs, findings), indent=2, ensure_ascii=False))
    else:
        print(report.format_report(runs, findings))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``torchbp report`` with the ``torchbp`` command's subparsers."""
    p = subparsers.add_parser(
        "report",
        help="say what a DeltaMonitor's TensorBoard logs show (vanishing or exploding δ, dead units, NaN)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory (runs are its subdirectories)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON instead of text")
    p.set_defaults(func=run)
