"""``python -m harness.bench`` at tiny settings: the sampler comparison, one step timing, the state."""

from __future__ import annotations

import json

import pytest
import torch

from harness import bench
from harness.bench.memory import state_memory
from harness.bench.shapes import group_layout
from harness.models.llama import CausalLM, ScalarHead

TINY = ["--models", "llama_tiny", "--threads", "1", "--batch", "4", "--prompt-len", "4", "--new-tokens", "4",
        "--iters", "1", "--warmup", "1", "--device", "cpu"]


def test_sampler_and_step_timing_print_positive_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main([*TINY, "--sections", "sampler", "steps", "--methods", "grpo",
                         "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert result is not None
    (s,) = result["sampler"]
    assert s["model"] == "llama_tiny" and s["batch"] == 4 and s["new_tokens"] == 4
    for k in ("ours_tok_s", "hf_tok_s", "speedup", "ours_s", "hf_s"):
        assert s[k] > 0, k
    assert 0.0 <= s["agree"] <= 1.0
    (g,) = result["steps"]
    assert g["method"] == "grpo" and g["sequences"] == 4  # 1 prompt x group of 4
    assert g["s_per_batch"] > 0 and g["opt_steps_per_batch"] >= 1 and g["s_per_opt_step"] > 0
    text = capsys.readouterr().out
    assert "1. Sampler throughput" in text and "2. Seconds per optimisation step" in text
    assert "llama_tiny" in text and "grpo" in text
    assert json.loads(out.read_text())["steps"][0]["method"] == "grpo"


def test_online_dpo_steps_on_random_networks(tmp_path):
    """A random policy's gold rewards all tie (online DPO would take no step); the bench times it
    on the random reward model's scores, which rank every group."""
    result = bench.main([*TINY, "--sections", "steps", "--methods", "online_dpo",
                         "--cache-dir", str(tmp_path / "cache")])
    (g,) = result["steps"]
    assert g["method"] == "online_dpo" and g["opt_steps_per_batch"] >= 1


def test_grpo_layout_keeps_the_sequence_count():
    assert group_layout(64, 8) == (8, 8)
    assert group_layout(4, 8) == (1, 4)
    assert group_layout(12, 8) == (2, 6)
    with pytest.raises(ValueError):
        group_layout(1, 8)


@pytest.mark.parametrize("batch", [4, 8, 12])
def test_every_stage_sized_for_the_bench_forwards_the_batch_it_was_asked_for(batch):
    """The bench's shapes come from each stage's data and config, with no bench code per method:
    every registered stage, sized to ``batch`` sequences and 3 batches, forwards ``batch``
    sequences a batch in the layout of its kind, and nothing but its sizes changes."""
    from dataclasses import asdict

    from harness.bench.common import compose_config
    from harness.bench.shapes import shape, sized
    from harness.registry import get_stage, stage_names
    from harness.settings import validate

    layouts = {"sft": f"{batch} demos", "rm": f"{batch // 2} pairs", "dpo": f"{batch // 2} pairs",
               "ppo": f"{batch} prompts"}
    for name in stage_names():
        stage = get_stage(name)
        cfg = validate(compose_config([f"method={name}"])).stage_config(name)
        small = sized(stage, cfg, batch, 3)
        got = shape(stage, small)
        assert got.sequences == batch, name
        prompts, group = group_layout(batch, cfg.group_size) if hasattr(cfg, "group_size") else (0, 0)
        assert got.layout == layouts.get(name, f"{prompts} prompts x {group}"), name
        assert (got.passes is None) == (stage.data != "prompts"), name
        steps = small.max_steps if stage.data != "prompts" else small.n_iterations
        assert steps == 3, name
        changed = {k for k, v in asdict(small).items() if asdict(cfg)[k] != v}
        assert changed <= {"batch_size", "max_steps", "n_iterations", "group_size", "rollout"}, name


def test_state_memory_of_grpo_is_about_half_of_ppo():
    cfg = bench.model_config("llama_tiny", 300)
    torch.manual_seed(0)
    policy, reference = CausalLM(cfg), CausalLM(cfg)
    critic, rm = ScalarHead(CausalLM(cfg)), ScalarHead(CausalLM(cfg))
    ppo = state_memory({"policy": policy, "reference": reference, "critic": critic,
                              "reward_model": rm}, [policy, critic])
    grpo = state_memory({"policy": policy, "reference": reference}, [policy])
    p = sum(t.numel() * 4 for t in policy.parameters())
    assert grpo["param_bytes"] == 2 * p and grpo["grad_bytes"] == p and grpo["adamw_bytes"] == 2 * p
    assert ppo["n_networks"] == 4 and ppo["networks"] == "policy+ref+critic+RM"
    # by hand: PPO holds 4 networks (critic and RM with a scalar head of s bytes) and trains the
    # policy and the critic, whose LM head (h bytes) is frozen: it is never used for a score
    h = critic.backbone.lm_head.weight.numel() * 4
    sc = sum(t.numel() * 4 for t in critic.score.parameters())
    assert ppo["state_bytes"] == (4 * p + 2 * sc) + 3 * (p + p - h + sc)
    assert grpo["state_bytes"] == 5 * p
    assert 0.5 < grpo["state_bytes"] / ppo["state_bytes"] < 0.6


def test_table_formats_missing_values_and_notes():
    text = bench.format_table("T", [{"a": "x", "b": 1.5}, {"a": "yy"}],
                              [("a", "A", ""), ("b", "B", ".2f")], ["a note"])
    lines = text.splitlines()
    assert lines[0] == "T" and "1.50" in text and lines[-1] == "  a note"
    assert any(line.startswith("yy") and line.endswith("-") for line in lines)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_the_sampler_and_a_step_run_in_bf16(precision, tmp_path):
    result = bench.main([*TINY, "--sections", "sampler", "steps", "--methods", "dpo",
                         "--precision", precision, "--cache-dir", str(tmp_path / "cache")])
    assert result is not None
    (s,), (d,) = result["sampler"], result["steps"]
    assert s["precision"] == d["precision"] == precision
    assert s["ours_tok_s"] > 0 and s["hf_tok_s"] > 0 and d["s_per_batch"] > 0


def test_bf16_is_refused_where_the_bench_runs_in_float32(capsys):
    for section in (["--vs", "trl"], ["--curves", "out"]):
        with pytest.raises(SystemExit):
            bench.main([*section, "--precision", "bf16-mixed"])
        assert "--precision bf16-mixed: the sampler and steps sections only" in capsys.readouterr().err


def test_the_sampler_table_shows_the_eager_step_only_where_it_was_timed():
    """On a CPU no row has the eager step's figures (it is the only step): no empty columns."""
    from harness.bench.sampler import SAMPLER_COLUMNS, sampler_columns

    gpu = [{key: 1.0 for key, _, _ in SAMPLER_COLUMNS}]
    cpu = [{**gpu[0], "ours_eager_tok_s": None, "eager_agree": None}]
    assert {c[0] for c in sampler_columns(cpu)} == {c[0] for c in SAMPLER_COLUMNS} - {
        "ours_eager_tok_s", "eager_agree"}
    assert sampler_columns(gpu) == SAMPLER_COLUMNS


@pytest.mark.slow
def test_memory_section_runs_children(tmp_path):
    result = bench.main([*TINY, "--sections", "memory", "--mem-iters", "1",
                         "--cache-dir", str(tmp_path)])
    assert result is not None
    rows = {r["method"]: r for r in result["memory"]}
    assert rows["ppo"]["state_bytes"] > rows["grpo"]["state_bytes"] > 0
    assert rows["ppo"]["peak_bytes"] > 0 and rows["ppo"]["from_tensors_after_training"]
    (ratio,) = result["memory_ratios"]
    assert 0.4 < ratio["state_ratio"] < 0.6


def test_memory_of_any_method_with_and_without_lora(tmp_path):
    """``--lora R`` puts adapters on the trained policy: its gradients and AdamW state shrink to
    the adapters'; SFT holds the base plus the adapters, DPO no second copy for its reference."""
    rows = {}
    for r in (0, 4):
        result = bench.main([*TINY, "--sections", "memory", "--memory-methods", "sft", "dpo",
                             "--lora", str(r), "--cache-dir", str(tmp_path / "cache")])
        rows[r] = {row["method"]: row for row in result["memory"]}
    assert set(rows[4]) == {"sft", "dpo"}
    for method in ("sft", "dpo"):
        full, lora = rows[0][method], rows[4][method]
        assert lora["grad_bytes"] < 0.5 * full["grad_bytes"]
        assert lora["adamw_bytes"] < 0.5 * full["adamw_bytes"]
    assert rows[4]["sft"]["param_bytes"] > rows[0]["sft"]["param_bytes"]  # + the adapters
    assert rows[4]["dpo"]["param_bytes"] < 0.6 * rows[0]["dpo"]["param_bytes"]  # shared reference
    assert bench.model_config("llama_tiny", 300, lora=4).lora.r == 4


def test_a_pretrained_preset_is_benched_with_its_own_vocabulary(tmp_path):
    """The random-init stand-in of a checkpoint keeps the checkpoint's embedding and LM head (a
    fifth of SmolLM2's weights), not the task tokenizer's few hundred rows."""
    from test_pretrained import write_folder

    folder = write_folder(tmp_path / "tiny-llama")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    cfg = bench.model_config("hf", 20, overrides=[f"model.pretrained={folder}"])
    assert cfg.vocab_size == vocab > 20 and cfg.d_model == 32 and cfg.pretrained is None
    assert bench.model_config("hf", vocab + 7, overrides=[f"model.pretrained={folder}"]
                              ).vocab_size == vocab + 7  # a larger task vocabulary still fits
    assert bench.model_config("llama_tiny", 20).vocab_size == 20


def test_a_power_law_fit_recovers_exponent_and_constant():
    from harness.bench.curves import fit_power_law

    a, c = fit_power_law([1, 2, 4, 8], [3 * x**2 for x in (1, 2, 4, 8)])
    assert a == pytest.approx(2.0) and c == pytest.approx(3.0)
    a, _ = fit_power_law([10, 100], [5.0, 50.0])  # linear growth
    assert a == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distinct"):
        fit_power_law([2, 2], [1.0, 3.0])


def test_cost_curves_write_every_axis_with_a_fitted_growth(tmp_path, capsys):
    out = tmp_path / "curves"
    result = bench.main(["--curves", str(out), "--quick", "--threads", "1", "--device", "cpu",
                         "--cache-dir", str(tmp_path / "cache")])
    curves = result["curves"]
    axes = {(p["axis"], p["method"]) for p in curves["points"]}
    # sft has no response-length axis: it reads its lengths from the data
    assert axes == {("params", "sft"), ("params", "grpo"), ("batch", "sft"), ("batch", "grpo"),
                    ("new_tokens", "grpo")}
    for p in curves["points"]:
        assert p["s_per_step"] > 0 and p["tokens_per_step"] > 0 and p["tokens_per_s"] > 0
    sizes = sorted({p["x"] for p in curves["points"] if p["axis"] == "params"})
    assert sizes == [35_232, 60_320]  # llama_tiny, moe_tiny parameters
    assert {(g["axis"], g["method"]) for g in curves["growth"]} == axes
    # the base point (llama_tiny, 4 sequences, 2 new tokens) lies on every axis: its repeats
    reps = {r["method"]: r for r in curves["repeats"]}
    assert len(reps["grpo"]["s"]) == 3 and len(reps["sft"]["s"]) == 2
    assert reps["grpo"]["spread"] >= 1.0 and "Run-to-run spread" in (out / "cost_curves.md").read_text()
    md = (out / "cost_curves.md").read_text()
    assert "python -m harness.bench --curves" in md and "s/step ∝ x^a" in md
    assert json.loads((out / "cost_curves.json").read_text())["points"] == curves["points"]
    assert (out / "cost_curves.png").stat().st_size > 10_000
    assert "5. Cost curves" in capsys.readouterr().out


def test_cost_curve_settings_are_checked_before_any_work():
    from harness.bench.curves import CurveSettings

    with pytest.raises(ValueError, match="kto"):
        CurveSettings(methods=("sft", "kto")).check()
    CurveSettings(methods=("sft", "rm")).check()  # every stage counts the tokens it trains on
    with pytest.raises(ValueError, match="batches"):
        CurveSettings(batches=(8,)).check()


def test_profile_splits_each_step_into_its_phases(tmp_path, capsys):
    """--profile: a phase table after the steps table; GRPO's batch runs sampling, reward and
    the reference, DPO's (automatic optimisation) forward, backward and optimizer only."""
    result = bench.main([*TINY, "--sections", "steps", "--methods", "grpo", "dpo", "--profile",
                         "--cache-dir", str(tmp_path / "cache")])
    assert result is not None
    grpo, dpo = result["steps"]
    assert {"sample", "reward", "reference", "forward", "backward", "optimizer"} < set(grpo["phases"])
    assert "sample" not in dpo["phases"] and dpo["phases"]["optimizer"] > 0
    for row in (grpo, dpo):
        assert row["phases"]["batch"] > 0
    text = capsys.readouterr().out
    assert "2b. Where a batch's time goes, by phase" in text
    assert "sample" in text.split("2b.")[1] and "optimizer" in text.split("2b.")[1]


def test_profile_is_refused_outside_the_steps_section(capsys):
    for args in (["--vs", "trl"], ["--sections", "sampler"], ["--sections"], ["--curves", "out"]):
        with pytest.raises(SystemExit):
            bench.main([*args, "--profile"])
        assert "--profile: the steps section only" in capsys.readouterr().err


def test_rollout_tokens_reach_the_on_policy_methods_only(tmp_path, capsys):
    from harness.bench.steps import rollout_overrides

    assert rollout_overrides("grpo", 16) == ["method.rollout.max_new_tokens=16"]
    assert rollout_overrides("ppo", 16) == rollout_overrides("rloo", 16) != []
    assert rollout_overrides("dpo", 16) == rollout_overrides("sft", 16) == []
    assert rollout_overrides("grpo", None) == []
    short, long = (bench.main([*TINY, "--sections", "steps", "--methods", "grpo",
                               "--rollout-tokens", str(n), "--cache-dir", str(tmp_path / "c")])
                   for n in (2, 6))
    assert short is not None and long is not None
    # 4 responses of at most 2 vs 6 tokens (a random policy may stop early at EOS)
    assert short["steps"][0]["tokens_per_batch"] < long["steps"][0]["tokens_per_batch"]
    with pytest.raises(SystemExit):
        bench.main(["--rollout-tokens", "0"])
    assert "--rollout-tokens=0: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch", "0"], "--batch=0: must be >= 1"),
    (["--iters", "0"], "--iters=0: must be >= 1"),
    (["--warmup", "-1"], "--warmup=-1: must be >= 0"),
    (["--vocab", "4"], "--vocab=4: must be >= 5"),
    (["--vs", "trl", "--pairs", "0"], "--pairs=0: must be >= 1"),
    (["--models", "llama_tiny", "nope"], "--models nope: no such preset in conf/model"),
])
def test_bad_sizes_and_presets_stop_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_bench_answers_help_without_the_sections_heavy_imports():
    """``--help`` and a bad option come before Lightning is imported (the sections' modules)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness.bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert proc.returncode == 0 and "--vs-steps" in proc.stdout
    assert "harness.bench.cli" in imported and "lightning" not in imported


def test_the_trl_crosscheck_stops_without_trl_and_checks_its_options():
    import importlib.util

    from harness.bench.crosscheck import main, parse_args

    args = parse_args(["--seeds", "0", "1", "--methods", "dpo"])
    assert args.seeds == [0, 1] and args.methods == ["dpo"] and args.model == "llama_small"
    assert parse_args([]).methods == ["grpo", "rloo", "dpo"]
    with pytest.raises(SystemExit):
        parse_args(["--methods", "ppo"])  # PPO is TRL 1.12's, mapped by the bench, not here
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "-1"])
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("TRL is installed: the cross-check would train")
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[trl\]'"):
        main(["--seeds", "0"])
