"""Test-wide settings: never touch the network, keep W&B offline and caches inside tmp dirs."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# runs started by tests write their result records here, never into the repository's results/
os.environ.setdefault("HARNESS_RESULTS_DIR", tempfile.mkdtemp(prefix="harness-results-"))
