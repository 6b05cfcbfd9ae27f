"""The moving reference (``method.ref_sync``; TR-DPO's soft update, TRL's ``sync_ref_model``):
the update's equation by hand, when it happens, what it leaves alone, and the records it does not
orphan."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from harness.config import ConfigError
from harness.methods.rl_base import mix_into
from harness.settings import register_configs, validate
from harness.util.conf_path import config_dir

TINY = ["model=llama_tiny", "logger=none", "dataset.n_train=200", "dataset.n_pairs=32",
        "dataset.n_eval=20", "sft.max_steps=3", "eval.curve_points=0"]


def _composed(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_mix_into_moves_each_parameter_a_share_alpha_towards_the_policy() -> None:
    ref, policy = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        ref.weight.fill_(0.0), ref.bias.fill_(10.0)
        policy.weight.fill_(1.0), policy.bias.fill_(0.0)
    mix_into(ref, policy, 0.6)  # 0.6·1 + 0.4·0 = 0.6; 0.6·0 + 0.4·10 = 4
    assert ref.weight.flatten().tolist() == pytest.approx([0.6, 0.6]) and ref.bias.item() == pytest.approx(4.0)
    mix_into(ref, policy, 0.6)  # 0.6 + 0.4·0.6 = 0.84; 0.4·4 = 1.6
    assert ref.weight.flatten().tolist() == pytest.approx([0.84, 0.84]) and ref.bias.item() == pytest.approx(1.6)
    assert policy.weight.tolist() == [[1.0, 1.0]] and policy.bias.item() == 0.0  # the source stays
    mix_into(ref, policy, 1.0)  # a hard copy
    assert torch.equal(ref.weight, policy.weight) and torch.equal(ref.bias, policy.bias)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_the_reference_follows_the_policy_and_the_sft_base_stays(method, tmp_path) -> None:
    """``every=1, alpha=1``: after training the module's reference is the policy, bit for bit,
    while the SFT base (what the run evaluates against) is what it was; ``every=0``: the
    module's reference is the SFT base itself."""
    from harness.pipeline import stage_runner
    from harness.registry import get_stage

    budget = {"grpo": ["method.rollout.prompts_per_batch=2", "method.group_size=2",
                       "method.minibatch_size=2"],
              "ppo": ["method.rollout.prompts_per_batch=4", "method.minibatch_size=2",
                      "method.reward_source=gold"]}[method]

    def job_of(every: int):
        cfg = _composed([*TINY, f"method={method}", "method.n_iterations=2",
                         "method.rollout.max_new_tokens=4", f"method.ref_sync.every={every}",
                         "method.ref_sync.alpha=1.0", f"cache_dir={tmp_path}/c", *budget])
        settings = validate(cfg)
        runner = stage_runner(settings, OmegaConf.to_container(cfg, resolve=True), tmp_path / "r")
        sft = runner.obtain("sft")
        return sft, get_stage(method).build(runner.ctx, settings.method, {"sft": sft})

    sft, frozen = job_of(0)
    assert frozen.module.reference is sft.model
    sft, job = job_of(1)
    # distinct rewards within every group: the advantages are never all zero, so the policy moves
    # on any machine (the tiny SFT base may answer every prompt alike)
    job.module.score_fn = lambda prompts, responses, *_: torch.arange(len(responses), dtype=torch.float32)
    before = copy.deepcopy(sft.model.state_dict())
    L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(job.module, job.data)
    m = job.module
    assert m.updates >= 2 and m.reference is not sft.model
    policy, reference = dict(m.policy.named_parameters()), dict(m.reference.named_parameters())
    assert any(not torch.equal(policy[k], before[k]) for k in policy)  # the policy moved
    assert all(torch.equal(reference[k], policy[k]) for k in policy)  # and the reference with it
    assert all(torch.equal(v, before[k]) for k, v in sft.model.state_dict().items())


def test_a_moving_reference_is_refused_with_lora_and_bad_values_name_the_field(tmp_path) -> None:
    from harness.pipeline.prepare import prepare

    for bad, field in (("method.ref_sync.every=-1", "method.ref_sync.every=-1"),
                       ("method.ref_sync.alpha=0", "method.ref_sync.alpha=0"),
                       ("method.ref_sync.alpha=1.5", "method.ref_sync.alpha=1.5")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate(_composed([*TINY, "method=grpo", bad]))
    settings = validate(_composed([*TINY, "method=rloo", "method.ref_sync.every=4",
                                   "model.lora.r=4", f"cache_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"method\.ref_sync\.every=4: a moving reference needs"):
        prepare(settings, tmp_path)


def test_the_new_field_at_its_default_keeps_the_config_hash_of_records_made_before_it() -> None:
    from harness.evaluation.records import config_hash

    resolved = OmegaConf.to_container(_composed([*TINY, "method=grpo"]), resolve=True)
    assert resolved["method"]["ref_sync"] == {"every": 0, "alpha": 0.6}
    old = copy.deepcopy(resolved)
    del old["method"]["ref_sync"]  # a record written before the field existed
    assert config_hash(resolved) == config_hash(old)
    moving = copy.deepcopy(resolved)
    moving["method"]["ref_sync"]["every"] = 8
    assert config_hash(moving) != config_hash(old)  # a moving reference is another run
