"""Hugging Face export: the exported checkpoint computes the harness model's logits, and reloads."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from harness.models.architecture import ModelConfig  # noqa: E402
from harness.models.hf import (  # noqa: E402
    CONFIG_FILE,
    NOISE_FILE,
    config_from_hf,
    load_checkpoint,
    save_checkpoint,
    to_hf_config,
    to_hf_model,
)
from harness.models.llama import CausalLM  # noqa: E402

VOCAB = 97
BASE = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
            max_seq_len=64, rope_theta=5000.0, norm_eps=1e-5, name="export_test")
CASES = {
    "dense": {},
    "dense_tied_mha": dict(tie_embeddings=True, n_kv_heads=None),
    "moe_softmax": dict(n_experts=4, top_k=2, gating="softmax", aux_loss_coef=0.02),
    "moe_noisy": dict(n_experts=4, top_k=2, gating="noisy_top_k", router_z_loss_coef=0.001),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    """A model with random matrices and random (non-unit) norm gains, in eval mode."""
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    model.reset_parameters()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    """Tiny word-level tokenizer (<pad>=0, <bos>=1, <eos>=2, <unk>=3) as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>",
                                          *(f"w{i}" for i in range(VOCAB - 4))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def logits(model: torch.nn.Module, x: torch.Tensor, hf: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits if hf else model(x).logits


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_through_transformers(case, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralForCausalLM

    cfg = ModelConfig(**{**BASE, **CASES[case]})
    model = random_model(cfg)
    resolved = {"seed": 3, "model": dataclasses.asdict(cfg), "method": {"name": "sft"}}
    out = save_checkpoint(model, tmp_path / "ckpt", tokenizer=tokenizer, resolved_config=resolved)
    assert out == (tmp_path / "ckpt").absolute()
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              CONFIG_FILE):
        assert (out / f).is_file(), f
    assert (out / NOISE_FILE).exists() == (cfg.gating == "noisy_top_k" and cfg.is_moe)
    assert OmegaConf.to_container(OmegaConf.load(out / CONFIG_FILE)) == resolved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left

    hf_json = json.loads((out / "config.json").read_text())
    assert hf_json["harness"]["name"] == "export_test"
    assert hf_json["rope_parameters"]["rope_theta"] == 5000.0
    assert (hf_json["bos_token_id"], hf_json["eos_token_id"], hf_json["pad_token_id"]) == (1, 2, 0)

    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    assert isinstance(hf, MixtralForCausalLM if cfg.is_moe else LlamaForCausalLM)
    torch.manual_seed(1)
    x = torch.randint(0, VOCAB, (3, 17))
    expected = logits(model, x)
    assert (logits(hf, x, hf=True) - expected).abs().max().item() <= 1e-4
    # an all-ones attention mask changes nothing
    with torch.no_grad():
        masked = hf(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert (masked - expected).abs().max().item() <= 1e-4

    back, tok, back_cfg = load_checkpoint(out)
    assert back_cfg == cfg
    assert not back.training
    sd, back_sd = model.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys()
    assert all(torch.equal(sd[k], back_sd[k]) for k in sd)  # router noise included
    torch.testing.assert_close(logits(back, x), expected, rtol=0, atol=0)
    assert tok is not None and tok("w1 w5 zz")["input_ids"] == tokenizer("w1 w5 zz")["input_ids"]
    if cfg.tie_embeddings:
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_to_hf_config_fields():
    cfg = ModelConfig(**{**BASE, **CASES["moe_noisy"]})
    hf = to_hf_config(cfg)
    assert type(hf).__name__ == "MixtralConfig"
    assert (hf.num_local_experts, hf.num_experts_per_tok, hf.router_jitter_noise) == (4, 2, 0.0)
    assert hf.output_router_logits is False and hf.router_aux_loss_coef == cfg.aux_loss_coef
    assert (hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == (64, 96, 2)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (4, 2, 16)
    assert hf.rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}
    assert hf.harness["gating"] == "noisy_top_k"
    assert hf.bos_token_id is None and hf.eos_token_id is None  # no tokenizer: none invented
    dense = to_hf_config(ModelConfig(**BASE))
    assert type(dense).__name__ == "LlamaConfig"
    assert dense.attention_bias is False and dense.mlp_bias is False
    assert dense.hidden_act == "silu" and dense.max_position_embeddings == 64
    assert config_from_hf(dense.to_dict()) == ModelConfig(**BASE)
    with pytest.raises(ValueError, match="vocab_size"):
        to_hf_config(ModelConfig(**{**BASE, "vocab_size": None}))


def test_to_hf_model_drops_only_router_noise():
    model = random_model(ModelConfig(**{**BASE, **CASES["moe_noisy"]}))
    hf = to_hf_model(model)
    assert not hf.training
    theirs = hf.state_dict()
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("gate.noise.weight")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_save_replaces_existing_checkpoint(tmp_path):
    cfg = ModelConfig(**BASE)
    save_checkpoint(random_model(cfg, seed=0), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("from the old checkpoint")
    newer = random_model(cfg, seed=1)
    save_checkpoint(newer, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert not (tmp_path / "ckpt" / CONFIG_FILE).exists()  # none given this time
    back, tok, _ = load_checkpoint(tmp_path / "ckpt")
    assert tok is None
    x = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(logits(back, x), logits(newer, x), rtol=0, atol=0)
