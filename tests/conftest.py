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
# Under pytest-xdist (the README's `-n 2`) each worker, and every run a test starts, computes on one
# thread: two workers of two threads each on two cores would oversubscribe them (set before torch
# is imported, which reads it once)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# runs started by tests write their result records here, never into the repository's results/
os.environ.setdefault("HARNESS_RESULTS_DIR", tempfile.mkdtemp(prefix="harness-results-"))
