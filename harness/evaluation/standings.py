"""The leaderboard: a pure function of the run records in ``results/runs/``.

``build_table`` aggregates the records into one row per (method, model, dataset) over *distinct
seeds*; ``paired_comparisons`` compares the methods on the same (model, dataset, group) prompt by
prompt; ``comparison_warnings`` says where a comparison is weak; the renderers turn all of it into
Markdown, CSV and a self-contained HTML page (inline CSS and JS, plots embedded as ``data:`` URIs:
the page can be mailed or opened from disk with no network). ``build_leaderboard`` does it all for
a folder::

    python -m harness.leaderboard --runs results/runs --out results [--group compare]

Conventions

* The main table uses the records of one group (``group=``; default ``"compare"`` when any record
  has it, else all records). The reward–KL plot uses every group (tuning sweeps supply its β grid).
* A row is a (method, model, dataset); a method that ran several settings (β, lr) in the chosen
  group gets a row per setting — runs at different settings are never averaged together.
* One sample per seed: repeated records of a seed are one sample, the latest by ``created``
  (whatever its status); the others are counted in ``n_duplicates`` and flagged.
* Cells are ``mean ± h`` with h the half-width of the Student-t 95 % interval over seeds,
  x̄ ± t(0.975, n − 1)·s/√n (s with ``ddof=1``), rounded so that h keeps two significant digits;
  a single seed shows a bare mean. A metric missing from some seeds is averaged over those that
  have it and marked ``(n=k)``.
* Failed runs never enter a mean; they are counted in ``n_failed`` and their errors listed. A row
  whose runs all failed has status ``"failed"`` and its error.
* Rows are sorted by dataset, model, then gold reward (descending); all-failed rows last.
* An empty (or missing) runs folder is not an error: every file is still written, with an empty
  table and a note saying that no records were found.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import shlex
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.atomic import write_bytes, write_text
from harness.evaluation.plots import plot_reward_kl, plot_training_curves
from harness.evaluation.records import finite, is_number, load_records, track_of
from harness.evaluation.stats import (
    distinct_seeds,
    kl_coefficient,
    learning_rate,
    paired_bootstrap,
    platform_identity,
    platform_label,
    round_to_ci,
    summarize,
)

__all__ = [
    "AVERAGE",
    "COST_COLUMNS",
    "DEFAULT_GROUP",
    "GAIN",
    "HEADLINE_COLUMNS",
    "Column",
    "average_score",
    "build_leaderboard",
    "build_table",
    "columns",
    "comparison_warnings",
    "footer_lines",
    "format_cell",
    "is_task_metric",
    "is_task_score",
    "paired_comparisons",
    "plot_reward_kl",
    "plot_training_curves",
    "render_html",
    "render_markdown",
    "run_metrics",
    "screenshot",
    "row_groups",
    "select_group",
    "setting_label",
    "shown_columns",
    "write_csv",
    "write_paired_csv",
]

AVERAGE = "Average"
GAIN = "eval/gold_gain"
DEFAULT_GROUP = "compare"
HEADLINE_COLUMNS = ("eval/gold_reward", GAIN, "eval/ref_gold_reward", "eval/win_rate", "eval/kl")
COST_COLUMNS = ("cost/method_wall_s", "cost/method_peak_mem_mb")
_KEY_COLUMNS = ("method", "model", "dataset", "track")
TRACK_NOTE = ("what the method learns from: oracle = the task's exact (gold) reward; preferences = "
              "the task's preference pairs, directly (offline DPO) or through the reward model "
              "trained on them; methods are compared only within a track")
INFORMATION_NOTE = ("the same method on the oracle track minus on the preferences track: what "
                    "learning from the pairs instead of the gold reward costs")
_EXCLUDED_FROM_AVERAGE = ("perplexity", "bits_per_byte", "word_perplexity", "stderr")
def default_title(rows: Sequence[Mapping[str, Any]]) -> str:
    """``Alignment leaderboard: GRPO vs RLOO vs ...``: the rows' methods, in the rows' order."""
    methods = [str(m).upper() for m in dict.fromkeys(r.get("method") for r in rows) if m]
    return "Alignment leaderboard" + (f": {' vs '.join(methods)}" if methods else "")
MIN_SEEDS = 3
CEILING_MARGIN = 0.02
ALPHA = 0.05
SCREENSHOT_WIDTH = 1400


# --------------------------------------------------------------------------- metric helpers
def is_task_metric(name: str) -> bool:
    """True for an lm-eval task metric ``eval/<task>/<metric>`` (not its ``stderr``)."""
    parts = name.split("/")
    return (len(parts) == 3 and parts[0] == "eval" and all(parts)
            and "stderr" not in parts[2])


def is_task_score(name: str) -> bool:
    """True for a task metric that enters the Average (not perplexity-like, not a stderr)."""
    return is_task_metric(name) and not any(x in name.split("/")[2]
                                            for x in _EXCLUDED_FROM_AVERAGE)


def average_score(metrics: Mapping[str, float]) -> float | None:
    """Mean of the task scores (see :func:`is_task_score`) in ``metrics``; ``None`` if none."""
    scores = [v for k, v in metrics.items() if is_task_score(k) and is_number(v)]
    return sum(scores) / len(scores) if scores else None


def run_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's numeric ``metrics`` and ``cost`` in one dict; cost names get a ``cost/`` prefix
    when they lack it. Derived per run: ``eval/gold_gain`` = eval/gold_reward −
    eval/ref_gold_reward (the gain over the SFT reference, so its interval is a paired one) and
    ``Average`` (mean of the lm-eval task scores, kept for the CSV) when the run has task scores."""
    out: dict[str, float] = {}
    for name, value in (record.get("metrics") or {}).items():
        if is_number(value):
            out[str(name)] = float(value)
    for name, value in (record.get("cost") or {}).items():
        if is_number(value):
            key = str(name) if str(name).startswith("cost/") else f"cost/{name}"
            out[key] = float(value)
    if finite(out.get("eval/gold_reward")) and finite(out.get("eval/ref_gold_reward")):
        out[GAIN] = out["eval/gold_reward"] - out["eval/ref_gold_reward"]
    avg = average_score(out)
    if avg is not None:
        out[AVERAGE] = avg
    return out


