"""The stage registry: every stage of the harness, by name (``method=<name>`` picks one).

Adding a method is one module with its :class:`~harness.stage.Stage` and its Lightning module, its
config dataclass in :mod:`harness.methods.config`, one YAML in ``conf/method/`` naming the config
(``- base_<name>``), and one line here. The pipeline, the bench, the sweeps
(``conf/sweep/compare.yaml`` globs ``conf/method``) and the leaderboard need no change.

An entry names the stage's config and whether it is a base stage beside the stage's class path, so
that composing and checking a config (:func:`harness.settings.register_configs`,
:func:`harness.settings.validate`; ``python -m harness --cfg job``, ``--help``, a bad override's
error) imports neither Lightning nor torch: a stage's module is imported the first time the stage
itself is asked for, and then it must agree with its entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.methods.config import (
    DPOConfig,
    GRPOConfig,
    OnlineDPOConfig,
    PPOConfig,
    RLOOConfig,
    RMConfig,
    SFTConfig,
)

if TYPE_CHECKING:
    from harness.stage import Stage


@dataclass(frozen=True)
class Entry:
    """One registered stage: ``path`` its class as ``"module:Class"`` (imported on first use),
    ``config`` its config dataclass, ``base`` whether other stages build on it (configured in
    its own section and cached: sft, rm)."""

    path: str
    config: type
    base: bool = False


@dataclass
class Registry:
    """Stage classes by name, imported lazily from their entries."""

    entries: Mapping[str, Entry]
    _loaded: dict[str, Stage] = field(default_factory=dict)

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise KeyError(f"unknown stage {name!r}; known: {', '.join(self.entries)}")
        return self.entries[name]

    def get(self, name: str) -> Stage:
        """The stage ``name``, its module imported on first use; it must be the stage its entry
        names (name, config class and base flag), else ``ValueError``."""
        e = self.entry(name)
        if name not in self._loaded:
            module, cls = e.path.split(":")
            stage = getattr(importlib.import_module(module), cls)()
            found = (stage.name, stage.config, stage.base)
            if found != (name, e.config, e.base):
                raise ValueError(
                    f"{e.path} is stage {stage.name!r} (config {stage.config.__name__}, base "
                    f"{stage.base}); registered as {name!r} (config {e.config.__name__}, base "
                    f"{e.base})")
            self._loaded[name] = stage
        return self._loaded[name]


STAGES = Registry({
    "sft": Entry("harness.methods.sft:SFTStage", SFTConfig, base=True),
    "rm": Entry("harness.methods.reward:RewardStage", RMConfig, base=True),
    "ppo": Entry("harness.methods.ppo:PPOStage", PPOConfig),
    "grpo": Entry("harness.methods.grpo:GRPOStage", GRPOConfig),
    "dpo": Entry("harness.methods.dpo:DPOStage", DPOConfig),
    "rloo": Entry("harness.methods.rloo:RLOOStage", RLOOConfig),
    "online_dpo": Entry("harness.methods.online_dpo:OnlineDPOStage", OnlineDPOConfig),
})


def get_stage(name: str) -> Stage:
    """The stage registered as ``name`` (its module is imported on first use)."""
    return STAGES.get(name)


def stage_config(name: str) -> type:
    """The config dataclass of the stage ``name``, without importing the stage."""
    return STAGES.entry(name).config


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES.entries)


def base_stages() -> tuple[str, ...]:
    """The stages others build on (configured in their own sections, cached): sft, rm."""
    return tuple(n for n, e in STAGES.entries.items() if e.base)
