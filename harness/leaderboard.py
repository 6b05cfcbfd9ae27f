"""Command line: build the leaderboard from the run records.

    python -m harness.leaderboard --runs results/runs --out results [--group G] [--note TEXT]
        [--command "python -m ..."] [--check-runs DIR] [--tuned-by tune] [--n-boot 10000] [--seed 0]
        [--no-screenshot]

Writes ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard_paired.csv``, ``leaderboard.html``,
``reward_kl.png``, ``training_curves.png`` and (when Chromium is installed) ``leaderboard.png`` into
``--out`` (see :mod:`harness.evaluation.leaderboard`). ``--note`` and ``--command`` are kept in
``--out``/``leaderboard_header.json``, so a rebuild without them writes the same header. An empty
runs folder is reported on stderr and still gives the files, with an empty table (exit status 0).
A runs folder that does not exist, ``--n-boot`` below 1, or a ``--group`` that none of the records
has stops with exit status 2 before anything is written (a typo would otherwise replace the
leaderboard in ``--out`` with an empty one, or store the bad group for later rebuilds).
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
                        help="the command that reproduces the runs, shown in the header (default: the "
                             "one given last time, kept in OUT/leaderboard_header.json, else a multirun "
                             "command derived from the records)")
    parser.add_argument("--group", default=None,
                        help="the records' group for the tables, several comma-separated "
                             "(compare,smollm2) (default: the one given last time, kept in "
                             "OUT/leaderboard_header.json, else 'compare' when any record has it, "
                             "else all records; '' clears it); the reward-KL plot uses every group")
    parser.add_argument("--note", default=None,
                        help="a note on the rows' settings for the header, e.g. 'beta and lr tuned on "
                             "the validation split' (default: the one given last time, kept in "
                             "OUT/leaderboard_header.json; --note '' clears it)")
    parser.add_argument("--check-runs", default=None,
                        help="a folder of records of the same sweep on other CPU kernels (e.g. "
                             "results/avx2/runs): the answer section claims a difference only where "
                             "it holds there too (default: the one given last time, kept in "
                             "OUT/leaderboard_header.json; '' clears it)")
    parser.add_argument("--tuned-by", default=None,
                        help="a tuning group in --runs (e.g. tune): each tuned method's rows keep only "
                             "the records at the setting that won its tuning (python -m harness.tuning), "
                             "so runs at a winner a later grid extension replaced drop out (default: "
                             "the one given last time, kept in OUT/leaderboard_header.json; '' clears it)")
    parser.add_argument("--n-boot", type=int, default=10_000,
                        help="bootstrap replicates of the paired comparisons (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's numpy seed (default: 0)")
    parser.add_argument("--no-screenshot", action="store_true",
                        help="do not render leaderboard.png with headless Chromium")
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        parser.error(f"--n-boot={args.n_boot}: must be >= 1")
    return args


def unknown_groups(runs: Path, group: str | None) -> str | None:
    """An error message when ``group`` (comma-separated) names a group that none of the records in
    ``runs`` has, listing the groups they have; None when every named group is there (or none is
    named, or there are no records)."""
    if not group:
        return None
    from harness.evaluation.leaderboard import group_names
    from harness.evaluation.records import load_records

    records = load_records(runs)
    present = {str(g) for r in records if (g := r.get("group"))}
    missing = sorted(group_names(group) - present)
    if not records or not missing:
        return None
    return (f"--group {group}: no record in {runs} has group {', '.join(missing)}; "
            f"groups present: {', '.join(sorted(present)) or 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the leaderboard; print the files written. Returns the exit status."""
    args = parse_args(argv)
    from harness.evaluation.leaderboard import build_leaderboard

    if not args.runs.is_dir():
        print(f"error: --runs {args.runs}: no such folder (nothing written)", file=sys.stderr)
        return 2
    if (bad := unknown_groups(args.runs, args.group)) is not None:
        print(f"error: {bad} (nothing written)", file=sys.stderr)
        return 2
    n = sum(1 for p in args.runs.glob("*.json") if not p.name.startswith("."))
    if n == 0:
        print(f"no run records in {args.runs}: writing an empty leaderboard", file=sys.stderr)
    try:
        paths = build_leaderboard(args.runs, args.out, command=args.command, group=args.group,
                                  note=args.note, screenshot=not args.no_screenshot, n_boot=args.n_boot,
                                  seed=args.seed, check_runs=args.check_runs, tuned_by=args.tuned_by)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"leaderboard from {n} record files in {args.runs} written to:")
    for path in paths.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
