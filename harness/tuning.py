"""Pick each method's tuned setting from the records of the tuning sweep (``sweeps/tune.sh``).

    python -m harness.tuning [--runs results/runs] [--group tune]

For every (method, model, dataset, track) of the group's ok records evaluated on the validation
split, the (KL coefficient, learning rate) with the highest mean held-out gold reward over
distinct seeds wins; ties go to the smaller KL (the closer policy). A winner at an edge of its
grid is named (:func:`~harness.evaluation.tuning.grid_edges`): the grid should be extended there
before the setting is trusted (a KL coefficient of 0 is a floor, not an edge). Only the records
of one grid count: those whose config differs from the newest record's in the KL coefficient,
the learning rate and the seed alone (:func:`~harness.evaluation.tuning.grid_family`), so a
tuning run under an older budget, task or
reward model never competes with the current grid. A method is tuned on each
track apart (what it learns from changes what suits it: the preferences track's reward model is
exploitable, the oracle's gold reward is not). Prints one line per method and track with the
overrides that select it, so the comparison sweep can run each method at its best; the test split
is never read here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.evaluation.records import load_records
from harness.evaluation.tuning import (  # noqa: F401  (re-exported: the tuning's functions)
    at_tuned_settings,
    best_settings,
    grid_edges,
    grid_family,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tuning", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("results/runs"))
    parser.add_argument("--group", default="tune")
    args = parser.parse_args(argv)
    best = best_settings(load_records(args.runs), args.group)
    if not best:
        print(f"no ok validation-split records of group {args.group!r} in {args.runs}", file=sys.stderr)
        return 1
    for (method, model, dataset, track), b in sorted(best.items()):
        older = f", {b['left_out']} of older grids left out" if b["left_out"] else ""
        # no ": " inside the brackets: sweeps/tuned.sh reads the overrides after the last one
        edge = f", at the grid's {' and '.join(b['edges'])}" if b["edges"] else ""
        print(f"{method:<10} {model:<12} {dataset:<10} {track or '-':<11} validation gold "
              f"{b['gold']:.3f} ({b['n_seeds']} seeds{older}{edge}): {b['overrides']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
