"""Sparse upcycling: a dense model's MLP copied into every expert preserves its function exactly."""

from __future__ import annotations

import pytest
import torch
from test_methods import TINY_SFT, composed
from test_pretrained import write_folder

from harness.models.architecture import ConfigError, ModelConfig
from harness.models.llama import CausalLM
from harness.models.upcycle import upcycle, upcycled_config
from harness.pipeline import run

DENSE = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=64)


@pytest.mark.parametrize("gating", ["softmax", "noisy_top_k"])
@pytest.mark.parametrize("training", [False, True])  # noisy gating adds noise only in training
def test_the_upcycled_model_computes_the_dense_model(gating, training):
    torch.manual_seed(0)
    dense = CausalLM(DENSE).eval()
    moe = upcycle(dense, upcycled_config(DENSE, n_experts=4, top_k=2, gating=gating))
    moe.train(training)
    assert moe.cfg.is_moe and moe.cfg.n_experts == 4
    experts = moe.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[3], torch.cat((dense.model.layers[1].mlp.gate_proj.weight,
                                                           dense.model.layers[1].mlp.up_proj.weight)))
    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        out = moe(ids)
        assert torch.allclose(out.logits, dense(ids).logits, atol=1e-5)
    # the routers are fresh: tokens spread over several experts, not one copy
    assert (torch.stack(out.expert_load) > 0).sum(-1).min() >= 2


def test_only_a_dense_pretrained_model_is_upcycled(tmp_path):
    from harness.settings import validate

    with pytest.raises(ValueError, match="upcycling needs a dense model"):
        upcycled_config(upcycled_config(DENSE, 4, 2), 8, 2)
    with pytest.raises(ConfigError, match="model.upcycle_experts=4: upcycles a pretrained"):
        validate(composed(["model=llama_tiny", "model.upcycle_experts=4"]))
    mixtral = write_folder(tmp_path / "tiny-mixtral", moe=True)
    with pytest.raises(ConfigError, match="model.upcycle_experts=4: upcycling needs a dense model"):
        validate(composed(["model=hf", f"model.pretrained={mixtral}", "model.upcycle_experts=4"]))


def test_grpo_trains_an_upcycled_pretrained_model(tmp_path):
    folder = write_folder(tmp_path / "tiny-llama")
    overrides = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "model.upcycle_experts=4",
                 "model.top_k=2", "model.gating=noisy_top_k", "method=grpo", "method.n_iterations=2",
                 "method.group_size=4", "sft.max_steps=4", f"cache_dir={tmp_path}/cache",
                 "results_dir=null"]
    summary = run(composed(overrides), tmp_path / "run")
    assert summary["status"] == "ok"
    m = summary["metrics"]
    assert "train/expert_load/3" in m or "train/moe_aux_loss" in m  # MoE telemetry of the arm
    dense = run(composed([o for o in overrides
                          if not o.startswith(("model.upcycle_experts", "model.gating"))]),
                tmp_path / "dense")
    assert dense["cache_keys"]["sft"] != summary["cache_keys"]["sft"]
    # the MoE arm is a model of its own in records and on the leaderboard
    assert (summary["model"], dense["model"]) == ("tiny-llama_moe4", "tiny-llama")
