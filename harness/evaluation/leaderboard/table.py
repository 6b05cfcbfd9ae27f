"""The leaderboard's table: the records of a group, one row per (method, model, dataset, track) and
setting over distinct seeds, with every metric summarised (mean, 95% interval)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from harness.evaluation.leaderboard.columns import (
    AVERAGE,
    COST_COLUMNS,
    HEADLINE_COLUMNS,
    KEY_COLUMNS,
    run_metrics,
)
from harness.evaluation.records import finite, is_number, track_of
from harness.evaluation.stats import (
    distinct_seeds,
    iqm,
    kl_coefficient,
    learning_rate,
    platform_identity,
    platform_label,
    stratified_bootstrap_interval,
    summarize,
)

DEFAULT_GROUP = "compare"
SEED_BOOT = 2_000
"""Replicates of the seed-level bootstraps (the IQM, P(A > B)): a few seeds resample quickly."""


def default_title(rows: Sequence[Mapping[str, Any]]) -> str:
    """``Alignment leaderboard: GRPO vs RLOO vs ...``: the rows' methods, in the rows' order."""
    methods = [str(m).upper() for m in dict.fromkeys(r.get("method") for r in rows) if m]
    return "Alignment leaderboard" + (f": {' vs '.join(methods)}" if methods else "")


def group_names(group: str) -> set[str]:
    """The groups a ``--group`` value names: ``"compare,smollm2"`` -> both (blanks dropped)."""
    return {g.strip() for g in group.split(",") if g.strip()}


def select_group(records: Sequence[Mapping[str, Any]], group: str | None = None
                 ) -> tuple[list[Mapping[str, Any]], str | None]:
    """The records of the main table and the group they come from: ``group`` when given (several
    comma-separated: ``"compare,smollm2"``), else ``"compare"`` when any record has it, else all
    records (group ``None``)."""
    if group is None and any(r.get("group") == DEFAULT_GROUP for r in records):
        group = DEFAULT_GROUP
    if group is None:
        return list(records), None
    groups = group_names(group)
    return [r for r in records if r.get("group") in groups], group


def _setting_of(record: Mapping[str, Any]) -> tuple[float | None, float | None]:
    return kl_coefficient(record), learning_rate(record)


def setting_label(setting: tuple[float | None, float | None] | None) -> str:
    """``"β=0.1, lr=5e-06"`` for a (KL coefficient, learning rate) setting; ``""`` for ``None``."""
    if setting is None:
        return ""
    beta, lr = setting
    return ", ".join(p for p in (f"β={beta:g}" if beta is not None else "",
                                 f"lr={lr:g}" if lr is not None else "") if p) or "setting not recorded"


def key_of(record: Mapping[str, Any], column: str) -> str:
    """A record's value in a key column: its ``track`` (:func:`track_of`, derived for records
    written before the field), else the field as text (``"?"`` when missing)."""
    return track_of(record) if column == "track" else str(record.get(column, "?"))


def row_groups(records: Iterable[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    """The records by row: ``(method, model, dataset, track, setting)`` with ``setting`` ``None``
    when the records of a (method, model, dataset, track) ran one setting (the usual case: the
    comparison sweep runs each method at one β and lr), else the (β, lr) they ran — runs at
    different settings are different rows, never one mean nor "duplicates" of a seed; runs on
    different tracks (what the method learns from) are different rows too. A record without a
    setting (e.g. an early failure) joins the only setting when there is one."""
    by_key: dict[tuple[str, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        by_key[tuple(key_of(rec, k) for k in KEY_COLUMNS)].append(rec)
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for key, recs in by_key.items():
        settings = {_setting_of(r) for r in recs} - {(None, None)}
        if len(settings) <= 1:
            out[(*key, None)] = recs
            continue
        for r in recs:
            out.setdefault((*key, _setting_of(r)), []).append(r)
    return out


def dataset_variant(record: Mapping[str, Any]) -> str:
    """The record's dataset config (all fields but ``seed``) as canonical JSON: records of one
    dataset name but different settings (e.g. ``wrong_fraction``) are different tasks."""
    ds = dict(((record.get("config") or {}).get("dataset")) or {})
    ds.pop("seed", None)
    return json.dumps(ds, sort_keys=True, default=str)


def build_table(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate run records into leaderboard rows, one per (method, model, dataset, track),
    sorted — one per (method, model, dataset, track, β, lr) where a method ran several settings
    (see :func:`row_groups`).

    Each row::

        {"method", "model", "dataset", "track",   # track: oracle | preferences | "" (sft, rm)
         "setting": str,                       # "" or "β=…, lr=…" when the method ran several
         "status": "ok" | "failed",            # "failed" when no seed's latest run succeeded
         "error": str | None,                  # the distinct errors of its failed runs, "; "-joined
         "n_seeds": int, "n_failed": int,      # distinct ok seeds / failed seeds
         "n_duplicates": int, "duplicates": [run_id, ...],   # older records of a seed, dropped
         "seeds": [int, ...], "run_ids": [str, ...], "failed_runs": [{"run_id", "seed", "error"}],
         "groups": [str, ...], "beta": [float, ...], "lr": [float, ...],   # the settings it ran
         "platforms": [str, ...],              # platform labels of its ok seeds
         "dataset_variants": int,              # distinct dataset configs (seed aside) of its ok seeds
         "ref_by_seed": {seed: eval/ref_gold_reward},
         "metrics": {name: {"mean", "std", "n", "ci_lo", "ci_hi", "half"}}}

    ``metrics`` (see :func:`harness.evaluation.stats.summarize`) holds every metric of the ok
    seeds, and always the headline and cost columns (``mean`` ``None`` when no run reported them).
    """
    rows = []
    for (method, model, dataset, track, setting), recs in row_groups(records).items():
        kept, dropped = distinct_seeds(recs)
        ok = [r for r in kept if r.get("status") == "ok"]
        failed = [r for r in kept if r.get("status") != "ok"]
        per_run = [run_metrics(r) for r in ok]
        names = {AVERAGE, *HEADLINE_COLUMNS, *COST_COLUMNS} | {k for m in per_run for k in m}
        metrics = {name: summarize([m[name] for m in per_run if name in m]) for name in sorted(names)}
        gold = [m["eval/gold_reward"] for m in per_run if finite(m.get("eval/gold_reward"))]
        if gold:  # the interquartile mean over seeds with its stratified bootstrap interval
            lo, hi = stratified_bootstrap_interval([gold], iqm, n_boot=SEED_BOOT)
            metrics["eval/gold_reward"].update(iqm=iqm(gold), iqm_lo=lo, iqm_hi=hi)
        errors = list(dict.fromkeys(str(r.get("error") or "unknown error") for r in failed))
        rows.append({
            "method": method,
            "model": model,
            "dataset": dataset,
            "track": track,
            "setting": setting_label(setting),
            "status": "ok" if ok else "failed",
            "error": "; ".join(errors) if errors else None,
            "n_seeds": len(ok),
            "n_failed": len(failed),
            "n_duplicates": len(dropped),
            "duplicates": sorted(str(r.get("run_id")) for r in dropped),
            "seeds": sorted(r.get("seed") for r in ok if is_number(r.get("seed"))),
            "run_ids": sorted(str(r.get("run_id")) for r in recs),
            "failed_runs": [{"run_id": r.get("run_id"), "seed": r.get("seed"),
                             "error": r.get("error")} for r in failed],
            "groups": sorted({str(r.get("group")) for r in recs if r.get("group") is not None}),
            "beta": sorted({b for r in ok if (b := kl_coefficient(r)) is not None}),
            "lr": sorted({x for r in ok if (x := learning_rate(r)) is not None}),
            "platforms": sorted({platform_label(platform_identity(r.get("platform"))) for r in ok}),
            "dataset_variants": len({dataset_variant(r) for r in ok}),
            "ref_by_seed": {r.get("seed"): float(r["metrics"]["eval/ref_gold_reward"]) for r in ok
                            if finite((r.get("metrics") or {}).get("eval/ref_gold_reward"))},
            "metrics": metrics,
        })
    rows.sort(key=_sort_key)
    return rows


def mean_of(row: Mapping[str, Any], name: str) -> float | None:
    mean = (row["metrics"].get(name) or {}).get("mean")
    return mean if mean is not None and math.isfinite(mean) else None


def _sort_key(row: Mapping[str, Any]) -> tuple:
    gold = mean_of(row, "eval/gold_reward")
    return (row["dataset"], row["model"], row.get("track", ""), row["status"] == "failed",
            gold is None, -(gold or 0.0), row["method"], row.get("setting", ""))
