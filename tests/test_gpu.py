"""The real entry point and the bench on a CUDA GPU (``trainer=gpu``: bf16-mixed). Skipped where
there is none (CI); run on a GPU machine with ``python -m pytest tests/test_gpu.py``."""

from __future__ import annotations

import json

import pytest
import torch
from test_entrypoint import harness

from harness import bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One stage cache for the module's runs: the SFT base is trained once, by the first."""
    return tmp_path_factory.mktemp("cache")


def tiny_run(method: str, trainer: str, cache, out) -> list[str]:
    """A few steps of ``method`` on llama_tiny (the SFT base and PPO's reward model: 2 steps)."""
    steps = ["method.max_steps=2"] if method == "dpo" else [
        "method.n_iterations=2", "method.rollout.prompts_per_batch=4"]
    return [f"method={method}", f"trainer={trainer}", "model=llama_tiny", "sft.max_steps=2",
            "rm.max_steps=2", *steps, "eval.limit=4", "logger=none", "eval.lm_eval.enabled=false",
            f"cache_dir={cache}", f"results_dir={out}/results", f"hydra.run.dir={out}/run"]


@pytest.mark.parametrize("method", ["grpo", "ppo", "dpo"])
def test_the_entry_point_trains_and_evaluates_on_the_gpu(method, cache, tmp_path):
    run = harness(*tiny_run(method, "gpu", cache, tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["platform"]["device"] == "cuda" and summary["platform"]["gpu"]
    assert summary["config"]["trainer"]["precision"] == "bf16-mixed"
    metrics = summary["metrics"]
    assert 0.0 <= metrics["eval/gold_reward"] <= 1.0 and metrics["eval/kl"] == metrics["eval/kl"]


def test_the_bench_times_the_sampler_and_a_step_on_the_gpu(tmp_path):
    result = bench.main(["--models", "llama_tiny", "--batch", "4", "--prompt-len", "4",
                         "--new-tokens", "4", "--iters", "1", "--warmup", "1", "--device", "cuda",
                         "--sections", "sampler", "steps", "memory", "--methods", "grpo",
                         "--cache-dir", str(tmp_path / "cache")])
    assert result is not None
    (s,) = result["sampler"]
    assert s["device"].startswith("cuda") and s["ours_tok_s"] > 0 and s["hf_tok_s"] > 0
    (g,) = result["steps"]
    assert g["device"].startswith("cuda") and g["s_per_batch"] > 0
    assert result["memory"], "no memory figures"
