"""The stage interface: how every stage of the pipeline (SFT, reward model, each aligning method)
says what it needs, how it builds its Lightning module and data, and what it hands on.

A stage is a :class:`Stage` subclass named in :mod:`harness.registry`. The pipeline
(:func:`harness.pipeline.run`) and the bench (:mod:`harness.bench`) build every stage through
:meth:`Stage.build` from a :class:`StageContext` (task, tokenizer, model config, seed) and the
finished stages it needs (:class:`Built`); neither knows any method by name.

Base stages (``base = True``: SFT, the reward model) are what other stages build on: each has a
top-level config section under its name (``sft.*``, ``rm.*``) and is cached under a key hashed
from everything that decides it, so every method of a sweep starts from the same one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from harness.cache import StageRecord
from harness.data.datamodule import AlignmentDataModule
from harness.data.resumable import ResumableLoader
from harness.models.architecture import ConfigError, LoRASettings, ModelConfig
from harness.models.hf import load_checkpoint, save_checkpoint
from harness.models.llama import CausalLM, ScalarHead
from harness.util.seeding import generator


@dataclass
class StageContext:
    """What a stage may use to build itself: the run's task, tokenizer, backbone config and seed
    (:func:`harness.pipeline.prepare.prepare` builds it from the settings)."""

    task: Any
    tokenizer: Any
    #: the backbone's config with ``vocab_size`` taken from the tokenizer when it was null
    model_cfg: ModelConfig
    seed: int
    #: the folder of ``model.pretrained`` (None: the backbone starts from a fresh initialisation)
    pretrained: Path | None = None
    #: the sha256 of the pretrained weights: base stages are keyed by it, not by the folder
    weights_sha256: str | None = None
    #: the prompt format in effect (``dataset.prompt_format``, ``auto`` resolved for the tokenizer)
    prompt_format: str = "raw"

    def new_policy(self) -> CausalLM:
        """The backbone SFT starts from: the pretrained weights of ``model.pretrained``, else a
        fresh initialisation (from the global RNG, seeded per stage)."""
        if self.pretrained is not None:
            from harness.models.pretrained import load_pretrained

            return load_pretrained(self.pretrained, self.model_cfg)
        return CausalLM(self.model_cfg)

    def datamodule(self, kind: str, c: Any) -> AlignmentDataModule:
        """The task's ``kind`` data (sft | pairs) batched as stage config ``c`` says, shuffled by
        the seed (``c`` has ``batch_size``, ``max_len`` and ``overflow``)."""
        return AlignmentDataModule(self.task, self.tokenizer, kind=kind, batch_size=c.batch_size,
                                   max_len=c.max_len, overflow=c.overflow, seed=self.seed)

    def prompt_loader(self, batch_size: int, n_batches: int) -> DataLoader:
        """``n_batches`` batches of training prompts (strings), drawn with replacement from the
        seed's ``prompts`` stream: the rollout batches of the on-policy methods."""
        prompts = sorted(set(self.task.sft_dataset("train")["prompt"]))
        sampler = RandomSampler(prompts, replacement=True, num_samples=batch_size * n_batches,
                                generator=generator(self.seed, "prompts"))
        return ResumableLoader(prompts, batch_size=batch_size, sampler=sampler, collate_fn=list)

    def gold_scorer(self) -> Callable:
        """Sequence reward = the task's gold (verifiable) reward of the decoded response."""
        task = self.task

        def score(prompts, responses, input_ids, attention_mask, prompt_len):
            return torch.tensor(task.rewards(prompts, responses), dtype=torch.float32)
        return score


@dataclass
class Budget:
    """How long a stage trains: ``max_steps`` optimiser steps (automatic optimisation) or
    ``limit_train_batches`` batches of one epoch (the on-policy methods' rollout batches)."""

    max_steps: int = -1
    limit_train_batches: int | None = None
    grad_clip: float | None = None
    val_every: int | None = None
    log_every_n_steps: int | None = None

    @property
    def steps(self) -> int:
        return self.max_steps if self.max_steps > 0 else int(self.limit_train_batches or 0)


@dataclass
class Fit:
    """A stage ready to train.

    ``model`` is what the stage produces (saved, handed on, evaluated); ``networks`` every network
    the stage holds, by role, and ``trainable`` those it optimises (gradient checkpointing applies
    to them). What one batch is, for the bench, is the bench's business
    (:mod:`harness.bench.shapes`).
    """

    module: L.LightningModule
    data: L.LightningDataModule | DataLoader
    budget: Budget
    model: nn.Module
    networks: dict[str, nn.Module]
    trainable: list[nn.Module]


@dataclass
class Built:
    """A finished stage: its config, its trained model and its record (key, path, metrics); what
    it cost, as the stage runner measures it (when trained: in this run; from the cache: what it
    spent when it was trained; None for a stage built outside the runner, e.g. by the bench) and
    the training curves of this run's training (``{metric: [[step, value], ...]}``; empty for a
    stage from the cache)."""

    name: str
    config: Any
    model: nn.Module
    record: StageRecord
    checkpoint: Path
    #: a :class:`harness.evaluation.cost.StageCost` (typed loosely: the stage interface sits below
    #: evaluation and imports nothing from it)
    cost: Any = None
    history: dict[str, list[list[float]]] = field(default_factory=dict)


