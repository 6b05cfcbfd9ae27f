"""The leaderboard's figures (matplotlib, Agg, no pyplot state): a pure function of run records.

* :func:`plot_reward_kl` — the reward–KL frontier: per (model, dataset, track) a panel; per method
  a line over its KL-coefficient values (β), each point the mean over seeds of
  ``eval/gold_reward`` against ``eval/kl`` with Student-t 95 % error bars; test split only; the
  SFT reference as a dashed line.
* :func:`plot_training_curves` — per (model, dataset) a row of three panels: held-out gold reward
  (history ``eval/gold_reward``) against trained tokens, sequence-level ``train/kl``, and the
  reward model's scores (``train/reward`` of runs whose ``reward_source`` is ``"rm"``) on an axis
  of their own — never on one axis with gold rewards.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.evaluation.records import finite, track_of
from harness.evaluation.stats import distinct_seeds, kl_coefficient, learning_rate, summarize
from harness.util.atomic import write_bytes

__all__ = ["EMA_ALPHA", "ema", "ema_alpha", "history_points", "plot_reward_kl", "plot_training_curves"]

EMA_ALPHA = 0.3


def ema_alpha(n: int) -> float:
    """The smoothing of a curve of ``n`` points: α = clip(5/n, 0.1, 0.6), so a 200-step curve is
    averaged over ~20 steps and a 10-point held-out curve barely lags."""
    return min(0.6, max(0.1, 5.0 / max(n, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Any, list[list[Any]]]:
    """A pyplot-free Agg figure (no global backend state: safe in libraries and threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [list(r) for r in axes]


def save_png(fig: Any, path: Path | str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes(path, buf.getvalue())


def method_style(methods: Iterable[str]) -> dict[str, tuple[Any, str]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: (cmap(i % 10), _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(sorted(set(methods)))}


def note_on(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666", wrap=True)


def _panels(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The ok records by (model, dataset), sorted."""
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        if rec.get("status") == "ok":
            out[(str(rec.get("model")), str(rec.get("dataset")))].append(rec)
    return dict(sorted(out.items()))


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


# --------------------------------------------------------------------------- reward–KL
def robust_limit(values: Sequence[float], factor: float = 3.0) -> float:
    """The axis end that one outlier cannot stretch: the largest value not beyond ``factor`` times
    the median (a β = 0 run at KL 20 beside the rest below 3 would squash them all at the left)."""
    vals = sorted(v for v in values if finite(v))
    if not vals:
        return 1.0
    median = vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])
    kept = [v for v in vals if v <= factor * max(median, 1e-9)]
    return max(kept) if kept else vals[-1]


def plot_reward_kl(records: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """The reward–KL frontier as in the DPO paper's Figure 2: one panel per (model, dataset,
    track) — methods that learn from different information never share one — and per method one
    line over its KL coefficients β (``config.method.beta``; ``kl_coef`` in older PPO records),
    one per learning rate where it ran several:
    at each β the mean over distinct seeds of (``eval/kl``, ``eval/gold_reward``) with Student-t
    95 % error bars, joined in order of KL. Test split only (records that do not say their split
    count as test: they predate the validation split). Methods are named in the legend (with
    their β range), never on the points. The KL axis ends where one outlier cannot stretch it
    (:func:`robust_limit`); a point beyond is drawn at the edge as a ▶ and its KL given in the
    legend. The SFT reference is a dashed line, the task's ceiling a dotted one."""
    panels: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for (model, dataset), recs in _panels(records).items():
        for r in recs:
            m = r.get("metrics") or {}
            if split_of(r) != "validation" and finite(m.get("eval/kl")) and finite(m.get("eval/gold_reward")):
                panels.setdefault((model, dataset, track_of(r) or "no track"), []).append(r)
    panels = dict(sorted(panels.items()))
    n = max(1, len(panels))
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(4.8 * ncols + 0.4, 4.4 * nrows, nrows, ncols)
    flat = [ax for row in axes for ax in row]
    if not panels:
        flat[0].set_title("Reward–KL frontier")
        note_on(flat[0], "no ok runs with eval/kl and eval/gold_reward on the test split")
        return save_png(fig, path)
    style = method_style(str(r.get("method")) for recs in panels.values() for r in recs)
    for ax, ((model, dataset, track), recs) in zip(flat, panels.items(), strict=False):
        ax.set_title(f"{model} · {dataset} · {track} track", fontsize="medium")
        ax.set_xlabel("KL(policy ‖ SFT) per sequence, nats  [eval/kl]")
        ax.set_ylabel("held-out gold reward  [eval/gold_reward]")
        curves = {}  # per method, and per learning rate where the records hold several
        for method in sorted({str(r.get("method")) for r in recs}):
            mrecs = [r for r in recs if str(r.get("method")) == method]
            lrs = sorted({learning_rate(r) for r in mrecs}, key=lambda x: (x is None, x or 0.0))
            for lr in lrs:
                name = method if len(lrs) == 1 else f"{method} lr={_fmt(lr)}"
                curves[(method, name)] = _frontier_points([r for r in mrecs if learning_rate(r) == lr])
        right = 1.05 * robust_limit([p["kl"] for c in curves.values() for p in c])
        span_y: list[float] = []
        for (method, name), curve in curves.items():
            color, marker = style[method]
            betas = sorted(p["beta"] for p in curve if p["beta"] is not None)
            label = name + (f" (β {_fmt(betas[0])})" if len(betas) == 1 else
                              f" (β {_fmt(betas[0])}–{_fmt(betas[-1])})" if betas else "")
            inside = [p for p in curve if p["kl"] <= right]
            beyond = [p for p in curve if p["kl"] > right]
            if beyond:
                label += "; beyond the axis: KL " + ", ".join(f"{p['kl']:.1f}" for p in beyond)
            xs = [min(p["kl"], right) for p in curve]
            ys = [p["gold"] for p in curve]
            span_y += ys
            ax.plot(xs, ys, color=color, linewidth=1.4, label=label)
            ax.errorbar([p["kl"] for p in inside], [p["gold"] for p in inside],
                        xerr=[p["kl_err"] for p in inside], yerr=[p["gold_err"] for p in inside],
                        color=color, marker=marker, markersize=5, linestyle="none", capsize=2,
                        elinewidth=0.8)
            if beyond:
                ax.plot([right] * len(beyond), [p["gold"] for p in beyond], color=color,
                        marker=">", markersize=7, linestyle="none")
        refs = [float(r["metrics"]["eval/ref_gold_reward"]) for r in distinct_seeds(
            [r for r in recs if finite((r.get("metrics") or {}).get("eval/ref_gold_reward"))])[0]]
        if refs:
            span_y.append(sum(refs) / len(refs))
            ax.axhline(sum(refs) / len(refs), color="grey", linewidth=1, linestyle="--",
                       label=f"SFT reference ({len(refs)} seeds)")
        caps = [float(r["metrics"]["eval/gold_max"]) for r in recs
                if finite((r.get("metrics") or {}).get("eval/gold_max"))]
        if caps:
            span_y.append(max(caps))
            ax.axhline(max(caps), color="black", linestyle=":", linewidth=0.8, label="ceiling (eval/gold_max)")
        _fit_axes(ax, [0.0, right], span_y)
        ax.set_xlim(0.0, right * 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="x-small", frameon=False)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    return save_png(fig, path)


def _fit_axes(ax: Any, xs: Sequence[float], ys: Sequence[float], pad: float = 0.08) -> None:
    """Axis limits that span the points and reference lines, not the error bars: with two or three
    seeds a Student-t interval is wide (t(0.975, 1) = 12.7) and would squash the points together;
    bars reaching beyond are cut at the panel's edge."""
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        vals = [v for v in values if finite(v)]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        margin = pad * (hi - lo) if hi > lo else max(0.05, 0.05 * abs(hi))
        setter(lo - margin, hi + margin)


def split_of(record: Mapping[str, Any]) -> str:
    """The held-out split a record's gold reward was measured on (``per_prompt.split``)."""
    per_prompt = record.get("per_prompt")
    split = per_prompt.get("split") if isinstance(per_prompt, Mapping) else None
    return str(split) if split else "split not recorded"


def _frontier_points(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per β: mean gold and KL over distinct seeds with their CI half-widths, sorted by KL."""
    by_beta: dict[float | None, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_beta[kl_coefficient(r)].append(r)
    points = []
    for beta, recs in by_beta.items():
        kept = distinct_seeds(recs)[0]
        gold = summarize([float(r["metrics"]["eval/gold_reward"]) for r in kept])
        kl = summarize([float(r["metrics"]["eval/kl"]) for r in kept])
        points.append({"beta": beta, "n": gold["n"], "gold": gold["mean"], "kl": kl["mean"],
                       "gold_err": gold["half"] or 0.0, "kl_err": kl["half"] or 0.0})
    return sorted(points, key=lambda p: (p["kl"], p["gold"]))


# --------------------------------------------------------------------------- training curves
def history_points(rec: Mapping[str, Any], key: str) -> list[tuple[float, ...]]:
    """A history key's points as tuples of floats — ``(step, value)`` or, for
    ``eval/gold_reward``, ``(step, value, trained_tokens, wall_s)`` — malformed ones dropped,
    sorted by step."""
    out = []
    for point in (rec.get("history") or {}).get(key) or []:
        if isinstance(point, list | tuple) and len(point) >= 2 and all(finite(x) for x in point):
            out.append(tuple(float(x) for x in point))
    return sorted(out)


def ema(values: Sequence[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Exponential moving average s_0 = x_0, s_t = α·x_t + (1 − α)·s_{t−1}."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def _mean_curve(runs: Sequence[Sequence[tuple[float, ...]]], use_tokens: bool) -> tuple[list[float], list[float]]:
    """Mean over seeds at each step; x is the step or the mean trained tokens at that step."""
    per_step: dict[float, list[tuple[float, ...]]] = defaultdict(list)
    for series in runs:
        for point in series:
            per_step[point[0]].append(point)
    xs, ys = [], []
    for step in sorted(per_step):
        pts = per_step[step]
        xs.append(sum(p[2] for p in pts) / len(pts) if use_tokens else step)
        ys.append(sum(p[1] for p in pts) / len(pts))
    return xs, ys


_PANELS = (
    ("eval/gold_reward", "held-out gold reward (history eval/gold_reward)", None),
    ("train/kl", "KL to the SFT reference per sequence (train/kl)", None),
    ("train/reward", "reward-model score (train/reward, reward_source = rm)", "rm"),
)


def plot_training_curves(records: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Per (model, dataset) a row of three panels, one colour per method, the mean over distinct
    seeds drawn faint and its EMA (:func:`ema`, α = :func:`ema_alpha` of the curve's length) solid:

    1. held-out gold reward (history ``eval/gold_reward``, measured every K steps on a fixed
       prompt subset) against trained tokens (against steps when a record lacks the token count);
    2. sequence-level ``train/kl`` against steps;
    3. the reward model's scores, ``train/reward`` of the records whose ``reward_source`` is
       ``"rm"`` (a different scale from gold rewards, so a panel of its own).

    A method with several KL coefficients in a panel gets one curve per β. Panels without history
    say so instead of failing.
    """
    panels = _panels(records)
    nrows = max(1, len(panels))
    fig, axes = new_figure(15, 3.6 * nrows, nrows, 3)
    if not panels:
        for ax, (key, title, _) in zip(axes[0], _PANELS, strict=True):
            ax.set_title(title, fontsize="small")
            note_on(ax, f"no {key} history in the run records")
        return save_png(fig, path)
    style = method_style(str(r.get("method")) for recs in panels.values() for r in recs)
    for row_axes, ((model, dataset), recs) in zip(axes, panels.items(), strict=True):
        by_series: dict[tuple[str, float | None], list[Mapping[str, Any]]] = defaultdict(list)
        for r in recs:
            by_series[(str(r.get("method")), kl_coefficient(r))].append(r)
        betas_per_method: dict[str, int] = defaultdict(int)
        for method, _ in by_series:
            betas_per_method[method] += 1
        for ax, (key, title, source) in zip(row_axes, _PANELS, strict=True):
            ax.set_title(f"{model} · {dataset}: {title}", fontsize="small")
            curves = {}
            for (method, beta), srecs in sorted(by_series.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
                kept = [r for r in distinct_seeds(srecs)[0]
                        if source is None or r.get("reward_source") == source]
                runs = [s for s in (history_points(r, key) for r in kept) if s]
                if runs:
                    label = method if betas_per_method[method] == 1 else f"{method} β={_fmt(beta)}"
                    curves[(method, label)] = runs
            use_tokens = key == "eval/gold_reward" and bool(curves) and all(
                len(p) >= 3 for runs in curves.values() for s in runs for p in s)
            ax.set_xlabel("trained tokens" if use_tokens else "step")
            if not curves:
                note_on(ax, f"no {key} history" + (f" with reward_source={source}" if source else ""))
                continue
            for (method, label), runs in curves.items():
                color, _ = style[method]
                xs, ys = _mean_curve(runs, use_tokens)
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, ema(ys, ema_alpha(len(ys))), color=color, linewidth=1.8,
                        label=f"{label} ({len(runs)} seeds)")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="x-small")
    return save_png(fig, path)
