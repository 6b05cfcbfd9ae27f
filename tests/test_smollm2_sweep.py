"""``sweeps/smollm2_oracle.sh``, the real-model oracle track: its syntax, its matched budgets (every
method samples and scores the same responses and steps once per rollout batch), and its seeds
stage reading each method's tuned setting from the tuning records, or refusing without them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from harness.evaluation.records import new_record, write_record

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "smollm2_oracle.sh"
METHODS = ("grpo", "rloo", "online_dpo", "ppo")


def dry_run(stage: str, results: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
           "HARNESS_RESULTS_DIR": str(results), **extra}
    return subprocess.run(["bash", str(SCRIPT), stage], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def overrides(command: str) -> list[str]:
    """A printed ``python -m harness -m ...`` command's overrides, each sweep list at its first
    value, on llama_tiny (composing SmolLM2 would read its weights; the budget does not depend
    on the model)."""
    out = []
    for arg in shlex.split(command)[3:]:
        if arg in ("-m", "+launch=parallel", "sft.enabled=false"):
            continue
        key, value = arg.split("=", 1)
        out.append(f"{key}={'llama_tiny' if key == 'model' else value.split(',')[0]}")
    return out


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_every_method_is_tuned_at_one_matched_budget(tmp_path):
    from harness.bench.common import compose_config
    from harness.methods.config import planned_budget
    from harness.settings import validate

    done = dry_run("tune", tmp_path)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.strip().splitlines()
    assert len(commands) == len(METHODS)
    budgets = {}
    for command, method in zip(commands, METHODS, strict=True):
        assert f"method={method}" in command and "track=oracle" in command
        assert "eval.split=validation" in command and "method.optim.lr=3e-5,1e-4,3e-4,1e-3" in command
        settings = validate(compose_config(overrides(command)))
        assert settings.method.reward_source == "gold"
        # the group methods pack a group's responses with their prompt (PPO samples one a prompt)
        assert getattr(settings.method, "share_prompt", False) is (method != "ppo")
        # PPO's unpacked rows through policy and critic: two jobs fit in memory only recomputed
        assert settings.model.gradient_checkpointing is (method == "ppo")
        budgets[method] = planned_budget(settings.method)
    assert set(map(str, budgets.values())) == {str({"responses": 30 * 32, "steps_per_batch": 1})}


def test_a_grid_is_extended_by_naming_its_new_learning_rates(tmp_path):
    done = dry_run("tune", tmp_path, LRS="3e-3", METHODS="grpo")
    assert done.returncode == 0, done.stderr
    (command,) = done.stdout.strip().splitlines()
    assert "method=grpo" in command and "method.optim.lr=3e-3 seed=0,1" in command
    assert "group=smollm2_tune" in command  # one tuning group: the winner is picked over both


def test_the_seeds_stage_needs_the_tuning_and_runs_each_method_at_its_best(tmp_path):
    refused = dry_run("seeds", tmp_path)
    assert refused.returncode == 1 and "no tuned setting of grpo" in refused.stderr
    for method in METHODS:
        for lr, gold in ((1e-4, 0.30), (3e-4, 0.40 if method != "ppo" else 0.20)):
            rec = new_record(run_id=f"{method}_{lr}", method=method, model="smollm2_135m",
                             dataset="arith_fast", seed=0, status="ok", group="smollm2_tune",
                             config={"method": {"name": method, "beta": 0.05, "optim": {"lr": lr}}},
                             metrics={"eval/gold_reward": gold})
            rec.update(track="oracle", per_prompt={"split": "validation"})
            write_record(rec, tmp_path / "runs")
    done = dry_run("seeds", tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(METHODS)
    for line, method in zip(lines, METHODS, strict=True):
        best = "0.0001" if method == "ppo" else "0.0003"
        assert f"method={method} track=oracle method.beta=0.05 method.optim.lr={best}" in line
        assert "group=smollm2_oracle" in line and "seed=0,1,2,3,4" in line


def test_an_unknown_stage_stops_the_script(tmp_path):
    done = dry_run("nonsense", tmp_path)
    assert done.returncode == 2 and "unknown stage nonsense" in done.stderr
