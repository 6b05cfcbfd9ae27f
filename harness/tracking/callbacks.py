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
        from harness.evaluation.leaderboard import build_leaderboard
        from harness.evaluation.records import load_records

        results = Path(to_absolute_path(config.get("results_dir") or "results"))
        command = "python -m harness " + " ".join(sys.argv[1:])
        paths = build_leaderboard(results / "runs", results, command=command)
        log.info("leaderboard rebuilt: %s", paths.get("markdown"))
        print(f"leaderboard: {paths.get('markdown')}")
        if config.logger.get("kind") == "wandb":
            log_leaderboard_table(config, load_records(results / "runs"))


def log_leaderboard_table(config: DictConfig, records: list[dict]) -> None:
    """The leaderboard rows as a ``wandb.Table`` in a run of its own (job_type ``leaderboard``)."""
    import wandb

    from harness.evaluation.leaderboard import build_table, columns

    rows = build_table(records)
    cols = columns(rows)
    data = []
    for row in rows:
        cells = [row["method"], row["model"], row["dataset"], row.get("status", "ok")]
        cells += [(row["metrics"].get(c) or {}).get("mean") for c in cols]
        data.append(cells)
    mode = "offline" if config.logger.get("offline", True) and os.environ.get("WANDB_MODE") != "online" \
        else "online"
    run = wandb.init(project=config.logger.project, entity=config.logger.get("entity"),
                     group=config.logger.get("group") or config.get("experiment"),
                     job_type="leaderboard", name=f"leaderboard-{config.get('experiment')}",
                     mode=mode, dir=to_absolute_path(config.get("results_dir") or "results"))
    run.log({"leaderboard": wandb.Table(columns=["method", "model", "dataset", "status", *cols],
                                        data=data)})
    run.finish()
