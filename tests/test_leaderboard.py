"""The leaderboard on hand-made records: aggregation over distinct seeds, intervals, paired tests,
warnings, labels and footer, failures, renderers, HTML width, CLI, the W&B table."""

from __future__ import annotations

import base64
import csv
import json
import math
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from harness.evaluation.leaderboard import (
    average_score,
    build_leaderboard,
    build_table,
    columns,
    comparison_warnings,
    footer_lines,
    format_cell,
    information_effect,
    is_task_metric,
    is_task_score,
    paired_comparisons,
    plot_reward_kl,
    plot_training_curves,
    render_html,
    render_markdown,
    select_group,
    shown_columns,
    take_screenshot,
    write_csv,
)
from harness.evaluation.leaderboard import build as lb
from harness.evaluation.records import track_of, write_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def rec(method: str, seed: int, metrics: dict, *, model: str = "llama_small",
        status: str = "ok", error: str | None = None, cost: dict | None = None,
        history: dict | None = None, group: str = "test", created: str = "2026-11-24T00:00:00+00:00",
        suffix: str = "", **extra) -> dict:
    """A hand-made run record (``extra``: platform, per_prompt, reward_source, config, ...); an
    online method's ``reward_source`` defaults to the reward model, so that every record of a
    test is on the preferences track with offline DPO unless it says otherwise."""
    if method not in ("dpo", "sft", "rm"):
        extra.setdefault("reward_source", "rm")
    r = {
        "run_id": f"{method}-{model}-toy-s{seed}{suffix}",
        "status": status, "error": error,
        "method": method, "model": model, "dataset": "toy", "seed": seed, "group": group,
        "metrics": metrics, "cost": cost or {},
        "cache_keys": {"sft": "sft123", "rm": None}, "config": {"seed": seed},
        "harness_version": "0.1.0", "git_commit": "a" * 40,
        "created": created,
    }
    if history is not None:
        r["history"] = history
    r.update(extra)
    return r


def _curve(scale: float) -> dict:
    return {"train/reward": [[s, scale * s] for s in range(5)],
            "train/kl": [[s, 0.01 * s * scale] for s in range(5)]}


@pytest.fixture
def records() -> list[dict]:
    dpo = [
        rec("dpo", 0, {"eval/gold_reward": 0.5, "eval/win_rate": 0.6, "eval/kl": 1.0,
                       "eval/arith/acc": 0.4, "eval/boolq/acc": 0.8,
                       "eval/arith/acc_stderr": 0.05,
                       "eval/wikitext/word_perplexity": 20.0,
                       "eval/wikitext/bits_per_byte": 1.5},
            cost={"cost/wall_s": 100.0, "cost/peak_mem_mb": 1000.0, "cost/tokens_per_s": 50.0},
            history=_curve(1.0)),
        rec("dpo", 1, {"eval/gold_reward": 0.7, "eval/win_rate": 0.8, "eval/kl": 3.0,
                       "eval/arith/acc": 0.6, "eval/boolq/acc": 1.0,
                       "eval/wikitext/word_perplexity": 30.0,
                       "eval/wikitext/bits_per_byte": 1.7},
            cost={"wall_s": 120.0, "peak_mem_mb": 1200.0, "tokens_per_s": 70.0},  # no prefix
            history=_curve(1.2)),
        # a failed seed with absurd numbers: must never reach the means
        rec("dpo", 2, {"eval/gold_reward": 100.0, "eval/arith/acc": 100.0}, status="failed",
            error="NaN loss at step 7"),
    ]
    # all on the preferences track: DPO from the pairs, PPO and GRPO from the reward model
    ppo = [rec("ppo", 0, {"eval/gold_reward": 0.9, "eval/win_rate": 0.7, "eval/kl": 5.0,
                          "eval/arith/acc": 0.2, "eval/boolq/acc": 0.4},
               history=_curve(2.0))]
    grpo = [rec("grpo", s, {}, status="failed", error="CUDA out of memory") for s in (0, 1)]
    # no lm-eval tasks at all: no Average, sorts after the rows with one
    moe = [rec("dpo", 0, {"eval/gold_reward": 0.95, "eval/kl": 2.0}, model="moe_small")]
    return dpo + ppo + grpo + moe


def _row(rows: list[dict], method: str, model: str = "llama_small") -> dict:
    (row,) = [r for r in rows if r["method"] == method and r["model"] == model]
    return row


CPU = {"torch": "2.13.0+cpu", "device": "cpu", "cpu_capability": "AVX512", "threads": 2, "gpu": None,
       "python": "3.11.7", "machine": "x86_64", "processor": "x", "peak_mem_method": "rss_rise", "env": {}}
GPU = {**CPU, "torch": "2.13.0", "device": "cuda", "gpu": "NVIDIA H200", "peak_mem_method": "cuda_max_allocated"}


def _per_prompt(gold: list[float], sha: str = "h") -> dict:
    return {"split": "test", "prompts_sha256": sha, "gold_reward": gold, "ref_gold_reward": [0.0] * len(gold)}


# --------------------------------------------------------------------------- table
def test_task_metric_names() -> None:
    assert is_task_metric("eval/arith/acc")
    assert is_task_metric("eval/wikitext/word_perplexity")
    assert not is_task_metric("eval/gold_reward")
    assert not is_task_metric("eval/arith/acc_stderr")
    assert not is_task_metric("train/arith/acc")
    assert not is_task_metric("eval/a/b/c")
    assert is_task_score("eval/arith/acc,none")
    for name in ("eval/wikitext/word_perplexity", "eval/wikitext/perplexity",
                 "eval/wikitext/bits_per_byte", "eval/gold_reward"):
        assert not is_task_score(name)
    assert average_score({"eval/a/acc": 0.2, "eval/b/acc": 0.6, "eval/c/perplexity": 9.0,
                          "eval/kl": 4.0}) == pytest.approx(0.4)
    assert average_score({"eval/kl": 4.0}) is None


def test_aggregation_over_seeds(records: list[dict]) -> None:
    row = _row(build_table(records), "dpo")
    gold = row["metrics"]["eval/gold_reward"]
    assert gold["mean"] == pytest.approx(0.6)
    assert gold["std"] == pytest.approx(math.sqrt(0.02))  # 0.1414..., ddof=1
    assert gold["n"] == 2
    # two seeds: t(0.975, 1) = 12.706, half = 12.706 · 0.1414 / √2 = 1.2706
    assert gold["half"] == pytest.approx(1.27062, rel=1e-4)
    assert (gold["ci_lo"], gold["ci_hi"]) == (pytest.approx(0.6 - 1.27062, rel=1e-4),
                                              pytest.approx(0.6 + 1.27062, rel=1e-4))
    assert row["metrics"]["eval/kl"]["mean"] == pytest.approx(2.0)
    assert row["metrics"]["eval/kl"]["std"] == pytest.approx(math.sqrt(2.0))
    assert row["metrics"]["cost/wall_s"]["mean"] == pytest.approx(110.0)  # prefixes unified
    assert row["metrics"]["cost/peak_mem_mb"]["mean"] == pytest.approx(1100.0)
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1] and row["n_duplicates"] == 0
    # a single seed has no std and no interval
    ppo = _row(build_table(records), "ppo")
    assert ppo["metrics"]["eval/gold_reward"] == {"mean": 0.9, "std": None, "n": 1, "ci_lo": None,
                                                  "ci_hi": None, "half": None, "iqm": 0.9,
                                                  "iqm_lo": 0.9, "iqm_hi": 0.9}


def test_t_interval_of_three_seeds() -> None:
    rows = build_table([rec("dpo", s, {"eval/gold_reward": g}) for s, g in enumerate((0.5, 0.7, 0.9))])
    cell = rows[0]["metrics"]["eval/gold_reward"]
    half = 4.303 * 0.2 / math.sqrt(3)  # t(0.975, 2) · s / √n = 0.4969
    assert cell["half"] == pytest.approx(half, rel=1e-3)
    assert format_cell(cell, 3) == "0.70 ± 0.50"


