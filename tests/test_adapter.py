"""A non-LLaMA causal LM (a tiny random GPT-2 built here) behind the backbone interface through the
transformers adapter (``harness.models.adapter``): config, logits, the KV-cached sampler, every
method's entry point, LoRA on its own layer names, checkpoints that reload in ``transformers``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_methods import TINY_SFT, composed
from test_pretrained import arith_tokenizer

from harness.models.architecture import ConfigError
from harness.pipeline import run


def gpt2_folder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 (learned positions, LayerNorm, GELU, Conv1D layers, dropout 0.1)
    with an arith tokenizer, as ``save_pretrained`` writes it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = arith_tokenizer(folder)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return gpt2_folder(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


def _context_of(folder: Path, tmp_path: Path, *extra: str):
    """The run's set-up (:func:`harness.pipeline.prepare.prepare`) for the checkpoint ``folder``."""
    from harness.pipeline.prepare import prepare
    from harness.settings import validate

    cfg = composed(["model=hf", f"model.pretrained={folder}", f"cache_dir={tmp_path}/c", *extra])
    return prepare(validate(cfg), tmp_path / "c")


def test_a_gpt2_checkpoint_runs_through_transformers_and_says_what_it_lacks(folder, tmp_path, caplog):
    from harness.settings import validate

    m = validate(composed(["model=hf", f"model.pretrained={folder}"])).model
    assert m.backend == "transformers" and m.via_transformers
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len) == (32, 2, 4, 128, 128)
    assert m.tie_embeddings and m.name == "tiny-gpt2"
    with pytest.raises(ConfigError, match=r"model_type='gpt2'.*model.backend=transformers runs it"):
        validate(composed(["model=hf", f"model.pretrained={folder}", "model.backend=native"]))
    with pytest.raises(ConfigError, match=r"model.upcycle_experts=4: upcycling .* model.backend=native"):
        validate(composed(["model=hf", f"model.pretrained={folder}", "model.upcycle_experts=4"]))
    with pytest.raises(ConfigError, match=r"model.backend='torch': must be 'auto', 'native' or"):
        validate(composed(["model=hf", f"model.pretrained={folder}", "model.backend=torch"]))
    # the native layouts stay native, and keep their cache keys (backend left out of the key)
    assert validate(composed(["model=llama_tiny"])).model.backend == "native"
    assert "backend" not in validate(composed(["model=llama_tiny"])).model.key_fields()
    assert m.key_fields()["backend"] == "transformers"
    from harness.models import adapter

    adapter._REPORTED.discard("tiny-gpt2")
    with caplog.at_level(logging.WARNING, logger="harness"):
        _context_of(folder, tmp_path).new_policy()
        _context_of(folder, tmp_path).new_policy()
    said = [r.getMessage() for r in caplog.records if "not available through it" in r.getMessage()]
    assert len(said) == 1 and "GPT2LMHeadModel" in said[0] and "upcycling" in said[0]


@pytest.mark.parametrize("method", ["dpo", "grpo", "rloo"])
def test_a_shared_prompt_is_refused_through_transformers_before_work(folder, tmp_path, method):
    with pytest.raises(ConfigError, match="method.share_prompt=true: the packed layout"):
        _context_of(folder, tmp_path, f"method={method}", "method.share_prompt=true")
    assert not list((tmp_path / "c").glob("stages/*"))   # no stage trained


