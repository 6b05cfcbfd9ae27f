"""Parameter counts of the presets equal the published model sizes; the CLI prints them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.config import ModelConfig, to_dataclass
from harness.models.param_count import format_breakdown, meta_model, parameter_breakdown
from harness.settings import register_configs

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# Total parameters of the released checkpoints (Meta's model cards / HF safetensors metadata).
PUBLISHED = {
    "llama1_7b": 6738415616,
    "llama1_13b": 13015864320,
    "llama1_33b": 32528943616,
    "llama1_65b": 65285660672,
    "llama2_7b": 6738415616,
    "llama2_13b": 13015864320,
    "llama2_70b": 68976648192,
    "llama3_8b": 8030261248,
    "llama3_70b": 70553706496,
    "mixtral_8x7b": 46702792704,
}


@pytest.fixture(scope="module")
def composed():
    """Compose ``conf/params.yaml`` with ``model=<name>`` (+ overrides) -> DictConfig."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda name, *overrides: compose(config_name="params",
                                               overrides=[f"model={name}", *overrides])


@pytest.fixture(scope="module")
def preset(composed):
    """``model=<name>`` -> ModelConfig."""
    return lambda name: to_dataclass(ModelConfig, composed(name).model)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_matches_published_count(name, preset):
    cfg = preset(name)
    model = meta_model(cfg)
    assert next(model.parameters()).is_meta
    counts = parameter_breakdown(model)
    assert counts["total"] == PUBLISHED[name]
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["layers"] == cfg.n_layers * counts["layer"]
    assert counts["embedding"] == counts["lm_head"] == cfg.vocab_size * cfg.d_model
    assert format_breakdown(counts, cfg).splitlines()[-1] == f"total {PUBLISHED[name]}"


def test_moe_breakdown_and_active_parameters(preset):
    cfg = preset("mixtral_8x7b")
    counts = parameter_breakdown(meta_model(cfg))
    expert = 3 * cfg.d_model * cfg.d_ff
    assert counts["layer.moe.experts.gate_up_proj"] == cfg.n_experts * 2 * cfg.d_model * cfg.d_ff
    assert counts["layer.moe.router"] == cfg.n_experts * cfg.d_model
    assert "layer.moe.router_noise" not in counts
    assert counts["active"] == PUBLISHED["mixtral_8x7b"] - cfg.n_layers * 6 * expert
    assert counts["active"] == 12879925248  # "12.9B active parameters"
    noisy = dataclasses.replace(preset("moe_small"), vocab_size=512)
    counts = parameter_breakdown(meta_model(noisy))
    assert counts["layer.moe.router_noise"] == counts["layer.moe.router"] == 4 * 128


def test_tied_head_counts_zero(preset):
    cfg = dataclasses.replace(preset("llama3_8b"), tie_embeddings=True)
    counts = parameter_breakdown(meta_model(cfg))
    assert counts["lm_head"] == 0
    assert counts["total"] == PUBLISHED["llama3_8b"] - cfg.vocab_size * cfg.d_model


def test_null_vocab_uses_default(composed):
    from harness.params import report

    text = report(composed("llama_small", "default_vocab_size=1000")).splitlines()
    assert "model.vocab_size is null" in text[0] and "default_vocab_size=1000" in text[0]
    assert "vocab 1000" in text[1]
    assert text[-1] == f"total {4 * 181504 + 2 * 1000 * 128 + 128}"


def test_cli_prints_total_and_writes_nothing(tmp_path):
    """``python -m harness.params`` from an empty folder: right totals, no files left behind."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    procs = {name: subprocess.Popen([sys.executable, "-m", "harness.params", f"model={name}"],
                                    cwd=tmp_path, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("llama3_8b", "mixtral_8x7b")}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        out[name] = stdout.strip().splitlines()
    assert out["llama3_8b"][-1] == "total 8030261248"
    assert out["mixtral_8x7b"][-1] == "total 46702792704"
    assert any(line.startswith("active per token") and line.split()[-2] == "12879925248"
               for line in out["mixtral_8x7b"])
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log files


def test_cli_stops_a_bad_shape_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "harness.params", "model.d_model=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        "config error: model.d_model=0: must be a positive integer"
