"""The one progress bar of a stage's training: Lightning's own (Rich when ``rich`` is installed, as
Lightning chooses, else tqdm), named after the stage instead of "Epoch 0/-2" (Lightning's
description when a budget is counted in steps, ``max_epochs=-1``), and without ``v_num`` (the
logger's version, which says nothing to the user)."""

from __future__ import annotations

import importlib.util
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


def description(stage: str, epoch: int) -> str:
    """``"SFT"``, then ``"SFT epoch 2"`` from the second pass over the data on."""
    return stage.upper() if epoch == 0 else f"{stage.upper()} epoch {epoch + 1}"


class StageRichBar(RichProgressBar):
    """Lightning's Rich bar under the stage's name."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=description(self.stage, trainer.current_epoch))

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class StageTQDMBar(TQDMProgressBar):
    """Lightning's tqdm bar under the stage's name."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(description(self.stage, trainer.current_epoch))

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def stage_progress_bar(stage: str) -> ProgressBar:
    """The bar Lightning would pick (Rich if importable, else tqdm), for ``stage``."""
    rich = importlib.util.find_spec("rich") is not None
    return StageRichBar(stage) if rich else StageTQDMBar(stage)
