"""``moelora report LOG_DIR [-o report.html]``: build the routing report of a recorded run."""

from __future__ import annotations

import argparse
import sys


def report_main(argv: list[str] | None = None) -> int:
    """Entry point of ``moelora report``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="moelora report",
        description="Write a self-contained HTML routing report (opens offline) from a run's routing store.")
    parser.add_argument("log_dir", metavar="LOG_DIR",
                        help="the run's log directory (holding routing/), the store itself, or a parent "
                             "directory (its most recent run is used)")
    parser.add_argument("-o", "--output", metavar="REPORT.html",
                        help="output file (default: routing_report.html in the run's log directory)")
    args = parser.parse_args(argv)

    from .report import build_report
    from .store import find_store

    try:
        store = find_store(args.log_dir)
        path = build_report(store, args.output)
    except OSError as err:  # missing paths, and any I/O error writing the report
        print(f"moelora report: {err}", file=sys.stderr)
        return 1
    print(f"routing store:   {store}")
    print(f"routing report:  {path}")
    return 0
