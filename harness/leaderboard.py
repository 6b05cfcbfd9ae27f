"""Command line: build the leaderboard from the run records.

    python -m harness.leaderboard --runs results/runs --out results [--command "python -m ..."]

Writes ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html``, ``reward_kl.png`` and
``training_curves.png`` into ``--out`` (see :mod:`harness.evaluation.leaderboard`). An empty runs
folder is reported on stderr and still gives the files, with an empty table (exit status 0).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.leaderboard",
        description="Build the leaderboard (Markdown, CSV, HTML, plots) from run records.",
    )
    parser.add_argument("--runs", type=Path, default=Path("results/runs"),
                        help="folder of run records (*.json) (default: results/runs)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="folder to write the leaderboard into (default: results)")
    parser.add_argument("--command", default=None,
                        help="the command that reproduces the runs, shown in the header "
                             "(default: a multirun command derived from the records)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the leaderboard; print the files written. Returns the exit status."""
    args = parse_args(argv)
    from harness.evaluation.leaderboard import build_leaderboard

    n = sum(1 for p in args.runs.glob("*.json") if not p.name.startswith("."))
    if n == 0:
        print(f"no run records in {args.runs}: writing an empty leaderboard", file=sys.stderr)
    paths = build_leaderboard(args.runs, args.out, command=args.command)
    print(f"leaderboard from {n} record files in {args.runs} written to:")
    for path in paths.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
