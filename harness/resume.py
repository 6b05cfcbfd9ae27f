"""Resume after a kill: a Lightning checkpoint every N training batches, restored on rerun.

What a resume checkpoint holds is Lightning's own (``Trainer.save_checkpoint``): the module's
weights, every optimiser and scheduler state, the loops' progress, the callbacks' states (the
training curves: :class:`harness.pipeline.trainer.HistoryRecorder`, the held-out gold curve) and the
train loader's position (:class:`harness.data.resumable.ResumableLoader`), plus what
:class:`harness.methods.base.AlignmentModule` adds: the global RNG states (dropout, noisy-gating
noise), the module's own generators (the rollout sampler) and its running state (e.g. PPO's
adaptive KL coefficient). A run resumed from batch k therefore trains batches k+1.. exactly as the
uninterrupted run would (same seed, same machine and kernels): the same final weights and metrics.

Where: base stages (SFT, reward model) and aligning stages alike keep their checkpoint in
``<cache_dir>/resume/<stage key>/resume.ckpt``, keyed by what decides the stage (backbone, data,
config, seed, numerics, the stages it builds on), so rerunning the same command finds it whatever
the new run directory is called; the folder is removed when the stage finishes.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from harness.data.resumable import ResumableLoader

log = logging.getLogger("harness")

CKPT_NAME = "resume.ckpt"


def rng_states() -> dict[str, Any]:
    """The global RNG states: torch (CPU and every CUDA device), numpy, Python's ``random``.

    Tensors and plain Python values only, so checkpoints load with ``torch.load(weights_only=True)``
    (numpy's key array is kept as an int64 tensor).
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train_loaders(trainer: L.Trainer) -> list[ResumableLoader]:
    """The trainer's train loaders that can be resumed (Lightning's own copies under DDP)."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return [dl for dl in loaders if isinstance(dl, ResumableLoader)]


class ResumeCheckpoint(Checkpoint):
    """Save ``dirpath/resume.ckpt`` every ``every`` training batches (atomically: a kill while
    saving leaves the previous one). ``every=0`` saves nothing.

    A ``Checkpoint`` subclass, so Lightning runs it after the other callbacks of a batch: the
    curves it saves already include that batch.
    """

    def __init__(self, dirpath: Path, every: int, total: int = 0) -> None:
        if every < 0:
            raise ValueError(f"every={every}: must be >= 0")
        #: the stage's training batches (0: unknown): no checkpoint after the last one
        self.dirpath, self.every, self.total = Path(dirpath), int(every), int(total)

    @property
    def path(self) -> Path:
        return self.dirpath / CKPT_NAME

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # batches trained, all epochs
        if not self.every or done % self.every:
            return
        if self.total and done >= self.total:
            return  # the stage is over: nothing left to resume
        for loader in train_loaders(trainer):
            loader.mark_consumed(batch_idx + 1)
        tmp = self.dirpath / f".{CKPT_NAME}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        # weights_only=False: the optimiser and loops too (and no log line at every save)
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("resume_checkpoint")


def resumable(ckpt_dir: Path) -> Path | None:
    """The resume checkpoint in ``ckpt_dir``, if a killed run left one."""
    path = Path(ckpt_dir) / CKPT_NAME
    return path if path.is_file() else None


def checkpoint_batch(path: Path) -> int:
    """How many training batches the checkpoint at ``path`` had trained (for the log)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no tensor reads
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    return int(progress["processed"])


def discard(ckpt_dir: Path) -> None:
    """Remove a finished stage's resume folder."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
