"""Hydra callbacks: rebuild the leaderboard when a multirun sweep ends, and log it to W&B."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

log = logging.getLogger("harness")


class LeaderboardCallback(Callback):
    """After ``-m`` sweeps: ``results/leaderboard.{md,csv,html}`` and plots from the run records."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.evaluation.records import load_records
        from harness.evaluation.standings import build_leaderboard

        results = Path(to_absolute_path(config.results_dir or "results"))
        command = "python -m harness " + " ".join(sys.argv[1:])
        paths = build_leaderboard(results / "runs", results, command=command)
        log.info("leaderboard rebuilt: %s", paths.get("markdown"))
        print(f"leaderboard: {paths.get('markdown')}")
        if config.logger.kind == "wandb":
            log_leaderboard_table(config, load_records(results / "runs"))


def log_leaderboard_table(config: DictConfig, records: list[dict]) -> None:
    """The leaderboard rows as a ``wandb.Table`` in a run of its own (job_type ``leaderboard``).

    The rows are those of the leaderboard's main table (the ``compare`` group when the records
    have one, else all; see :func:`harness.evaluation.standings.select_group`). Columns: method,
    model, dataset, status, seeds (distinct ok seeds), then per metric key of
    :func:`harness.evaluation.standings.columns` its mean over seeds and the bounds of its
    Student-t 95 % interval (``<key> ci_lo``, ``<key> ci_hi``; empty for a single seed).
    """
    import wandb

    from harness.evaluation.standings import build_table, columns, select_group

    rows = build_table(select_group(records)[0])
    cols = columns(rows)
    header = ["method", "model", "dataset", "status", "seeds"]
    for c in cols:
        header += [c, f"{c} ci_lo", f"{c} ci_hi"]
    data = []
    for row in rows:
        cells = [row["method"], row["model"], row["dataset"], row.get("status", "ok"), row.get("n_seeds", 0)]
        for c in cols:
            cell = row["metrics"].get(c) or {}
            cells += [cell.get("mean"), cell.get("ci_lo"), cell.get("ci_hi")]
        data.append(cells)
    mode = "offline" if config.logger.offline and os.environ.get("WANDB_MODE") != "online" \
        else "online"
    run = wandb.init(project=config.logger.project, entity=config.logger.entity,
                     group=config.logger.group or config.group,
                     job_type="leaderboard", name=f"leaderboard-{config.group}",
                     mode=mode, dir=to_absolute_path(config.results_dir or "results"))
    run.log({"leaderboard": wandb.Table(columns=header, data=data)})
    run.finish()