class Stage:
    """One stage of the pipeline. A method's stage names its declaration
    (``class GRPOStage(GroupStage, method=METHOD)``, :class:`~harness.methods.declaration.Method`),
    which gives it ``name``, ``config`` (the config dataclass, whose defaults are the stage's) and
    ``base`` (a stage others build on, configured in its own section and cached: sft, rm); it sets
    the other class attributes it changes and implements :meth:`build`.

    ``produces_policy``: the stage's model is a policy, evaluated on the task's gold reward
    against its reference; False for the reward model (its ``eval/rewards_acc`` is its score).
    ``reference``: the stage whose model is the frozen reference (None: no reference).
    ``data``: the task data the stage trains on: ``sft`` (demonstrations), ``pairs`` (preference
    pairs) or ``prompts`` (on-policy methods); read before any work so bad data stops a run early.
    """

    #: the method's declaration (a :class:`harness.methods.declaration.Method`; read by attribute,
    #: not imported: the methods sit above this interface)
    method: ClassVar[Any]
    name: ClassVar[str]
    config: ClassVar[type]
    base: ClassVar[bool] = False
    produces_policy: ClassVar[bool] = True
    reference: ClassVar[str | None] = "sft"
    data: ClassVar[str] = "prompts"

    def __init_subclass__(cls, method: Any = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            cls.method = method
            cls.name, cls.config, cls.base = method.name, method.config, method.base

    def needs(self, cfg: Any) -> tuple[str, ...]:
        """The stages this one builds on (by name), for config ``cfg``."""
        return ("sft",)

    def build(self, ctx: StageContext, cfg: Any, inputs: Mapping[str, Built]) -> Fit:
        raise NotImplementedError

    def check_model(self, cfg: Any, model_cfg: ModelConfig) -> None:
        """Raise :class:`~harness.models.architecture.ConfigError` (naming the field) when ``cfg``
        asks for something the model ``model_cfg`` cannot do; the run calls it before any work.
        By default: ``share_prompt`` (a packed layout, where a stage has it) needs the harness's
        own decoder."""
        if getattr(cfg, "share_prompt", False) and model_cfg.via_transformers:
            raise ConfigError("method.share_prompt=true: the packed layout needs the harness's own "
                              f"decoder (its 4-D mask and position ids); {model_cfg.pretrained} "
                              "runs through transformers (model.backend=transformers)")

    def untrained(self, ctx: StageContext, cfg: Any) -> nn.Module | None:
        """The stage's model when ``cfg`` says not to train it (e.g. ``sft.enabled=false``: the
        pretrained model itself), else None (the stage trains)."""
        return None

    def reward_source(self, cfg: Any) -> str | None:
        """What ``train/reward`` measures: ``gold``, ``rm`` or None (no reward during training)."""
        return None

    def summary_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The run's metrics from the stage's training and validation metrics and its budget."""
        return {k: v for k, v in metrics.items() if k.startswith(("train/", "val/", "budget/"))}

    def save(self, model: nn.Module, path: Path, tokenizer: Any, resolved: dict) -> None:
        """Write the stage's model as a Hugging Face folder at ``path``; a LoRA-adapted model
        merged (loadable as it is), with its adapter in ``path/adapter``."""
        from harness.models.lora import has_lora, merged, save_adapter

        if has_lora(model):
            save_checkpoint(merged(model), path, tokenizer=tokenizer, resolved_config=resolved)
            save_adapter(model, path / "adapter")
        else:
            save_checkpoint(model, path, tokenizer=tokenizer, resolved_config=resolved)

    def load(self, path: Path) -> nn.Module:
        """The model :meth:`save` wrote."""
        return load_checkpoint(path)[0]


def set_gradient_checkpointing(networks: list[nn.Module], on: bool) -> None:
    """``model.gradient_checkpointing`` on every backbone of ``networks`` (the ones a stage
    trains), including backbones loaded from checkpoints, whose saved config does not carry it."""
    from harness.models.adapter import TransformersCausalLM

    for net in networks:
        for module in net.modules():
            if isinstance(module, CausalLM | TransformersCausalLM):
                module.set_gradient_checkpointing(on)


def scalar_head(backbone: nn.Module, lora: LoRASettings | None = None) -> ScalarHead:
    """A reward model or critic on a copy of ``backbone``: every weight trainable, or, with
    ``lora.reward_and_critic`` (and ``lora.r > 0``), LoRA adapters on the backbone and the
    score head in full."""
    head = ScalarHead(copy.deepcopy(backbone))
    if lora is not None and lora.r and lora.reward_and_critic:
        from harness.models.lora import add_lora

        add_lora(head.backbone, lora)  # freezes the backbone's own weights, not the score head
    return head


def policy_from(inputs: Mapping[str, Built], lora: LoRASettings | None = None,
                ) -> tuple[CausalLM, nn.Module]:
    """(the policy to train, the frozen reference), both from the SFT base.

    Full fine-tuning: a trainable copy of the SFT base, and the base itself as the reference.
    With LoRA (``lora.r > 0``): the SFT base itself gets the adapters (base weights frozen), and
    the reference is the same model with its adapters off (:class:`~harness.models.lora.AdaptersOff`)
    -- no second copy of the weights; the SFT stage's entry then holds that view, so the run's
    evaluation compares against the base too.
    """
    base = inputs["sft"]
    if lora is None or not lora.r:
        return copy.deepcopy(base.model), base.model
    from harness.models.lora import AdaptersOff, add_lora

    policy = add_lora(base.model, lora)
    base.model = AdaptersOff(policy)
    return policy, base.model
