"""Tuning's choices as pure functions of run records: the grid a record belongs to, the winning
(KL coefficient, learning rate) per (method, model, dataset, track), where a winner sits on its
grid's edge, and a record set restricted to the winners (what a board of tuned runs shows).
The command line is :mod:`harness.tuning`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from harness.evaluation.records import config_hash, track_of
from harness.evaluation.stats import distinct_seeds, kl_coefficient, learning_rate


def grid_family(record: Mapping[str, Any]) -> str:
    """The hash (:func:`~harness.evaluation.records.config_hash`) of a record's config without
    what a tuning grid varies: ``seed`` (and ``dataset.seed`` where it follows it), ``method.beta``
    (``kl_coef`` in older PPO records) and ``method.optim.lr``. Two records of one grid have one
    family."""
    config = dict(record.get("config") or {})
    seed = config.pop("seed", None)
    dataset = config.get("dataset")
    if isinstance(dataset, Mapping) and dataset.get("seed") == seed:
        config["dataset"] = {k: v for k, v in dataset.items() if k != "seed"}
    method = {k: v for k, v in dict(config.get("method") or {}).items()
              if k not in ("beta", "kl_coef")}
    optim = method.get("optim")
    if isinstance(optim, Mapping):
        method["optim"] = {k: v for k, v in optim.items() if k != "lr"}
    config["method"] = method
    return config_hash(config)


def grid_edges(kl: float | None, lr: float | None, kls: Iterable[float | None],
               lrs: Iterable[float | None]) -> list[str]:
    """Where the cell (``kl``, ``lr``) sits on the edge of a grid whose cells have the KL
    coefficients ``kls`` and learning rates ``lrs``: ``["largest β", "smallest lr"]`` and the like,
    ``[]`` for an interior cell. An axis with one value has no edge to extend, and a KL coefficient
    of 0 is the axis' floor, not an edge (a negative one means nothing)."""
    out = []
    for name, value, values in (("β", kl, kls), ("lr", lr, lrs)):
        present = sorted({v for v in values if v is not None})
        if value is None or len(present) < 2:
            continue
        if value == present[-1]:
            out.append(f"largest {name}")
        elif value == present[0] and not (name == "β" and value == 0):
            out.append(f"smallest {name}")
    return out


def best_settings(records: Iterable[Mapping[str, Any]], group: str = "tune"
                  ) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """``{(method, model, dataset, track): {"kl", "lr", "gold", "n_seeds", "overrides",
    "left_out", "edges"}}``; the track is the records' (:func:`~harness.evaluation.records.track_of`;
    ``""`` for a record on none), and the overrides name it (``track=oracle``) when there is one.
    Per (method, model, dataset, track) only the grid of the newest record counts
    (:func:`grid_family`); ``left_out`` counts the records of older grids; ``edges`` says where the
    winner sits on its grid's edge (:func:`grid_edges`; ``[]`` inside it)."""
    runs: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        pp = rec.get("per_prompt") or {}
        if rec.get("group") != group or rec.get("status") != "ok" or pp.get("split") != "validation":
            continue
        runs[(rec["method"], rec["model"], rec["dataset"], track_of(rec))].append(rec)
    cells: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    grid_cells: dict[tuple, set[tuple[float | None, float | None]]] = defaultdict(set)
    left_out: dict[tuple, int] = {}
    for key, recs in runs.items():
        newest = max(recs, key=lambda r: (str(r.get("created", "")), str(r.get("run_id", ""))))
        family = grid_family(newest)
        grid = [r for r in recs if grid_family(r) == family]
        left_out[key] = len(recs) - len(grid)
        for rec in grid:
            kl, lr = kl_coefficient(rec), learning_rate(rec)
            cells[(*key, kl, lr)].append(rec)
            grid_cells[key].add((kl, lr))
    best: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for (method, model, dataset, track, kl, lr), recs in cells.items():
        kept, _ = distinct_seeds(recs)
        golds = [r["metrics"]["eval/gold_reward"] for r in kept if "eval/gold_reward" in r["metrics"]]
        if not golds:
            continue
        gold = sum(golds) / len(golds)
        cur = best.get((method, model, dataset, track))
        if cur is None or (gold, -(kl or 0.0)) > (cur["gold"], -(cur["kl"] or 0.0)):
            on = f" track={track}" if track else ""
            best[(method, model, dataset, track)] = {
                "kl": kl, "lr": lr, "gold": gold, "n_seeds": len(golds),
                "left_out": left_out[(method, model, dataset, track)],
                "overrides": f"method={method}{on} method.beta={kl} method.optim.lr={lr}"}
    for key, b in best.items():
        grid = grid_cells[key]
        b["edges"] = grid_edges(b["kl"], b["lr"], [kl for kl, _ in grid], [lr for _, lr in grid])
    return best


def _same(a: float | None, b: float | None) -> bool:
    return a == b if a is None or b is None else math.isclose(a, b, rel_tol=1e-9)


def at_tuned_settings(records: Sequence[Mapping[str, Any]], tuning: Iterable[Mapping[str, Any]],
                      group: str = "tune") -> tuple[list[Mapping[str, Any]], int]:
    """``records`` without those of a superseded tuning: a record whose (method, model, dataset,
    track) has a tuned setting in ``tuning``'s group ``group`` (:func:`best_settings`) is kept only
    at that (KL coefficient, learning rate); records of a method never tuned there (the SFT base,
    the reward model) are kept. Returns the kept records and how many were left out. What a
    board of tuned runs needs when a grid extension moves a winner: the runs at the old winner stay
    on disk (records are never replaced) but no longer count."""
    return keep_tuned(records, best_settings(tuning, group))


def keep_tuned(records: Sequence[Mapping[str, Any]],
               best: Mapping[tuple[str, str, str, str], Mapping[str, Any]]
               ) -> tuple[list[Mapping[str, Any]], int]:
    """:func:`at_tuned_settings` with the winners ``best`` (:func:`best_settings`) already picked,
    for a caller that filters several record sets by one tuning."""
    kept: list[Mapping[str, Any]] = []
    for rec in records:
        b = best.get((rec.get("method"), rec.get("model"), rec.get("dataset"), track_of(rec)))
        if b is None or (_same(kl_coefficient(rec), b["kl"]) and _same(learning_rate(rec), b["lr"])):
            kept.append(rec)
    return kept, len(records) - len(kept)
