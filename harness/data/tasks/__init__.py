"""Task registry: :func:`build_task` builds a task from the ``dataset`` config group.

Config fields (``name`` picks the task; every task also takes ``seed`` and ``vocab_size``, the
latter for the tokenizer only). Unknown fields raise ``ConfigError`` naming them.

``arith`` / ``arith_fast``: :class:`~harness.data.tasks.arith.ArithConfig` (three- / two-digit
addition); ``courier`` / ``courier_unseen`` / ``courier_misrouted``:
:class:`~harness.data.tasks.courier.CourierConfig` (``courier_unseen``: scored on phrasings never
trained on; ``courier_misrouted``: four cities the demonstrator rarely names right); ``preference``:
:class:`~harness.data.tasks.preference.PreferenceConfig`. The fields and their defaults are those
dataclasses' (the YAML files of ``conf/dataset/`` hold only what each option changes).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.data.errors import ConfigError
from harness.data.tasks.arith import ArithConfig, ArithFastTask, ArithTask
from harness.data.tasks.base import Task, TaskConfig
from harness.data.tasks.courier import (
    CourierConfig,
    CourierMisroutedTask,
    CourierTask,
    CourierUnseenTask,
)
from harness.data.tasks.preference import NoGoldRewardError, PreferenceConfig, PreferenceTask

__all__ = ["TASKS", "ArithConfig", "ArithTask", "CourierConfig", "CourierMisroutedTask", "CourierTask",
           "CourierUnseenTask",
           "NoGoldRewardError", "PreferenceConfig", "PreferenceTask", "Task", "TaskConfig",
           "build_task", "task_config"]

TASKS: dict[str, type[Task]] = {"arith": ArithTask, "arith_fast": ArithFastTask, "courier": CourierTask,
                                "courier_unseen": CourierUnseenTask,
                                "courier_misrouted": CourierMisroutedTask, "preference": PreferenceTask}


def _plain(cfg: Any) -> dict[str, Any]:
    """A plain dict from a mapping or an OmegaConf ``DictConfig`` (resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency of the harness
        DictConfig = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"dataset: expected a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def task_config(cfg: Mapping[str, Any] | TaskConfig) -> TaskConfig:
    """The validated config dataclass of the task named by ``cfg["name"]``."""
    if isinstance(cfg, TaskConfig):
        cfg.validate()
        return cfg
    plain = _plain(cfg)
    name = plain.get("name")
    if name not in TASKS:
        raise ConfigError(f"dataset.name={name!r}: must be one of {sorted(TASKS)}")
    return TASKS[name].config_class.from_mapping(plain)


def build_task(cfg: Mapping[str, Any] | TaskConfig, cache_dir: str | Path | None = None) -> Task:
    """The task named by ``cfg["name"]``, configured by the rest of ``cfg``.

    ``cache_dir`` is the parent folder of the generated datasets' cache (default
    ``~/.cache/harness/data``); each task config caches under ``<cache_dir>/<name>-<hash>``.
    """
    config = task_config(cfg)
    return TASKS[config.name](config, cache_dir=cache_dir)