def test_distinct_seeds_latest_record_wins() -> None:
    old = rec("dpo", 0, {"eval/gold_reward": 0.1}, created="2026-11-20T00:00:00+00:00", suffix="-old")
    new = rec("dpo", 0, {"eval/gold_reward": 0.5}, created="2026-11-24T00:00:00+00:00")
    other = rec("dpo", 1, {"eval/gold_reward": 0.7})
    (row,) = build_table([new, old, other])
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1]
    assert row["n_duplicates"] == 1 and row["duplicates"] == ["dpo-llama_small-toy-s0-old"]
    assert row["metrics"]["eval/gold_reward"]["mean"] == pytest.approx(0.6)  # (0.5 + 0.7) / 2, not 0.1
    assert row["metrics"]["eval/gold_reward"]["n"] == 2
    md = render_markdown([row])
    assert "‡1 dup" in md
    assert any("duplicate" in w and "dpo-llama_small-toy-s0-old" in w for w in comparison_warnings([row]))
    # a failed rerun of a seed is the latest record: the seed counts as failed
    rerun = rec("dpo", 1, {}, status="failed", error="boom", created="2026-11-25T00:00:00+00:00", suffix="-b")
    (row,) = build_table([new, other, rerun])
    assert row["n_seeds"] == 1 and row["n_failed"] == 1 and row["n_duplicates"] == 1


def test_average_over_task_scores_by_hand(records: list[dict]) -> None:
    rows = build_table(records)
    avg = _row(rows, "dpo")["metrics"]["Average"]
    # seed 0: (0.4 + 0.8) / 2 = 0.6; seed 1: (0.6 + 1.0) / 2 = 0.8 — perplexity, bits_per_byte
    # and stderr left out
    assert avg["mean"] == pytest.approx(0.7)
    assert avg["std"] == pytest.approx(math.sqrt(0.02))
    assert _row(rows, "ppo")["metrics"]["Average"]["mean"] == pytest.approx(0.3)
    assert _row(rows, "dpo", "moe_small")["metrics"]["Average"]["mean"] is None
    # the CSV's columns: full keys; perplexities and stderr are not among them
    cols = columns(rows)
    assert cols[:5] == ["eval/gold_reward", "eval/gold_gain", "eval/ref_gold_reward", "eval/win_rate", "eval/kl"]
    assert {"eval/arith/acc", "eval/boolq/acc", "cost/method_wall_s", "Average"} <= set(cols)
    assert not [c for c in cols if "perplexity" in c or "stderr" in c]


def test_failed_runs_counted_shown_and_excluded(records: list[dict]) -> None:
    rows = build_table(records)
    dpo = _row(rows, "dpo")
    assert dpo["status"] == "ok" and dpo["n_failed"] == 1 and dpo["n_seeds"] == 2
    assert dpo["metrics"]["eval/arith/acc"]["mean"] == pytest.approx(0.5)  # not 100
    grpo = _row(rows, "grpo")
    assert grpo["status"] == "failed"
    assert grpo["error"] == "CUDA out of memory"  # deduplicated
    assert grpo["n_seeds"] == 0 and grpo["n_failed"] == 2
    assert grpo["metrics"]["eval/gold_reward"]["mean"] is None


def test_sorting_by_gold_within_dataset_and_model(records: list[dict]) -> None:
    rows = build_table(records)
    order = [(r["method"], r["model"]) for r in rows]
    assert order == [("ppo", "llama_small"), ("dpo", "llama_small"),  # gold 0.9 > 0.6
                     ("grpo", "llama_small"),  # all failed: last within its model
                     ("dpo", "moe_small")]  # another model: after, never mixed in


def test_table_is_a_pure_function_of_the_records(records: list[dict]) -> None:
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert build_table(shuffled) == build_table(records)
    assert build_table([]) == []


def test_setting_columns_and_group_selection() -> None:
    cfg_ppo = {"method": {"kl_coef": 0.5, "optim": {"lr": 1e-4}}}
    cfg_dpo = {"method": {"beta": 0.1, "optim": {"lr": 5e-6}}}
    recs = [rec("ppo", 0, {"eval/gold_reward": 0.8}, group="compare", config=cfg_ppo),
            rec("dpo", 0, {"eval/gold_reward": 0.7}, group="compare", config=cfg_dpo),
            rec("dpo", 0, {"eval/gold_reward": 0.2}, group="tune", suffix="-t",
                config={"method": {"beta": 0.5, "optim": {"lr": 5e-6}}})]
    chosen, group = select_group(recs)
    assert group == "compare" and len(chosen) == 2
    assert select_group(recs, "tune")[0] == [recs[2]]
    assert select_group([recs[2]]) == ([recs[2]], None)  # no compare group: all records
    rows = build_table(chosen)
    assert _row(rows, "ppo")["beta"] == [0.5] and _row(rows, "ppo")["lr"] == [1e-4]
    assert _row(rows, "dpo")["beta"] == [0.1]
    line = next(x for x in render_markdown(rows).splitlines() if x.startswith("| ppo"))
    assert "| 0.5 | 0.0001 |" in line


def test_runs_at_different_settings_are_different_rows() -> None:
    def cfg(beta: float) -> dict:
        return {"method": {"beta": beta, "optim": {"lr": 5e-6}}}

    recs = [rec("dpo", s, {"eval/gold_reward": 0.5 + beta}, group="tune", suffix=f"-b{beta}", config=cfg(beta),
                per_prompt=_per_prompt([0.5 + beta] * 4)) for beta in (0.1, 0.3) for s in range(3)]
    recs.append(rec("dpo", 3, {}, status="failed", error="boom", group="tune"))  # no setting: its own row
    rows = build_table(recs)
    assert [(r["setting"], r["n_seeds"], r["n_duplicates"]) for r in rows] == [
        ("β=0.3, lr=5e-06", 3, 0), ("β=0.1, lr=5e-06", 3, 0), ("setting not recorded", 0, 0)]
    assert rows[0]["metrics"]["eval/gold_reward"]["mean"] == pytest.approx(0.8)
    (pair,) = paired_comparisons(recs[:6], n_boot=100)
    assert (pair["a"], pair["b"]) == ("dpo (β=0.3, lr=5e-06)", "dpo (β=0.1, lr=5e-06)")
    assert pair["mean_diff"] == pytest.approx(0.2)
    # one setting (and a failed run without one): one row, as keyed by (method, model, dataset)
    one = build_table([*recs[:3], recs[-1]])
    assert len(one) == 1 and one[0]["setting"] == "" and one[0]["n_failed"] == 1


# --------------------------------------------------------------------------- labels, footer, rounding
def _full_record(seed: int = 0, **metrics: float) -> dict:
    m = {"eval/gold_reward": 0.7, "eval/ref_gold_reward": 0.6, "eval/win_rate": 0.55, "eval/kl": 3.0,
         "eval/gold_max": 1.0, "eval/harness_toy_gold/gold_reward": 0.7, "eval/harness_toy_pref/acc": 0.9,
         "eval/harness_toy_ppl/word_perplexity": 2.1e28, "eval/harness_toy_ppl/byte_perplexity": 1400.0,
         "eval/harness_toy_ppl/bits_per_byte": 10.45, "eval/harness_toy_ppl/bits_per_byte_stderr": 0.1}
    m.update(metrics)
    return rec("ppo", seed, m, cost={"cost/method_wall_s": 60.0, "cost/method_peak_mem_mb": 800.0})


