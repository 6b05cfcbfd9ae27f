"""``AlignmentDataModule``: a task's train / validation data as collated batches for Lightning."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from harness.data.collate import (
    OVERFLOWS,
    PairCollator,
    PromptCollator,
    SFTCollator,
    TokenizeStats,
    tokenize_dataset,
)
from harness.data.resumable import ResumableLoader
from harness.data.tasks.base import SPLITS, Task

log = logging.getLogger(__name__)

DataKind = Literal["sft", "pairs", "prompts"]


class AlignmentDataModule(L.LightningDataModule):
    """Collated batches of ``task``'s data for one stage.

    Args:
        task: the :class:`~harness.data.tasks.base.Task`.
        tokenizer: from :mod:`harness.data.tokenizer` (needs ``bos/eos/pad_token_id``).
        kind: ``"sft"`` (demonstrations, :class:`SFTCollator`), ``"pairs"`` (preference pairs,
            :class:`PairCollator`) or ``"prompts"`` (the distinct prompts of the SFT split,
            left-padded by :class:`PromptCollator`).
        batch_size: examples per batch (train and validation).
        max_len: the longest sequence; the overflow policy is :mod:`harness.data.collate`'s.
        overflow: ``"truncate"`` or ``"skip"`` for prompts that do not fit.
        num_workers: DataLoader workers (0: in the main process).
        seed: seeds the train shuffle (a dedicated ``torch.Generator``), so the order of batches
            is the same in every run with this seed.

    After ``setup()``: ``datasets[split]`` (tokenized), ``stats[split]``
    (:class:`~harness.data.collate.TokenizeStats`) and ``n_train``.
    """

    def __init__(self, task: Task, tokenizer: Any, kind: DataKind, batch_size: int,
                 max_len: int, overflow: str = "truncate", num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        if kind not in ("sft", "pairs", "prompts"):
            raise ValueError(f"kind={kind!r}: must be 'sft', 'pairs' or 'prompts'")
        if overflow not in OVERFLOWS:
            raise ValueError(f"overflow={overflow!r}: must be one of {list(OVERFLOWS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.task, self.tokenizer, self.kind = task, tokenizer, kind
        self.batch_size, self.max_len, self.overflow = batch_size, max_len, overflow
        self.num_workers, self.seed = num_workers, seed
        self.datasets: dict[str, Dataset] = {}
        self.stats: dict[str, TokenizeStats] = {}
        pad = tokenizer.pad_token_id
        self.collate = {"sft": SFTCollator, "pairs": PairCollator,
                        "prompts": PromptCollator}[kind](pad)

    def _source(self, split: str) -> Dataset:
        if self.kind == "pairs":
            return self.task.preference_dataset(split)
        ds = self.task.sft_dataset(split)
        if self.kind == "prompts":
            return Dataset.from_dict({"prompt": sorted(set(ds["prompt"]))})
        return ds

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the train and validation splits (once) and log what overflowed."""
        for split in SPLITS:
            if split in self.datasets:
                continue
            name = f"{self.task.name} {self.kind} {split}"
            ds, stats = tokenize_dataset(self._source(split), self.tokenizer, self.kind,
                                         self.max_len, self.overflow, name=name)
            level = logging.WARNING if stats.truncated or stats.skipped else logging.DEBUG
            log.log(level, "data %s (max_len=%d, overflow=%s): %s", name, self.max_len,
                    self.overflow, stats)
            self.datasets[split] = ds.with_format(None)
            self.stats[split] = stats

    @property
    def n_train(self) -> int:
        """Examples in the tokenized train split (``index`` runs over 0..n_train-1)."""
        self.setup()
        return len(self.datasets["train"])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        cls = ResumableLoader if shuffle else DataLoader  # the train loader resumes mid-epoch
        return cls(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          generator=gen, collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches (seeded generator)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return self._loader("validation", shuffle=False)

    def reference_dataloader(self, split: str = "train") -> DataLoader:
        """Batches of ``split`` in order, without shuffling (e.g. DPO's reference log-probs by index)."""
        return self._loader(split, shuffle=False)

    def n_examples(self, split: str) -> int:
        """Examples in the tokenized ``split``."""
        self.setup()
        return len(self.datasets[split])
