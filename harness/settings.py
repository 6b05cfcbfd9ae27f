"""A composed run config checked into :class:`Settings`, and the schemas registered with Hydra.

:func:`register_configs` puts every schema in Hydra's ConfigStore (the run-wide ones of
:mod:`harness.config`, the stages' of :mod:`harness.methods.config` by way of the registry, the
tasks'); :func:`check_overrides` stops renamed fields on the command line; :func:`validate` checks
every group of a composed config and returns it as dataclasses, raising
:class:`~harness.config.ConfigError` naming the field. None of it imports Lightning or torch, so
the entry point checks a config before a run's heavy imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from harness.config import (
    OFFLINE_PAIR_METHODS,
    TRACK_SOURCES,
    ConfigError,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    RunSchema,
    StageRef,
    TrainerConfig,
    model_config,
    reject_non_finite,
    to_dataclass,
)
from harness.registry import base_stages, stage_config, stage_names


@dataclass
class Settings:
    """A validated run config: every group as its dataclass."""

    model: ModelConfig
    dataset: Any                     # the task's config (harness.data.tasks)
    method: Any                      # the aligning stage's config, or a StageRef for sft / rm
    stages: dict[str, Any]           # the base stages' configs (sft, rm), by name
    trainer: TrainerConfig
    logger: LoggerConfig
    eval: EvalConfig
    seed: int
    group: str
    cache_dir: str
    force_retrain: bool
    results_dir: str | None
    log_level: str
    skip_done: bool

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def eval_max_len(self) -> int:
        """The longest sequence of evaluation (held-out decoding, the KL estimate, the curve):
        the SFT base's ``max_len``, since every policy and reference descends from it."""
        return self.stages["sft"].max_len

    def stage_config(self, name: str) -> Any:
        """The config of stage ``name``: its own section for a base stage, else ``method``."""
        return self.stages.get(name, self.method)


def validate(cfg: DictConfig) -> Settings:
    """Check every group of a composed config; returns them as dataclasses. Raises ConfigError."""
    from harness.data.tasks import task_config

    known = {f.name for f in fields(RunSchema)} | set(base_stages())
    for key in cfg:
        if key not in known:
            raise ConfigError(f"{key}: unknown top-level field; known: {', '.join(sorted(known))}")
    top = to_dataclass(RunSchema, {k: cfg[k] for k in ("seed", "group", "cache_dir",
                                                       "force_retrain", "results_dir",
                                                       "log_level", "track", "skip_done")})
    top.check()
    apply_track(cfg, top.track)
    model = model_config(cfg.model, to_absolute_path(top.cache_dir))
    name = cfg.method.name
    if name not in stage_names():
        raise ConfigError(f"method.name={name!r}: unknown method; known: {', '.join(stage_names())}")
    stages = {}
    for base in base_stages():
        stages[base] = to_dataclass(stage_config(base), cfg[base], base)
        stages[base].check(base)
    if not stages["sft"].enabled and model.pretrained is None:
        raise ConfigError("sft.enabled=False: needs a pretrained model (model=hf "
                          "model.pretrained=...); a fresh initialisation is no SFT base")
    method = to_dataclass(StageRef if name in stages else stage_config(name), cfg.method,
                          "method")
    method.check("method")
    groups = {g: to_dataclass(schema, cfg[g], g) for g, schema in
              (("trainer", TrainerConfig), ("logger", LoggerConfig), ("eval", EvalConfig))}
    for g, c in groups.items():
        c.check(g)
    _check_wandb_key(groups["logger"])
    # the SFT base (every run's start and evaluation length) and the stage the run is for
    own = name if name in stages else "method"
    for section, c in {"sft": stages["sft"], own: stages.get(name, method)}.items():
        if getattr(c, "max_len", 0) > model.max_seq_len:
            raise ConfigError(f"{section}.max_len={c.max_len}: must be <= model.max_seq_len="
                              f"{model.max_seq_len} (the longest sequence the model is built and "
                              "exported for)")
    sft_len = stages["sft"].max_len  # evaluation decodes within the SFT base's max_len
    if groups["eval"].max_new_tokens >= sft_len:
        raise ConfigError(f"eval.max_new_tokens={groups['eval'].max_new_tokens}: must be < "
                          f"sft.max_len={sft_len} (evaluation's prompts keep sft.max_len - "
                          "eval.max_new_tokens tokens)")
    dataset = task_config(cfg.dataset)
    _check_reward_available(dataset, method)
    for section, node in (("model", model), ("dataset", dataset), ("method", method),
                          *stages.items(), *groups.items()):
        reject_non_finite(node, section)
    return Settings(model=model, dataset=dataset, method=method, stages=stages,
                    seed=top.seed, group=top.group, cache_dir=top.cache_dir,
                    force_retrain=top.force_retrain, results_dir=top.results_dir,
                    log_level=top.log_level, skip_done=top.skip_done, **groups)


