"""Functions the exported lm-eval task YAMLs call (``!function harness.evaluation.tasks.functions.X``).

The gold-reward task scores completions with the harness task's *own* gold reward, so there is one
source of truth: every row of ``gold.jsonl`` names the task class and carries its full config
(:data:`TASK_CLASS_FIELD`, :data:`TASK_CONFIG_FIELD`), and :func:`gold_process_results` rebuilds
the task from them (once per config) and calls ``task.reward(prompt, completion)``.

lm-eval resolves ``!function a.b.c`` first as ``a/b.py`` beside the YAML, then as an importable
module; the exported YAMLs use this module's dotted path, so nothing is copied beside them and the
``harness`` package must be importable where lm-eval runs (it is, in the project's environment).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CACHE_DIR_FIELD", "RAW_PROMPT_FIELD", "TASK_CLASS_FIELD", "TASK_CONFIG_FIELD", "gold_process_results",
           "rebuild_task", "task_from_row"]

#: Row field: ``"package.module:ClassName"`` of the harness task that generated the row.
TASK_CLASS_FIELD = "harness_task_class"
#: Row field: the task's config as a JSON object string (every field, name included).
TASK_CONFIG_FIELD = "harness_task_config"
#: Row field: the task's data cache folder (passed to the constructor; the reward never reads it).
CACHE_DIR_FIELD = "harness_cache_dir"
#: Row field of a task whose prompts were formatted (``dataset.prompt_format`` alpaca or chat:
#: :class:`harness.data.prompt_format.FormattedTask`): the task's own prompt behind the formatted
#: one; the completion is then graded as the harness grades it, ``normalize_answer`` first.
RAW_PROMPT_FIELD = "harness_raw_prompt"


@functools.lru_cache(maxsize=32)
def rebuild_task(task_class: str, config_json: str, cache_dir: str | None = None) -> Any:
    """The task ``task_class(config, cache_dir=cache_dir)``: built once per (class, config, cache).

    Args:
        task_class: ``"package.module:ClassName"`` (e.g. ``"harness.data.tasks.arith:ArithTask"``).
        config_json: the task config as a JSON object string (the constructor's mapping).
        cache_dir: the task's data cache folder, or None for the task's default.
    """
    module_name, _, qualname = task_class.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"{TASK_CLASS_FIELD}={task_class!r}: expected 'package.module:ClassName'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    config = json.loads(config_json)
    if not isinstance(config, dict):
        raise ValueError(f"{TASK_CONFIG_FIELD} must be a JSON object, got {config_json[:80]!r}")
    return obj(config, cache_dir=cache_dir)


def task_from_row(doc: Mapping[str, Any]) -> Any:
    """Rebuild the harness task that generated the exported row ``doc`` (cached)."""
    missing = [f for f in (TASK_CLASS_FIELD, TASK_CONFIG_FIELD) if not doc.get(f)]
    if missing:
        raise KeyError(f"gold row has no {missing}: re-export it with "
                       "harness.evaluation.tasks.export_task_data")
    return rebuild_task(doc[TASK_CLASS_FIELD], doc[TASK_CONFIG_FIELD], doc.get(CACHE_DIR_FIELD) or None)


def gold_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval ``process_results`` of ``harness_<task>_gold``: ``{"gold_reward": task.reward(...)}``.

    Args:
        doc: one row of ``gold.jsonl`` (``prompt`` plus the task class and config fields).
        results: lm-eval's filtered model outputs for the row: one completion string (the greedy
            continuation up to EOS, special tokens removed, as the harness decodes it).
    """
    if len(results) != 1:
        raise ValueError(f"gold_process_results: expected one completion, got {len(results)}")
    task = task_from_row(doc)
    if doc.get(RAW_PROMPT_FIELD):  # a formatted prompt: the task's own, the answer normalised
        return {"gold_reward": float(task.reward(doc[RAW_PROMPT_FIELD],
                                                 task.normalize_answer(results[0])))}
    return {"gold_reward": float(task.reward(doc["prompt"], results[0]))}