# --------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class Column:
    """A shown column: a short ``label``, the metric ``key`` (a fixed key, or a pattern with
    ``<task>`` resolved per row), its ``definition`` and whether higher is better."""

    label: str
    key: str
    definition: str
    pattern: str | None = None  # a regex for per-row keys like eval/harness_<task>_pref/acc

    def resolve(self, row: Mapping[str, Any]) -> str | None:
        """The concrete metric key of this column in ``row`` (``None`` when it has none)."""
        if self.pattern is None:
            return self.key
        keys = sorted(k for k in row["metrics"] if re.fullmatch(self.pattern, k))
        own = [k for k in keys if re.fullmatch(self.pattern.replace("(.+)", re.escape(str(row["dataset"]))), k)]
        return (own or keys or [None])[0]


_PREF = Column("Pref acc", "eval/harness_<task>_pref/acc",
               "lm-eval: share of held-out preference pairs where the model puts more likelihood on the "
               "chosen response", pattern=r"eval/harness_(.+)_pref/acc")
_BPB = Column("bits/byte", "eval/harness_<task>_ppl/bits_per_byte",
              "lm-eval: bits per byte of held-out SFT texts (lower is better; the word and byte perplexities "
              "are left out: they are monotone in it)", pattern=r"eval/harness_(.+)_ppl/bits_per_byte")
_BASE_COLUMNS = (
    Column("Gold ↑", "eval/gold_reward",
           "mean gold (task) reward of the policy's responses to the held-out prompts; the ceiling is eval/gold_max"),
    Column("Δ vs SFT", GAIN, "eval/gold_reward − eval/ref_gold_reward per seed, then over seeds"),
    Column("SFT ref", "eval/ref_gold_reward", "the same gold reward for the SFT reference the method started from"),
    Column("Win rate", "eval/win_rate",
           "share of held-out prompts where the policy's gold reward beats the SFT reference's (ties half)"),
    Column("KL", "eval/kl", "KL(policy ‖ SFT reference) of sampled held-out responses, nats per sequence"),
)
_HELD_OUT_PREF = (
    Column("Pref ↑", "eval/pref_accuracy",
           "data without a gold reward: share of held-out preference pairs where the policy puts more "
           "likelihood on the chosen response (strict)"),
    Column("SFT pref", "eval/ref_pref_accuracy", "the same for the SFT reference"),
)
_TIME = Column("time", "cost/method_wall_s", "wall-clock seconds of the method's own training stage")
_MEMORY = Column("memory", "cost/method_peak_mem_mb",
                 "peak memory (MB) of the method's own stage: the rise in process RSS on CPU (rss_rise), "
                 "torch.cuda.max_memory_allocated on GPU (record platform.peak_mem_method)")
_COST_TABLE = (
    Column("method s", "cost/method_wall_s", _TIME.definition),
    Column("method MB", "cost/method_peak_mem_mb", _MEMORY.definition),
    Column("gen tok/s", "cost/gen_tokens_per_s", "generated tokens per second in the method's stage"),
    Column("train tok/s", "cost/train_tokens_per_s", "trained tokens per second in the method's stage"),
    Column("eval s", "cost/eval/wall_s", "wall-clock seconds of the evaluation stage"),
    Column("SFT s", "cost/sft/wall_s", "SFT stage training time (when cached: the time it took when trained)"),
    Column("RM s", "cost/rm/wall_s", "reward-model stage training time (when cached: when trained)"),
    Column("run s", "cost/wall_s", "wall-clock seconds of the whole run (cached stages load, not train)"),
    Column("responses", "budget/responses", "responses the method sampled (and scored: one reward call "
           "each); within a track every online method samples the same number"),
    Column("pairs", "budget/pairs", "preference pairs the method trained on, repeats counted (offline "
           "DPO: steps x batch; online DPO: the sampled pairs that were not ties)"),
    Column("steps", "budget/optimizer_steps", "the method's optimiser steps"),
    Column("trained tok", "budget/trained_tokens", "tokens of the sequences the method optimised on, "
           "summed over passes"),
)
_SKIPPED_TASK_METRIC = re.compile(r"eval/harness_.+_gold/gold_reward|.*perplexity.*")


