"""The leaderboard on hand-made records: aggregation, Average, failures, renderers, CLI."""

from __future__ import annotations

import base64
import csv
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.evaluation.leaderboard import (
    average_score,
    build_leaderboard,
    build_table,
    columns,
    is_task_metric,
    is_task_score,
    plot_reward_kl,
    plot_training_curves,
    render_html,
    render_markdown,
    write_csv,
)
from harness.evaluation.records import write_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def rec(method: str, seed: int, metrics: dict, *, model: str = "llama_small",
        status: str = "ok", error: str | None = None, cost: dict | None = None,
        history: dict | None = None) -> dict:
    """A hand-made run record."""
    r = {
        "run_id": f"{method}-{model}-toy-s{seed}",
        "status": status, "error": error,
        "method": method, "model": model, "dataset": "toy", "seed": seed, "group": "test",
        "metrics": metrics, "cost": cost or {},
        "cache_keys": {"sft": "sft123", "rm": None}, "config": {"seed": seed},
        "harness_version": "0.1.0", "git_commit": "a" * 40,
        "created": "2026-11-24T00:00:00+00:00",
    }
    if history is not None:
        r["history"] = history
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
    assert row["metrics"]["eval/kl"]["mean"] == pytest.approx(2.0)
    assert row["metrics"]["eval/kl"]["std"] == pytest.approx(math.sqrt(2.0))
    assert row["metrics"]["cost/wall_s"]["mean"] == pytest.approx(110.0)  # prefixes unified
    assert row["metrics"]["cost/peak_mem_mb"]["mean"] == pytest.approx(1100.0)
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1]
    # a single seed has no std
    ppo = _row(build_table(records), "ppo")
    assert ppo["metrics"]["eval/gold_reward"] == {"mean": 0.9, "std": None, "n": 1}


def test_average_over_task_scores_by_hand(records: list[dict]) -> None:
    rows = build_table(records)
    avg = _row(rows, "dpo")["metrics"]["Average"]
    # seed 0: (0.4 + 0.8) / 2 = 0.6; seed 1: (0.6 + 1.0) / 2 = 0.8 — perplexity, bits_per_byte
    # and stderr left out
    assert avg["mean"] == pytest.approx(0.7)
    assert avg["std"] == pytest.approx(math.sqrt(0.02))
    assert _row(rows, "ppo")["metrics"]["Average"]["mean"] == pytest.approx(0.3)
    assert _row(rows, "dpo", "moe_small")["metrics"]["Average"]["mean"] is None
    # task metrics are columns, perplexities included; stderr is not
    cols = columns(rows)
    assert cols[:4] == ["Average", "eval/gold_reward", "eval/win_rate", "eval/kl"]
    assert cols[-3:] == ["cost/wall_s", "cost/peak_mem_mb", "cost/tokens_per_s"]
    assert set(cols[4:-3]) == {"eval/arith/acc", "eval/boolq/acc",
                               "eval/wikitext/bits_per_byte", "eval/wikitext/word_perplexity"}


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


def test_sorting(records: list[dict]) -> None:
    rows = build_table(records)
    order = [(r["method"], r["model"]) for r in rows]
    assert order == [("dpo", "llama_small"), ("ppo", "llama_small"),  # by Average desc
                     ("dpo", "moe_small"),  # no Average: after those with one
                     ("grpo", "llama_small")]  # all failed: last


def test_table_is_a_pure_function_of_the_records(records: list[dict]) -> None:
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert build_table(shuffled) == build_table(records)
    assert build_table([]) == []


