"""A new method is its package and its YAML, nothing else: written outside the repository, found
by the registry, composed by Hydra and run end to end through ``python -m harness``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INIT = '''\
"""Toy DPO: offline DPO under another name, a method added from outside the harness."""
from dataclasses import dataclass

from harness.methods.declaration import Method
from harness.methods.dpo import DPOConfig


@dataclass
class ToyDPOConfig(DPOConfig):
    name: str = "toy_dpo"
    beta: float = 0.25


METHOD = Method("toy_dpo", ToyDPOConfig, "harness.methods.toy_dpo.stage:ToyDPOStage")
'''

STAGE = '''\
from harness.methods.dpo.stage import DPOStage
from harness.methods.toy_dpo import METHOD


class ToyDPOStage(DPOStage, method=METHOD):
    """DPO's stage, declared as toy_dpo."""
'''

YAML = "defaults:\n  - base_toy_dpo\n  - _self_\n"


def test_a_method_added_as_a_package_and_a_yaml_runs_end_to_end(tmp_path):
    plugins, conf = tmp_path / "plugins", tmp_path / "conf"
    (plugins / "toy_dpo").mkdir(parents=True)
    (plugins / "toy_dpo" / "__init__.py").write_text(INIT)
    (plugins / "toy_dpo" / "stage.py").write_text(STAGE)
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "toy_dpo.yaml").write_text(YAML)
    args = ["method=toy_dpo", "model=llama_tiny", "sft.max_steps=2", "method.max_steps=2",
            "eval.limit=4", "logger=none", "eval.lm_eval.enabled=false",
            f"hydra.searchpath=[file://{conf}]", f"hydra.run.dir={tmp_path}/run",
            f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results"]
    # the package goes beside the harness's own methods, as if its folder had been added there
    script = textwrap.dedent(f"""
        import sys
        import harness.methods
        harness.methods.__path__.append({str(plugins)!r})
        sys.argv = ["harness", *{args!r}]
        from harness.__main__ import main
        main()
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "results" / "runs").glob("toy_dpo_*.json")
    record = json.loads(path.read_text())
    assert record["method"] == "toy_dpo" and record["status"] == "ok"
    assert record["config"]["method"]["beta"] == 0.25           # its own config's default
    assert record["metrics"]["budget/optimizer_steps"] == 2
    assert "cost/toy_dpo/wall_s" in record["cost"]                # the stage runner measured it
    assert 0.0 <= record["metrics"]["eval/gold_reward"] <= 1.0  # evaluated like every policy
