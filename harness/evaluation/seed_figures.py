"""Figures of what seeds and reward models do: one dot per seed (a reader sees when a method is
bimodal, which a mean and an interval hide), and reward over-optimisation (Gao et al. 2022): the
held-out gold reward of the runs trained on the reward model against √KL, with the fitted RL form
and where it peaks. Pure functions of run records (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.evaluation.overoptimisation import GaoFit, fit_gao
from harness.evaluation.plots import history_points, method_style, new_figure, note_on, save_png, split_of
from harness.evaluation.records import finite, track_of
from harness.evaluation.stats import distinct_seeds, iqm

__all__ = ["overoptimisation_points", "plot_overoptimisation", "plot_seed_strips"]


def _ok(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and split_of(r) != "validation"
            and finite((r.get("metrics") or {}).get("eval/gold_reward"))]


def plot_seed_strips(records: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """One panel per (model, dataset, track), one column per method: every seed's held-out gold
    reward as a dot (one record per seed, the latest; test split), the methods' IQM as a bar, the
    SFT reference as a dashed line. With a 0/1 gold reward a seed's score is the share of the
    held-out prompts it answers right."""
    panels: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in _ok(records):
        if track_of(r):  # an aligning method (the SFT base and the reward model are on no track)
            panels.setdefault((str(r.get("model")), str(r.get("dataset")), track_of(r)), []).append(r)
    panels = dict(sorted(panels.items()))
    n = max(1, len(panels))
    ncols = min(n, 3)
    fig, axes = new_figure(4.6 * ncols + 0.4, 3.6 * math.ceil(n / ncols), math.ceil(n / ncols), ncols)
    flat = [ax for row in axes for ax in row]
    if not panels:
        flat[0].set_title("Seeds")
        note_on(flat[0], "no ok runs with eval/gold_reward on the test split")
        return save_png(fig, path)
    style = method_style(str(r.get("method")) for recs in panels.values() for r in recs)
    for ax, ((model, dataset, track), recs) in zip(flat, panels.items(), strict=False):
        methods = sorted({str(r.get("method")) for r in recs})
        refs = []
        for i, method in enumerate(methods):
            kept = [r for r in distinct_seeds([r for r in recs if str(r.get("method")) == method])[0]
                    if r.get("status") == "ok"]
            golds = [float(r["metrics"]["eval/gold_reward"]) for r in kept]
            refs += [float(r["metrics"]["eval/ref_gold_reward"]) for r in kept
                     if finite(r["metrics"].get("eval/ref_gold_reward"))]
            color, marker = style[method]
            jitter = [(k - (len(golds) - 1) / 2) * 0.05 for k in range(len(golds))]
            ax.scatter([i + j for j in jitter], golds, color=color, marker=marker, s=28, zorder=3,
                       edgecolors="white", linewidths=0.5)
            if golds:
                ax.hlines(iqm(golds), i - 0.3, i + 0.3, color=color, linewidth=2.2, zorder=2)
            ax.text(i, -0.06, f"{len(golds)} seeds", ha="center", va="top", fontsize="x-small",
                    color="#555", transform=ax.get_xaxis_transform())
        if refs:
            ax.axhline(sum(refs) / len(refs), color="grey", linestyle="--", linewidth=1,
                       label="SFT reference")
            ax.legend(loc="lower right", fontsize="x-small")
        ax.set_xticks(range(len(methods)), methods, fontsize="small")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"{model} · {dataset} · {track} track", fontsize="medium")
        ax.set_ylabel("held-out gold per seed (dot); IQM (bar)", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    return save_png(fig, path)


def overoptimisation_points(record: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(KL, gold gain) points of one run trained on the reward model: at its end (``eval/kl``,
    ``eval/gold_reward − eval/ref_gold_reward``), and over training where its history has the
    held-out gold curve and ``train/kl`` (the gain over the curve's first point, at the KL of the
    nearest logged step)."""
    m = record.get("metrics") or {}
    out = []
    if finite(m.get("eval/kl")) and finite(m.get("eval/gold_reward")) and finite(m.get("eval/ref_gold_reward")):
        out.append((float(m["eval/kl"]), float(m["eval/gold_reward"]) - float(m["eval/ref_gold_reward"])))
    curve, kl = history_points(record, "eval/gold_reward"), history_points(record, "train/kl")
    if len(curve) >= 2 and kl:
        start = curve[0][1]
        for point in curve[1:]:
            nearest = min(kl, key=lambda p: abs(p[0] - point[0]))
            out.append((nearest[1], point[1] - start))
    return out


def plot_overoptimisation(records: Iterable[Mapping[str, Any]], path: Path | str
                          ) -> tuple[Path, dict[tuple[str, str, str], GaoFit]]:
    """Per (model, dataset), the runs trained on the reward model (``reward_source=rm``): their
    gold gain against √KL (:func:`overoptimisation_points`, over β and over training), one colour
    per method, with Gao's RL form d(α − β log d) fitted per method (:func:`fit_gao`) and its
    peak marked. Returns the figure's path and the fits by (model, dataset, method)."""
    panels: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("reward_source") == "rm" and split_of(r) != "validation":
            panels.setdefault((str(r.get("model")), str(r.get("dataset"))), []).append(r)
    panels = dict(sorted(panels.items()))
    n = max(1, len(panels))
    fig, axes = new_figure(5.2 * min(n, 3) + 0.4, 4.0 * math.ceil(n / 3), math.ceil(n / 3), min(n, 3))
    flat = [ax for row in axes for ax in row]
    fits: dict[tuple[str, str, str], GaoFit] = {}
    if not panels:
        flat[0].set_title("Reward over-optimisation")
        note_on(flat[0], "no runs trained on the reward model (reward_source=rm)")
        return save_png(fig, path), fits
    style = method_style(str(r.get("method")) for recs in panels.values() for r in recs)
    for ax, ((model, dataset), recs) in zip(flat, panels.items(), strict=False):
        for method in sorted({str(r.get("method")) for r in recs}):
            pts = [p for r in recs if str(r.get("method")) == method for p in overoptimisation_points(r)]
            pts = [(k, g) for k, g in pts if k > 0]
            if not pts:
                continue
            color, marker = style[method]
            ax.scatter([math.sqrt(k) for k, _ in pts], [g for _, g in pts], color=color, marker=marker,
                       s=14, alpha=0.6)
            label = method
            try:
                fit = fit_gao([k for k, _ in pts], [g for _, g in pts])
            except ValueError:
                fit = None
            if fit is not None:
                fits[(model, dataset, method)] = fit
                top = max(math.sqrt(k) for k, _ in pts)
                ds = [top * i / 100 for i in range(1, 101)]
                ax.plot(ds, [fit(d) for d in ds], color=color, linewidth=1.4)
                if fit.peak_d is not None and fit.peak_d <= top:
                    ax.plot([fit.peak_d], [fit.peak_gold], marker="*", color=color, markersize=11)
                    label += f": peak {fit.peak_gold:+.3f} at KL {fit.peak_kl:.2f}"
                elif fit.alpha <= 0:
                    label += ": gold falls from the start (α ≤ 0: the reward model misleads at once)"
                else:
                    label += ": gold still rising at the largest KL run (no turn-down yet)"
            ax.plot([], [], color=color, marker=marker, label=label)
        ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{model} · {dataset}: trained on the reward model", fontsize="medium")
        ax.set_xlabel("√KL(policy ‖ SFT), √nats")
        ax.set_ylabel("held-out gold gain over the SFT reference")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="x-small", frameon=False)
        else:
            note_on(ax, "no run here has a KL above 0")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    return save_png(fig, path), fits
