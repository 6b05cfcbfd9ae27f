"""A trained policy's evaluation, from explicit arguments: the policy and its reference, the task,
the tokenizer, the ``eval`` config and the seed (no run state).

- :func:`evaluate`: the gold reward on held-out prompts; with a reference also its gold reward,
  the win rate and the sequence KL (data without a gold reward: :func:`evaluate_preferences`).
- :class:`ReferenceCache`: the reference's greedy responses kept between the runs that share it.
- :func:`lm_eval_stage`: lm-evaluation-harness on the saved checkpoint.
- :func:`eval_prompts` / :func:`held_out_curve`: which held-out prompts are read, and the gold
  curve a training stage records on validation prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cache import stage_key
from harness.config import EvalConfig
from harness.evaluation.curves import HeldOutGoldCurve
from harness.evaluation.drift import sequence_kl
from harness.evaluation.gold import Completions, gold_eval, win_rate
from harness.models.llama import CausalLM
from harness.util.atomic import write_json
from harness.util.seeding import stream_seed

log = logging.getLogger("harness")

#: what an evaluation returns: (metrics, samples, per_prompt)
Evaluation = tuple[dict[str, float], list[dict], dict[str, Any]]


@dataclass
class ReferenceCache:
    """Where the reference's greedy held-out responses are kept, and what identifies them.

    Every run that aligns from one base (a sweep's methods, settings and seeds) evaluates the
    same frozen reference greedily on the same prompts: the same responses, a third of the
    evaluation's time on a real model. ``identity`` names what decides them besides the prompts
    and the decoding settings: the reference stage's cache key and training id, the dataset's
    config (its gold reward), the platform (:func:`~harness.evaluation.stats.platform_identity`),
    the CPU threads and the reference's dtype; the file is ``<folder>/<stage_key>.json`` of all
    of them, so a reference retrained, another machine's kernels or another thread count never
    read another's responses. ``hit`` says whether the last lookup found them.
    """

    folder: Path
    identity: Mapping[str, Any]
    hit: bool = field(default=False, init=False)

    def file(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int, max_len: int,
             cuda_graph: bool) -> Path:
        decides = {**self.identity, "prompts_sha256": _prompts_sha(prompts),
                   "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                   "max_len": max_len, "cuda_graph": cuda_graph}
        return self.folder / f"{stage_key('ref_gold', decides)}.json"


def _prompts_sha(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def reference_gold_eval(reference: CausalLM, tokenizer: Any, task: Any, prompts: Sequence[str],
                        max_new_tokens: int, batch_size: int, max_len: int, cuda_graph: bool,
                        cache: ReferenceCache | None) -> Completions:
    """:func:`~harness.evaluation.gold.gold_eval` of the reference, its responses read from
    ``cache`` when a run with the same reference, prompts and settings kept them (the gold rewards
    are scored again), else decoded and kept there. A cache file that cannot be read, or whose
    prompts differ, is decoded again and replaced."""
    if cache is None:
        return gold_eval(reference, tokenizer, task, prompts, max_new_tokens, batch_size, max_len,
                         cuda_graph=cuda_graph)
    path = cache.file(prompts, max_new_tokens, batch_size, max_len, cuda_graph)
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["prompts"] == list(prompts) and len(kept["responses"]) == len(prompts):
            cache.hit = True
            log.info("evaluation: the reference's responses from %s", path)
            responses = [str(r) for r in kept["responses"]]
            return Completions(list(prompts), responses,
                               list(task.rewards(list(prompts), responses)))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    cache.hit = False
    res = gold_eval(reference, tokenizer, task, prompts, max_new_tokens, batch_size, max_len,
                    cuda_graph=cuda_graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"prompts": res.prompts, "responses": res.responses,
                      "identity": dict(cache.identity)})
    return res


def eval_prompts(task: Any, e: EvalConfig, split: str | None = None,
                 limit: int | None = None) -> list[str]:
    """Held-out prompts of ``split`` (default ``e.split``): ``test`` (the task's eval pool, never
    tuned on) or ``validation`` (distinct prompts of the validation split, for tuning; as many as
    test); the first ``limit`` (default ``e.limit``; null = all)."""
    split = split or e.split
    test = list(task.eval_dataset()["prompt"])
    prompts = test
    if split != "test":  # distinct validation prompts, as many as test has
        prompts = list(dict.fromkeys(task.sft_dataset("validation")["prompt"]))[:len(test)]
    limit = e.limit if limit is None else limit
    return prompts[:limit] if limit else prompts


def held_out_curve(task: Any, tokenizer: Any, e: EvalConfig, steps: int,
                   max_len: int) -> HeldOutGoldCurve | None:
    """The held-out gold curve callback for a stage of ``steps`` training steps: ``e.curve_points``
    points on ``e.curve_prompts`` validation prompts (None without a gold reward or points)."""
    if not task.has_gold_reward or not e.curve_points:
        return None
    prompts = eval_prompts(task, e, "validation", e.curve_prompts)
    return HeldOutGoldCurve(task, tokenizer, prompts, every=max(1, steps // e.curve_points),
                            max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                            max_len=max_len, cuda_graph=e.cuda_graph)


def evaluate(policy: CausalLM, reference: CausalLM | None, task: Any, tokenizer: Any,
             e: EvalConfig, seed: int, max_len: int,
             reference_cache: ReferenceCache | None = None) -> Evaluation:
    """Gold reward on held-out prompts; with a reference also its gold reward, win rate and KL
    (sampled with the seed's ``eval_kl`` stream). ``reference_cache``: where the reference's
    greedy responses are kept between runs (:func:`reference_gold_eval`; None: decoded here).

    Returns (metrics, samples, per_prompt): ``per_prompt`` holds the split, a hash of the prompts
    and each prompt's gold reward (and the reference's), the unit of the leaderboard's paired test.
    """
    if not task.has_gold_reward:
        return evaluate_preferences(policy, reference, task, tokenizer, e, seed, max_len)
    prompts = eval_prompts(task, e)
    args = (prompts, e.max_new_tokens, e.batch_size, max_len)
    res = gold_eval(policy, tokenizer, task, *args, cuda_graph=e.cuda_graph)
    best = task.gold_max
    metrics = {"eval/gold_reward": res.mean_reward, "eval/gold_accuracy": res.accuracy(best),
               "eval/gold_max": float(best), "eval/n_prompts": float(len(prompts))}
    per_prompt: dict[str, Any] = {
        "split": e.split,
        "prompts_sha256": _prompts_sha(prompts),
        "gold_reward": [float(r) for r in res.rewards]}
    samples = [{"prompt": p, "response": r, "reward": w} for p, r, w in
               zip(res.prompts, res.responses, res.rewards, strict=True)][: e.n_samples]
    if reference is not None:
        ref = reference_gold_eval(reference, tokenizer, task, *args, e.cuda_graph, reference_cache)
        per_prompt["ref_gold_reward"] = [float(r) for r in ref.rewards]
        metrics["eval/ref_gold_reward"] = ref.mean_reward
        metrics["eval/ref_gold_accuracy"] = ref.accuracy(best)
        metrics["eval/win_rate"] = win_rate(res.rewards, ref.rewards)
        metrics["eval/kl"] = sequence_kl(policy, reference, tokenizer, prompts, e.max_new_tokens,
                                         e.batch_size, max_len, stream_seed(seed, "eval_kl"),
                                         e.cuda_graph)
        for s, r in zip(samples, ref.responses, strict=False):
            s["reference"] = r
    return metrics, samples, per_prompt


def evaluate_preferences(policy: CausalLM, reference: CausalLM | None, task: Any, tokenizer: Any,
                         e: EvalConfig, seed: int, max_len: int) -> Evaluation:
    """Evaluation for data without a gold reward: held-out preference accuracy and KL.

    The held-out pairs are the task's eval pairs (``eval.split=test``) or its validation pairs;
    ``eval/pref_accuracy`` (and the reference's, and the implicit-reward accuracy) are defined in
    :mod:`harness.evaluation.preference_eval`. Data with responses but no pairs gets only KL.
    """
    from harness.evaluation.gold import complete
    from harness.evaluation.preference_eval import (
        implicit_reward_correct,
        pair_logps_table,
        prefers_chosen,
    )

    ds = task.eval_dataset() if e.split == "test" else task.preference_dataset("validation")
    if e.limit:
        ds = ds.select(range(min(e.limit, len(ds))))
    prompts = list(ds["prompt"])
    metrics: dict[str, float] = {"eval/n_prompts": float(len(prompts))}
    per_prompt: dict[str, Any] = {
        "split": e.split, "prompts_sha256": _prompts_sha(prompts)}
    if {"chosen", "rejected"} <= set(ds.column_names):
        pairs = (prompts, list(ds["chosen"]), list(ds["rejected"]), e.batch_size, max_len)
        table = pair_logps_table(policy, tokenizer, *pairs)
        per_prompt["pref_accuracy"] = prefers_chosen(table)
        metrics["eval/pref_accuracy"] = sum(per_prompt["pref_accuracy"]) / len(prompts)
        if reference is not None:
            ref_table = pair_logps_table(reference, tokenizer, *pairs)
            per_prompt["ref_pref_accuracy"] = prefers_chosen(ref_table)
            metrics["eval/ref_pref_accuracy"] = sum(per_prompt["ref_pref_accuracy"]) / len(prompts)
            correct = implicit_reward_correct(table, ref_table)
            metrics["eval/reward_accuracy"] = sum(correct) / len(prompts)
    shown = prompts[: e.n_samples]
    responses = complete(policy, tokenizer, shown, e.max_new_tokens, e.batch_size, max_len,
                         cuda_graph=e.cuda_graph)
    samples = [{"prompt": p, "response": r} for p, r in zip(shown, responses, strict=True)]
    if reference is not None:
        metrics["eval/kl"] = sequence_kl(policy, reference, tokenizer, prompts, e.max_new_tokens,
                                         e.batch_size, max_len, stream_seed(seed, "eval_kl"),
                                         e.cuda_graph)
    return metrics, samples, per_prompt


def lm_eval_stage(task: Any, tokenizer: Any, e: EvalConfig, checkpoint: Path,
                  run_dir: Path) -> tuple[dict[str, float], str]:
    """lm-evaluation-harness on the HF checkpoint (the task's own lm-eval task exported under
    ``<run_dir>/lm_eval_tasks`` unless ``e.lm_eval.include_defaults``); returns the metrics and
    the equivalent ``lm_eval`` command."""
    from harness.evaluation.lm_eval_runner import lm_eval_command, run_lm_eval
    from harness.evaluation.tasks.export import export_task_data

    lm = e.lm_eval
    include = None
    if not lm.include_defaults:
        include = export_task_data(task, run_dir / "lm_eval_tasks", limit=lm.limit,
                                   tokenizer=tokenizer, max_gen_toks=e.max_new_tokens)
    tasks = list(lm.tasks) if lm.tasks is not None else [f"harness_{task.name}"]
    kwargs = dict(limit=lm.limit, batch_size=lm.batch_size, num_fewshot=lm.num_fewshot,
                  add_bos_token=lm.add_bos_token)
    metrics = run_lm_eval(checkpoint, include, tasks, include_defaults=lm.include_defaults,
                          output_path=run_dir / "lm_eval_results.json", **kwargs)
    return metrics, lm_eval_command(checkpoint, include, tasks, **kwargs)
