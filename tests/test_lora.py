"""LoRA through peft: only the adapters train, the reference is the base with adapters off (no
second copy), checkpoints are saved merged with the adapter beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_methods import TINY_SFT, composed
from test_pretrained import write_folder

from harness.models.architecture import ConfigError, LoRASettings, ModelConfig
from harness.models.llama import CausalLM
from harness.models.lora import AdaptersOff, add_lora, has_lora, merged
from harness.pipeline import run

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=64)


def test_adapters_train_alone_and_the_view_and_the_merge_are_exact():
    torch.manual_seed(0)
    base = CausalLM(CFG).eval()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        before = base(ids).logits.clone()
    policy = add_lora(base, LoRASettings(r=4, alpha=8.0))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * CFG.n_layers  # A and B on each of the 7 linear layers
    with torch.no_grad():
        assert torch.equal(policy(ids).logits, before)  # B = 0: the adapted model starts as its base
        for n, p in policy.named_parameters():  # a step's worth of change in the adapters
            if "lora_B" in n:
                p.normal_(0, 0.1)
        adapted = policy(ids).logits
        assert not torch.allclose(adapted, before)
        reference = AdaptersOff(policy).eval()
        assert list(reference.parameters()) == []  # no second copy of the weights
        assert torch.equal(reference(ids).logits, before)  # exactly the base
        assert torch.equal(policy(ids).logits, adapted)  # the adapters are back on
        plain = merged(policy)
        assert not has_lora(plain) and has_lora(policy)
        assert set(plain.state_dict()) == set(CausalLM(CFG).state_dict())
        assert torch.allclose(plain(ids).logits, adapted, atol=1e-5)


def test_lora_settings_are_checked():
    from harness.settings import validate

    with pytest.raises(ConfigError, match="model.lora.r=-1"):
        validate(composed(["model=llama_tiny", "model.lora.r=-1"]))
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        validate(composed(["model=llama_tiny", "model.lora.r=4", "model.lora.target_modules=[qproj]"]))
    with pytest.raises(ConfigError, match="MoE experts are fused tensors"):
        validate(composed(["model=moe_tiny", "model.lora.r=4"]))
    ok = validate(composed(["model=moe_tiny", "model.lora.r=4",
                            "model.lora.target_modules=[q_proj,v_proj]"]))
    assert ok.model.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_a_lora_run_trains_adapters_and_saves_a_merged_checkpoint(method, tmp_path):
    from transformers import AutoModelForCausalLM

    from harness.models.hf import load_checkpoint

    folder = write_folder(tmp_path / "tiny-llama")
    # GRPO scores with a reward model: on a random model every gold reward can be 0, and then no
    # advantage moves a weight (whether one rollout gets lucky depends on the CPU's rounding)
    budget = {"grpo": ["method.n_iterations=3", "method.group_size=4", "method.reward_source=rm"],
              "dpo": ["method.max_steps=4", "method.optim.lr=1e-2"]}[method]
    summary = run(composed([*TINY_SFT, "model=hf", f"model.pretrained={folder}", "sft.enabled=false",
                            "model.lora.r=4", f"method={method}", *budget,
                            f"cache_dir={tmp_path}/cache", "results_dir=null"]), tmp_path / "run")
    assert summary["status"] == "ok"
    ckpt = Path(summary["checkpoint"])
    adapter = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    ours, _, _ = load_checkpoint(ckpt)  # merged: the plain layout, no LoRA names
    theirs = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(4, 100, (2, 8))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)
        assert not torch.allclose(theirs(ids).logits, base(ids).logits, atol=1e-6)  # it trained
        # only the adapted layers moved: the embeddings and norms are the base's
        assert torch.equal(theirs.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert summary["metrics"]["eval/kl"] == summary["metrics"]["eval/kl"]  # computed, not NaN


def test_a_lora_sft_base_trained_in_this_run_is_the_one_the_cache_gives(tmp_path):
    """Later stages build on the merged SFT base whether it was trained in this process or read
    from the cache: the reward model trained on either is the same."""
    folder = write_folder(tmp_path / "tiny-llama")
    common = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "model.lora.r=4",
              "sft.max_steps=4", "rm.max_steps=4", "results_dir=null", "dataset.n_train=300", "dataset.n_pairs=96"]
    fresh = run(composed([*common, "method=rm", f"cache_dir={tmp_path}/a"]), tmp_path / "fresh")
    run(composed([*common, "method=sft", f"cache_dir={tmp_path}/b"]), tmp_path / "sft")
    cached = run(composed([*common, "method=rm", f"cache_dir={tmp_path}/b"]), tmp_path / "cached")
    assert fresh["stages"]["sft"]["cached"] is False and cached["stages"]["sft"]["cached"] is True
    trained = sorted(k for k in fresh["stages"]["rm"]["metrics"]  # wall-clock rates aside
                     if k.startswith("train/") and not k.endswith("tokens_per_s"))
    assert "train/loss" in trained
    for key in trained:
        assert fresh["stages"]["rm"]["metrics"][key] == pytest.approx(
            cached["stages"]["rm"]["metrics"][key], abs=1e-6), key


def test_the_reward_model_and_the_critic_can_train_adapters_too(tmp_path):
    from harness.models.hf import load_checkpoint
    from harness.settings import validate
    from harness.stage import scalar_head

    with pytest.raises(ConfigError, match="model.lora.reward_and_critic=true: .* model.lora.r > 0"):
        validate(composed(["model=llama_tiny", "model.lora.reward_and_critic=true"]))
    settings = LoRASettings(r=4, reward_and_critic=True)
    torch.manual_seed(0)
    head = scalar_head(CausalLM(CFG), settings)
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("score.") for n in trainable)
    assert {"score.weight", "score.bias"} <= trainable
    full = scalar_head(CausalLM(CFG), LoRASettings(r=4))  # default: the heads train in full
    assert not has_lora(full) and all(p.requires_grad for n, p in full.named_parameters()
                                      if not n.startswith("backbone.lm_head"))
    # end to end: PPO's reward model (saved merged, adapter beside) and critic on adapters
    folder = write_folder(tmp_path / "tiny-llama")
    summary = run(composed([*TINY_SFT, "model=hf", f"model.pretrained={folder}", "sft.enabled=false",
                            "model.lora.r=4", "model.lora.reward_and_critic=true", "method=ppo",
                            "rm.max_steps=4", "method.n_iterations=2",
                            f"cache_dir={tmp_path}/cache", "results_dir=null"]), tmp_path / "run")
    assert summary["status"] == "ok", summary.get("error")
    rm_dir = Path(summary["stages"]["rm"]["checkpoint"])
    assert (rm_dir / "adapter" / "adapter_model.safetensors").is_file()
    backbone, _, _ = load_checkpoint(rm_dir)
    assert not has_lora(backbone)  # merged


def test_an_moe_model_merges_right_after_a_training_step():
    """The MoE layers keep their last auxiliary loss, a graph tensor after a step with gradients:
    deep copies (the merged checkpoint of a LoRA run) must not trip over it."""
    import copy

    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64,
                      n_experts=4, top_k=2)
    torch.manual_seed(0)
    model = add_lora(CausalLM(cfg), LoRASettings(r=4, target_modules=["q_proj", "v_proj"]))
    out = model(torch.randint(0, 50, (2, 8)))
    (out.logits.mean() + out.aux_loss).backward()
    assert not model.moe_layers[0].aux_loss.is_leaf  # what deepcopy used to refuse
    plain = merged(model)
    assert not has_lora(plain) and copy.deepcopy(model) is not None
    assert model.moe_layers[0].aux_loss.requires_grad  # the original is left as it was