def test_the_adapter_gives_transformers_logits_and_samples_like_it(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from harness.models.generation import generate

    ctx = _context_of(folder, tmp_path)
    ours = ctx.new_policy()
    assert not any(isinstance(m, torch.nn.Dropout) and m.p for m in ours.modules())  # dropout off
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(4, ours.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        out = ours(ids)
        assert torch.allclose(out.logits, theirs(ids).logits, atol=1e-5)
        assert out.hidden.shape == (2, 12, 32) and float(out.aux_loss) == 0.0 and not out.expert_load
    # left-padded prompts of two lengths, KV-cached: each row as if alone, and as HF greedy
    pad = ctx.tokenizer.pad_token_id
    eos = ctx.tokenizer.eos_token_id
    a, b = [5, 9, 13, 7, 21], [8, 30]
    batch = torch.tensor([a, [pad] * 3 + b])
    mask = torch.tensor([[1] * 5, [0] * 3 + [1] * 2])
    both = generate(ours, batch, mask, 6, eos_token_id=10**6, pad_token_id=pad, greedy=True)
    for row, prompt in enumerate((a, b)):
        alone = generate(ours, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                         6, eos_token_id=10**6, pad_token_id=pad, greedy=True)
        hf = theirs.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos)
        assert both.response[row].tolist() == alone.response[0].tolist()
        assert alone.response[0].tolist() == hf[0, len(prompt):].tolist()


def test_every_method_runs_on_gpt2_and_its_checkpoints_reload_in_transformers(folder, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    base = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "sft.max_steps=4",
            "rm.max_steps=4", f"cache_dir={tmp_path}/cache", "results_dir=null",
            "dataset.n_train=300", "dataset.n_pairs=96"]
    budget = {"grpo": ["method.n_iterations=2", "method.group_size=4"],
              "ppo": ["method.n_iterations=2"], "dpo": ["method.max_steps=4"]}
    for method, extra in budget.items():
        out = run(composed([*base, f"method={method}", *extra]), tmp_path / method)
        assert out["status"] == "ok", out.get("error")
        assert out["model"] == "tiny-gpt2" and 0.0 <= out["metrics"]["eval/gold_reward"] <= 1.0
        assert not any(k.startswith("train/expert_load") for k in out["metrics"])  # absent, not 0
        saved = json.loads((Path(out["checkpoint"]) / "config.json").read_text())
        assert saved["model_type"] == "gpt2" and saved["harness"]["backend"] == "transformers"
        loaded = AutoModelForCausalLM.from_pretrained(out["checkpoint"])
        assert isinstance(loaded, GPT2LMHeadModel)
    # the reward model's backbone (PPO) was saved and reloaded through the adapter too
    assert list((tmp_path / "cache" / "stages").glob("rm-*/checkpoint/score_head.pt"))


def test_lora_on_gpt2_targets_its_own_layers_and_saves_merged(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from harness.settings import validate

    m = validate(composed(["model=hf", f"model.pretrained={folder}", "model.lora.r=4"])).model
    assert list(m.lora.target_modules) == ["c_attn"]  # peft's default for gpt2
    overrides = [*TINY_SFT, "model=hf", f"model.pretrained={folder}", "sft.enabled=false",
                 "model.lora.r=4", "method=grpo", "method.n_iterations=2", "method.group_size=4",
                 "method.reward_source=rm",  # gold rewards of a random model can all be 0: no update
                 f"cache_dir={tmp_path}/cache", "results_dir=null"]
    out = run(composed(overrides), tmp_path / "lora")
    assert out["status"] == "ok", out.get("error")
    ckpt = Path(out["checkpoint"])
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["target_modules"] \
        == ["c_attn"]
    merged = AutoModelForCausalLM.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(folder)
    changed = [n for n, p in merged.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("c_attn" in n for n in changed)  # only the adapted layers moved


def test_the_parameter_breakdown_counts_a_gpt2_checkpoint(folder):
    from hydra import compose, initialize_config_dir
    from test_methods import CONF
    from transformers import AutoModelForCausalLM

    from harness.params import report

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="params", overrides=["model=hf", f"model.pretrained={folder}"])
    text = report(cfg)
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    assert text.splitlines()[-1] == f"total {total}"  # the tied head counted once
    assert "gpt2 through transformers (GPT2LMHeadModel)" in text and "transformer.wte" in text


def test_gradient_checkpointing_through_the_adapter_keeps_the_gradients(folder, tmp_path):
    import copy

    policy = _context_of(folder, tmp_path).new_policy().train()
    recomputing = copy.deepcopy(policy)
    recomputing.set_gradient_checkpointing(True)
    assert recomputing.hf.is_gradient_checkpointing and not policy.hf.is_gradient_checkpointing
    ids = torch.randint(4, policy.cfg.vocab_size, (2, 10))
    grads = []
    for model in (policy, recomputing):
        model(ids).logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7) for n in grads[0])
