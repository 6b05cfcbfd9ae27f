"""A method's declaration: what the registry needs to know of it without importing torch.

Every method lives in one package, ``harness/methods/<name>/``: its ``__init__`` holds the config
dataclass and ``METHOD = Method(...)``, its ``stage.py`` the stage and the Lightning module, and
``conf/method/<name>.yaml`` its Hydra entry (``- base_<name>``). :mod:`harness.registry` finds the
packages by their ``METHOD``; nothing else names a method.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One method: ``name`` (``method=<name>``, its package and YAML), ``config`` its config
    dataclass (its defaults are the method's defaults), ``stage`` its stage class as
    ``"module:Class"`` (imported the first time the stage is asked for), ``base`` whether other
    stages build on it (configured in its own section and cached: sft, rm), ``order`` where it is
    listed (the base stages first, in the order they build on each other; then by name)."""

    name: str
    config: type
    stage: str
    base: bool = False
    order: int = 100

    def __post_init__(self) -> None:
        if ":" not in self.stage:
            raise ValueError(f"Method {self.name!r}: stage {self.stage!r} must be 'module:Class'")