def _check_wandb_key(logger: LoggerConfig) -> None:
    """W&B online needs a key (``wandb login`` or ``WANDB_API_KEY``): without one it would fail
    only when the first stage's logger starts, after the data and the tokenizer."""
    from harness.util.wandb_auth import credentials_found, wants_online

    if logger.kind == "wandb" and wants_online(logger.offline) and not credentials_found():
        raise ConfigError(f"logger.offline={logger.offline!r}: W&B online needs a key: run "
                          "`wandb login` or set WANDB_API_KEY (or keep logger.offline=true and "
                          "upload later with `wandb sync`)")


def apply_track(cfg: DictConfig, track: str | None) -> None:
    """Put an online method on ``track``: ``method.reward_source`` becomes the track's source
    (:data:`~harness.config.TRACK_SOURCES`), in ``cfg`` itself, so the run's resolved config and
    record say what it learned from. Offline DPO needs nothing on the preferences track and has no
    oracle run; a base stage (sft, rm) aligns nothing and is on no track. Raises ConfigError."""
    if track is None:
        return
    name = cfg.method.name
    if "reward_source" in cfg.method:
        cfg.method.reward_source = TRACK_SOURCES[track]
    elif name in OFFLINE_PAIR_METHODS:
        if track != "preferences":
            raise ConfigError(f"track={track}: method={name} learns from the preference pairs "
                              "themselves; it runs on the preferences track only")
    else:
        raise ConfigError(f"track={track}: method={name} aligns nothing and is on no track; "
                          "tracks are for the aligning methods")


def _check_reward_available(dataset: Any, method: Any) -> None:
    """An RL method that scores rollouts with the task's gold reward needs a task that has one."""
    from harness.data.tasks import TASKS

    if getattr(method, "reward_source", None) == "gold" and not TASKS[dataset.name].has_gold_reward:
        raise ConfigError(
            f"method.reward_source='gold': dataset {dataset.name!r} has no gold reward to score "
            "rollouts with; use method.reward_source=rm (the reward model trained on its pairs)")


#: Config names that changed: an override with the old name stops with the new one.
RENAMED: dict[str, str] = {
    "method.kl_coef": "method.beta",
    "method.ppo_epochs": "method.update_epochs",
    "method.num_inner_iterations": "method.update_epochs",
    "method.epsilon_high": "method.clip_eps_high",
    "dataset.sft_max_steps": "sft.max_steps (or an experiment config: conf/experiment/)",
    "experiment": "group (experiment= now selects a set-up in conf/experiment/)",
}


def check_overrides(overrides: Sequence[str], experiments: Sequence[str] = (),
                    default_method: str = "") -> None:
    """Stop on command-line overrides that use a renamed field, or ``method.*`` fields with
    ``method=sft`` / ``method=rm`` (whose hyperparameters live under ``sft.*`` / ``rm.*``).

    ``experiments``: the options of ``conf/experiment``; ``default_method``: the method that
    ``conf/config.yaml`` selects when the command line does not.
    """
    keys = {}
    for o in overrides:
        if "=" not in o or o.startswith("hydra"):
            continue
        k, v = o.split("=", 1)
        keys[k.lstrip("+~")] = v
    for key, value in keys.items():
        new = RENAMED.get(key)
        if key == "experiment" and value.split(",")[0] in experiments:
            continue
        if new is not None:
            raise ConfigError(f"{key}: renamed to {new}")
    if "track" in keys and "method.reward_source" in keys:
        raise ConfigError("method.reward_source: set by track=" + keys["track"] + "; give one "
                          "of the two")
    method = keys.get("method", default_method)
    if method in base_stages():
        for key in keys:
            if key.startswith("method."):
                field_ = key.removeprefix("method.")
                raise ConfigError(f"{key}: with method={method} the stage is configured under "
                                  f"{method}.*; use {method}.{field_}")


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    from harness.data.tasks import TASKS
    from harness.util.run_uid import run_uid

    OmegaConf.register_new_resolver("run_uid", run_uid, replace=True)
    cs = ConfigStore.instance()
    cs.store(group="model", name="base_model", node=ModelConfig)
    for name, task in TASKS.items():
        cs.store(group="dataset", name=f"base_{name}", node=task.config_class)
    base = base_stages()
    cs.store(group="method", name="base_stage_ref", node=StageRef)
    for name in stage_names():
        if name not in base:
            cs.store(group="method", name=f"base_{name}", node=stage_config(name))
    schema = dataclasses.make_dataclass(
        "HarnessConfig",
        [(b, stage_config(b), field(default_factory=stage_config(b))) for b in base],
        bases=(RunSchema,))
    cs.store(name="harness_schema", node=schema)
