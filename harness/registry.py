"""The stage registry: every method of the harness, by name (``method=<name>`` picks one).

A method is one package, ``harness/methods/<name>/`` (its ``__init__`` holds the config dataclass
and ``METHOD``, a :class:`~harness.methods.declaration.Method`; its ``stage.py`` the stage and the
Lightning module), and one YAML, ``conf/method/<name>.yaml`` (``- base_<name>``). The registry
finds the packages under :mod:`harness.methods` by their ``METHOD``; the pipeline, the bench, the
sweeps (``conf/sweep/compare.yaml`` globs ``conf/method``) and the leaderboard need no change.

Composing and checking a config (:func:`harness.settings.register_configs`,
:func:`harness.settings.validate`; ``python -m harness --cfg job``, ``--help``, a bad override's
error) imports the packages' ``__init__`` only, which import neither Lightning nor torch: a
stage's module is imported the first time the stage itself is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from harness.methods.declaration import Method

if TYPE_CHECKING:
    from harness.stage import Stage

METHODS_PACKAGE = "harness.methods"


def discover(package: str = METHODS_PACKAGE) -> dict[str, Method]:
    """Every :class:`Method` declared as ``METHOD`` by a subpackage of ``package``, by name, in
    listing order (``Method.order``, then name). A package's name must be its method's name
    (``method=<name>`` picks both it and ``conf/method/<name>.yaml``)."""
    found: dict[str, Method] = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
        if not info.ispkg:
            continue
        declared = getattr(importlib.import_module(info.name), "METHOD", None)
        if declared is None:
            continue
        folder = info.name.rsplit(".", 1)[1]
        if not isinstance(declared, Method) or declared.name != folder:
            raise ValueError(f"{info.name}.METHOD must be a Method named {folder!r} (its package's "
                             f"name); found {declared!r}")
        found[declared.name] = declared
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


@dataclass
class Registry:
    """Stage classes by name, imported lazily from their declarations."""

    entries: Mapping[str, Method]
    _loaded: dict[str, Stage] = field(default_factory=dict)

    def entry(self, name: str) -> Method:
        if name not in self.entries:
            raise KeyError(f"unknown stage {name!r}; known: {', '.join(self.entries)}")
        return self.entries[name]

    def get(self, name: str) -> Stage:
        """The stage ``name``, its module imported on first use; its class must declare the
        method it is registered under (``class XStage(Stage, method=METHOD)``), else
        ``ValueError``."""
        e = self.entry(name)
        if name not in self._loaded:
            module, cls = e.stage.split(":")
            stage = getattr(importlib.import_module(module), cls)()
            if getattr(stage, "method", None) != e:
                raise ValueError(f"{e.stage} declares {getattr(stage, 'method', None)!r}; it is "
                                 f"registered as {e!r}")
            self._loaded[name] = stage
        return self._loaded[name]


@cache
def stages() -> Registry:
    """The registry of every method under :mod:`harness.methods` (found once per process)."""
    return Registry(discover())


def get_stage(name: str) -> Stage:
    """The stage registered as ``name`` (its module is imported on first use)."""
    return stages().get(name)


def stage_config(name: str) -> type:
    """The config dataclass of the stage ``name``, without importing the stage."""
    return stages().entry(name).config


def stage_names() -> tuple[str, ...]:
    return tuple(stages().entries)


def stage_chain(name: str, config_of: Callable[[str], Any]) -> tuple[str, ...]:
    """``name`` and every stage it builds on, transitively, in the order first reached: each
    stage's :meth:`~harness.stage.Stage.needs` for its config ``config_of(stage)`` (imports the
    stages). E.g. ``("grpo", "sft")`` for GRPO on the gold reward, ``("grpo", "sft", "rm")`` on
    the reward model."""
    chain: list[str] = []
    todo = [name]
    while todo:
        n = todo.pop(0)
        if n not in chain:
            chain.append(n)
            todo += get_stage(n).needs(config_of(n))
    return tuple(chain)


def base_stages() -> tuple[str, ...]:
    """The stages others build on (configured in their own sections, cached): sft, rm."""
    return tuple(n for n, e in stages().entries.items() if e.base)