# --------------------------------------------------------------------------- renderers
def test_markdown(records: list[dict]) -> None:
    cmd = "python -m harness -m method=ppo,grpo,dpo seed=0,1"
    md = render_markdown(build_table(records), [f"Reproduce the runs: `{cmd}`"])
    assert md.startswith("# ")
    assert cmd in md
    dpo_line = next(line for line in md.splitlines() if line.startswith("| dpo | llama_small"))
    assert "0.600 ± 0.141" in dpo_line  # gold reward
    assert "0.700 ± 0.141" in dpo_line  # Average
    assert "2 (+1 failed)" in dpo_line
    grpo_line = next(line for line in md.splitlines() if line.startswith("| grpo"))
    assert "failed" in grpo_line and "CUDA out of memory" in grpo_line
    assert "0.900 |" in md  # single seed: bare mean
    assert "NaN loss at step 7" in md  # failed runs listed


def test_csv_columns(records: list[dict], tmp_path: Path) -> None:
    rows = build_table(records)
    path = write_csv(rows, tmp_path / "lb.csv")
    with path.open() as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        data = list(reader)
    assert header[:6] == ["method", "model", "dataset", "status", "n_seeds", "n_failed"]
    for col in ("Average", "eval/gold_reward", "eval/win_rate", "eval/kl", "eval/arith/acc",
                "cost/wall_s", "cost/peak_mem_mb", "cost/tokens_per_s"):
        assert f"{col}_mean" in header and f"{col}_std" in header
    assert header[-1] == "error"
    assert len(data) == 4
    dpo = data[0]
    assert float(dpo["eval/gold_reward_mean"]) == pytest.approx(0.6)
    assert float(dpo["eval/gold_reward_std"]) == pytest.approx(0.141421356)
    assert float(dpo["Average_mean"]) == pytest.approx(0.7)
    ppo = data[1]
    assert ppo["eval/gold_reward_std"] == ""  # one seed
    grpo = data[-1]
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
    assert "0.600 ± 0.141" in page and 'class="failed"' in page
    assert "CUDA out of memory" in page


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


# --------------------------------------------------------------------------- end to end
def test_build_leaderboard(records: list[dict], tmp_path: Path) -> None:
    runs = tmp_path / "results" / "runs"
    for r in records:
        write_record(r, runs)
    paths = build_leaderboard(runs, tmp_path / "results", command="python -m harness -m x=1")
    assert {p.name for p in paths.values()} == {
        "leaderboard.md", "leaderboard.csv", "leaderboard.html", "reward_kl.png",
        "training_curves.png"}
    assert all(p.is_file() and p.parent == tmp_path / "results" for p in paths.values())
    md = paths["markdown"].read_text()
    assert "`python -m harness -m x=1`" in md and "python -m harness.leaderboard" in md
    assert "](reward_kl.png)" in md
    _assert_self_contained(paths["html"].read_text())
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")]


def test_build_leaderboard_default_command(records: list[dict], tmp_path: Path) -> None:
    for r in records:
        write_record(r, tmp_path / "runs")
    md = build_leaderboard(tmp_path / "runs", tmp_path / "out")["markdown"].read_text()
    assert ("python -m harness -m method=dpo,grpo,ppo model=llama_small,moe_small dataset=toy "
            "seed=0,1,2") in md


def test_empty_runs_dir_writes_empty_leaderboard(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    paths = build_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert "No run records found" in paths["markdown"].read_text()
    header = paths["csv"].read_text().splitlines()
    assert len(header) == 1 and header[0].startswith("method,model,dataset,status")
    assert "No run records found" in paths["html"].read_text()
    assert paths["reward_kl"].read_bytes().startswith(PNG_MAGIC)


def test_cli(records: list[dict], tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    for r in records:
        write_record(r, runs)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.leaderboard", "--runs", str(runs), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "leaderboard.html" in proc.stdout
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "reward_kl.png",
                 "training_curves.png"):
        assert (out / name).is_file(), name
    assert "| dpo | llama_small |" in (out / "leaderboard.md").read_text()

    empty = subprocess.run(
        [sys.executable, "-m", "harness.leaderboard", "--runs", str(tmp_path / "none"),
         "--out", str(tmp_path / "out2")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert empty.returncode == 0 and "no run records" in empty.stderr
    assert (tmp_path / "out2" / "leaderboard.md").is_file()
