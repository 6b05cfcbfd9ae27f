"""Where the table's comparison is weak, one sentence each (the page's warnings)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from harness.evaluation.leaderboard.columns import GAIN
from harness.evaluation.leaderboard.table import mean_of
from harness.evaluation.stats import platform_identity, platform_label

MIN_SEEDS = 3
CEILING_MARGIN = 0.02


def _row_name(row: Mapping[str, Any]) -> str:
    name = f"{row['method']} · {row['model']} · {row['dataset']}"
    name += f" · {row['track']}" if row.get("track") else ""
    return name + (f" ({row['setting']})" if row.get("setting") else "")


def table_platforms(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct platform labels of the ok records (``"unknown platform"`` for records without
    one, listed only when some record does say its platform)."""
    ids = {platform_identity(r.get("platform")) for r in records if r.get("status") == "ok"}
    known = sorted(platform_label(i) for i in ids if i is not None)
    return known + (["unknown platform"] if known and None in ids else [])


def comparison_warnings(rows: Sequence[Mapping[str, Any]], records: Iterable[Mapping[str, Any]] = ()
                        ) -> list[str]:
    """Where the table's comparison is weak, one sentence each:

    * a row with fewer than 3 seeds;
    * a gold score at the task's ceiling: mean eval/gold_reward ≥ eval/gold_max − 0.02, or the
      upper bound of its interval ≥ eval/gold_max (skipped without eval/gold_max);
    * SFT references that differ between seeds of a (model, dataset) — max − min over its seeds of
      eval/ref_gold_reward — by more than the smallest |Δ vs SFT| (mean gain) of its methods;
    * rows from more than one platform (listed; ``records`` are the table's records);
    * rows whose runs used different dataset settings under one dataset name;
    * duplicate records of a seed that were dropped.
    """
    out = []
    ok_rows = [r for r in rows if r["status"] == "ok"]
    few = [f"{_row_name(row)} ({row['n_seeds']})" for row in ok_rows if row["n_seeds"] < MIN_SEEDS]
    if few:
        out.append(f"fewer than {MIN_SEEDS} seeds (intervals wide or missing, comparisons weak): "
                   + ", ".join(few) + ".")
    for row in ok_rows:
        gold, top = mean_of(row, "eval/gold_reward"), mean_of(row, "eval/gold_max")
        if gold is None or top is None:
            continue
        hi = (row["metrics"].get("eval/gold_reward") or {}).get("ci_hi")
        if gold >= top - CEILING_MARGIN:
            out.append(f"{_row_name(row)}: gold reward at the task's ceiling (mean {gold:.3f}, "
                       f"ceiling {top:g}): differences between methods there are compressed.")
        elif hi is not None and hi >= top:
            # a wide interval, not a high mean: some seeds may sit at the ceiling
            out.append(f"{_row_name(row)}: the gold reward's 95% interval reaches the task's ceiling "
                       f"(mean {gold:.3f}, upper bound {hi:.3f}, ceiling {top:g}): seeds near the "
                       "ceiling compress the differences between methods.")
    by_cell: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in ok_rows:
        by_cell[(row["model"], row["dataset"])].append(row)
    for (model, dataset), cell_rows in sorted(by_cell.items()):
        per_seed: dict[Any, list[float]] = defaultdict(list)
        for row in cell_rows:
            for s, v in row["ref_by_seed"].items():
                per_seed[s].append(v)
        refs = [sum(v) / len(v) for v in per_seed.values()]
        gains = [(abs(g), row["method"]) for row in cell_rows if (g := mean_of(row, GAIN)) is not None]
        if len(refs) >= 2 and gains:
            spread = max(refs) - min(refs)
            smallest, method = min(gains)
            if spread > smallest:
                out.append(f"{model} · {dataset}: the SFT reference's gold reward differs between seeds by "
                           f"{spread:.3f} (max − min over {len(refs)} seeds), more than the smallest "
                           f"|Δ vs SFT| of its methods ({smallest:.3f}, {method}): the starting point varies "
                           "as much as that method's effect.")
    platforms = table_platforms(records)
    if len(platforms) > 1:
        mixed = [_row_name(r) for r in ok_rows if len(r["platforms"]) > 1]
        out.append(f"the rows come from {len(platforms)} platforms ({'; '.join(platforms)}): numerics differ "
                   "between platforms" + (f"; rows mixing platforms: {', '.join(mixed)}" if mixed else "") + ".")
    mixed_data = [_row_name(r) for r in ok_rows if r.get("dataset_variants", 1) > 1]
    if mixed_data:
        out.append("rows mixing runs of different dataset settings (the same dataset name, other "
                   f"fields such as wrong_fraction differ; not one task): {', '.join(mixed_data)}.")
    for row in rows:
        if row.get("n_duplicates"):
            out.append(f"{_row_name(row)}: {row['n_duplicates']} older duplicate record(s) of a seed dropped "
                       f"(the latest by created kept): {', '.join(row['duplicates'])}.")
    return out
