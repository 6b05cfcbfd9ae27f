"""What a run prints (harness/util/console.py): the stages as they start and finish, one progress bar per
training stage, the summary; no third-party line the user did not ask for, and none twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOISE = {
    "Lightning's accelerator lines": "GPU available",
    "Lightning's TPU line": "TPU available",
    "Lightning's advert": "litlogger",
    "W&B's deprecation of a setting it is handed": "anonymous setting",
    "torch's deprecation inside Lightning": "LeafSpec",
    "Lightning on the on-policy stages' frozen modules": "eval mode at the start of training",
    "datasets' map bars": "examples/s]",
    "transformers' save bars": "Writing model shards",
    "git, run by lm-eval, outside a checkout": "not a git repository",
    "Lightning's epoch description": "Epoch 0/",
    "the logger's version in the bar": "v_num",
}


def _run(tmp_path: Path, *extra: str) -> str:
    """A tiny GRPO run (SFT base, GRPO, evaluation and lm-eval, W&B offline) started from a folder
    outside any git checkout; its stdout and stderr together."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}  # as a user's shell has it
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    out = subprocess.run(
        [sys.executable, "-m", "harness", "method=grpo", "model=llama_tiny", "sft.max_steps=4",
         "method.n_iterations=2", "eval.limit=4", "eval.lm_eval.limit=4",
         f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_a_run_shows_its_stages_and_summary_and_no_third_party_noise(tmp_path):
    console = _run(tmp_path)
    for what, text in NOISE.items():
        assert text not in console, f"{what} reached the console:\n{console}"
    for line in ("SFT stage: training sft-", "SFT stage: trained in", "GRPO stage: training",
                 "GRPO stage: trained in", "evaluation: test split, then lm-eval",
                 "evaluation: done in", "run: grpo | model llama_tiny", "gold reward"):
        assert line in console, f"{line!r} missing:\n{console}"
    # one bar per training stage, named after it
    assert any(line.startswith("SFT ") for line in console.splitlines())
    assert any(line.startswith("GRPO ") for line in console.splitlines())
    # the stages cached, the next run says so and trains only GRPO
    again = _run(tmp_path, "log_level=INFO")
    assert "SFT stage: reusing cached sft-" in again and "SFT stage: training" not in again
    # log_level=INFO lets Lightning's lines through, once each (not also from its own handler)
    assert again.count("GPU available") == 1, again
    assert "litlogger" not in again  # the advert is dropped at every level


def test_log_level_is_checked_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "log_level=LOUD", "logger=none",
                          f"cache_dir={tmp_path}/cache"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "log_level='LOUD': must be one of DEBUG, INFO, WARNING, ERROR" in out.stderr
    assert not (tmp_path / "cache").exists()
