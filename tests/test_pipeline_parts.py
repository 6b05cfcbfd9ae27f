"""The run's three parts used on their own: the set-up (``prepare``), the stage runner and the
evaluation, each from explicit arguments (:mod:`harness.pipeline`)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.settings import register_configs, validate
from harness.util.conf_path import config_dir

TINY = ["model=llama_tiny", "logger=none", "dataset.n_train=200", "dataset.n_pairs=32",
        "dataset.n_eval=20", "sft.max_steps=3", "rm.max_steps=2", "eval.curve_points=0"]


def _settings(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return validate(cfg), OmegaConf.to_container(cfg, resolve=True)


def test_prepare_fills_the_vocabulary_in_its_own_model_config_and_leaves_the_settings(tmp_path):
    from harness.pipeline.prepare import prepare

    settings, _ = _settings([*TINY, f"cache_dir={tmp_path}"])
    assert settings.model.vocab_size is None
    ctx = prepare(settings, tmp_path)
    assert ctx.model_cfg.vocab_size == len(ctx.tokenizer)
    assert settings.model.vocab_size is None  # null still means "the tokenizer's"
    assert (ctx.seed, ctx.prompt_format, ctx.pretrained, ctx.weights_sha256) == \
        (settings.seed, "raw", None, None)


def test_the_stage_runner_returns_each_stage_with_its_cost_and_curves(tmp_path):
    """A trained stage comes back with what it cost and its curves; the same stage from the
    cache (a second runner, as a second run would be) with its training's cost, marked cached,
    and no curves; ``into`` holds every stage in the order it finished."""
    from harness.pipeline import stage_runner

    settings, resolved = _settings([*TINY, "method=rm", f"cache_dir={tmp_path}/c"])
    first: dict = {}
    rm = stage_runner(settings, resolved, tmp_path / "run1").obtain("rm", first)
    assert list(first) == ["sft", "rm"] and first["rm"] is rm
    sft = first["sft"]
    assert not sft.cost.cached and sft.cost.wall_s > 0 and sft.cost.extra["train_tokens"] > 0
    assert [step for step, _ in sft.history["train/loss"]] == [0.0, 1.0, 2.0]
    assert sft.record.metrics["cost/train_wall_s"] == sft.cost.wall_s

    again: dict = {}
    stage_runner(settings, resolved, tmp_path / "run2").obtain("rm", again)
    for name in ("sft", "rm"):
        b = again[name]
        assert b.cost.cached and b.history == {}
        assert b.record.key == first[name].record.key
        assert b.cost.wall_s == first[name].cost.wall_s  # what it spent when it was trained


def test_evaluation_needs_no_run_only_its_arguments(tmp_path):
    """The same policy evaluated twice with the same seed gives the same numbers; against itself
    as reference its KL is zero (to rounding) and every prompt is a tie."""
    from harness.models.llama import CausalLM
    from harness.pipeline.evaluation import evaluate
    from harness.pipeline.prepare import prepare

    settings, _ = _settings([*TINY, f"cache_dir={tmp_path}", "eval.limit=8"])
    ctx = prepare(settings, tmp_path)
    policy = CausalLM(ctx.model_cfg).eval()
    args = (ctx.task, ctx.tokenizer, settings.eval, 0, settings.eval_max_len)
    metrics, samples, per_prompt = evaluate(policy, policy, *args)
    assert metrics["eval/n_prompts"] == 8 and len(per_prompt["gold_reward"]) == 8
    # zero up to rounding: the two log-probability passes need not batch alike
    assert metrics["eval/kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["eval/win_rate"] == 0.5  # every prompt a tie
    assert metrics["eval/gold_reward"] == metrics["eval/ref_gold_reward"]
    assert evaluate(policy, policy, *args)[0] == metrics
    assert samples and all(s["response"] == s["reference"] for s in samples)


def test_the_reference_responses_are_kept_for_the_next_run_from_the_same_reference(tmp_path):
    """A second evaluation with the same reference identity reads the reference's responses from
    the cache (an untrained stand-in proves it: its own responses differ) and reports what the
    first run decoded; another identity, prompt count or a damaged file decodes afresh."""
    import torch

    from harness.models.llama import CausalLM
    from harness.pipeline.evaluation import ReferenceCache, evaluate
    from harness.pipeline.prepare import prepare

    settings, _ = _settings([*TINY, f"cache_dir={tmp_path}", "eval.limit=8"])
    ctx = prepare(settings, tmp_path)
    torch.manual_seed(0)
    policy, reference = CausalLM(ctx.model_cfg).eval(), CausalLM(ctx.model_cfg).eval()
    torch.manual_seed(1)
    stand_in = CausalLM(ctx.model_cfg).eval()  # other weights: other greedy responses
    args = (ctx.task, ctx.tokenizer, settings.eval, 0, settings.eval_max_len)
    cache = ReferenceCache(tmp_path / "ref_eval", {"reference": "sft-x", "threads": 1})
    fresh, samples, per_prompt = evaluate(policy, reference, *args, reference_cache=cache)
    assert not cache.hit and len(list((tmp_path / "ref_eval").glob("ref_gold-*.json"))) == 1

    again, again_samples, again_prompt = evaluate(policy, stand_in, *args, reference_cache=cache)
    assert cache.hit
    assert again_prompt["ref_gold_reward"] == per_prompt["ref_gold_reward"]
    assert [s["reference"] for s in again_samples] == [s["reference"] for s in samples]
    for key in ("eval/ref_gold_reward", "eval/ref_gold_accuracy", "eval/win_rate"):
        assert again[key] == fresh[key]
    # the KL is still measured against the reference given (it is sampled, never cached)
    stand_in_responses = evaluate(policy, stand_in, *args)[1]
    assert [s["reference"] for s in stand_in_responses] != [s["reference"] for s in samples]

    other = ReferenceCache(tmp_path / "ref_eval", {"reference": "sft-y", "threads": 1})
    evaluate(policy, stand_in, *args, reference_cache=other)
    assert not other.hit
    fewer = settings.eval.__class__(**{**vars(settings.eval), "limit": 4})
    evaluate(policy, reference, ctx.task, ctx.tokenizer, fewer, 0, settings.eval_max_len,
             reference_cache=cache)
    assert not cache.hit
    for path in (tmp_path / "ref_eval").glob("*.json"):
        path.write_text("{not json")
    evaluate(policy, reference, *args, reference_cache=cache)
    assert not cache.hit
    assert evaluate(policy, stand_in, *args, reference_cache=cache)[2] == per_prompt  # rewritten
