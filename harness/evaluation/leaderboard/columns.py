"""The leaderboard's columns: the metric helpers, the key columns, every shown column with its
metric key and definition, and which of them a set of rows shows."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.evaluation.records import finite, is_number

AVERAGE = "Average"
GAIN = "eval/gold_gain"
HEADLINE_COLUMNS = ("eval/gold_reward", GAIN, "eval/ref_gold_reward", "eval/win_rate", "eval/kl")
COST_COLUMNS = ("cost/method_wall_s", "cost/method_peak_mem_mb")
KEY_COLUMNS = ("method", "model", "dataset", "track")
"""What a row is (with its setting, β and lr, when a method ran several)."""
TRACK_NOTE = ("what the method learns from: oracle = the task's exact (gold) reward; preferences = "
              "the task's preference pairs, directly (offline DPO) or through the reward model "
              "trained on them; methods are compared only within a track")
_EXCLUDED_FROM_AVERAGE = ("perplexity", "bits_per_byte", "word_perplexity", "stderr")


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


@dataclass(frozen=True)
class Column:
    """A shown column: a short ``label``, the metric ``key`` (a fixed key, or a pattern with
    ``<task>`` resolved per row), its ``definition`` and whether higher is better."""

    label: str
    key: str
    definition: str
    pattern: str | None = None  # a regex for per-row keys like eval/harness_<task>_pref/acc
    stat: str = "mean"          # mean (± the t half-width) | iqm ([its bootstrap interval])

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
    Column("Gold IQM", "eval/gold_reward",
           "interquartile mean of the seeds' gold (the mean of the middle half; Agarwal et al. 2021) "
           "with its 95% stratified bootstrap interval over seeds", stat="iqm"),
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
_REWARD_MODEL = (
    Column("RM acc", "eval/rewards_acc",
           "reward-model rows: the kept checkpoint's pair accuracy on the validation pairs (the "
           "chosen response scores higher)"),
    Column("SFT pair acc", "eval/sft_pair_acc",
           "reward-model rows: the SFT policy's own likelihood accuracy on the same pairs, what a "
           "reward model must beat to add information"),
)
_TIME = Column("time", "cost/method_wall_s", "wall-clock seconds of the method's own training stage")
_MEMORY = Column("memory", "cost/method_peak_mem_mb",
                 "peak memory (MB) of the method's own stage: the rise in process RSS on CPU (rss_rise), "
                 "torch.cuda.max_memory_allocated on GPU (record platform.peak_mem_method)")
COST_TABLE = (
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
    preference accuracies (data without a gold reward), the reward model's pair accuracy beside
    the SFT policy's (reward-model rows), then Pref acc and bits/byte when some row
    has them, any other lm-eval task metric (not
    ``harness_<task>_gold/gold_reward``, which repeats eval/gold_reward, nor perplexities), time,
    memory."""
    cols = list(_BASE_COLUMNS)
    keys = {k for r in rows for k in r["metrics"] if r["metrics"][k].get("n")}
    cols += [c for c in (*_HELD_OUT_PREF, *_REWARD_MODEL) if c.key in keys]
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
    for col in [*shown_columns(rows), *COST_TABLE]:
        keys = sorted({k for r in rows if (k := col.resolve(r))}) if col.pattern else [col.key]
        out += [k for k in keys if k not in out]
    out += [k for k in ("eval/gold_max", AVERAGE) if k not in out]
    return out
