"""``python -m harness [overrides]``: the Hydra entry point. Thin: compose -> run the pipeline.

Config errors (a renamed field, a bad value) stop before any work with one line naming the field
and exit status 1; they leave no results record. So does bad data (``data error: ...`` naming the
file, row and column), found while the data is read, before any training. ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from harness.config import ConfigError
from harness.data.errors import DataError
from harness.settings import check_overrides, register_configs, validate
from harness.util.conf_path import config_dir
from harness.util.run_uid import new_run_uid

register_configs()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        settings = validate(cfg)  # before Lightning and torch are imported: bad values stop fast
        from harness.pipeline import run  # heavy imports only once a run really starts

        summary = run(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir), settings=settings)
    except (ConfigError, DataError) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        kind = "config" if isinstance(exc, ConfigError) else "data"
        sys.exit(f"{kind} error: {exc}")
    except Exception as exc:
        from harness.pipeline.outputs import RecordNotWritten

        if isinstance(exc, RecordNotWritten):
            sys.exit(f"record error: {exc}")
        raise
    if summary.get("status") == "ok" and "rank" in summary:
        return None  # a DDP rank other than 0: rank 0 prints the summary
    if summary.get("status") == "skipped":
        print(f"run: {summary['method']} | model {summary['model']} | dataset "
              f"{summary['dataset']} | seed {summary['seed']} -> skipped, done before: "
              f"{summary['record']}")
        return None
    from harness.pipeline.report import print_summary

    print_summary(summary)
    return summary.get("metrics", {}).get("eval/gold_reward")


def default_choice(group: str) -> str:
    """The option of ``group`` that ``conf/config.yaml``'s defaults list selects."""
    defaults = yaml.safe_load((config_dir() / "config.yaml").read_text())["defaults"]
    return next((e[group] for e in defaults if isinstance(e, dict) and group in e), "") or ""


def method_of(argv: list[str]) -> str:
    """The method a command selects: ``method=``, else a ``+sweep=`` or ``experiment=`` config's
    ``override /method`` (followed through the configs of the same group it extends, as
    ``tune_grpo_preferences`` extends ``tune_grpo``), else ``conf/config.yaml``'s default."""
    chosen = default_choice("method")
    for arg in argv:
        key, _, value = arg.partition("=")
        group = key.lstrip("+")
        if group in ("sweep", "experiment") and value:
            chosen = config_method(group, value.split(",")[0]) or chosen
    return chosen


def config_method(group: str, name: str, seen: frozenset[str] = frozenset()) -> str | None:
    """The ``override /method`` of ``conf/<group>/<name>.yaml``, or of the first config of the same
    group in its defaults list that has one (the config's own entry wins); None when none has."""
    path = config_dir() / group / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() and name not in seen else None
    defaults = (data or {}).get("defaults") or []
    for entry_ in defaults:
        if isinstance(entry_, dict) and "override /method" in entry_:
            return entry_["override /method"]
    parents = [e for e in defaults if isinstance(e, str) and e != "_self_" and not e.startswith("/")]
    return next((m for p in parents if (m := config_method(group, p, seen | {name})) is not None),
                None)


def entry() -> None:
    """Check the command line for renamed fields, then hand over to Hydra."""
    new_run_uid()  # this command's own id, never one inherited from a parent command
    experiments = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    try:
        check_overrides(sys.argv[1:], experiments, method_of(sys.argv[1:]))
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    main()


if __name__ == "__main__":
    entry()
