"""The data layer: built-in tasks (generators + gold rewards), loaders for hub/local preference
data, the Alpaca template, a locally trained byte-level BPE tokenizer, encoders/collators and the
LightningDataModule.

Modules: :mod:`~harness.data.tasks` (``build_task``), :mod:`~harness.data.tokenizer`
(``build_tokenizer``, ``load_or_build_tokenizer``), :mod:`~harness.data.collate`
(``encode_sft``, ``encode_prompt(s)``, ``encode_pair``, collators, ``tokenize_dataset``),
:mod:`~harness.data.datamodule` (``AlignmentDataModule``), :mod:`~harness.data.templates`
(``alpaca_prompt``), :mod:`~harness.data.errors` (``DataError``). Submodules are imported on
demand (this package does not import torch, transformers or Lightning by itself).
"""

from harness.data.errors import DataError

__all__ = ["DataError"]
