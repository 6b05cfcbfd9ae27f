"""The Lightning ``Trainer`` a stage trains with, and the callback that keeps its training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from harness.config import TrainerConfig
from harness.stage import Budget
from harness.tracking.progress import stage_progress_bar
from harness.util.step_profile import build_profiler


def build_trainer(trainer: TrainerConfig, logger, ckpt_dir: Path, run_dir: Path, budget: Budget,
                  extra_callbacks: tuple = (), stage: str = "stage") -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` group plus the stage's budget; with
    ``trainer.profiler``, that profiler writing to ``<run_dir>/profile/fit-<stage>.txt``."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    callbacks: list = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0),
                       HistoryRecorder(), *extra_callbacks]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if trainer.enable_progress_bar:
        callbacks.append(stage_progress_bar(stage))
    kwargs: dict[str, Any] = {}
    if budget.val_every is not None:
        kwargs.update(val_check_interval=budget.val_every, check_val_every_n_epoch=None)
    if budget.limit_train_batches is not None:
        kwargs.update(limit_train_batches=budget.limit_train_batches, max_epochs=1,
                      limit_val_batches=0)
    trainer_kwargs = trainer.kwargs()
    if budget.log_every_n_steps is not None:
        trainer_kwargs["log_every_n_steps"] = budget.log_every_n_steps
    profiler = build_profiler(trainer.profiler, run_dir / "profile", stage)
    if profiler is not None:
        kwargs["profiler"] = profiler
    return L.Trainer(**trainer_kwargs, max_steps=budget.max_steps,
                     gradient_clip_val=budget.grad_clip or None,
                     logger=logger if logger is not None else False, callbacks=callbacks,
                     default_root_dir=str(run_dir), **kwargs)


class HistoryRecorder(L.Callback):
    """Keeps the training curves the leaderboard plots (``[[step, value], ...]`` per metric).

    ``step`` counts the stage's training steps (Lightning batches) across epochs.
    """

    KEYS = ("train/loss", "train/reward", "train/kl", "train/rewards_margin")
    VAL_KEYS = ("val/loss", "val/rewards_acc")  # at each validation

    def __init__(self) -> None:
        self.history: dict[str, list[list[float]]] = {}
        self._step = 0

    def state_dict(self) -> dict[str, Any]:  # kept in resume checkpoints
        return {"history": self.history, "step": self._step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history, self._step = state_dict["history"], state_dict["step"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, self.KEYS)
        self._step += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, self.VAL_KEYS)

    def _record(self, trainer, keys: tuple[str, ...]) -> None:
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.setdefault(key, []).append([float(self._step), float(value)])