def shown_columns(rows: Sequence[Mapping[str, Any]]) -> list[Column]:
    """The metric columns of the main table: Gold, Δ vs SFT, SFT ref, Win rate, KL, the held-out
    preference accuracies (data without a gold reward), then Pref acc and bits/byte when some row
    has them, any other lm-eval task metric (not
    ``harness_<task>_gold/gold_reward``, which repeats eval/gold_reward, nor perplexities), time,
    memory."""
    cols = list(_BASE_COLUMNS)
    keys = {k for r in rows for k in r["metrics"] if r["metrics"][k].get("n")}
    cols += [c for c in _HELD_OUT_PREF if c.key in keys]
    claimed = set()
    for col in (_PREF, _BPB):
        hits = {k for k in keys if col.pattern and re.fullmatch(col.pattern, k)}
        if hits:
            cols.append(col)
            claimed |= hits
    for key in sorted(k for k in keys if is_task_metric(k) and k not in claimed
                      and not _SKIPPED_TASK_METRIC.fullmatch(k)):
        cols.append(Column(key.split("/", 1)[1], key, "lm-eval task metric"))
    return [*cols, _TIME, _MEMORY]


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The full metric keys behind the shown columns, resolved over the rows (so
    ``eval/harness_arith_pref/acc``, not the pattern), then the cost table's keys, ``eval/gold_max``
    and ``Average``: the CSV's and the W&B table's columns."""
    out: list[str] = []
    for col in [*shown_columns(rows), *_COST_TABLE]:
        keys = sorted({k for r in rows if (k := col.resolve(r))}) if col.pattern else [col.key]
        out += [k for k in keys if k not in out]
    out += [k for k in ("eval/gold_max", AVERAGE) if k not in out]
    return out


# --------------------------------------------------------------------------- selecting and aggregating
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
        by_key[tuple(key_of(rec, k) for k in _KEY_COLUMNS)].append(rec)
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


def _mean(row: Mapping[str, Any], name: str) -> float | None:
    mean = (row["metrics"].get(name) or {}).get("mean")
    return mean if mean is not None and math.isfinite(mean) else None


def _sort_key(row: Mapping[str, Any]) -> tuple:
    gold = _mean(row, "eval/gold_reward")
    return (row["dataset"], row["model"], row.get("track", ""), row["status"] == "failed",
            gold is None, -(gold or 0.0), row["method"], row.get("setting", ""))


# --------------------------------------------------------------------------- paired comparisons
def _cells(records: Iterable[Mapping[str, Any]]
           ) -> dict[tuple[str, str, str, str], dict[str, dict[Any, Mapping[str, Any]]]]:
    """The ok records, one per seed (as :func:`build_table` keeps them), by cell ``(model,
    dataset, group, track)`` and method name (``"dpo (β=0.1, lr=5e-06)"`` for a method that ran
    several settings there): ``{cell: {method: {seed: record}}}``."""
    cells: dict[tuple[str, str, str, str], dict[str, dict[Any, Mapping[str, Any]]]] = defaultdict(dict)
    by_group: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_group[str(r.get("group"))].append(r)
    for group, grecs in by_group.items():
        for (method, model, dataset, track, setting), recs in row_groups(grecs).items():
            ok = [r for r in distinct_seeds(recs)[0] if r.get("status") == "ok"]
            if ok:
                name = f"{method} ({setting_label(setting)})" if setting else method
                cells[(model, dataset, group, track)][name] = {r.get("seed"): r for r in ok}
    return cells


def paired_comparisons(records: Iterable[Mapping[str, Any]], n_boot: int = 10_000, seed: int = 0,
                       ) -> list[dict[str, Any]]:
    """Every pair of methods on the same (model, dataset, group, track), compared prompt by
    prompt: methods are compared only with what learned from the same information.

    A method that ran several settings in a group enters once per setting, named e.g.
    ``"dpo (β=0.1, lr=5e-06)"`` (see :func:`row_groups`). Per pair (A, B), A the one with the
    higher mean gold: the seeds both ran (ok, one record per
    seed as in :func:`build_table`) whose ``per_prompt`` has the same ``prompts_sha256`` and
    length; d[s, i] = gold_A[s, i] − gold_B[s, i] goes to
    :func:`harness.evaluation.stats.paired_bootstrap` (``n_boot`` replicates, numpy seed
    ``seed``). Returns dicts ``{"model", "dataset", "group", "track", "a", "b", "n_seeds",
    "n_prompts", "seeds", "mean_diff", "ci_lo", "ci_hi", "p", "sign_flip_p", "significant",
    "skipped"}``; ``skipped`` says why a pair could not be compared (then the numbers are
    ``None``).
    """
    out = []
    for (model, dataset, group, track), methods in sorted(_cells(records).items()):
        def gold(m: str, methods: Mapping[str, Mapping[Any, Mapping[str, Any]]] = methods) -> float:
            vals = [float(r["metrics"]["eval/gold_reward"]) for r in methods[m].values()
                    if finite((r.get("metrics") or {}).get("eval/gold_reward"))]
            return sum(vals) / len(vals) if vals else -math.inf

        order = sorted(methods, key=lambda m: (-gold(m), m))
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                out.append({**_compare(model, dataset, group, a, b, methods[a], methods[b], n_boot,
                                       seed), "track": track})
    return out


def information_effect(records: Iterable[Mapping[str, Any]], n_boot: int = 10_000, seed: int = 0,
                       ) -> list[dict[str, Any]]:
    """The same method told the exact reward against told only the preference pairs: for each
    method that ran on both tracks of a (model, dataset, group), A = it on ``oracle``, B = it on
    ``preferences`` (each setting against each when it ran several), compared prompt by prompt
    over their common seeds as :func:`paired_comparisons` compares two methods. Δ gold > 0: what
    the reward model (or the pairs) lose of the gold reward's information. Returns the same
    dicts, ``track`` ``"oracle − preferences"``."""
    cells = _cells(records)
    out = []
    for (model, dataset, group, track), methods in sorted(cells.items()):
        if track != "oracle":
            continue
        other = cells.get((model, dataset, group, "preferences"), {})
        for a in sorted(methods):
            for b in sorted(other):
                if a.split(" (")[0] == b.split(" (")[0]:
                    out.append({**_compare(model, dataset, group, f"{a} · oracle",
                                           f"{b} · preferences", methods[a], other[b], n_boot, seed),
                                "track": "oracle − preferences"})
    return out


def _gold_list(per_prompt: Any) -> list[float] | None:
    values = per_prompt.get("gold_reward") if isinstance(per_prompt, Mapping) else None
    if not isinstance(values, list) or not values or not all(finite(v) for v in values):
        return None
    return [float(v) for v in values]


def _compare(model: str, dataset: str, group: str, a: str, b: str, ra: Mapping[Any, Mapping[str, Any]],
             rb: Mapping[Any, Mapping[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    result: dict[str, Any] = {"model": model, "dataset": dataset, "group": group, "a": a, "b": b,
                              "n_seeds": 0, "n_prompts": 0, "seeds": [], "mean_diff": None, "ci_lo": None,
                              "ci_hi": None, "p": None, "sign_flip_p": None, "significant": False,
                              "skipped": None}
    common = sorted(set(ra) & set(rb), key=lambda s: (s is None, str(s)))
    if not common:
        result["skipped"] = "no seed in common"
        return result
    rows_a, rows_b, seeds, reasons = [], [], [], []
    for s in common:
        pa, pb = ra[s].get("per_prompt"), rb[s].get("per_prompt")
        ga, gb = _gold_list(pa), _gold_list(pb)
        if ga is None or gb is None:
            reasons.append(f"seed {s}: no per-prompt gold rewards")
        elif pa.get("prompts_sha256") != pb.get("prompts_sha256") or len(ga) != len(gb):
            reasons.append(f"seed {s}: different held-out prompts (prompts_sha256)")
        elif rows_a and len(ga) != len(rows_a[0]):
            reasons.append(f"seed {s}: {len(ga)} prompts, not {len(rows_a[0])}")
        else:
            rows_a.append(ga)
            rows_b.append(gb)
            seeds.append(s)
    if not seeds:
        result["skipped"] = "; ".join(dict.fromkeys(r.split(": ", 1)[1] for r in reasons))
        return result
    res = paired_bootstrap(rows_a, rows_b, n_boot=n_boot, seed=seed)
    result.update(n_seeds=res.n_seeds, n_prompts=res.n_prompts, seeds=seeds, mean_diff=res.mean_diff,
                  ci_lo=res.ci_lo, ci_hi=res.ci_hi, p=res.p_value, sign_flip_p=res.sign_flip_p,
                  significant=res.p_value < ALPHA, skipped="; ".join(reasons) or None)
    return result


# --------------------------------------------------------------------------- warnings
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
        gold, top = _mean(row, "eval/gold_reward"), _mean(row, "eval/gold_max")
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
        gains = [(abs(g), row["method"]) for row in cell_rows if (g := _mean(row, GAIN)) is not None]
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


# --------------------------------------------------------------------------- formatting
def format_cell(cell: Mapping[str, Any] | None, n_seeds: int) -> str:
    """``"0.600 ± 0.035"`` (mean ± 95 % half-width, rounded by
    :func:`harness.evaluation.stats.round_to_ci`); a bare mean for one value; ``"—"`` when
    missing; ``(n=k)`` when only ``k`` of the ``n_seeds`` seeds reported the metric."""
    if not cell or cell.get("mean") is None:
        return "—"
    mean, n = cell["mean"], cell.get("n", n_seeds)
    m, h = round_to_ci(mean, cell.get("half"))
    text = m if h is None else f"{m} ± {h}"
    if 0 < n < n_seeds:
        text += f" (n={n})"
    return text


def _num(x: float) -> str:
    return f"{x:g}"


def _setting(values: Sequence[float]) -> str:
    return "—" if not values else ", ".join(_num(v) for v in values)


def _seeds_text(row: Mapping[str, Any]) -> str:
    text = f"{row['n_seeds']}"
    if row["n_failed"]:
        text += f" (+{row['n_failed']} failed)"
    if row.get("n_duplicates"):
        text += f" ‡{row['n_duplicates']} dup"
    return text


def _status_text(row: Mapping[str, Any], limit: int | None = 120) -> str:
    if row["status"] == "ok":
        return "ok"
    err = " ".join(str(row.get("error") or "").split())
    if limit is not None and len(err) > limit:
        err = err[: limit - 1] + "…"
    return f"failed: {err}" if err else "failed"


def _cached_text(row: Mapping[str, Any], stage: str) -> str:
    """``"cached"`` when every seed loaded the stage from the cache, ``"cached k/n"`` for some."""
    cell = row["metrics"].get(f"cost/{stage}/cached") or {}
    if not cell.get("n") or cell.get("mean") is None:
        return ""
    k = round(cell["mean"] * cell["n"])
    return "" if k == 0 else "cached" if k == cell["n"] else f"cached {k}/{cell['n']}"


def _cost_cells(row: Mapping[str, Any]) -> list[str]:
    cells = []
    for col in _COST_TABLE:
        text = format_cell(row["metrics"].get(col.key), row["n_seeds"]).replace(" ± 0 ", " ").removesuffix(" ± 0")
        stage = col.key.split("/")[1] if col.key.count("/") == 2 else None
        if stage in ("sft", "rm") and (c := _cached_text(row, stage)):
            text += f" ({c})"
        cells.append(text)
    return cells


def _bound(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _p_text(p: float | None) -> str:
    """Three significant digits below 0.1 (so 0.0498 never reads as "0.050"), else two decimals."""
    return "—" if p is None else f"{p:.3g}" if p < 0.1 else f"{p:.2f}"


def _paired_cells(c: Mapping[str, Any]) -> list[str]:
    if c["mean_diff"] is None:
        return [f"{c['a']} − {c['b']}", "—", "—", "—", "—", "0", "0", f"skipped: {c['skipped']}"]
    mark = "✓" if c["significant"] else ""
    return [f"{c['a']} − {c['b']}", _bound(c["mean_diff"]), f"[{_bound(c['ci_lo'])}, {_bound(c['ci_hi'])}]",
            _p_text(c["p"]) + (f" {mark}" if mark else ""), _p_text(c["sign_flip_p"]), str(c["n_seeds"]),
            str(c["n_prompts"]), c["skipped"] or ""]


_PAIRED_HEAD = ("A − B", "Δ gold", "95% interval", "p", "sign-flip p", "seeds", "prompts", "note")


def footer_lines(cols: Sequence[Column], rows: Sequence[Mapping[str, Any]] = (), n_boot: int = 10_000,
                 seed: int = 0) -> list[str]:
    """The footer: how cells are computed, every shown column's label, metric key and definition,
    the seeds column, and the paired test's method."""
    lines = [
        "Cells: mean ± half-width of the 95% confidence interval over distinct seeds, Student-t: "
        "mean ± t(0.975, n−1)·s/√n with s the sample standard deviation (ddof=1); rounded so the "
        "half-width keeps two significant digits. A bare number is a single seed (no interval); (n=k): "
        "only k seeds reported the metric. The CSV has every metric at full precision (mean, std, ci_lo, "
        "ci_hi, n).",
        f"track: {TRACK_NOTE}.",
        "β, lr: the method's KL coefficient (config.method.beta; config.method.kl_coef in PPO records "
        "written before the rename) and learning rate (config.method.optim.lr) of the rows' runs.",
    ]
    for col in cols:
        key = col.key
        if col.pattern:
            concrete = sorted({k for r in rows if (k := col.resolve(r))})
            if concrete:
                key += " (here: " + ", ".join(concrete) + ")"
        lines.append(f"{col.label}: {key}: {col.definition}.")
    lines += [
        "seeds: distinct seeds of ok runs; repeated records of one seed are one sample, the latest by "
        "created (‡k dup: k older records dropped); +k failed: seeds whose run failed, excluded from "
        "every mean.",
        f"Paired differences: Δ gold = mean over seeds s and held-out prompts i of gold_A[s,i] − gold_B[s,i], "
        "over the seeds both methods ran on the same prompts (equal per_prompt.prompts_sha256). 95% interval: "
        f"percentile interval of a two-level paired bootstrap (B = {n_boot} replicates: seeds resampled with "
        "replacement, then prompts with replacement within each seed, the same prompts for both methods; "
        f"numpy seed {seed}). p: two-sided bootstrap p = min(1, 2·min(P(Δ*≤0), P(Δ*≥0))) with "
        "P = (1 + count)/(B + 1); ✓: p < 0.05. Sign-flip p: exact permutation test of the per-seed mean "
        "differences (its smallest value is 2/2^S: 0.25 with 3 seeds).",
    ]
    return lines


