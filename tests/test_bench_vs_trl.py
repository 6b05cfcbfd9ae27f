"""``python -m harness.bench --vs trl``: the FLOP model by hand, the message without TRL, a tiny run."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from harness import bench
from harness.bench.cli import parse_args
from harness.bench.flops import (
    dpo_step_flops,
    forward_flops,
    grpo_step_flops,
    matmul_gflops,
    matmul_params,
    ppo_step_flops,
)
from harness.bench.steps import precompute_reference
from harness.bench.vs_trl import MISSING_PPO, MISSING_TRL, require_ppo_trainer
from harness.config import ModelConfig
from harness.models.llama import CausalLM

# d 4, 1 layer, 2 heads of width 2 sharing 1 KV head, d_ff 8, vocabulary 10
SMALL = ModelConfig(d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8, max_seq_len=8,
                    vocab_size=10)


def test_matmul_params_by_hand():
    # q 4*2*2 = 16, k + v 2 * 4*1*2 = 16, o 2*2*4 = 16, gate/up/down 3*4*8 = 96; lm_head 4*10 = 40
    assert matmul_params(SMALL) == 16 + 16 + 16 + 96 + 40 == 184
    # MoE: top_k = 2 of 4 experts active per token, plus the router 4*4
    moe = ModelConfig(d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8, max_seq_len=8,
                      vocab_size=10, n_experts=4, top_k=2)
    assert matmul_params(moe) == 48 + 2 * 96 + 16 + 40 == 296


def test_step_flops_by_hand():
    # B = 2 sequences of T = 3: weights 2*184*2*3 = 2208; scores 4 * L1 * B2 * T^2 9 * h*hd 4 = 288
    assert forward_flops(SMALL, 2, 3) == 2208 + 288 == 2496
    # GRPO: sampling + reference + one policy forward and backward (3x) = 5 forwards
    assert grpo_step_flops(SMALL, 2, 3) == 5 * 2496 == 12480
    assert grpo_step_flops(SMALL, 2, 3, epochs=2) == 8 * 2496
    # the group's prompt (P 1) shared: reference + policy passes over 1 packed row of 1 + 2 * 2
    # tokens: weights 2*184*1*5 = 1840, scores 4*1*1*25*4 = 400; sampling stays 2496
    assert grpo_step_flops(SMALL, 2, 3, packed_group=2, prompt_len=1) == 2496 + 4 * 2240
    # DPO, 1 pair = 2 sequences: forward + backward, the reference precomputed
    assert dpo_step_flops(SMALL, 1, 3) == 3 * 2496 == 7488
    # PPO, 2 prompts, 1 epoch: F = 2496; the reward model and critic end in one scalar, so
    # G = F - 2 d V B T = 2496 - 2*4*10*2*3 = 2016; sampling + reference (2F), RM + critic
    # passes (2G), policy and critic forward + backward (3F + 3G)
    assert ppo_step_flops(SMALL, 2, 3, epochs=1) == 2 * 2496 + 2 * 2016 + 3 * (2496 + 2016) == 22560
    assert ppo_step_flops(SMALL, 2, 3, epochs=4) == 4992 + 4032 + 12 * 4512


def test_matmul_params_are_the_linear_weights_of_the_model():
    cfg = bench.model_config("llama_tiny", 300)
    model = CausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_params(cfg) == linear


def test_the_comparison_shape_is_the_trl_benchmark_llama():
    cfg = bench.model_config("llama_trl_bench", 260)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff) == (256, 4, 8, 4, 688)
    # 4 * (256*256*2 + 2*256*128 + 3*256*688) + 256*260
    assert matmul_params(cfg) == 2_966_528


def test_matmul_rate_is_positive():
    assert matmul_gflops(32, trials=1, min_s=0.001) > 0


def test_vs_trl_takes_the_comparison_settings():
    args = parse_args(["--vs", "trl"])
    # the sampler at the comparison's shape: the one command prints every ratio the issue names
    assert args.models == ["llama_trl_bench"] and args.sections == ["sampler"] and args.threads == 2
    assert (args.batch, args.new_tokens, args.pairs, args.rounds) == (64, 16, 8, 3)
    assert parse_args(["--vs", "trl", "--sections", "steps", "--threads", "1"]).sections == ["steps"]
    assert parse_args(["--vs", "trl", "--sections"]).sections == []  # the step comparison alone
    assert args.vs_steps == ["grpo", "dpo"] and args.ppo_prompts == 8
    assert parse_args(["--vs", "trl", "--vs-steps", "ppo"]).vs_steps == ["ppo"]
    plain = parse_args([])
    assert plain.vs is None and plain.sections == ["sampler", "steps", "memory"]
    assert plain.models == ["llama_small", "moe_small"] and plain.threads is None


def test_fused_adamw_reaches_both_sides_of_the_comparison(tmp_path):
    """``--fused-adamw``: every optimiser of the harness's stage is fused (PPO's critic too) and
    TRL's arguments ask for ``adamw_torch_fused``; without it both run the per-tensor loop."""
    from harness.bench.steps import build_method, prepare_data
    from harness.bench.vs_trl import common_args
    from harness.config import OptimConfig

    assert parse_args(["--vs", "trl", "--fused-adamw"]).fused_adamw
    assert not parse_args(["--vs", "trl"]).fused_adamw
    for fused, name in ((False, "adamw_torch"), (True, "adamw_torch_fused")):
        assert common_args(OptimConfig(fused=fused), 3, tmp_path, 0, torch.device("cpu"))["optim"] == name
    task, tok = prepare_data(16, tmp_path)
    cfg = bench.model_config("llama_tiny", len(tok))
    for fused in (False, True):
        setup = build_method("ppo", cfg, task, tok, 4, 2, device=torch.device("cpu"),
                             fused_adamw=fused)
        assert setup.module.cfg.optim.fused is fused and setup.module.cfg.critic_optim.fused is fused
        optimizers, _ = setup.module.configure_optimizers()
        assert [bool(o.defaults["fused"]) for o in optimizers] == [fused, fused]


