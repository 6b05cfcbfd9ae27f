"""A sweep checks every job's values before it launches any (``python -m harness -m ...``).

Hydra's basic sweeper composes each job's config before it hands the jobs to the launcher, so an
unknown key or a wrong type stops a sweep at once; a bad *value* (``method.beta=0.1,-1``) surfaced
only when its job ran, after the jobs before it had trained. :class:`SweepCheck`, a Hydra callback
(``conf/config.yaml``), expands the sweep as the basic sweeper does
(:meth:`~hydra._internal.core_plugins.basic_sweeper.BasicSweeper.split_arguments` over the sweep
config's ``hydra.sweeper.params`` and the command line), composes each job's config and runs
:func:`harness.settings.validate` on it, so a grid with one bad point stops before its first job
with the one-line ``config error`` a single run gives. Other sweepers (Optuna) choose their jobs
as they go and are left to check each job when it runs; the launchers are not involved.
"""

from __future__ import annotations

from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError
from harness.settings import validate

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides of the multirun ``config`` (the master config Hydra composed), as the
    basic sweeper will launch them; None for another sweeper."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    # Hydra's own expansion (a private module): imported here, so that a Hydra that moved it only
    # turns this check into the warning Hydra gives a failing callback, never stops a run
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    assert isinstance(task, list)
    # the group options a glob() names come from the running app's config loader, as the sweeper's
    loader = GlobalHydra.instance().config_loader()
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(
        [*params, *map(str, task)])
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


class SweepCheck(Callback):
    """Validate every job of a basic sweep before any is launched (see the module's docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = sweep_jobs(config)
        for overrides in jobs or ():
            cfg = compose(config_name=kwargs.get("config_name") or "config", overrides=overrides)
            try:
                validate(cfg)
            except ConfigError as exc:
                raise SystemExit(f"config error: {exc} (sweep job: {' '.join(overrides)}; no job "
                                 "was launched)") from None
