"""How each alignment method's stage is set up from the shared SFT base (and reward model).

``run_method`` is called by the pipeline for every method but SFT; it returns the trained policy
(or None for the reward model), the stage's logger and metrics, and the stages and cache keys used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from harness.methods.reward import sequence_reward
from harness.models.hf import save_checkpoint
from harness.models.llama import CausalLM, ScalarHead
from harness.seeding import generator, seed_stage
from harness.stages import StageRecord


@dataclass
class Outcome:
    policy: CausalLM | None
    logger: Any
    metrics: dict[str, float]
    checkpoint: Path
    stages: dict[str, dict] = field(default_factory=dict)
    cache_keys: dict[str, str] = field(default_factory=dict)
    reward_source: str | None = None   # what train/reward measures: "gold", "rm" or None (DPO)


def gold_scorer(task) -> Callable:
    """Sequence reward = the task's gold (verifiable) reward of the decoded response."""
    def score(prompts, responses, input_ids, attention_mask, prompt_len):
        return torch.tensor(task.rewards(prompts, responses), dtype=torch.float32)
    return score


def rm_scorer(rm: ScalarHead, pooling: str) -> Callable:
    """Sequence reward = the learned reward model's score pooled over the sampled response."""
    rm.eval()

    def score(prompts, responses, input_ids, attention_mask, prompt_len):
        rm.to(input_ids.device)  # not a submodule of the Lightning module: follow the policy
        response_mask = attention_mask.clone()
        response_mask[:, :prompt_len] = 0
        return sequence_reward(rm, input_ids, attention_mask, response_mask, pooling)[0]
    return score


def prompt_loader(task, batch_size: int, n_batches: int, seed: int) -> DataLoader:
    """``n_batches`` batches of training prompts (strings), drawn with replacement from the run
    seed's ``prompts`` stream."""
    prompts = sorted(set(task.sft_dataset("train")["prompt"]))
    sampler = RandomSampler(prompts, replacement=True, num_samples=batch_size * n_batches,
                            generator=generator(seed, "prompts"))
    return DataLoader(prompts, batch_size=batch_size, sampler=sampler, collate_fn=list)


def stage_metrics(record: StageRecord) -> dict[str, float]:
    """A stage's training and validation metrics (its costs go to the run's ``cost``)."""
    return {k: v for k, v in record.metrics.items() if k.startswith(("train/", "val/"))}


def run_method(run, sft: StageRecord, sft_policy: CausalLM) -> Outcome:
    """Set up and train the method named by ``run.method_cfg`` from the SFT base."""
    name = run.method_cfg.name
    if name == "rm":
        rm_rec, _, logger = run.rm_stage(sft, sft_policy)
        metrics = stage_metrics(rm_rec)
        if "val/rewards_acc" in metrics:
            metrics["eval/rewards_acc"] = metrics["val/rewards_acc"]
        return Outcome(None, logger, metrics, rm_rec.checkpoint, {"rm": rm_rec.to_json()},
                       {"rm": rm_rec.key})
    runner = {"ppo": _ppo, "grpo": _grpo, "dpo": _dpo}[name]
    return runner(run, sft, sft_policy)


def _finish_policy_stage(run, stage: str, module, data, policy: CausalLM, extra_stages: dict,
                         cache_keys: dict, reward_source: str | None, **budget) -> Outcome:
    record, logger = run.fit_stage(stage, None, {}, module, data, **budget)
    ckpt = run.run_dir / "checkpoint"
    save_checkpoint(policy, ckpt, tokenizer=run.tokenizer, resolved_config=run.cfg)
    stages = {**extra_stages, stage: {"key": None, "path": str(run.run_dir), "cached": False,
                                      "checkpoint": str(ckpt), "metrics": record.metrics}}
    return Outcome(policy, logger, stage_metrics(record), ckpt, stages, cache_keys, reward_source)


def _ppo(run, sft: StageRecord, sft_policy: CausalLM) -> Outcome:
    from harness.methods.ppo import PPOModule

    cfg = run.method_cfg
    rm_rec, rm, _ = run.rm_stage(sft, sft_policy)
    with run.meter("ppo"):
        seed_stage(run.seed)
        critic = (copy.deepcopy(rm) if cfg.critic_init == "rm"
                  else ScalarHead(copy.deepcopy(sft_policy)))
        policy = copy.deepcopy(sft_policy)
        module = PPOModule(policy, sft_policy, critic, run.tokenizer, cfg,
                           rm_scorer(rm, run.rm_cfg.pooling), run.seed)
        data = prompt_loader(run.task, cfg.rollout.prompts_per_batch, cfg.n_iterations, run.seed)
        return _finish_policy_stage(run, "ppo", module, data, policy, {"rm": rm_rec.to_json()},
                                    {"rm": rm_rec.key}, "rm", limit_train_batches=cfg.n_iterations,
                                    log_every_n_steps=1)


def _grpo(run, sft: StageRecord, sft_policy: CausalLM) -> Outcome:
    from harness.methods.grpo import GRPOModule

    cfg = run.method_cfg
    stages, keys = {}, {}
    if cfg.reward_source == "rm":
        rm_rec, rm, _ = run.rm_stage(sft, sft_policy)
        score = rm_scorer(rm, run.rm_cfg.pooling)
        stages, keys = {"rm": rm_rec.to_json()}, {"rm": rm_rec.key}
    else:
        score = gold_scorer(run.task)
    with run.meter("grpo"):
        seed_stage(run.seed)
        policy = copy.deepcopy(sft_policy)
        module = GRPOModule(policy, sft_policy, run.tokenizer, cfg, score, run.seed)
        data = prompt_loader(run.task, cfg.rollout.prompts_per_batch, cfg.n_iterations, run.seed)
        return _finish_policy_stage(run, "grpo", module, data, policy, stages, keys,
                                    cfg.reward_source, limit_train_batches=cfg.n_iterations,
                                    log_every_n_steps=1)


def _dpo(run, sft: StageRecord, sft_policy: CausalLM) -> Outcome:
    from harness.methods.dpo import DPOModule, reference_logps

    cfg = run.method_cfg
    with run.meter("dpo"):
        seed_stage(run.seed)
        dm = run.datamodule("pairs", cfg)
        dm.setup("fit")
        table = reference_logps(sft_policy, dm.reference_dataloader("train"), dm.n_train)
        val_table = reference_logps(sft_policy, dm.reference_dataloader("validation"),
                                    dm.n_examples("validation"))
        policy = copy.deepcopy(sft_policy)
        module = DPOModule(policy, table, cfg, val_table)
        return _finish_policy_stage(run, "dpo", module, dm, policy, {}, {}, None,
                                    max_steps=cfg.max_steps, grad_clip=cfg.optim.grad_clip,
                                    val_every=cfg.val_every)