def test_share_prompt_reaches_the_benched_dpo_and_grpo_stages(tmp_path):
    """``--share-prompt``: the harness's DPO (steps and --vs) packs each pair with its prompt
    once, policy and reference alike, GRPO each group; PPO is untouched."""
    from harness.bench.steps import build_method, prepare_data
    from harness.bench.vs_trl import harness_overrides
    from harness.methods.dpo.stage import pair_logps, shared_prompt_pair_logps

    assert parse_args(["--share-prompt"]).share_prompt and not parse_args([]).share_prompt
    assert harness_overrides("dpo", 16, True) == ["method.share_prompt=true"]
    assert harness_overrides("dpo", 16) == [] and "method.share_prompt=true" not in \
        harness_overrides("ppo", 16, True) + harness_overrides("grpo", 16)
    assert harness_overrides("grpo", 16, True) == ["method.rollout.max_new_tokens=16",
                                                   "method.share_prompt=true"]
    task, tok = prepare_data(16, tmp_path)
    cfg = bench.model_config("llama_tiny", len(tok))
    for share, logps in ((False, pair_logps), (True, shared_prompt_pair_logps)):
        setup = build_method("dpo", cfg, task, tok, 4, 2, device=torch.device("cpu"),
                             overrides=harness_overrides("dpo", 16, share))
        assert setup.module.cfg.share_prompt is share and setup.module.ref.logps is logps
        grpo = build_method("grpo", cfg, task, tok, 8, 2, device=torch.device("cpu"),
                            overrides=harness_overrides("grpo", 4, share))
        assert grpo.module.cfg.share_prompt is share


def test_the_benched_ppo_drops_what_trl_1_12_lacks(tmp_path):
    """TRL 1.12's PPO has no entropy bonus and clips no gradients: the harness's PPO in the
    comparison runs without both (a setting on one side only is not the same settings)."""
    from harness.bench.steps import build_method, prepare_data
    from harness.bench.vs_trl import PPO_AS_TRL, harness_overrides

    assert set(PPO_AS_TRL) <= set(harness_overrides("ppo", 16))
    assert not set(PPO_AS_TRL) & set(harness_overrides("grpo", 16) + harness_overrides("dpo", 16))
    task, tok = prepare_data(16, tmp_path)
    setup = build_method("ppo", bench.model_config("llama_tiny", len(tok)), task, tok, 4, 2,
                         device=torch.device("cpu"), overrides=harness_overrides("ppo", 4))
    cfg = setup.module.cfg
    assert cfg.ent_coef == 0 and cfg.optim.grad_clip == 0 and cfg.critic_optim.grad_clip == 0
    assert cfg.update_epochs == 4 and cfg.rollout.max_new_tokens == 4


