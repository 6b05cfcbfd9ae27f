"""Paired comparisons on the held-out prompts: two methods of one track (and group), and one
method across the two tracks (the information effect), each over the seeds both ran, prompt by
prompt, with the two-level paired bootstrap of :mod:`harness.evaluation.stats`.

What decides a difference (``significant``, the leaderboard's ✓): the paired t-test over seeds,
its p adjusted by Holm's step-down method over the family of comparisons made together — the
pairs of methods of one table (model, dataset, group, track), or the information effects of one
(model, dataset, group) — so that a table of six pairs does not claim one by chance more often
than a single test would (at most ``ALPHA`` for the whole table).

A reference implementation's row (``trl_grpo``: TRL's trainer from the same SFT bases, scored by
the harness; :mod:`harness.bench.crosscheck`) is compared with its own method only (``trl_grpo −
grpo``): it checks the harness, it is not a method of the comparison, so it neither enters the
methods' family nor is paired with the other methods."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from harness.evaluation.leaderboard.table import SEED_BOOT, row_groups, setting_label
from harness.evaluation.records import finite
from harness.evaluation.stats import (
    distinct_seeds,
    holm,
    paired_bootstrap,
    paired_t_test,
    probability_of_improvement,
    stratified_bootstrap_interval,
)

ALPHA = 0.05
REFERENCE_PREFIX = "trl_"
"""The method-name prefix of a reference implementation's records (``trl_grpo``)."""


def is_reference(name: str) -> bool:
    """Whether the row ``name`` (``"trl_grpo"``, ``"trl_dpo (β=0.1, lr=5e-06)"``) is a reference
    implementation's."""
    return name.startswith(REFERENCE_PREFIX)


def checks_reference(c: Mapping[str, Any]) -> bool:
    """Whether the comparison ``c`` checks a reference implementation against its method (one
    side a ``trl_*`` row), rather than comparing two methods."""
    return is_reference(c["a"]) or is_reference(c["b"])


def _method_of(name: str) -> str:
    """The harness method a row stands for: ``"trl_grpo (β=…)"`` -> ``"grpo"``."""
    return name.split(" (")[0].removeprefix(REFERENCE_PREFIX)


def _compared(a: str, b: str) -> bool:
    """Two rows of one table are compared when both are methods, or one is a reference
    implementation of the other."""
    if is_reference(a) or is_reference(b):
        return is_reference(a) != is_reference(b) and _method_of(a) == _method_of(b)
    return True
INFORMATION_NOTE = ("the same method on the oracle track minus on the preferences track: what "
                    "learning from the pairs instead of the gold reward costs")


def _cells(records: Iterable[Mapping[str, Any]]
           ) -> dict[tuple[str, str, str, str], dict[str, dict[Any, Mapping[str, Any]]]]:
    """The ok records, one per seed (as :func:`build_table` keeps them), by cell ``(model,
    dataset, group, track)`` and method name (``"dpo (β=0.1, lr=5e-06)"`` for a method that ran
    several settings there): ``{cell: {method: {seed: record}}}``."""
    cells: dict[tuple[str, str, str, str], dict[str, dict[Any, Mapping[str, Any]]]] = defaultdict(dict)
    by_group: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_group[str(r.get("group"))].append(r)
    for group, grecs in by_group.items():
        for (method, model, dataset, track, setting), recs in row_groups(grecs).items():
            ok = [r for r in distinct_seeds(recs)[0] if r.get("status") == "ok"]
            if ok:
                name = f"{method} ({setting_label(setting)})" if setting else method
                cells[(model, dataset, group, track)][name] = {r.get("seed"): r for r in ok}
    return cells


def paired_comparisons(records: Iterable[Mapping[str, Any]], n_boot: int = 10_000, seed: int = 0,
                       ) -> list[dict[str, Any]]:
    """Every pair of methods on the same (model, dataset, group, track), compared prompt by
    prompt: methods are compared only with what learned from the same information.

    A method that ran several settings in a group enters once per setting, named e.g.
    ``"dpo (β=0.1, lr=5e-06)"`` (see :func:`row_groups`). Per pair (A, B), A the one with the
    higher mean gold: the seeds both ran (ok, one record per
    seed as in :func:`build_table`) whose ``per_prompt`` has the same ``prompts_sha256`` and
    length; d[s, i] = gold_A[s, i] − gold_B[s, i] goes to
    :func:`harness.evaluation.stats.paired_bootstrap` (``n_boot`` replicates, numpy seed
    ``seed``). Returns dicts ``{"model", "dataset", "group", "track", "a", "b", "n_seeds",
    "n_prompts", "seeds", "mean_diff", "ci_lo", "ci_hi", "p", "sign_flip_p", "t_lo", "t_hi", "t_p",
    "holm_p", "wins", "poi", "poi_lo", "poi_hi", "significant", "skipped"}``; ``skipped`` says why a
    pair could not be compared (then the numbers are ``None``). ``holm_p``: ``t_p`` adjusted over
    the pairs of the same (model, dataset, group, track); ``significant``: ``holm_p < ALPHA``.
    """
    out = []
    for (model, dataset, group, track), methods in sorted(_cells(records).items()):
        def gold(m: str, methods: Mapping[str, Mapping[Any, Mapping[str, Any]]] = methods) -> float:
            vals = [float(r["metrics"]["eval/gold_reward"]) for r in methods[m].values()
                    if finite((r.get("metrics") or {}).get("eval/gold_reward"))]
            return sum(vals) / len(vals) if vals else -math.inf

        order = sorted(methods, key=lambda m: (-gold(m), m))
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                if _compared(a, b):
                    out.append({**_compare(model, dataset, group, a, b, methods[a], methods[b],
                                           n_boot, seed), "track": track})
    return _decide(out)