def _md_escape(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _md_table(head: Sequence[str], body: Iterable[Sequence[str]], align: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in head) + " |",
             "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in cells) + " |" for cells in body]
    return lines


def _main_cells(row: Mapping[str, Any], cols: Sequence[Column]) -> list[str]:
    failed = row["status"] == "failed"
    cells = [str(row[k]) for k in _KEY_COLUMNS] + [_setting(row["beta"]), _setting(row["lr"])]
    for col in cols:
        key = col.resolve(row)
        cells.append("failed" if failed else format_cell(row["metrics"].get(key) if key else None,
                                                         row["n_seeds"]))
    return cells + [_seeds_text(row), _status_text(row)]


def render_markdown(rows: Sequence[Mapping[str, Any]], header_lines: Sequence[str] = (),
                    title: str | None = None, plots: Mapping[str, str] | None = None,
                    paired: Sequence[Mapping[str, Any]] | None = None,
                    warnings: Sequence[str] | None = None, n_boot: int = 10_000, seed: int = 0,
                    information: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The leaderboard as Markdown: a title, ``header_lines`` (one paragraph line each: the
    reproduce command, provenance, platforms), the ``warnings`` (default: computed from the
    rows), the main table, its footer, the failed runs, the paired differences (within a track),
    the information effect (:func:`information_effect`), the cost table, then ``plots``
    (``{caption: relative image path}``) as image links."""
    cols = shown_columns(rows)
    warnings = comparison_warnings(rows) if warnings is None else warnings
    title = title or default_title(rows)
    lines = [f"# {title}", ""]
    for line in header_lines:
        lines += [line, ""]
    if warnings:
        lines += ["**Warnings**", ""] + [f"- ⚠ {_md_escape(w)}" for w in warnings] + [""]
    if not rows:
        lines += ["_No run records found: the table is empty._", ""]
    head = [*_KEY_COLUMNS, "β", "lr", *(c.label for c in cols), "seeds", "status"]
    align = [":---"] * len(_KEY_COLUMNS) + ["---:"] * (len(cols) + 3) + [":---"]
    lines += _md_table(head, (_main_cells(r, cols) for r in rows), align)
    lines += ["", *(f"- {_md_escape(f)}" for f in footer_lines(cols, rows, n_boot, seed))]
    failures = [(row, f) for row in rows for f in row["failed_runs"]]
    if failures:
        lines += ["", "## Failed runs", ""]
        for row, f in failures:
            err = _md_escape(str(f.get("error") or "unknown error"))
            lines.append(f"- `{f.get('run_id')}` ({row['method']}, {row['model']}, "
                         f"{row['dataset']}, seed {f.get('seed')}): {err}")
    for heading, items in (("Paired differences (within a track)", paired),
                           (f"Information effect ({INFORMATION_NOTE})", information)):
        if not items:
            continue
        lines += ["", f"## {heading}", ""]
        for (model, dataset, group, track), cell in _by_cell(items).items():
            lines += [f"**{model} · {dataset} · {track or 'no track'}** (group {group})", ""]
            lines += _md_table(_PAIRED_HEAD, (_paired_cells(c) for c in cell),
                               [":---"] + ["---:"] * 6 + [":---"])
            lines.append("")
    ok_rows = [r for r in rows if r["status"] == "ok"]
    if ok_rows:
        lines += ["", "## Cost", ""]
        lines += _md_table([*_KEY_COLUMNS, *(c.label for c in _COST_TABLE)],
                           ([*(str(r[k]) for k in _KEY_COLUMNS), *_cost_cells(r)] for r in ok_rows),
                           [":---"] * len(_KEY_COLUMNS) + ["---:"] * len(_COST_TABLE))
        lines += ["", *(f"- {c.label}: {c.key}: {c.definition}." for c in _COST_TABLE),
                  "- (cached): the stage was loaded from the cache in every seed (cached k/n: in k of n); its "
                  "time is the time it took when it was trained."]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{caption}]({target})" for caption, target in plots.items()]
    return "\n".join(lines) + "\n"


def _by_cell(paired: Sequence[Mapping[str, Any]]
             ) -> dict[tuple[str, str, str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for c in paired:
        out[(c["model"], c["dataset"], c["group"], c.get("track", ""))].append(c)
    return dict(out)


# --------------------------------------------------------------------------- CSV
def _csv_value(x: Any) -> Any:
    return "" if x is None else x


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write the rows as CSV (atomically): key columns, status, n_seeds, n_failed, n_duplicates,
    groups, beta, lr, platforms, then ``<metric>_mean``, ``_std``, ``_ci_lo``, ``_ci_hi``, ``_n``
    for every key of :func:`columns` (full keys, full precision), then the error."""
    cols = columns(rows)
    header = [*_KEY_COLUMNS, "status", "n_seeds", "n_failed", "n_duplicates", "groups", "beta", "lr",
              "platforms"]
    for c in cols:
        header += [f"{c}_{s}" for s in ("mean", "std", "ci_lo", "ci_hi", "n")]
    header.append("error")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = [row[k] for k in _KEY_COLUMNS] + [row["status"], row["n_seeds"], row["n_failed"],
                                                   row.get("n_duplicates", 0), ";".join(row.get("groups", [])),
                                                   ";".join(map(repr, row.get("beta", []))),
                                                   ";".join(map(repr, row.get("lr", []))),
                                                   ";".join(row.get("platforms", []))]
        for c in cols:
            cell = row["metrics"].get(c) or {}
            values += [_csv_value(cell.get(s)) for s in ("mean", "std", "ci_lo", "ci_hi")] + [cell.get("n", 0)]
        values.append(_csv_value(row.get("error")))
        writer.writerow(values)
    return write_text(path, buf.getvalue())


_PAIRED_FIELDS = ("model", "dataset", "group", "track", "a", "b", "n_seeds", "n_prompts", "mean_diff",
                  "ci_lo", "ci_hi", "p", "sign_flip_p", "significant", "skipped")


def write_paired_csv(paired: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """The paired differences as CSV (full precision), one line per pair; ``track`` is the
    track both ran on, or ``"oracle − preferences"`` for a line of the information effect."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_PAIRED_FIELDS)
    for c in paired:
        writer.writerow([_csv_value(c.get(k)) for k in _PAIRED_FIELDS])
    return write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- HTML
_CSS = """
*{box-sizing:border-box}
html{font-size:13px}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:.8rem 1rem;
max-width:1400px;color:#222;line-height:1.35;overflow-wrap:anywhere}
h1{font-size:1.35rem;margin:.2rem 0 .5rem}h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
h3{font-size:.95rem;margin:.8rem 0 .2rem}
p{margin:.3rem 0}
code,pre{background:#f4f4f4;padding:.05rem .25rem;border-radius:3px;font-size:.9em;overflow-wrap:anywhere}
.box{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:11.5px;margin:.5rem 0;max-width:100%}
th,td{border:1px solid #ddd;padding:.2rem .35rem}
td{white-space:nowrap}
td.wrap{white-space:normal;min-width:8rem;max-width:22rem}
th{background:#f0f0f5;cursor:pointer;user-select:none;position:sticky;top:0;white-space:normal;
vertical-align:bottom;font-weight:600}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fdecec;color:#a33}
tr.first td{border-top:2px solid #999}
tr.sig td{font-weight:600}
tbody tr:hover td{background:#f7f7ff}
.note,.footer{color:#555;font-size:11.5px}
.footer{margin:.3rem 0 0 1rem;padding:0}.footer li{margin:.1rem 0}
.warn{background:#fff6e0;border:1px solid #f0c36d;border-radius:4px;padding:.4rem .8rem;margin:.6rem 0;
font-size:12px}
.warn ul{margin:.2rem 0 .2rem 1rem;padding:0}
figure{margin:.8rem 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555}
"""

_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, i) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var asc = !th.classList.contains("asc");
    table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(asc ? "asc" : "desc");
    var key = function (r) {
      var c = r.cells[i];
      return c.hasAttribute("data-sort") ? c.getAttribute("data-sort") : c.textContent.trim();
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = Number(x), ny = Number(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _th(label: str, tip: str) -> str:
    return f'<th title="{html.escape(tip)} (click to sort)">{html.escape(label)}</th>'


def render_html(rows: Sequence[Mapping[str, Any]], plots: Mapping[str, Path | str],
                header_lines: Sequence[str] = (), title: str | None = None,
                paired: Sequence[Mapping[str, Any]] | None = None, warnings: Sequence[str] | None = None,
                n_boot: int = 10_000, seed: int = 0,
                information: Sequence[Mapping[str, Any]] | None = None) -> str:
    """A self-contained HTML page that fits a 1,400-pixel window: inline CSS (``max-width``
    1400px, small fonts, wrapping headers), the warnings, a sortable main table (click a header;
    inline vanilla JS) with every column's key and definition as a ``title=`` tooltip and in the
    footer, the paired differences, the cost table, the PNG ``plots`` (``{caption: path}``;
    missing files are skipped) as base64 data URIs (``max-width:100%``). No external scripts,
    styles, fonts or images."""
    esc = html.escape
    title = title or default_title(rows)
    cols = shown_columns(rows)
    warnings = comparison_warnings(rows) if warnings is None else warnings
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>"]
    for line in header_lines:
        out.append(f"<p>{_inline_code(line)}</p>")
    if warnings:
        out.append('<div class="warn"><b>Warnings</b><ul>'
                   + "".join(f"<li>⚠ {esc(w)}</li>" for w in warnings) + "</ul></div>")
    if not rows:
        out.append('<p class="note">No run records found: the table is empty.</p>')
    head = [_th("method", "the alignment method"), _th("model", "the policy model"), _th("dataset", "the task"),
            _th("track", TRACK_NOTE),
            _th("β", "KL coefficient: config.method.beta (kl_coef in older PPO records)"),
            _th("lr", "learning rate: config.method.optim.lr")]
    head += [_th(c.label, f"{c.key}: {c.definition}") for c in cols]
    head += [_th("seeds", "distinct ok seeds (+failed, ‡duplicates dropped)"), _th("status", "ok or failed")]
    out.append('<div class="box"><table class="sortable" id="leaderboard"><thead><tr>' + "".join(head)
               + "</tr></thead><tbody>")
    previous = None
    for row in rows:
        failed = row["status"] == "failed"
        first = previous is not None and (row["model"], row["dataset"]) != previous
        previous = (row["model"], row["dataset"])
        cells = _main_cells(row, cols)
        n_key = len(_KEY_COLUMNS) + 2  # the key columns, β and lr
        tds = [f"<td>{esc(c)}</td>" for c in cells[:n_key]]
        for col, text in zip(cols, cells[n_key:-2], strict=True):
            key = col.resolve(row)
            mean = None if failed or key is None else _mean(row, key)
            tip = f"{key or col.key}" + (f" (n={row['metrics'][key]['n']})" if mean is not None else "")
            tds.append(f'<td class="num" data-sort="{"" if mean is None else repr(mean)}" title="{esc(tip)}">'
                       f"{esc(text)}</td>")
        tds.append(f'<td class="num" data-sort="{row["n_seeds"]}">{esc(cells[-2])}</td>')
        full = _status_text(row, limit=None)
        tds.append(f'<td class="wrap" title="{esc(full)}">{esc(_status_text(row, limit=80))}</td>')
        out.append(f'<tr class="{"failed" if failed else "ok"}{" first" if first else ""}">' + "".join(tds)
                   + "</tr>")
    out.append("</tbody></table></div>")
    out.append('<ul class="footer">' + "".join(f"<li>{esc(f)}</li>" for f in footer_lines(cols, rows, n_boot, seed))
               + "<li>Click a column header to sort.</li></ul>")
    failures = [(row, f) for row in rows for f in row["failed_runs"]]
    if failures:
        out.append("<h2>Failed runs</h2><ul>")
        for row, f in failures:
            out.append(f"<li><code>{esc(str(f.get('run_id')))}</code> ({esc(row['method'])}, "
                       f"{esc(row['model'])}, {esc(row['dataset'])}, seed "
                       f"{esc(str(f.get('seed')))}): {esc(str(f.get('error') or '?'))}</li>")
        out.append("</ul>")
    tips = ("A is the method with the higher mean gold", "mean over seeds and prompts of gold_A − gold_B",
            "95% percentile interval of the two-level paired bootstrap",
            "two-sided bootstrap p; ✓ p < 0.05", "exact sign-flip test over per-seed mean differences",
            "seeds both methods ran on the same prompts", "held-out prompts per seed", "why seeds were left out")
    for heading, items in (("Paired differences (within a track)", paired),
                           (f"Information effect ({INFORMATION_NOTE})", information)):
        if not items:
            continue
        out.append(f"<h2>{esc(heading)}</h2>")
        for (model, dataset, group, track), cell in _by_cell(items).items():
            out.append(f"<h3>{esc(model)} · {esc(dataset)} · {esc(track or 'no track')} "
                       f"<span class=\"note\">(group {esc(group)})</span></h3>")
            out.append('<div class="box"><table class="paired"><thead><tr>'
                       + "".join(f'<th title="{esc(t)}">{esc(h)}</th>' for h, t in zip(_PAIRED_HEAD, tips, strict=True))
                       + "</tr></thead><tbody>")
            for c in cell:
                cells = _paired_cells(c)
                tds = [f"<td>{esc(cells[0])}</td>"] + [f'<td class="num">{esc(x)}</td>' for x in cells[1:-1]]
                tds.append(f'<td class="wrap">{esc(cells[-1])}</td>')
                out.append(f'<tr class="{"sig" if c["significant"] else ""}">' + "".join(tds) + "</tr>")
            out.append("</tbody></table></div>")
        out.append('<p class="note">Bold and ✓: p &lt; 0.05. See the footer above for the method.</p>')
    ok_rows = [r for r in rows if r["status"] == "ok"]
    if ok_rows:
        out.append("<h2>Cost</h2>")
        out.append('<div class="box"><table class="cost"><thead><tr>'
                   + "".join(_th(k, k) for k in _KEY_COLUMNS)
                   + "".join(_th(c.label, f"{c.key}: {c.definition}") for c in _COST_TABLE) + "</tr></thead><tbody>")
        for r in ok_rows:
            out.append("<tr>" + "".join(f"<td>{esc(str(r[k]))}</td>" for k in _KEY_COLUMNS)
                       + "".join(f'<td class="num">{esc(x)}</td>' for x in _cost_cells(r)) + "</tr>")
        out.append("</tbody></table></div>")
        out.append('<ul class="footer">' + "".join(f"<li>{esc(c.label)}: {esc(c.key)}: {esc(c.definition)}.</li>"
                                                   for c in _COST_TABLE)
                   + "<li>(cached): loaded from the cache in every seed (cached k/n: in k of n); the time is the "
                     "time it took when it was trained.</li></ul>")
    figures = []
    for caption, path in plots.items():
        p = Path(path)
        if not p.is_file():
            continue
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    if figures:
        out.append("<h2>Plots</h2>")
        out += figures
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"


def _inline_code(line: str) -> str:
    """Escape a Markdown-ish header line for HTML, turning `code` spans into <code>."""
    parts = line.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(html_path: Path | str, png_path: Path | str, width: int = SCREENSHOT_WIDTH,
               height: int = 2400, timeout_s: float = 90.0) -> Path | None:
    """A PNG of ``html_path`` as headless Chromium renders it in a ``width``×``height`` window
    (written atomically to ``png_path``), or ``None`` when Chromium is not installed or fails."""
    exe = _chromium()
    if exe is None:
        return None
    html_path = Path(html_path).resolve()
    with tempfile.TemporaryDirectory(prefix="leaderboard-shot-") as tmp:
        shot = Path(tmp) / "shot.png"
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu",
               f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               f"--screenshot={shot}", html_path.as_uri()]
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        if not shot.is_file() or shot.stat().st_size == 0:
            return None
        return write_bytes(png_path, shot.read_bytes())


# --------------------------------------------------------------------------- everything at once
def reproduce_command(records: Sequence[Mapping[str, Any]]) -> str | None:
    """A Hydra multirun command covering the records' methods, models, datasets and seeds."""
    if not records:
        return None
    parts = ["python", "-m", "harness", "-m"]
    for key in ("method", "model", "dataset", "seed"):
        values = sorted({str(r.get(key)) for r in records if r.get(key) is not None},
                        key=lambda v: (len(v), v) if key == "seed" else (0, v))
        if values:
            parts.append(f"{key}={','.join(values)}")
    return " ".join(shlex.quote(p) for p in parts)


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies inside it (portable headers)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


HEADER_FILE = "leaderboard_header.json"


def header_settings(out_dir: Path, command: str | None, note: str | None,
                    group: str | None = None) -> tuple[str | None, str | None, str | None]:
    """The header's ``command``, ``note`` and the tables' ``group``, kept across rebuilds in
    ``out_dir/leaderboard_header.json``.

    A value given (even ``""``) replaces the stored one and is written back; a value not given
    (``None``) is read from the file, so ``python -m harness.leaderboard`` with no ``--note``
    rebuilds the same header it wrote last time. Raises ``ValueError`` naming the file when it is
    not a JSON object of strings.
    """
    path = Path(out_dir) / HEADER_FILE
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err}); delete it or fix it") from err
        if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
            raise ValueError(f"{path}: expected a JSON object of strings "
                             '{"command": "...", "note": "..."}; delete it or fix it')
    given = {k: v for k, v in (("command", command), ("note", note), ("group", group))
             if v is not None}
    if given:
        merged = {**{k: v for k, v in stored.items() if k in ("command", "note", "group")},
                  **given}
        if merged != stored:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(merged, indent=1, ensure_ascii=False) + "\n")
        stored = merged
    return (stored.get("command") or None, stored.get("note") or None,
            stored.get("group") or None)


def build_leaderboard(runs_dir: Path | str, out_dir: Path | str, command: str | None = None, *,
                      group: str | None = None, note: str | None = None, screenshot: bool = True,
                      n_boot: int = 10_000, seed: int = 0) -> dict[str, Path]:
    """Read the records in ``runs_dir`` and write, atomically, into ``out_dir``:
    ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard_paired.csv``, ``leaderboard.html``,
    ``reward_kl.png``, ``training_curves.png`` and, with ``screenshot`` and Chromium installed,
    ``leaderboard.png`` (the HTML in a 1,400-pixel window). Returns ``{"markdown", "csv",
    "paired_csv", "html", "reward_kl", "training_curves"[, "screenshot"]}`` → path.

    The tables use the records of ``group`` (comma-separated for several; default: the one given
    last time, else ``"compare"`` when any record has it, else all); the reward–KL plot uses all
    records. ``note`` is shown in the header (e.g. "β and lr
    tuned on the validation split"). ``command`` is the command that reproduces the runs; by
    default a multirun command is derived from the records. Both are kept for later rebuilds in
    ``out_dir/leaderboard_header.json`` (see :func:`header_settings`). ``n_boot`` and ``seed`` set the
    paired bootstrap. An empty or missing ``runs_dir`` is not an error: all files are written
    with an empty table and a note.
    """
    runs_dir, out_dir = _shown(Path(runs_dir)), _shown(Path(out_dir))
    command, note, group = header_settings(out_dir, command, note, group)
    rejected: list[tuple[Path, str]] = []
    all_records = load_records(runs_dir, rejected)
    records, chosen = select_group(all_records, group)
    rows = build_table(records)
    paired = paired_comparisons(records, n_boot=n_boot, seed=seed)
    information = information_effect(records, n_boot=n_boot, seed=seed)
    warnings = comparison_warnings(rows, records)
    if rejected:
        warnings.insert(0, f"{len(rejected)} file(s) in the runs folder are not valid records and "
                           "are left out of every count: "
                        + "; ".join(f"{p.name}: {why}" for p, why in rejected) + ".")

    command = command or reproduce_command(records)
    n_failed = sum(r.get("status") != "ok" for r in records)
    versions = sorted({str(r.get("harness_version")) for r in records if r.get("harness_version")})
    commits = sorted({str(r.get("git_commit"))[:12] for r in records if r.get("git_commit")})
    rebuild = f"python -m harness.leaderboard --runs {shlex.quote(str(runs_dir))} " \
              f"--out {shlex.quote(str(out_dir))}" + (f" --group {shlex.quote(group)}" if group else "")
    header = []
    if command:
        header.append(f"Reproduce the runs: `{command}`")
    header.append(f"Rebuild this leaderboard: `{rebuild}`")
    if all_records:
        prov = f"{len(records)} run records ({n_failed} failed) from `{runs_dir}`"
        if chosen is not None:
            others = defaultdict(int)
            shown = group_names(chosen)
            for r in all_records:
                if r.get("group") not in shown:
                    others[str(r.get("group"))] += 1
            prov += f", group{'s' if len(shown) > 1 else ''} " \
                    + ", ".join(f"`{g}`" for g in sorted(shown))
            if others:
                prov += " (other groups, used only in the reward–KL plot: " \
                        + ", ".join(f"`{g}` {n}" for g, n in sorted(others.items())) + ")"
        if versions:
            prov += f"; harness {', '.join(versions)}"
        if commits:
            prov += f"; commits {', '.join(commits)}"
        header.append(prov + ".")
        where = f"the `{chosen}` sweep" if chosen and "," not in chosen else "their runs"
        header.append(f"Methods are shown at the setting {where} ran (columns β and lr)"
                      + (f": {note}" if note else "") + ".")
        platforms = table_platforms(records)
        header.append(("Platform: " if len(platforms) <= 1 else "Platforms: ")
                      + ("; ".join(platforms) if platforms else "— (not recorded)") + ".")
    else:
        header.append(f"No run records found in `{runs_dir}`.")
        if note:
            header.append(note)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "reward_kl": plot_reward_kl(all_records, out_dir / "reward_kl.png"),
        "training_curves": plot_training_curves(records, out_dir / "training_curves.png"),
    }
    plots = {"Reward–KL frontier: mean held-out gold reward vs KL per sequence at each β, 95% intervals "
             "(all groups)": paths["reward_kl"],
             "Training curves: held-out gold vs trained tokens, train/kl, reward-model score (EMA; raw faint)":
                 paths["training_curves"]}
    paths["markdown"] = write_text(
        out_dir / "leaderboard.md",
        render_markdown(rows, header, plots={c: p.name for c, p in plots.items()}, paired=paired,
                        warnings=warnings, n_boot=n_boot, seed=seed, information=information))
    paths["csv"] = write_csv(rows, out_dir / "leaderboard.csv")
    paths["paired_csv"] = write_paired_csv([*paired, *information],
                                           out_dir / "leaderboard_paired.csv")
    paths["html"] = write_text(out_dir / "leaderboard.html",
                                      render_html(rows, plots, header, paired=paired, warnings=warnings,
                                                  n_boot=n_boot, seed=seed, information=information))
    if screenshot:
        shot = _take_screenshot(paths["html"], out_dir / "leaderboard.png")
        if shot is not None:
            paths["screenshot"] = shot
    return paths


_take_screenshot = screenshot
