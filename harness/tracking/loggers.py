"""Experiment loggers built from the ``logger`` config group (W&B offline by default, CSV, none)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from harness.util.wandb_auth import wants_online


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 128}}`` -> ``{"model.d_model": 128}`` so W&B can filter on any field."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def run_identity(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """Name, group, job type and tags of a run, derived from the (resolved) config alone."""
    method, model, dataset = cfg["method"]["name"], cfg["model"]["name"], cfg["dataset"]["name"]
    return {
        "name": f"{stage}-{model}-{dataset}-s{cfg['seed']}" if stage != method
        else f"{method}-{model}-{dataset}-s{cfg['seed']}",
        "group": cfg["logger"]["group"] or cfg["group"],
        "job_type": stage,
        "tags": [f"method:{method}", f"model:{model}", f"dataset:{dataset}", f"stage:{stage}"],
    }


def build_logger(cfg: dict[str, Any], stage: str, save_dir: Path) -> Logger | None:
    """A Lightning logger for one stage of a run; ``cfg`` is the resolved config as a dict."""
    lcfg = cfg["logger"]
    kind = lcfg["kind"]
    save_dir.mkdir(parents=True, exist_ok=True)
    if kind == "none":
        return None
    if kind == "csv":
        return CSVLogger(save_dir=str(save_dir), name=stage, version="")
    if kind != "wandb":
        raise ValueError(f"logger.kind={kind!r}: must be one of wandb, csv, none")
    ident = run_identity(cfg, stage)
    offline = not wants_online(bool(lcfg["offline"]))
    os.environ.setdefault("WANDB_SILENT", "true")
    return QuietWandbLogger(
        project=lcfg["project"],
        entity=lcfg["entity"],
        name=ident["name"],
        group=ident["group"],
        job_type=ident["job_type"],
        tags=ident["tags"],
        save_dir=str(save_dir),
        offline=offline,
        log_model=False,  # checkpoints are logged as artifacts by the pipeline (offline too)
        config=flatten(cfg),
    )


class QuietWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous=None`` it always hands ``wandb.init``:
    wandb 0.2x deprecated the setting and warns on every run that passes it, ``None`` included."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class RunLoggers:
    """The experiment loggers of one run: one per stage trained in it, opened by :meth:`open`.

    The run owns them: a stage's logger is closed with :meth:`close` when the stage is done,
    except the final stage's, which :meth:`finish` closes with the run's summary (opening one
    when the final stage came from the cache). :meth:`abort` closes whatever is open.
    """

    def __init__(self, cfg: dict[str, Any], run_dir: Path, final_stage: str) -> None:
        self.cfg, self.run_dir, self.final = cfg, run_dir, final_stage
        self.open_loggers: dict[str, Logger | None] = {}

    def open(self, stage: str) -> Logger | None:
        logger = build_logger(self.cfg, stage, self.run_dir)
        self.open_loggers[stage] = logger
        return logger

    def close(self, stage: str) -> None:
        """Close ``stage``'s logger unless it is the final stage's (kept for the summary)."""
        if stage != self.final and stage in self.open_loggers:
            finish(self.open_loggers.pop(stage))

    def finish(self, summary: dict[str, Any], samples: list[dict] | None = None,
               checkpoint: Path | None = None) -> None:
        """Log the samples table (and the checkpoint artifact) and the summary; close all."""
        logger = self.open_loggers.pop(self.final, None) if self.final in self.open_loggers \
            else build_logger(self.cfg, self.final, self.run_dir)
        if logger is not None and hasattr(logger, "log_table") and samples:
            cols = list(samples[0])
            logger.log_table("eval/samples", columns=cols, data=[[s[c] for c in cols] for s in samples])
        if checkpoint is not None and self.cfg["logger"]["log_model"]:
            log_model_artifact(logger, checkpoint, f"{self.final}-{self.cfg['model']['name']}")
        finish(logger, summary)
        self.abort(None)

    def abort(self, summary: dict[str, Any] | None = None) -> None:
        """Close every logger still open (a failed run: ``{"status": "failed"}``)."""
        for stage in list(self.open_loggers):
            finish(self.open_loggers.pop(stage), summary)


def log_model_artifact(logger: Logger | None, checkpoint: Path, name: str) -> None:
    """Log a checkpoint folder as a W&B model artifact (``logger.log_model=true``; works offline)."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    artifact = wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "-", name), type="model")
    artifact.add_dir(str(checkpoint))
    logger.experiment.log_artifact(artifact)


def finish(logger: Logger | None, summary: dict[str, Any] | None = None) -> None:
    """Write ``summary`` into the W&B run summary and close the run (WandbLogger does not)."""
    if not isinstance(logger, WandbLogger):
        if logger is not None:
            logger.finalize("success")
        return
    run = logger.experiment
    if summary:
        for k, v in summary.items():
            run.summary[k] = v
    run.finish()
