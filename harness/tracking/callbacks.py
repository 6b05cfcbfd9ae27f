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

        results = Path(to_absolute_path(config.results_dir or "results"))
        command = "python -m harness " + " ".join(sys.argv[1:])
        try:
            paths = build_leaderboard_after(results, command, str(config.group))
        except ValueError as err:  # the sweep's records are written; only the page is not
            log.warning("leaderboard not rebuilt: %s (python -m harness.leaderboard rebuilds it)", err)
            print(f"leaderboard not rebuilt: {err}")
            return
        log.info("leaderboard rebuilt: %s", paths.get("markdown"))
        print(f"leaderboard: {paths.get('markdown')}")
        if config.logger.kind == "wandb":
            log_leaderboard_table(config, load_records(results / "runs"))


def build_leaderboard_after(results: Path, command: str, sweep_group: str) -> dict[str, Path]:
    """Rebuild the leaderboard in ``results`` after a sweep of ``sweep_group`` ran ``command``.

    The header's "Reproduce the runs" names ``command`` only when the sweep's records are in the
    table (its group is one of the table's groups, or the table shows every record); a sweep of
    another group (e.g. ``tune``, whose records only feed the reward–KL plot) keeps the command
    stored for the table's rows.
    """
    from harness.evaluation.leaderboard import (
        build_leaderboard,
        group_names,
        header_settings,
        select_group,
    )
    from harness.evaluation.records import load_records

    _, _, stored_group, _, _ = header_settings(results, None, None)
    _, shown = select_group(load_records(results / "runs"), stored_group)
    if shown is not None and sweep_group not in group_names(shown):
        log.info("leaderboard: sweep group %r is not in the table (groups %s); its header keeps "
                 "its command", sweep_group, shown)
        return build_leaderboard(results / "runs", results)
    return build_leaderboard(results / "runs", results, command=command)


def log_leaderboard_table(config: DictConfig, records: list[dict]) -> None:
    """The leaderboard rows as a ``wandb.Table`` in a run of its own (job_type ``leaderboard``).

    The rows are those of the leaderboard's main table (the ``compare`` group when the records
    have one, else all; see :func:`harness.evaluation.leaderboard.select_group`). Columns: method,
    model, dataset, status, seeds (distinct ok seeds), then per metric key of
    :func:`harness.evaluation.leaderboard.columns` its mean over seeds and the bounds of its
    Student-t 95 % interval (``<key> ci_lo``, ``<key> ci_hi``; empty for a single seed).
    """
    import wandb

    from harness.evaluation.leaderboard import build_table, columns, select_group

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