def test_labels_and_footer() -> None:
    rows = build_table([_full_record(s, **{"eval/gold_reward": g}) for s, g in enumerate((0.6, 0.7, 0.8))])
    cols = shown_columns(rows)
    labels = [c.label for c in cols]
    assert labels == ["Gold ↑", "Gold IQM", "Δ vs SFT", "SFT ref", "Win rate", "KL", "Pref acc",
                      "bits/byte", "time", "memory"]
    resolved = [c.resolve(rows[0]) for c in cols]
    # the gold reward twice, as its mean and its IQM; lm-eval's gold task (the same) not again
    assert [c.stat for c, k in zip(cols, resolved, strict=True) if k == "eval/gold_reward"] == ["mean", "iqm"]
    assert "eval/harness_toy_gold/gold_reward" not in resolved
    assert not [k for k in resolved if k and "perplexity" in k]
    assert "eval/harness_toy_pref/acc" in resolved and "eval/harness_toy_ppl/bits_per_byte" in resolved
    footer = "\n".join(footer_lines(cols, rows))
    for col in cols:
        assert f"{col.label}: {col.key}" in footer  # every shown column: its label, key, definition
        assert col.definition in footer
    assert "eval/harness_toy_pref/acc" in footer and "Student-t" in footer and "ddof=1" in footer
    assert "two-level paired bootstrap" in footer and "nats per sequence" in footer
    md = render_markdown(rows)
    header = next(x for x in md.splitlines() if x.startswith("| method"))
    assert "perplexity" not in header and header.count("Gold") == 2  # its mean and its IQM
    assert "2.1e+28" not in md and "21026" not in md
    # Δ vs SFT is computed per seed: 0.0, 0.1, 0.2 → mean 0.1
    assert rows[0]["metrics"]["eval/gold_gain"]["mean"] == pytest.approx(0.1)


def test_rounding_follows_the_interval() -> None:
    assert format_cell({"mean": 0.51234, "half": 0.03456, "n": 3}, 3) == "0.512 ± 0.035"
    assert format_cell({"mean": 65.63, "half": 7.84, "n": 3}, 3) == "65.6 ± 7.8"
    assert format_cell({"mean": 1234.5, "half": 123.0, "n": 3}, 3) == "1230 ± 120"
    assert format_cell({"mean": 0.9, "half": None, "n": 1}, 1) == "0.900"
    assert format_cell({"mean": 0.9, "half": None, "n": 1}, 3) == "0.900 (n=1)"
    assert format_cell(None, 3) == "—" and format_cell({"mean": None}, 3) == "—"


# --------------------------------------------------------------------------- paired comparisons
def test_paired_comparisons() -> None:
    gold_a, gold_b = [1.0] * 20, [0.0] * 20
    recs = [rec(m, s, {"eval/gold_reward": g[0]}, per_prompt=_per_prompt(g))
            for s in range(3) for m, g in (("ppo", gold_a), ("dpo", gold_b), ("grpo", gold_b))]
    pairs = paired_comparisons(recs, n_boot=1000)
    assert [(c["a"], c["b"]) for c in pairs] == [("ppo", "dpo"), ("ppo", "grpo"), ("dpo", "grpo")]
    better = pairs[0]
    assert better["mean_diff"] == 1.0 and (better["ci_lo"], better["ci_hi"]) == (1.0, 1.0)
    assert better["p"] == pytest.approx(2 / 1001) and better["significant"]
    assert (better["n_seeds"], better["n_prompts"], better["seeds"]) == (3, 20, [0, 1, 2])
    same = pairs[2]
    assert same["mean_diff"] == 0.0 and same["p"] == 1.0 and not same["significant"]
    md = render_markdown(build_table(recs), paired=pairs)
    # every seed +1: the t interval is [1, 1], p 0 and Holm p 0 (decides ✓); A ahead in 3 of 3
    # seeds; P(A > B) 1; bootstrap p 2/1001
    assert "## Paired differences" in md
    assert ("| ppo − dpo | +1.000 | [+1.000, +1.000] | 0 | 0 ✓ | 3/3 | 1.00 [1.00, 1.00] | "
            "[+1.000, +1.000] | 0.002 |") in md
    assert "<tr class=\"sig\">" in render_html(build_table(recs), {}, paired=pairs)


def test_holm_adjusts_p_values_as_computed_by_hand() -> None:
    from harness.evaluation.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, 2·0.03, max(1·0.04, 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([None, 0.2, 0.01]) == [None, pytest.approx(0.2), pytest.approx(0.02)]  # m = 2
    assert holm([0.6, 0.5]) == [1.0, 1.0]  # 2·0.5 capped at 1; then max(1, 1·0.6)
    assert holm([]) == []


def test_a_pair_the_t_test_alone_separates_is_no_difference_after_holm() -> None:
    """Three methods, three pairs in one table: PPO − DPO is separated by its own t-test
    (D = 1, 2, 1, 3 twentieths: p 0.0354) but not after Holm over the table (3 · 0.0354 = 0.106),
    so no ✓ and the answer claims nothing; ``wins`` counts the seeds where A is ahead."""
    from harness.evaluation.leaderboard.sections import answer

    n = 20

    def gold(k: int) -> list[float]:  # a seed's score is k/20
        return [1.0] * k + [0.0] * (n - k)

    scores = {"ppo": (10, 11, 12, 13), "dpo": (9, 9, 11, 10), "grpo": (9, 10, 11, 10)}
    recs = [rec(m, s, {"eval/gold_reward": k[s] / n}, per_prompt=_per_prompt(gold(k[s])))
            for s in range(4) for m, k in scores.items()]
    pairs = {(c["a"], c["b"]): c for c in paired_comparisons(recs, n_boot=200)}
    close = pairs[("ppo", "dpo")]
    assert close["wins"] == 4 and close["t_p"] == pytest.approx(0.035353, abs=1e-5)
    # sorted p: 0.0354 (x3), 0.0577 (x2), 0.391 (x1), each at least the one before
    assert close["holm_p"] == pytest.approx(3 * close["t_p"]) and not close["significant"]
    assert pairs[("ppo", "grpo")]["holm_p"] == pytest.approx(2 * pairs[("ppo", "grpo")]["t_p"])
    assert pairs[("grpo", "dpo")]["holm_p"] == pytest.approx(pairs[("grpo", "dpo")]["t_p"])
    assert pairs[("grpo", "dpo")]["wins"] == 1  # D = 0, +1, 0, 0: ahead in one seed, tied in three
    text = " ".join(answer(list(pairs.values())))
    assert "no difference between methods is separable" in text and "PPO − DPO" not in text
    md = render_markdown(build_table(recs), paired=list(pairs.values()))
    assert "| ppo − dpo | +0.087 | [+0.011, +0.164] | 0.0354 | 0.11 | 4/4 |" in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "✓" in line]


def test_a_reference_implementation_is_paired_with_its_own_method_only() -> None:
    """TRL's GRPO (``trl_grpo``) is compared with the harness's GRPO, never with PPO, in a family of
    its own: GRPO − PPO alone is the methods' family (Holm p = its p), and the answer says whether
    TRL agrees in a sentence of its own, not among the methods' differences."""
    from harness.evaluation.leaderboard.sections import answer

    per_seed = {"grpo": ([1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]),
                "trl_grpo": ([1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 0]),
                "ppo": ([1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0])}
    recs = [rec(m, s, {"eval/gold_reward": sum(g[s]) / 4}, per_prompt=_per_prompt(list(map(float, g[s]))),
                reward_source="gold") for m, g in per_seed.items() for s in range(3)]
    pairs = paired_comparisons(recs, n_boot=200)
    assert sorted((c["a"], c["b"]) for c in pairs) == [("grpo", "ppo"), ("grpo", "trl_grpo")]
    for c in pairs:
        assert c["holm_p"] == pytest.approx(c["t_p"])  # each alone in its family
    said = answer(pairs)
    assert "TRL" not in said[0] and "GRPO − PPO" in said[0]
    assert said[-1].startswith("Reference implementation, oracle track, llama_small · toy (group "
                               "test): GRPO − TRL_GRPO +0.083") and said[-1].endswith(": not separable.")


