"""What a run leaves: its results record in ``<results_dir>/runs/``, its ``summary.json``, and the
``cost/*`` fields both carry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path

from harness.evaluation.cost import StageCost
from harness.util.atomic import write_json


def record_for(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The results record of a finished or failed run (see :mod:`harness.evaluation.records`)."""
    from harness.evaluation.records import new_record

    cfg = summary.get("config", {})
    return new_record(run_id=summary["run_id"], method=summary["method"], model=summary["model"],
                      dataset=summary["dataset"], seed=int(summary["seed"]),
                      status=summary["status"], error=summary.get("error"),
                      group=cfg.get("group"), metrics=summary.get("metrics", {}),
                      cost=summary.get("cost", {}), cache_keys=summary.get("cache_keys", {}),
                      config=cfg, history=summary.get("history"),
                      platform=summary.get("platform"), per_prompt=summary.get("per_prompt"),
                      reward_source=summary.get("reward_source"),
                      # the code's commit, wherever the command was started from
                      repo_path=Path(__file__).resolve().parent)


class RecordNotWritten(RuntimeError):
    """The run's results record could not be written (its ``summary.json`` was)."""


def write_outputs(summary: dict[str, Any], run_dir: Path) -> None:
    """One record in ``<results_dir>/runs/``, then ``summary.json`` in the run directory.

    Each is written whatever happens to the other: a summary that cannot be written does not stop
    the record, and a record that cannot be written (a results folder gone bad, a record of the
    same id already there) is noted in the summary (``record_error``), which is written first;
    then :class:`RecordNotWritten` is raised, so the run fails rather than lose its record.
    """
    from harness.evaluation.records import write_record

    results = summary.get("config", {}).get("results_dir")
    error = None
    if results:
        runs = Path(to_absolute_path(results)) / "runs"
        try:
            summary["record"] = str(write_record(record_for(summary, run_dir), runs))
        except Exception as exc:  # the run's own summary must survive a results folder gone bad
            summary["record_error"] = f"{type(exc).__name__}: {exc}"
            error = f"could not write the results record to {runs}: {summary['record_error']}"
    write_json(run_dir / "summary.json", summary)
    if error is not None:
        raise RecordNotWritten(f"{error} (the run's summary is in {run_dir / 'summary.json'})")


def stage_costs(costs: dict[str, StageCost], method_stage: str, total_s: float) -> dict[str, float]:
    """The run's ``cost/*`` fields: per stage, the method's own stage, and the whole run.

    ``cost/peak_mem_mb`` is the largest peak of the stages computed in this run (not cached);
    ``cost/method_*`` alias the aligning method's stage (for ``method=sft`` the SFT stage).
    """
    out: dict[str, float] = {"cost/wall_s": total_s}
    for stage, c in costs.items():
        out.update(c.as_metrics(stage))
    live = [c.peak_mem_mb for c in costs.values() if not c.cached]
    out["cost/peak_mem_mb"] = max(live) if live else float("nan")
    own = costs.get(method_stage)
    if own is not None:
        out["cost/method_wall_s"] = own.wall_s
        out["cost/method_peak_mem_mb"] = own.peak_mem_mb
        for name in ("train_tokens_per_s", "gen_tokens_per_s"):
            if name in own.extra:
                out[f"cost/{name}"] = own.extra[name]
        if "train_tokens_per_s" in own.extra:
            out["cost/tokens_per_s"] = own.extra["train_tokens_per_s"]
    return out