def information_effect(records: Iterable[Mapping[str, Any]], n_boot: int = 10_000, seed: int = 0,
                       ) -> list[dict[str, Any]]:
    """The same method told the exact reward against told only the preference pairs: for each
    method that ran on both tracks of a (model, dataset, group), A = it on ``oracle``, B = it on
    ``preferences`` (each setting against each when it ran several), compared prompt by prompt
    over their common seeds as :func:`paired_comparisons` compares two methods. Δ gold > 0: what
    the reward model (or the pairs) lose of the gold reward's information. Returns the same
    dicts, ``track`` ``"oracle − preferences"``."""
    cells = _cells(records)
    out = []
    for (model, dataset, group, track), methods in sorted(cells.items()):
        if track != "oracle":
            continue
        other = cells.get((model, dataset, group, "preferences"), {})
        for a in sorted(methods):
            for b in sorted(other):
                if a.split(" (")[0] == b.split(" (")[0]:
                    out.append({**_compare(model, dataset, group, f"{a} · oracle",
                                           f"{b} · preferences", methods[a], other[b], n_boot, seed),
                                "track": "oracle − preferences"})
    return _decide(out)


def _decide(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each comparison's ``holm_p`` (its t-test's p adjusted by :func:`holm` over the comparisons
    of its (model, dataset, group, track): one family, the reference implementations' checks
    another) and ``significant`` (``holm_p < ALPHA``)."""
    families: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in comparisons:
        families[(c["model"], c["dataset"], c["group"], c["track"], checks_reference(c))].append(c)
    for family in families.values():
        for c, adjusted in zip(family, holm([c["t_p"] for c in family]), strict=True):
            c["holm_p"] = adjusted
            c["significant"] = adjusted is not None and adjusted < ALPHA
    return comparisons


def _gold_list(per_prompt: Any) -> list[float] | None:
    values = per_prompt.get("gold_reward") if isinstance(per_prompt, Mapping) else None
    if not isinstance(values, list) or not values or not all(finite(v) for v in values):
        return None
    return [float(v) for v in values]


def _compare(model: str, dataset: str, group: str, a: str, b: str, ra: Mapping[Any, Mapping[str, Any]],
             rb: Mapping[Any, Mapping[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Methods A and B over their common seeds (their per-prompt gold on the same prompts): the
    seed-level paired t-test (``t_lo``, ``t_hi``, ``t_p``; adjusted over its family it decides
    ``significant``: :func:`_decide`), the seeds where A scores above B (``wins``), P(A > B)
    over the seeds' scores with its stratified bootstrap interval (``poi``, ``poi_lo``,
    ``poi_hi``), the two-level paired bootstrap over seeds and prompts (``ci_lo``, ``ci_hi``,
    ``p``) and the exact sign-flip p."""
    result: dict[str, Any] = {"model": model, "dataset": dataset, "group": group, "a": a, "b": b,
                              "n_seeds": 0, "n_prompts": 0, "seeds": [], "mean_diff": None, "ci_lo": None,
                              "ci_hi": None, "p": None, "sign_flip_p": None, "t_lo": None, "t_hi": None,
                              "t_p": None, "holm_p": None, "wins": None, "poi": None, "poi_lo": None,
                              "poi_hi": None, "significant": False, "skipped": None}
    common = sorted(set(ra) & set(rb), key=lambda s: (s is None, str(s)))
    if not common:
        result["skipped"] = "no seed in common"
        return result
    rows_a, rows_b, seeds, reasons = [], [], [], []
    for s in common:
        pa, pb = ra[s].get("per_prompt"), rb[s].get("per_prompt")
        ga, gb = _gold_list(pa), _gold_list(pb)
        if ga is None or gb is None:
            reasons.append(f"seed {s}: no per-prompt gold rewards")
        elif pa.get("prompts_sha256") != pb.get("prompts_sha256") or len(ga) != len(gb):
            reasons.append(f"seed {s}: different held-out prompts (prompts_sha256)")
        elif rows_a and len(ga) != len(rows_a[0]):
            reasons.append(f"seed {s}: {len(ga)} prompts, not {len(rows_a[0])}")
        else:
            rows_a.append(ga)
            rows_b.append(gb)
            seeds.append(s)
    if not seeds:
        result["skipped"] = "; ".join(dict.fromkeys(r.split(": ", 1)[1] for r in reasons))
        return result
    res = paired_bootstrap(rows_a, rows_b, n_boot=n_boot, seed=seed)
    score_a, score_b = [sum(g) / len(g) for g in rows_a], [sum(g) / len(g) for g in rows_b]
    diffs = [x - y for x, y in zip(score_a, score_b, strict=True)]
    t = paired_t_test(diffs)
    poi_lo, poi_hi = stratified_bootstrap_interval([score_a, score_b], probability_of_improvement,
                                                   n_boot=min(n_boot, SEED_BOOT), seed=seed)
    result.update(n_seeds=res.n_seeds, n_prompts=res.n_prompts, seeds=seeds, mean_diff=res.mean_diff,
                  ci_lo=res.ci_lo, ci_hi=res.ci_hi, p=res.p_value, sign_flip_p=res.sign_flip_p,
                  t_lo=t.ci_lo, t_hi=t.ci_hi, t_p=t.p_value, wins=sum(d > 0 for d in diffs),
                  poi=probability_of_improvement(score_a, score_b), poi_lo=poi_lo, poi_hi=poi_hi,
                  skipped="; ".join(reasons) or None)
    return result