def test_tracks_split_rows_and_pair_methods_only_within_one() -> None:
    """GRPO on the gold reward and GRPO on the reward model are two rows; methods are paired
    within a track only (PPO on rm with GRPO on rm, never with GRPO on gold); offline DPO is on the
    preferences track; records written before the field say their track through reward_source."""
    gold, half = [1.0] * 4, [1.0, 1.0, 0.0, 0.0]
    recs = [rec(m, s, {"eval/gold_reward": sum(g) / 4}, per_prompt=_per_prompt(g), reward_source=src,
                suffix=f"-{src}")
            for s in range(3)
            for m, g, src in (("grpo", gold, "gold"), ("ppo", gold, "gold"), ("grpo", half, "rm"),
                              ("ppo", half, "rm"), ("dpo", half, None))]
    assert {track_of(r) for r in recs} == {"oracle", "preferences"}
    rows = build_table(recs)
    assert sorted((r["method"], r["track"]) for r in rows) == [
        ("dpo", "preferences"), ("grpo", "oracle"), ("grpo", "preferences"), ("ppo", "oracle"),
        ("ppo", "preferences")]
    assert all(r["n_seeds"] == 3 for r in rows)
    pairs = paired_comparisons(recs, n_boot=200)
    assert sorted((c["track"], *sorted((c["a"], c["b"]))) for c in pairs) == [
        ("oracle", "grpo", "ppo"), ("preferences", "dpo", "grpo"), ("preferences", "dpo", "ppo"),
        ("preferences", "grpo", "ppo")]
    md = render_markdown(rows, paired=pairs)
    assert "| method | model | dataset | track |" in md
    assert "**llama_small · toy · oracle** (group test)" in md
    assert "<th title=\"what the method learns from" in render_html(rows, {}, paired=pairs)


def test_the_information_effect_pairs_a_method_with_itself_across_tracks() -> None:
    """Δ gold of a method on the gold reward minus on the reward model, over the seeds both ran:
    here 0.5 on every seed (4 prompts: 1, 1, 1, 1 against 1, 1, 0, 0); offline DPO has no
    oracle run, so no line."""
    gold, half = [1.0] * 4, [1.0, 1.0, 0.0, 0.0]
    recs = [rec("grpo", s, {"eval/gold_reward": sum(g) / 4}, per_prompt=_per_prompt(g),
                reward_source=src, suffix=f"-{src}")
            for s in range(3) for g, src in ((gold, "gold"), (half, "rm"))]
    recs += [rec("dpo", s, {"eval/gold_reward": 0.5}, per_prompt=_per_prompt(half)) for s in range(3)]
    (effect,) = information_effect(recs, n_boot=500)
    assert (effect["a"], effect["b"]) == ("grpo · oracle", "grpo · preferences")
    assert effect["track"] == "oracle − preferences" and effect["mean_diff"] == pytest.approx(0.5)
    assert effect["n_seeds"] == 3 and effect["n_prompts"] == 4
    md = render_markdown(build_table(recs), information=[effect])
    assert "## Information effect" in md and "| grpo · oracle − grpo · preferences | +0.500 |" in md
    # the answer's sentence: every seed +0.5, so p 0 (Holm: alone in its family) and 3 of 3 ahead
    assert ("- Information effect, llama_small · toy (group test): GRPO on the oracle track − on "
            "the preferences track +0.500 [+0.500, +0.500], Holm p 0, P(oracle > preferences) = "
            "1.00, ahead on the oracle track in 3 of 3 seeds: separable (Holm p < 0.05).") in md


def test_paired_comparisons_check_the_prompts() -> None:
    recs = [rec("ppo", 0, {"eval/gold_reward": 1.0}, per_prompt=_per_prompt([1.0, 1.0], sha="x")),
            rec("dpo", 0, {"eval/gold_reward": 0.0}, per_prompt=_per_prompt([0.0, 0.0], sha="y")),
            rec("ppo", 1, {"eval/gold_reward": 1.0}, per_prompt=_per_prompt([1.0, 0.0])),
            rec("dpo", 1, {"eval/gold_reward": 0.0}, per_prompt=_per_prompt([0.0, 0.0])),
            rec("grpo", 0, {"eval/gold_reward": 0.5})]  # an older record: no per_prompt
    pairs = {(c["a"], c["b"]): c for c in paired_comparisons(recs, n_boot=200)}
    ppo_dpo = pairs[("ppo", "dpo")]
    assert ppo_dpo["seeds"] == [1] and ppo_dpo["n_prompts"] == 2
    assert "different held-out prompts" in ppo_dpo["skipped"]
    assert pairs[("ppo", "grpo")]["mean_diff"] is None
    assert "no per-prompt gold rewards" in pairs[("ppo", "grpo")]["skipped"]
    # different groups are never paired
    other = [rec("dpo", 0, {"eval/gold_reward": 0.0}, per_prompt=_per_prompt([0.0, 0.0]), group="tune")]
    assert paired_comparisons([recs[2], *other], n_boot=10) == []


# --------------------------------------------------------------------------- warnings
def test_warning_few_seeds(records: list[dict]) -> None:
    warns = comparison_warnings(build_table(records))
    (few,) = [w for w in warns if w.startswith("fewer than 3 seeds")]
    assert "dpo · llama_small · toy · preferences (2)" in few
    assert "ppo · llama_small · toy · preferences (1)" in few
    assert "grpo" not in few  # all failed: listed as failed, not as few seeds
    three = build_table([rec("dpo", s, {"eval/gold_reward": 0.5}) for s in range(3)])
    assert not [w for w in comparison_warnings(three) if "fewer than" in w]


def test_warning_ceiling() -> None:
    def rows(golds: tuple[float, ...], top: float | None = 1.0) -> list[dict]:
        extra = {} if top is None else {"eval/gold_max": top}
        return build_table([rec("dpo", s, {"eval/gold_reward": g, **extra}) for s, g in enumerate(golds)])

    assert any("ceiling" in w and "mean 0.990" in w for w in comparison_warnings(rows((0.99, 0.99, 0.99))))
    # mean 0.9 but the interval 0.9 ± 4.303·0.1/√3 = [0.65, 1.15] reaches the ceiling
    interval = [w for w in comparison_warnings(rows((0.8, 1.0, 0.9))) if "ceiling" in w]
    assert len(interval) == 1 and "interval reaches" in interval[0]
    assert "mean 0.900, upper bound 1.148" in interval[0] and "at the task's ceiling" not in interval[0]
    assert not [w for w in comparison_warnings(rows((0.50, 0.51, 0.52))) if "ceiling" in w]
    assert not [w for w in comparison_warnings(rows((0.99, 0.99, 0.99), top=None)) if "ceiling" in w]


def test_warning_sft_reference_spread() -> None:
    def rows(refs: tuple[float, ...], gain: float) -> list[dict]:
        return build_table([rec(m, s, {"eval/gold_reward": r + gain + (0.05 if m == "ppo" else 0),
                                       "eval/ref_gold_reward": r})
                            for m in ("dpo", "ppo") for s, r in enumerate(refs)])

    # references 0.5..0.7 (spread 0.2) against a smallest gain of 0.1 (dpo)
    warns = [w for w in comparison_warnings(rows((0.5, 0.6, 0.7), 0.1)) if "SFT reference" in w]
    assert len(warns) == 1 and "0.200" in warns[0] and "0.100, dpo" in warns[0]
    assert not [w for w in comparison_warnings(rows((0.6, 0.6, 0.61), 0.1)) if "SFT reference" in w]


def test_warning_platforms_and_header(tmp_path: Path) -> None:
    recs = [rec("dpo", s, {"eval/gold_reward": 0.5}, platform=CPU if s else GPU) for s in range(3)]
    warns = comparison_warnings(build_table(recs), recs)
    (warn,) = [w for w in warns if "platforms" in w]
    assert "torch 2.13.0+cpu, cpu AVX512" in warn and "torch 2.13.0, cuda NVIDIA H200" in warn
    assert "dpo · llama_small · toy" in warn  # the row mixes them
    same = [rec("dpo", s, {"eval/gold_reward": 0.5}, platform=CPU) for s in range(3)]
    assert not [w for w in comparison_warnings(build_table(same), same) if "platforms" in w]
    # records without a platform: no warning, the header says it is not recorded
    assert not [w for w in comparison_warnings(build_table(recs[:0]), []) if "platforms" in w]
    for r in recs:
        write_record(r, tmp_path / "runs")
    md = build_leaderboard(tmp_path / "runs", tmp_path / "out", screenshot=False)["markdown"].read_text()
    assert "Platforms: torch 2.13.0+cpu, cpu AVX512; torch 2.13.0, cuda NVIDIA H200." in md
    assert "⚠ the rows come from 2 platforms" in md


