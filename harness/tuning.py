"""Pick each method's tuned setting from the records of the tuning sweep (``sweeps/tune.sh``).

    python -m harness.tuning [--runs results/runs] [--group tune]

For every (method, model, dataset, track) of the group's ok records evaluated on the validation
split, the (KL coefficient, learning rate) with the highest mean held-out gold reward over
distinct seeds wins; ties go to the smaller KL (the closer policy). A method is tuned on each
track apart (what it learns from changes what suits it: the preferences track's reward model is
exploitable, the oracle's gold reward is not). Prints one line per method and track with the
overrides that select it, so the comparison sweep can run each method at its best; the test split
is never read here.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.evaluation.records import load_records, track_of
from harness.evaluation.stats import distinct_seeds, kl_coefficient, learning_rate


def best_settings(records: Iterable[Mapping[str, Any]], group: str = "tune"
                  ) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """``{(method, model, dataset, track): {"kl", "lr", "gold", "n_seeds", "overrides"}}``; the
    track is the records' (:func:`~harness.evaluation.records.track_of`; ``""`` for a record on
    none), and the overrides name it (``track=oracle``) when there is one."""
    cells: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        pp = rec.get("per_prompt") or {}
        if rec.get("group") != group or rec.get("status") != "ok" or pp.get("split") != "validation":
            continue
        key = (rec["method"], rec["model"], rec["dataset"], track_of(rec), kl_coefficient(rec),
               learning_rate(rec))
        cells[key].append(rec)
    best: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for (method, model, dataset, track, kl, lr), recs in cells.items():
        kept, _ = distinct_seeds(recs)
        golds = [r["metrics"]["eval/gold_reward"] for r in kept if "eval/gold_reward" in r["metrics"]]
        if not golds:
            continue
        gold = sum(golds) / len(golds)
        cur = best.get((method, model, dataset, track))
        if cur is None or (gold, -(kl or 0.0)) > (cur["gold"], -(cur["kl"] or 0.0)):
            on = f" track={track}" if track else ""
            best[(method, model, dataset, track)] = {
                "kl": kl, "lr": lr, "gold": gold, "n_seeds": len(golds),
                "overrides": f"method={method}{on} method.beta={kl} method.optim.lr={lr}"}
    return best


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
        print(f"{method:<10} {model:<12} {dataset:<10} {track or '-':<11} validation gold "
              f"{b['gold']:.3f} ({b['n_seeds']} seeds): {b['overrides']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
