"""lm-eval tasks for the harness's own tasks (``arith``, ``courier``, any task with the Task interface).

Per harness task ``<t>`` three local lm-eval tasks and a group, read from JSONL the harness writes
(no network):

- ``harness_<t>_gold`` (``generate_until``): greedy completions of the held-out prompts, scored by
  the task's gold reward -> ``gold_reward`` (mean, higher is better); equals the harness's own
  ``eval/gold_reward`` for the same prompts and ``max_new_tokens``;
- ``harness_<t>_pref`` (``multiple_choice``): held-out preference pairs, choices
  ``[chosen, rejected]``, gold index 0 -> ``acc`` (share of pairs where the model puts more
  likelihood on the chosen response);
- ``harness_<t>_ppl`` (``loglikelihood_rolling``): held-out SFT texts (prompt + response) ->
  ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``;
- ``harness_<t>``: the group of the three.

The YAMLs are templates here (``*.yaml.in``; not ``*.yaml``, so lm-eval never indexes them with
their placeholders); :func:`export_task_data` renders them with absolute data paths into an include
folder together with the JSONL files. :mod:`harness.evaluation.tasks.functions` holds the
``!function`` the gold YAML calls.
"""

from harness.evaluation.tasks.export import (
    KINDS,
    TEMPLATE_DIR,
    export_task_data,
    group_name,
    task_class_path,
    task_names,
)
from harness.evaluation.tasks.functions import gold_process_results, rebuild_task

__all__ = ["KINDS", "TEMPLATE_DIR", "export_task_data", "gold_process_results", "group_name",
           "rebuild_task", "task_class_path", "task_names"]