# --------------------------------------------------------------------------- renderers
def test_markdown(records: list[dict]) -> None:
    cmd = "python -m harness -m method=ppo,grpo,dpo seed=0,1"
    md = render_markdown(build_table(records), [f"Reproduce the runs: `{cmd}`"])
    assert md.startswith("# ")
    assert cmd in md
    dpo_line = next(line for line in md.splitlines() if line.startswith("| dpo | llama_small"))
    assert "0.6 ± 1.3" in dpo_line  # gold reward: 0.6 ± 12.706·0.1414/√2
    assert "2 (+1 failed)" in dpo_line
    grpo_line = next(line for line in md.splitlines() if line.startswith("| grpo"))
    assert "failed" in grpo_line and "CUDA out of memory" in grpo_line
    assert "| 0.900 |" in md  # single seed: bare mean
    assert "NaN loss at step 7" in md  # failed runs listed
    assert "**Warnings**" in md


def test_csv_columns(records: list[dict], tmp_path: Path) -> None:
    rows = build_table(records)
    path = write_csv(rows, tmp_path / "lb.csv")
    with path.open() as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        data = list(reader)
    assert header[:8] == ["method", "model", "dataset", "track", "status", "n_seeds", "n_failed",
                          "n_duplicates"]
    for col in ("eval/gold_reward", "eval/win_rate", "eval/kl", "eval/arith/acc", "cost/method_wall_s",
                "Average"):
        for stat in ("mean", "std", "ci_lo", "ci_hi", "n"):
            assert f"{col}_{stat}" in header
    assert header[-1] == "error"
    assert len(data) == 4
    dpo = next(d for d in data if d["method"] == "dpo" and d["model"] == "llama_small")
    assert float(dpo["eval/gold_reward_mean"]) == pytest.approx(0.6)
    assert float(dpo["eval/gold_reward_std"]) == pytest.approx(0.141421356)
    assert float(dpo["eval/gold_reward_ci_hi"]) == pytest.approx(0.6 + 1.270620, rel=1e-6)  # full precision
    assert dpo["eval/gold_reward_n"] == "2"
    ppo = next(d for d in data if d["method"] == "ppo")
    assert ppo["eval/gold_reward_std"] == "" and ppo["eval/gold_reward_ci_lo"] == ""  # one seed
    grpo = next(d for d in data if d["method"] == "grpo")
    assert grpo["status"] == "failed" and grpo["error"] == "CUDA out of memory"
    assert grpo["eval/gold_reward_mean"] == ""


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page, re.I)
    assert "<link" not in page.lower() and "@import" not in page


def test_html_self_contained(records: list[dict], tmp_path: Path) -> None:
    png = plot_reward_kl(records, tmp_path / "rk.png")
    page = render_html(build_table(records), {"reward vs KL": png},
                       ["Reproduce the runs: `python -m harness -m seed=0,1`"])
    _assert_self_contained(page)
    assert '<table class="sortable"' in page and "<th" in page and "<script>" in page
    assert "addEventListener" in page  # the sort
    assert "data:image/png;base64," in page
    b64 = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(b64).startswith(PNG_MAGIC)
    assert "<code>python -m harness -m seed=0,1</code>" in page
    assert "0.6 ± 1.3" in page and 'class="failed"' in page
    assert "CUDA out of memory" in page
    assert 'title="eval/gold_reward: mean gold' in page  # the key and definition as a tooltip


def test_html_fits_1400_pixels(records: list[dict], tmp_path: Path) -> None:
    png = plot_training_curves(records, tmp_path / "tc.png")
    page = render_html(build_table(records), {"curves": png})
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert re.search(r"body\{[^}]*max-width:1400px", css)
    assert re.search(r"img\{[^}]*max-width:100%", css)
    assert re.search(r"\.box\{[^}]*max-width:100%", css) and re.search(r"table\{[^}]*max-width:100%", css)
    # every table sits in a max-width box; nothing is given a fixed width over 1400 px
    assert page.count("<table") == page.count('<div class="box"><table')
    assert all(int(w) <= 1400 for w in re.findall(r"width\s*:\s*(\d+)px", page))
    assert all(int(w) <= 1400 for w in re.findall(r'width="(\d+)"', page))
    assert "white-space:nowrap" not in re.search(r"th\{[^}]*\}", css).group(0)  # headers wrap


def test_plots(records: list[dict], tmp_path: Path) -> None:
    for fn in (plot_reward_kl, plot_training_curves):
        path = fn(records, tmp_path / f"{fn.__name__}.png")
        assert path.read_bytes().startswith(PNG_MAGIC)
        # no usable data: still a figure (with a note), no exception
        bare = [rec("dpo", 0, {"eval/gold_reward": 0.5})]
        empty = fn(bare, tmp_path / f"{fn.__name__}_empty.png")
        assert empty.read_bytes().startswith(PNG_MAGIC)
        assert fn([], tmp_path / f"{fn.__name__}_none.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*.tmp"))


def test_plots_with_beta_grid_and_new_history(tmp_path: Path) -> None:
    recs = []
    for model in ("llama_small", "moe_small"):
        for beta in (0.05, 0.1, 0.5):
            for s in range(2):
                hist = {"eval/gold_reward": [[k, 0.5 + 0.01 * k, 100.0 * k, 0.1 * k] for k in range(0, 50, 10)],
                        "train/kl": [[k, 0.1 * k] for k in range(50)],
                        "train/reward": [[k, 2.0 + 0.1 * k] for k in range(50)]}
                recs.append(rec("ppo", s, {"eval/gold_reward": 0.6 + beta, "eval/kl": 1 / beta,
                                           "eval/ref_gold_reward": 0.5, "eval/gold_max": 1.0},
                                model=model, history=hist, reward_source="rm", suffix=f"-b{beta}",
                                config={"method": {"kl_coef": beta, "optim": {"lr": 1e-4}}}))
    for fn in (plot_reward_kl, plot_training_curves):
        assert fn(recs, tmp_path / f"{fn.__name__}.png").read_bytes().startswith(PNG_MAGIC)
    from harness.evaluation.plots import _frontier_points, ema, ema_alpha, split_of

    points = _frontier_points([r for r in recs if r["model"] == "moe_small"])
    assert [p["beta"] for p in points] == [0.5, 0.1, 0.05]  # sorted by KL: 2, 10, 20
    assert all(p["n"] == 2 for p in points)
    assert split_of(recs[0]) == "split not recorded"
    assert split_of({"per_prompt": {"split": "validation"}}) == "validation"
    assert ema([1.0, 0.0, 0.0], alpha=0.5) == [1.0, 0.5, 0.25]
    assert (ema_alpha(10), ema_alpha(200), ema_alpha(2)) == (0.5, 0.1, 0.6)


# --------------------------------------------------------------------------- end to end
def test_build_leaderboard(records: list[dict], tmp_path: Path) -> None:
    runs = tmp_path / "results" / "runs"
    for r in records:
        write_record(r, runs)
    paths = build_leaderboard(runs, tmp_path / "results", command="python -m harness -m x=1",
                              screenshot=False, note="β and lr tuned on the validation split")
    assert {p.name for p in paths.values()} == {
        "leaderboard.md", "leaderboard.csv", "leaderboard_paired.csv", "leaderboard.html", "reward_kl.png",
        "seeds.png", "overoptimisation.png", "training_curves.png"}
    assert all(p.is_file() and p.parent == tmp_path / "results" for p in paths.values())
    md = paths["markdown"].read_text()
    assert "`python -m harness -m x=1`" in md and "python -m harness.leaderboard" in md
    assert "](reward_kl.png)" in md
    assert "β and lr tuned on the validation split" in md
    assert "Platform: — (not recorded)." in md
    _assert_self_contained(paths["html"].read_text())
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")]