def test_without_trl_the_bench_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        bench.main(["--vs", "trl", "--quick", "--device", "cpu", "--cache-dir", str(cache)])
    assert str(stop.value) == MISSING_TRL and "pip install -e '.[trl]'" in MISSING_TRL
    assert not cache.exists()  # stopped before any work


def test_vs_trl_runs_both_sides_at_tiny_sizes(tmp_path, capsys):
    pytest.importorskip("trl")
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    result = bench.main(["--vs", "trl", "--quick", "--device", "cpu", "--threads", "1",
                         "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert result is not None and torch.get_num_threads() == threads
    (vs,) = result["vs_trl"]
    assert vs["model"] == "llama_tiny" and set(vs["peak_gflops"]) == {256, 1024}
    assert [r["method"] for r in vs["rounds"]] == ["grpo", "dpo"]
    grpo, dpo = vs["rounds"]
    assert grpo["sequences"] == 8 and grpo["layout"] == "1 prompts x 8 x 4 tokens"
    assert dpo["sequences"] == 4 and dpo["layout"] == "2 pairs"
    for r in vs["rounds"]:
        assert r["harness_s"] > 0 and r["trl_s"] > 0 and r["flops"] > 0 and r["threads"] == 1
        assert r["ratio"] == pytest.approx(r["trl_s"] / r["harness_s"])
    assert 0 < grpo["harness_response_tokens"] <= 4 and 0 < grpo["trl_response_tokens"] <= 4
    text = capsys.readouterr().out
    assert "4. Harness vs TRL" in text and "GRPO, 1 prompts x 8 x 4 tokens" in text
    assert json.loads(out.read_text())["vs_trl"][0]["rounds"][1]["method"] == "dpo"


def test_dpo_reference_is_scored_before_the_clock():
    class Ref:  # harness.methods.dpo.stage.ReferenceLogps' interface: table [n, 2], lookup(index)
        table = torch.full((5, 2), float("nan"))
        asked: torch.Tensor | None = None

        def lookup(self, index: torch.Tensor) -> torch.Tensor:
            self.asked = index
            return self.table[index]

    class Module:
        ref = Ref()

    precompute_reference(Module(), torch.device("cpu"))
    assert Module.ref.asked is not None and Module.ref.asked.tolist() == [0, 1, 2, 3, 4]
    precompute_reference(object(), torch.device("cpu"))  # no reference table (GRPO): nothing to do


def test_without_a_ppo_trainer_the_bench_names_trl_1_12(monkeypatch):
    """TRL dropped its PPO trainer after 1.12: the comparison names the environment it needs."""
    monkeypatch.setitem(sys.modules, "trl.experimental.ppo", None)
    with pytest.raises(SystemExit) as stop:
        require_ppo_trainer()
    assert str(stop.value) == MISSING_PPO and "trl==1.12.0" in MISSING_PPO


def test_vs_trl_1_12_runs_ppo_on_both_sides_at_tiny_sizes(tmp_path, capsys):
    """Runs where TRL 1.12 is installed (its own environment, README); skipped elsewhere."""
    pytest.importorskip("trl.experimental.ppo")
    result = bench.main(["--vs", "trl", "--vs-steps", "ppo", "--quick", "--device", "cpu",
                         "--threads", "1", "--cache-dir", str(tmp_path / "cache")])
    (vs,) = result["vs_trl"]
    (ppo,) = vs["rounds"]
    assert ppo["method"] == "ppo" and ppo["sequences"] == 2
    assert ppo["layout"] == "2 prompts x 4 tokens, 4 epochs"
    assert ppo["harness_s"] > 0 and ppo["trl_s"] > 0 and ppo["flops"] > 0
    assert "PPO, 2 prompts x 4 tokens, 4 epochs" in capsys.readouterr().out