def test_build_leaderboard_default_command(records: list[dict], tmp_path: Path) -> None:
    for r in records:
        write_record(r, tmp_path / "runs")
    md = build_leaderboard(tmp_path / "runs", tmp_path / "out", screenshot=False)["markdown"].read_text()
    assert ("python -m harness -m method=dpo,grpo,ppo model=llama_small,moe_small dataset=toy "
            "seed=0,1,2") in md


def test_build_leaderboard_uses_the_compare_group(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(rec("dpo", 0, {"eval/gold_reward": 0.7}, group="compare"), runs)
    write_record(rec("dpo", 0, {"eval/gold_reward": 0.1}, group="tune", suffix="-t"), runs)
    md = build_leaderboard(runs, tmp_path / "out", screenshot=False)["markdown"].read_text()
    assert "| 0.700 |" in md and "| 0.100 |" not in md
    assert "group `compare`" in md and "`tune` 1" in md
    md = build_leaderboard(runs, tmp_path / "out2", group="tune", screenshot=False)["markdown"].read_text()
    assert "| 0.100 |" in md and "--group tune" in md


def test_several_groups_show_together_and_the_choice_is_kept(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_record(rec("dpo", 0, {"eval/gold_reward": 0.7}, group="compare"), runs)
    write_record(rec("grpo", 0, {"eval/gold_reward": 0.3}, group="smollm2", suffix="-s"), runs)
    write_record(rec("dpo", 0, {"eval/gold_reward": 0.1}, group="tune", suffix="-t"), runs)
    md = build_leaderboard(runs, out, group="compare,smollm2", screenshot=False)["markdown"]
    text = md.read_text()
    assert "| 0.700 |" in text and "| 0.300 |" in text and "| 0.100 |" not in text
    assert "groups `compare`, `smollm2`" in text and "`tune` 1" in text
    again = build_leaderboard(runs, out, screenshot=False)["markdown"].read_text()  # kept
    assert "| 0.300 |" in again and "--group compare,smollm2" in again
    reset = build_leaderboard(runs, out, group="", screenshot=False)["markdown"].read_text()
    assert "| 0.300 |" not in reset and "group `compare`" in reset


def test_empty_runs_dir_writes_empty_leaderboard(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    paths = build_leaderboard(tmp_path / "runs", tmp_path / "out", screenshot=False)
    assert "No run records found" in paths["markdown"].read_text()
    header = paths["csv"].read_text().splitlines()
    assert len(header) == 1 and header[0].startswith("method,model,dataset,track,status")
    assert "No run records found" in paths["html"].read_text()
    assert paths["reward_kl"].read_bytes().startswith(PNG_MAGIC)


def test_screenshot(records: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "lb.html"
    page.write_text(render_html(build_table(records), {}))
    with monkeypatch.context() as m:
        m.setattr(lb.shutil, "which", lambda name: None)
        assert take_screenshot(page, tmp_path / "none.png") is None
    if lb.shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    shot = take_screenshot(page, tmp_path / "lb.png", height=600)
    assert shot is not None and shot.read_bytes().startswith(PNG_MAGIC)
    width = int.from_bytes(shot.read_bytes()[16:20], "big")
    assert width == 1400


def test_cli(records: list[dict], tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    for r in records:
        write_record(r, runs)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.leaderboard", "--runs", str(runs), "--out", str(out),
         "--no-screenshot", "--n-boot", "200", "--note", "a note"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "leaderboard.html" in proc.stdout
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "reward_kl.png",
                 "training_curves.png"):
        assert (out / name).is_file(), name
    assert "| dpo | llama_small |" in (out / "leaderboard.md").read_text()
    assert "a note" in (out / "leaderboard.md").read_text()

    (tmp_path / "none").mkdir()
    empty = subprocess.run(
        [sys.executable, "-m", "harness.leaderboard", "--runs", str(tmp_path / "none"),
         "--out", str(tmp_path / "out2"), "--no-screenshot"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert empty.returncode == 0 and "no run records" in empty.stderr
    assert (tmp_path / "out2" / "leaderboard.md").is_file()


@pytest.mark.parametrize(("argv", "message"), [
    (["--runs", "{tmp}/missing"], "--runs {tmp}/missing: no such folder (nothing written)"),
    (["--group", "nope"], "--group nope: no record in {tmp}/runs has group nope; groups present: test"),
    (["--group", "test,nope"], "--group test,nope: no record in {tmp}/runs has group nope;"),
])
def test_cli_stops_a_missing_folder_or_an_unknown_group_before_writing(
        records: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        argv: list[str], message: str) -> None:
    from harness.leaderboard import main

    for r in records:
        write_record(r, tmp_path / "runs")
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs"), *(a.format(tmp=tmp_path) for a in argv)]
    assert main([*argv, "--out", str(out), "--no-screenshot"]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not out.exists()  # not even the header with the bad group


def test_cli_refuses_a_bootstrap_of_no_replicates(capsys: pytest.CaptureFixture[str]) -> None:
    from harness.leaderboard import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--n-boot", "0"])
    assert "--n-boot=0: must be >= 1" in capsys.readouterr().err


def test_header_note_and_command_survive_a_rebuild(records: list[dict], tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    for r in records:
        write_record(r, runs)

    def header(**kw) -> str:
        md = build_leaderboard(runs, out, screenshot=False, n_boot=50, **kw)["markdown"].read_text()
        return md.split("| method")[0]

    derived = header()
    assert "a tuned note" not in derived and "Reproduce the runs: `python -m harness -m" in derived
    assert not (out / lb.HEADER_FILE).exists()  # nothing given, nothing stored
    given = header(note="a tuned note", command="bash sweeps/compare.sh seed=0")
    assert "(columns β and lr): a tuned note." in given
    assert "Reproduce the runs: `bash sweeps/compare.sh seed=0`" in given
    assert header() == given  # a plain rebuild keeps both
    # a sweep's rebuild replaces the command and keeps the note
    swept = header(command="python -m harness -m +sweep=compare")
    assert "a tuned note" in swept and "`python -m harness -m +sweep=compare`" in swept
    cleared = header(note="")
    assert "a tuned note" not in cleared and "+sweep=compare" in cleared

    (out / lb.HEADER_FILE).write_text('["not", "an object"]')
    with pytest.raises(ValueError, match="leaderboard_header.json: expected a JSON object"):
        header()
    (out / lb.HEADER_FILE).write_text("{broken")
    proc = subprocess.run(
        [sys.executable, "-m", "harness.leaderboard", "--runs", str(runs), "--out", str(out),
         "--no-screenshot", "--n-boot", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2 and "leaderboard_header.json: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sweep_of_another_group_keeps_the_tables_command(tmp_path: Path) -> None:
    """A tuning sweep's rebuild (group `tune`, not in the table) keeps the header's command for
    the table's rows; a sweep of the table's group replaces it."""
    import json

    from harness.tracking.callbacks import build_leaderboard_after

    out = tmp_path / "results"
    (out / "runs").mkdir(parents=True)
    (out / lb.HEADER_FILE).write_text(json.dumps({"command": "bash sweeps/compare.sh",
                                                  "group": "compare,smollm2"}))

    def stored() -> str:
        return json.loads((out / lb.HEADER_FILE).read_text())["command"]

    build_leaderboard_after(out, "python -m harness -m +sweep=tune_dpo", "tune")
    assert stored() == "bash sweeps/compare.sh"
    assert "Reproduce the runs: `bash sweeps/compare.sh`" in (out / "leaderboard.md").read_text()
    build_leaderboard_after(out, "python -m harness -m +sweep=compare seed=3", "smollm2")
    assert stored() == "python -m harness -m +sweep=compare seed=3"


def test_wandb_table(records: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from harness.tracking.callbacks import log_leaderboard_table

    logged: dict = {}

    class Table:
        def __init__(self, columns: list, data: list) -> None:
            self.columns, self.data = columns, data

    class Run:
        def log(self, payload: dict) -> None:
            logged.update(payload)

        def finish(self) -> None:
            logged["finished"] = True

    inits: list[dict] = []
    fake = types.SimpleNamespace(Table=Table, init=lambda **kwargs: inits.append(kwargs) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = OmegaConf.create({"logger": {"kind": "wandb", "project": "p", "offline": True,
                                       "entity": None, "group": None},
                            "group": "x", "results_dir": str(tmp_path)})
    log_leaderboard_table(cfg, records)
    table = logged["leaderboard"]
    assert table.columns[:5] == ["method", "model", "dataset", "status", "seeds"]
    assert {"eval/gold_reward", "eval/gold_reward ci_lo", "eval/gold_reward ci_hi"} <= set(table.columns)
    assert len(table.data) == 4 and all(len(r) == len(table.columns) for r in table.data)
    dpo = next(r for r in table.data if r[0] == "dpo" and r[1] == "llama_small")
    i = table.columns.index("eval/gold_reward")
    assert dpo[4] == 2 and dpo[i] == pytest.approx(0.6) and dpo[i + 2] == pytest.approx(0.6 + 1.27062, rel=1e-4)
    assert logged["finished"]
    assert inits[0]["group"] == "x" and inits[0]["name"] == "leaderboard-x"


def test_the_title_names_the_methods_of_the_rows():
    from harness.evaluation.leaderboard import default_title

    rows = [{"method": "grpo"}, {"method": "rloo"}, {"method": "grpo"}, {"method": "dpo"}]
    assert default_title(rows) == "Alignment leaderboard: GRPO vs RLOO vs DPO"
    assert default_title([]) == "Alignment leaderboard"


def test_rows_mixing_dataset_settings_are_flagged():
    def with_data(seed: int, wrong: float) -> dict:
        return rec("dpo", seed, {"eval/gold_reward": 0.7}, suffix=f"-w{wrong}",
                   config={"seed": seed, "dataset": {"name": "toy", "seed": seed, "wrong_fraction": wrong}})

    same = [with_data(0, 0.36), with_data(1, 0.36), with_data(2, 0.36)]  # seeds differ: one task
    assert lb.build_table(same)[0]["dataset_variants"] == 1
    assert not any("dataset settings" in w for w in lb.comparison_warnings(lb.build_table(same)))
    mixed = [with_data(0, 0.36), with_data(1, 0.36), with_data(2, 0.30)]
    rows = lb.build_table(mixed)
    assert rows[0]["dataset_variants"] == 2
    (warning,) = [w for w in lb.comparison_warnings(rows) if "dataset settings" in w]
    assert "dpo · llama_small · toy" in warning


def test_malformed_records_are_listed_and_counted_nowhere(tmp_path: Path) -> None:
    """A record with only its names, and copies of a real record with a string seed, nested
    metrics or an unknown schema_version: none becomes a seed; the page lists each by file."""
    from harness.evaluation.records import write_record

    runs = tmp_path / "runs"
    good = rec("grpo", 0, {"eval/gold_reward": 0.5}, per_prompt=_per_prompt([0.5]))
    write_record(good, runs)
    bad = {"bare": {k: good[k] for k in ("status", "method", "model", "dataset")} | {"run_id": "bare"},
           "string_seed": {**good, "run_id": "string_seed", "seed": "0"},
           "nested": {**good, "run_id": "nested", "seed": 1,
                      "metrics": {"eval": {"gold_reward": 0.9}}},
           "future": {**good, "run_id": "future", "seed": 2, "schema_version": 99}}
    for name, r in bad.items():
        (runs / f"{name}.json").write_text(json.dumps(r))
    with pytest.warns(UserWarning, match="skipping unreadable run record"):
        paths = build_leaderboard(runs, tmp_path / "out", screenshot=False)
    (row,) = build_table([good])
    assert row["n_seeds"] == 1
    md = paths["markdown"].read_text()
    assert "4 file(s) in the runs folder are not valid records" in md
    for name, why in (("bare.json", "'seed' must be an integer"), ("string_seed.json", "got '0'"),
                      ("nested.json", "metrics['eval'] must be a number"),
                      ("future.json", "schema_version 99")):
        assert name in md and why in md, name
    csv_rows = paths["csv"].read_text().splitlines()
    assert len(csv_rows) == 2 and ",1," in csv_rows[1]  # one row, one seed


def test_a_reward_model_row_shows_its_accuracy_beside_the_sft_policys() -> None:
    recs = [rec("rm", s, {"eval/rewards_acc": acc, "eval/sft_pair_acc": 0.8})
            for s, acc in enumerate((0.85, 0.9, 0.95))]
    recs += [rec("grpo", s, {"eval/gold_reward": 0.7}) for s in range(3)]
    rows = build_table(recs)
    labels = [c.label for c in shown_columns(rows)]
    assert labels.index("RM acc") + 1 == labels.index("SFT pair acc")
    md = render_markdown(rows)
    assert "| RM acc | SFT pair acc |" in md and "| 0.90 ± 0.12 |" in md


def test_the_answer_is_written_from_the_comparisons() -> None:
    """GRPO ahead of PPO by 0.5 on every seed (separable); GRPO ahead of RLOO by 0.5 on average
    but not on every seed, RLOO level with PPO (neither separable at 3 seeds): the page opens with
    sentences that say exactly that, with the numbers, per track."""
    per_seed = {"grpo": ([1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]),
                "ppo": ([1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]),
                "rloo": ([1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0])}
    recs = [rec(m, s, {"eval/gold_reward": sum(g[s]) / 4}, per_prompt=_per_prompt(list(map(float, g[s]))),
                reward_source="gold") for m, g in per_seed.items() for s in range(3)]
    rows, pairs = build_table(recs), paired_comparisons(recs, n_boot=500)
    md = render_markdown(rows, paired=pairs)
    head, _, rest = md.partition("## What this comparison shows")
    assert rest and "| method |" not in head  # before the main table
    # GRPO − RLOO: D = 0.25, 0.75, 0.5: t-test p 0.074, Holm (second of three) 2 · 0.074
    assert ("- On the oracle track, llama_small · toy (group test): GRPO − PPO +0.500 "
            "[+0.500, +0.500], Holm p 0, P(GRPO > PPO) = 1.00, GRPO ahead in 3 of 3 seeds "
            "(Holm p < 0.05). Not separable: "
            "GRPO − RLOO +0.500 [-0.121, +1.121], Holm p 0.15, P(GRPO > RLOO) = 1.00, GRPO ahead in "
            "3 of 3 seeds; PPO − RLOO +0.000 [-0.621, +0.621], Holm p 1.00, P(PPO > RLOO) = 0.50, "
            "PPO ahead in 1 of 3 seeds.") in md
    assert "RLOO − PPO" not in md  # each pair once


def test_the_answer_claims_a_difference_only_where_it_holds_on_the_other_kernels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """GRPO ahead of PPO by 0.5 on every seed here. Re-run on AVX2: on llama_small it holds (the
    same records' gold, another platform), on moe_small PPO is ahead there (the pair in the other
    order, so the difference is turned to GRPO − PPO): the answer claims the first only, and says
    why not the second; a third model never run on AVX2 says so. The folder is kept for rebuilds
    and named in the header and the rebuild command."""
    grpo, ppo = ([1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]), ([1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0])
    here = {"platform": {"torch": "2.13.0+cpu", "device": "cpu", "cpu_capability": "AVX512"}}
    avx2 = {"platform": {"torch": "2.13.0+cpu", "device": "cpu", "cpu_capability": "AVX2"}}

    def runs(model: str, a: tuple, b: tuple, platform: dict) -> list[dict]:
        return [rec(m, s, {"eval/gold_reward": sum(g[s]) / 4}, model=model, reward_source="gold",
                    per_prompt=_per_prompt(list(map(float, g[s]))), **platform)
                for m, g in (("grpo", a), ("ppo", b)) for s in range(3)]

    for model in ("llama_small", "moe_small", "gpt2"):
        for r in runs(model, grpo, ppo, here):
            write_record(r, tmp_path / "results" / "runs")
    for r in runs("llama_small", grpo, ppo, avx2) + runs("moe_small", ppo, grpo, avx2):
        write_record(r, tmp_path / "avx2")
    monkeypatch.chdir(tmp_path)
    md = build_leaderboard(Path("results/runs"), Path("results"), screenshot=False, n_boot=500,
                           check_runs=Path("avx2"))["markdown"].read_text()
    assert ("- On the oracle track, llama_small · toy (group test): GRPO − PPO +0.500 [+0.500, +0.500], "
            "Holm p 0, P(GRPO > PPO) = 1.00, GRPO ahead in 3 of 3 seeds (holds on AVX2: +0.500 "
            "[+0.500, +0.500], 3 seeds) (Holm p < 0.05 on both kernels).") in md
    assert ("- On the oracle track, moe_small · toy (group test): no difference between methods is "
            "separable on both kernels.") not in md  # the sentence names the difference it drops
    assert ("- On the oracle track, moe_small · toy (group test): no difference between methods is "
            "separable on both kernels") in md
    assert "(not on AVX2: -0.500 [-0.500, -0.500], 3 seeds)" in md
    assert "gpt2 · toy (group test): no difference between methods is separable on both kernels" in md
    assert "(not run on AVX2)" in md
    assert "12 records of the same groups in `avx2` (AVX2)" in md and "--check-runs avx2" in md
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # kept relative to the output folder: found from any directory
    again = build_leaderboard(Path("../results/runs"), Path("../results"), screenshot=False, n_boot=500)
    assert "(holds on AVX2" in again["markdown"].read_text()
    # a sweep's rebuild with the kept folder gone says so and does not fail the sweep
    (tmp_path / "avx2").rename(tmp_path / "avx2-moved")
    from omegaconf import OmegaConf

    from harness.tracking.callbacks import LeaderboardCallback

    LeaderboardCallback().on_multirun_end(OmegaConf.create(
        {"results_dir": str(tmp_path / "results"), "group": "test", "logger": {"kind": "none"}}))
    assert "leaderboard not rebuilt: check_runs" in capsys.readouterr().out
    (tmp_path / "avx2-moved").rename(tmp_path / "avx2")
    cleared = build_leaderboard(tmp_path / "results" / "runs", tmp_path / "results", screenshot=False, n_boot=500,
                                check_runs="")
    assert "AVX2" not in cleared["markdown"].read_text()
    with pytest.raises(ValueError, match="check_runs .*: no such folder"):
        build_leaderboard(tmp_path / "results" / "runs", tmp_path / "results", screenshot=False,
                          check_runs=tmp_path / "nowhere")
    assert "nowhere" not in (tmp_path / "results" / lb.HEADER_FILE).read_text()  # not kept


def test_the_seed_strips_and_the_overoptimisation_figure(tmp_path: Path) -> None:
    from harness.evaluation.seed_figures import (
        overoptimisation_points,
        plot_overoptimisation,
        plot_seed_strips,
    )

    hist = {"eval/gold_reward": [[0, 0.6, 0, 0], [10, 0.7, 1, 1], [20, 0.5, 2, 2]],
            "train/kl": [[k, 0.5 * k] for k in range(21)]}
    recs = [rec("grpo", s, {"eval/gold_reward": 0.4, "eval/kl": 12.0, "eval/ref_gold_reward": 0.6},
                reward_source="rm", history=hist) for s in range(3)]
    # the run's end, then its curve over training at the KL of the nearest logged step
    assert overoptimisation_points(recs[0]) == [(12.0, pytest.approx(-0.2)), (5.0, pytest.approx(0.1)),
                                                (10.0, pytest.approx(-0.1))]
    path, fits = plot_overoptimisation(recs, tmp_path / "o.png")
    assert path.read_bytes().startswith(PNG_MAGIC) and ("llama_small", "toy", "grpo") in fits
    assert plot_seed_strips(recs + [rec("sft", 0, {"eval/gold_reward": 0.6})],
                            tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC)
    for fn in (plot_seed_strips, lambda r, p: plot_overoptimisation(r, p)[0]):  # nothing to draw
        assert fn([], tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)


def test_a_board_of_tuned_runs_keeps_each_method_at_its_tuning_winner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid extension moved GRPO's winner from β 0.04 to β 0.1 after the tuned sweep ran at 0.04:
    with ``tuned_by`` the table keeps GRPO at β 0.1 only (one row, not two), PPO at its winner, the
    reward model (never tuned) as it is; the header counts what it left out, the rebuild command and
    a later rebuild keep the choice, ``""`` clears it, and a group no record has is refused."""
    from harness.evaluation.tuning import at_tuned_settings

    def cfg(seed: int, beta: float, lr: float) -> dict:
        return {"seed": seed, "method": {"beta": beta, "optim": {"lr": lr}}}

    tune = [rec(m, s, {"eval/gold_reward": g}, group="tune", reward_source="gold",
                per_prompt={"split": "validation"}, config=cfg(s, b, 3e-4), suffix=f"-tune-{b}")
            for s in (0, 1) for m, b, g in (("grpo", 0.04, 0.6), ("grpo", 0.1, 0.7),
                                            ("ppo", 0.05, 0.8), ("ppo", 0.2, 0.5))]
    board = [rec(m, s, {"eval/gold_reward": 0.5 + 0.1 * s + b}, group="tracks_tuned",
                 reward_source="gold", per_prompt=_per_prompt([1.0, 0.0, float(s % 2)]),
                 config=cfg(s, b, 3e-4), suffix=f"-{b}")
             for s in range(3) for m, b in (("grpo", 0.04), ("grpo", 0.1), ("ppo", 0.05))]
    board += [rec("rm", s, {"eval/rm_pair_acc": 0.8}, group="tracks_tuned") for s in range(3)]
    kept, left = at_tuned_settings(board, tune)
    assert left == 3
    assert sorted((r["method"], r["config"]["method"].get("beta")) for r in kept if r["method"] != "rm") \
        == [("grpo", 0.1)] * 3 + [("ppo", 0.05)] * 3
    assert sum(r["method"] == "rm" for r in kept) == 3

    for r in tune + board:
        write_record(r, tmp_path / "results" / "runs")
    monkeypatch.chdir(tmp_path)

    def grpo_rows() -> list[str]:
        with open("results/leaderboard.csv", newline="") as f:
            return [row["beta"] for row in csv.DictReader(f) if row["method"] == "grpo"]

    md = build_leaderboard(Path("results/runs"), Path("results"), group="tracks_tuned",
                           tuned_by="tune", screenshot=False, n_boot=200)["markdown"].read_text()
    assert [float(b) for b in grpo_rows()] == [0.1]
    assert "`python -m harness.tuning --group tune` over the same records; 3 records at a " \
           "setting a later grid extension replaced left out" in md
    assert "--group tracks_tuned --tuned-by tune`" in md
    build_leaderboard(Path("results/runs"), Path("results"), screenshot=False, n_boot=200)  # kept
    assert len(grpo_rows()) == 1
    build_leaderboard(Path("results/runs"), Path("results"), tuned_by="", screenshot=False, n_boot=200)
    assert len(grpo_rows()) == 2  # cleared: both of GRPO's settings, each a row
    with pytest.raises(ValueError, match="tuned_by nope: no record"):
        build_leaderboard(Path("results/runs"), Path("results"), tuned_by="nope", screenshot=False)
