"""The leaderboard: a pure function of the run records in ``results/runs/``.

``build_table`` aggregates the records into one row per (method, model, dataset) — mean and
standard deviation over seeds of every metric — and the renderers turn the rows into Markdown, CSV
and a self-contained HTML page (inline CSS and JS, plots embedded as ``data:`` URIs: the page can
be mailed or opened from disk with no network). ``build_leaderboard`` does it all for a folder::

    python -m harness.leaderboard --runs results/runs --out results

Conventions

* Cells are ``mean ± std`` over the seeds of the *ok* runs; ``std`` uses ``ddof=1`` and is
  ``None`` (shown as a bare mean) for a single seed. A metric missing from some runs is averaged
  over the runs that have it and marked ``(n=k)``.
* Failed runs never enter a mean; they are counted in ``n_failed`` and their errors are listed. A
  row whose runs all failed has status ``"failed"`` and its error.
* ``Average`` is, per run, the mean of the lm-eval task scores — metrics named
  ``eval/<task>/<metric>`` (three ``/``-separated parts) — leaving out perplexity-like metrics
  (names containing ``perplexity`` or ``bits_per_byte``, as on the Open LLM Leaderboard) and
  standard errors (``stderr``); it is then aggregated over seeds like any other metric.
* Rows are sorted by Average (descending), then gold reward (descending); rows without a value
  come after rows with one, all-failed rows last.
* An empty (or missing) runs folder is not an error: every file is still written, with an empty
  table and a note saying that no records were found.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import shlex
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.evaluation.records import (
    atomic_write_bytes,
    atomic_write_text,
    finite,
    is_number,
    load_records,
)

__all__ = [
    "AVERAGE",
    "COST_COLUMNS",
    "HEADLINE_COLUMNS",
    "average_score",
    "build_leaderboard",
    "build_table",
    "columns",
    "is_task_metric",
    "is_task_score",
    "plot_reward_kl",
    "plot_training_curves",
    "render_html",
    "render_markdown",
    "run_metrics",
    "write_csv",
]

AVERAGE = "Average"
HEADLINE_COLUMNS = ("eval/gold_reward", "eval/win_rate", "eval/kl")
COST_COLUMNS = ("cost/wall_s", "cost/peak_mem_mb", "cost/tokens_per_s")
_EXCLUDED_FROM_AVERAGE = ("perplexity", "bits_per_byte", "word_perplexity", "stderr")
_KEY_COLUMNS = ("method", "model", "dataset")
_CURVE_KEYS = ("train/reward", "train/kl")
DEFAULT_TITLE = "Alignment leaderboard: PPO vs GRPO vs DPO"


# --------------------------------------------------------------------------- metric helpers
def is_task_metric(name: str) -> bool:
    """True for an lm-eval task metric ``eval/<task>/<metric>`` (not its ``stderr``)."""
    parts = name.split("/")
    return (len(parts) == 3 and parts[0] == "eval" and all(parts)
            and "stderr" not in parts[2])


def is_task_score(name: str) -> bool:
    """True for a task metric that enters the Average (not perplexity-like, not a stderr)."""
    return is_task_metric(name) and not any(x in name.split("/")[2]
                                            for x in _EXCLUDED_FROM_AVERAGE)


def run_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's numeric ``metrics`` and ``cost`` in one dict; cost names get a ``cost/`` prefix
    when they lack it; ``Average`` is added when the run has task scores."""
    out: dict[str, float] = {}
    for name, value in (record.get("metrics") or {}).items():
        if is_number(value):
            out[str(name)] = float(value)
    for name, value in (record.get("cost") or {}).items():
        if is_number(value):
            key = str(name) if str(name).startswith("cost/") else f"cost/{name}"
            out[key] = float(value)
    avg = average_score(out)
    if avg is not None:
        out[AVERAGE] = avg
    return out


def average_score(metrics: Mapping[str, float]) -> float | None:
    """Mean of the task scores (see :func:`is_task_score`) in ``metrics``; ``None`` if none."""
    scores = [v for k, v in metrics.items() if is_task_score(k) and is_number(v)]
    return sum(scores) / len(scores) if scores else None


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for fewer than two values)."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


# --------------------------------------------------------------------------- the table
def build_table(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate run records into leaderboard rows, one per (method, model, dataset), sorted.

    Each row::

        {"method", "model", "dataset",
         "status": "ok" | "failed",            # "failed" when no run of the row succeeded
         "error": str | None,                  # the distinct errors of its failed runs, "; "-joined
         "n_seeds": int, "n_failed": int,      # ok runs / failed runs
         "seeds": [int, ...], "run_ids": [str, ...], "failed_runs": [{"run_id", "seed", "error"}],
         "metrics": {name: {"mean": float | None, "std": float | None, "n": int}}}

    ``metrics`` holds every metric of the ok runs plus ``Average``, and always the headline and
    cost columns (``mean`` ``None`` when no run reported them).
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[tuple(str(rec.get(k, "?")) for k in _KEY_COLUMNS)].append(rec)  # type: ignore[index]

    rows = []
    for (method, model, dataset), recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        failed = [r for r in recs if r.get("status") != "ok"]
        per_run = [run_metrics(r) for r in ok]
        names = {AVERAGE, *HEADLINE_COLUMNS, *COST_COLUMNS} | {k for m in per_run for k in m}
        metrics = {}
        for name in sorted(names):
            values = [m[name] for m in per_run if name in m]
            mean, std = _mean_std(values)
            metrics[name] = {"mean": mean, "std": std, "n": len(values)}
        errors = list(dict.fromkeys(str(r.get("error") or "unknown error") for r in failed))
        rows.append({
            "method": method,
            "model": model,
            "dataset": dataset,
            "status": "ok" if ok else "failed",
            "error": "; ".join(errors) if errors else None,
            "n_seeds": len(ok),
            "n_failed": len(failed),
            "seeds": sorted(r.get("seed") for r in ok if is_number(r.get("seed"))),
            "run_ids": sorted(str(r.get("run_id")) for r in recs),
            "failed_runs": [{"run_id": r.get("run_id"), "seed": r.get("seed"),
                             "error": r.get("error")} for r in failed],
            "metrics": metrics,
        })
    rows.sort(key=_sort_key)
    return rows


def _sort_key(row: Mapping[str, Any]) -> tuple:
    def desc(name: str) -> tuple[bool, float]:
        mean = row["metrics"].get(name, {}).get("mean")
        ok = mean is not None and not math.isnan(mean)
        return (not ok, -mean if ok else 0.0)

    return (row["status"] == "failed", *desc(AVERAGE), *desc("eval/gold_reward"),
            row["method"], row["model"], row["dataset"])


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metric columns to show: Average, the headline metrics, every task metric, the costs."""
    tasks = sorted({k for r in rows for k in r["metrics"] if is_task_metric(k)})
    return [AVERAGE, *HEADLINE_COLUMNS, *tasks, *COST_COLUMNS]


# --------------------------------------------------------------------------- formatting
def _decimals(x: float) -> int:
    a = abs(x)
    return 3 if a < 10 else 2 if a < 100 else 1 if a < 10_000 else 0


def format_cell(cell: Mapping[str, Any] | None, n_seeds: int) -> str:
    """``"0.600 ± 0.141"``; a bare mean for one value; ``"—"`` when missing; ``(n=k)`` when only
    ``k`` of the ``n_seeds`` runs reported the metric."""
    if not cell or cell.get("mean") is None:
        return "—"
    mean, std, n = cell["mean"], cell.get("std"), cell.get("n", n_seeds)
    if not math.isfinite(mean):
        text = str(mean)
    else:
        d = _decimals(mean)
        text = f"{mean:.{d}f}" if std is None else f"{mean:.{d}f} ± {std:.{d}f}"
    if 0 < n < n_seeds:
        text += f" (n={n})"
    return text


def _seeds_text(row: Mapping[str, Any]) -> str:
    return f"{row['n_seeds']}" + (f" (+{row['n_failed']} failed)" if row["n_failed"] else "")


def _status_text(row: Mapping[str, Any], limit: int | None = 120) -> str:
    if row["status"] == "ok":
        return "ok"
    err = " ".join(str(row.get("error") or "").split())
    if limit is not None and len(err) > limit:
        err = err[: limit - 1] + "…"
    return f"failed: {err}" if err else "failed"


def _md_escape(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(rows: Sequence[Mapping[str, Any]], header_lines: Sequence[str] = (),
                    title: str = DEFAULT_TITLE, plots: Mapping[str, str] | None = None) -> str:
    """The leaderboard as Markdown: a title, ``header_lines`` (one paragraph line each: the
    reproduce command, provenance), a table of ``mean ± std`` cells, the failed runs, then
    ``plots`` (``{caption: relative image path}``) as image links.

    Cells of a row whose runs all failed read ``failed``.
    """
    cols = columns(rows)
    lines = [f"# {title}", ""]
    for line in header_lines:
        lines += [line, ""]
    if not rows:
        lines += ["_No run records found: the table is empty._", ""]
    head = [*_KEY_COLUMNS, *cols, "n_seeds", "status"]
    lines.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
    lines.append("|" + "|".join([":---"] * len(_KEY_COLUMNS) + ["---:"] * (len(cols) + 1)
                                + [":---"]) + "|")
    for row in rows:
        failed = row["status"] == "failed"
        cells = [str(row[k]) for k in _KEY_COLUMNS]
        cells += ["failed" if failed else format_cell(row["metrics"].get(c), row["n_seeds"])
                  for c in cols]
        cells += [_seeds_text(row), _status_text(row)]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines.append("")
    lines.append("Cells: mean ± std over seeds (ddof=1; a bare number is a single seed; (n=k): "
                 "only k runs reported it). Average: mean of the lm-eval task scores "
                 "(`eval/<task>/<metric>`, perplexity-like metrics excluded). Failed runs are "
                 "excluded from every mean and counted in n_seeds as `+k failed`.")
    failures = [(row, f) for row in rows for f in row["failed_runs"]]
    if failures:
        lines += ["", "## Failed runs", ""]
        for row, f in failures:
            err = _md_escape(str(f.get("error") or "unknown error"))
            lines.append(f"- `{f.get('run_id')}` ({row['method']}, {row['model']}, "
                         f"{row['dataset']}, seed {f.get('seed')}): {err}")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{caption}]({target})" for caption, target in plots.items()]
    return "\n".join(lines) + "\n"


def _csv_value(x: Any) -> Any:
    return "" if x is None else x


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write the rows as CSV (atomically): key columns, status, n_seeds, n_failed, then
    ``<metric>_mean`` and ``<metric>_std`` for every column of :func:`columns`, then the error."""
    cols = columns(rows)
    header = [*_KEY_COLUMNS, "status", "n_seeds", "n_failed"]
    for c in cols:
        header += [f"{c}_mean", f"{c}_std"]
    header.append("error")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = [row[k] for k in _KEY_COLUMNS] + [row["status"], row["n_seeds"], row["n_failed"]]
        for c in cols:
            cell = row["metrics"].get(c) or {}
            values += [_csv_value(cell.get("mean")), _csv_value(cell.get("std"))]
        values.append(_csv_value(row.get("error")))
        writer.writerow(values)
    return atomic_write_text(path, buf.getvalue())


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}
code,pre{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px;font-size:.9em}
pre{padding:.6rem;overflow-x:auto;white-space:pre-wrap}
table{border-collapse:collapse;font-size:.85rem;margin:1rem 0}
th,td{border:1px solid #ddd;padding:.3rem .5rem;white-space:nowrap}
th{background:#f0f0f5;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fdecec;color:#a33}
tbody tr:hover td{background:#f7f7ff}
.note{color:#666;font-size:.85rem}
figure{display:inline-block;margin:1rem 1rem 0 0}img{max-width:100%;border:1px solid #eee}
"""

_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, i) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var asc = !th.classList.contains("asc");
    table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(asc ? "asc" : "desc");
    var key = function (r) {
      var c = r.cells[i];
      return c.hasAttribute("data-sort") ? c.getAttribute("data-sort") : c.textContent.trim();
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = Number(x), ny = Number(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def render_html(rows: Sequence[Mapping[str, Any]], plots: Mapping[str, Path | str],
                header_lines: Sequence[str] = (), title: str = DEFAULT_TITLE) -> str:
    """A self-contained HTML page: inline CSS, a sortable table (click a header; inline vanilla
    JS), the PNG ``plots`` (``{caption: path}``; missing files are skipped) as base64 data URIs.
    No external scripts, styles, fonts or images."""
    esc = html.escape
    cols = columns(rows)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>"]
    for line in header_lines:
        out.append(f"<p>{_inline_code(line)}</p>")
    if not rows:
        out.append('<p class="note">No run records found: the table is empty.</p>')
    head = [*_KEY_COLUMNS, *cols, "n_seeds", "status"]
    out.append('<table class="sortable" id="leaderboard"><thead><tr>'
               + "".join(f'<th title="click to sort">{esc(h)}</th>' for h in head)
               + "</tr></thead><tbody>")
    for row in rows:
        failed = row["status"] == "failed"
        tds = [f"<td>{esc(str(row[k]))}</td>" for k in _KEY_COLUMNS]
        for c in cols:
            cell = row["metrics"].get(c) or {}
            mean = cell.get("mean")
            sort = "" if failed or mean is None or not math.isfinite(mean) else repr(mean)
            text = "failed" if failed else format_cell(cell, row["n_seeds"])
            tds.append(f'<td class="num" data-sort="{sort}">{esc(text)}</td>')
        tds.append(f'<td class="num" data-sort="{row["n_seeds"]}">{esc(_seeds_text(row))}</td>')
        full = _status_text(row, limit=None)
        tds.append(f'<td title="{esc(full)}">{esc(_status_text(row))}</td>')
        out.append(f'<tr class="{"failed" if failed else "ok"}">' + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    out.append('<p class="note">Cells: mean ± std over seeds (ddof=1; a bare number is a single '
               "seed; (n=k): only k runs reported it). Average: mean of the lm-eval task scores "
               "(perplexity-like metrics excluded). Failed runs are excluded from every mean. "
               "Click a column header to sort.</p>")
    failures = [(row, f) for row in rows for f in row["failed_runs"]]
    if failures:
        out.append("<h2>Failed runs</h2><ul>")
        for row, f in failures:
            out.append(f"<li><code>{esc(str(f.get('run_id')))}</code> ({esc(row['method'])}, "
                       f"{esc(row['model'])}, {esc(row['dataset'])}, seed "
                       f"{esc(str(f.get('seed')))}): {esc(str(f.get('error') or '?'))}</li>")
        out.append("</ul>")
    figures = []
    for caption, path in plots.items():
        p = Path(path)
        if not p.is_file():
            continue
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    if figures:
        out.append("<h2>Plots</h2>")
        out += figures
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"


def _inline_code(line: str) -> str:
    """Escape a Markdown-ish header line for HTML, turning `code` spans into <code>."""
    parts = line.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


# --------------------------------------------------------------------------- plots
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    """A pyplot-free Agg figure (no global backend state: safe in libraries and threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: Path | str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _style(methods: Iterable[str]) -> dict[str, tuple[Any, str]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: (cmap(i % 10), _MARKERS[i % len(_MARKERS)])
            for i, m in enumerate(sorted(set(methods)))}


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666",
            wrap=True)


def _run_labeller(records: Sequence[Mapping[str, Any]]) -> Any:
    """Label runs by method, or by method, model and dataset when several of those are present."""
    several = len({(r.get("model"), r.get("dataset")) for r in records}) > 1

    def label(rec: Mapping[str, Any]) -> str:
        method = str(rec.get("method"))
        return f"{method} ({rec.get('model')}, {rec.get('dataset')})" if several else method

    return label


def plot_reward_kl(records: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Gold reward (y) against KL to the reference (x), one point per ok run, one colour and
    marker per method (per method, model and dataset when several are present), with the
    reward–KL Pareto frontier over all runs (as in the DPO paper's Figure 2). Runs without both
    metrics are left out; with none, the figure says so."""
    usable = []
    for rec in records:
        m = rec.get("metrics") or {}
        if (rec.get("status") == "ok" and finite(m.get("eval/kl"))
                and finite(m.get("eval/gold_reward"))):
            usable.append(rec)
    label = _run_labeller(usable)
    points = [(label(r), float(r["metrics"]["eval/kl"]), float(r["metrics"]["eval/gold_reward"]))
              for r in usable]
    fig, (ax,) = _new_figure(6.4, 4.6)
    ax.set_xlabel("KL(policy ‖ reference)  [eval/kl]")
    ax.set_ylabel("gold reward  [eval/gold_reward]")
    ax.set_title("Reward–KL frontier")
    if not points:
        _note(ax, "no ok runs with eval/kl and eval/gold_reward")
        return _save(fig, path)
    style = _style(p[0] for p in points)
    for name, (color, marker) in style.items():
        xs = [p[1] for p in points if p[0] == name]
        ys = [p[2] for p in points if p[0] == name]
        ax.scatter(xs, ys, color=color, marker=marker, s=46, alpha=0.85, label=name,
                   edgecolors="black", linewidths=0.4, zorder=3)
    frontier, best = [], -math.inf
    for _, kl, reward in sorted(points, key=lambda p: (p[1], -p[2])):
        if reward > best:
            frontier.append((kl, reward))
            best = reward
    if len(frontier) > 1:
        ax.step([f[0] for f in frontier], [f[1] for f in frontier], where="post", color="grey",
                linestyle="--", linewidth=1, label="frontier", zorder=2)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def _history_series(rec: Mapping[str, Any], key: str) -> list[tuple[float, float]]:
    """``[(step, value), ...]`` of one history key, malformed points dropped."""
    series = (rec.get("history") or {}).get(key) or []
    out = []
    for point in series:
        if (isinstance(point, list | tuple) and len(point) == 2 and finite(point[0])
                and finite(point[1])):
            out.append((float(point[0]), float(point[1])))
    return sorted(out)


def plot_training_curves(records: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Training curves of ``train/reward`` and ``train/kl`` (two panels) from each ok record's
    ``history``: a thin line per run and a thick line for the mean over seeds at each step, one
    colour per method (per method, model and dataset when several are present). A panel with no
    history says so instead of failing."""
    records = [r for r in records if r.get("status") == "ok"]
    label = _run_labeller(records)
    style = _style(label(r) for r in records)
    fig, axes = _new_figure(11, 4.2, ncols=2)
    for ax, key in zip(axes, _CURVE_KEYS, strict=True):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(key.split("/", 1)[1])
        by_label: dict[str, list[list[tuple[float, float]]]] = defaultdict(list)
        for rec in records:
            series = _history_series(rec, key)
            if series:
                by_label[label(rec)].append(series)
        if not by_label:
            _note(ax, f"no {key} history in the run records")
            continue
        for name, runs in sorted(by_label.items()):
            color, _ = style[name]
            if len(runs) > 1:
                for series in runs:
                    ax.plot(*zip(*series, strict=True), color=color, alpha=0.25, linewidth=0.8)
            per_step: dict[float, list[float]] = defaultdict(list)
            for series in runs:
                for step, value in series:
                    per_step[step].append(value)
            steps = sorted(per_step)
            means = [sum(per_step[s]) / len(per_step[s]) for s in steps]
            ax.plot(steps, means, color=color, linewidth=2,
                    label=f"{name} (mean of {len(runs)})" if len(runs) > 1 else name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


# --------------------------------------------------------------------------- everything at once
def reproduce_command(records: Sequence[Mapping[str, Any]]) -> str | None:
    """A Hydra multirun command covering the records' methods, models, datasets and seeds."""
    if not records:
        return None
    parts = ["python", "-m", "harness", "-m"]
    for key in ("method", "model", "dataset", "seed"):
        values = sorted({str(r.get(key)) for r in records if r.get(key) is not None},
                        key=lambda v: (len(v), v) if key == "seed" else (0, v))
        if values:
            parts.append(f"{key}={','.join(values)}")
    return " ".join(shlex.quote(p) for p in parts)


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies inside it (portable headers)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def build_leaderboard(runs_dir: Path | str, out_dir: Path | str,
                      command: str | None = None) -> dict[str, Path]:
    """Read the records in ``runs_dir`` and write, atomically, into ``out_dir``:
    ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html``, ``reward_kl.png`` and
    ``training_curves.png``. Returns ``{"markdown", "csv", "html", "reward_kl",
    "training_curves"}`` → path.

    ``command`` is the command that reproduces the runs (shown in the header); by default a
    multirun command is derived from the records. An empty or missing ``runs_dir`` is not an
    error: all files are written with an empty table and a note.
    """
    runs_dir, out_dir = _shown(Path(runs_dir)), _shown(Path(out_dir))
    records = load_records(runs_dir)
    rows = build_table(records)

    command = command or reproduce_command(records)
    n_failed = sum(r.get("status") != "ok" for r in records)
    versions = sorted({str(r.get("harness_version")) for r in records if r.get("harness_version")})
    commits = sorted({str(r.get("git_commit"))[:12] for r in records if r.get("git_commit")})
    rebuild = f"python -m harness.leaderboard --runs {shlex.quote(str(runs_dir))} " \
              f"--out {shlex.quote(str(out_dir))}"
    header = []
    if command:
        header.append(f"Reproduce the runs: `{command}`")
    header.append(f"Rebuild this leaderboard: `{rebuild}`")
    if records:
        prov = f"{len(records)} run records ({n_failed} failed) from `{runs_dir}`"
        if versions:
            prov += f"; harness {', '.join(versions)}"
        if commits:
            prov += f"; commits {', '.join(commits)}"
        header.append(prov + ".")
    else:
        header.append(f"No run records found in `{runs_dir}`.")

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "reward_kl": plot_reward_kl(records, out_dir / "reward_kl.png"),
        "training_curves": plot_training_curves(records, out_dir / "training_curves.png"),
    }
    plots = {"Gold reward vs KL to the reference": paths["reward_kl"],
             "Training curves (train/reward, train/kl)": paths["training_curves"]}
    paths["markdown"] = atomic_write_text(
        out_dir / "leaderboard.md",
        render_markdown(rows, header, plots={c: p.name for c, p in plots.items()}))
    paths["csv"] = write_csv(rows, out_dir / "leaderboard.csv")
    paths["html"] = atomic_write_text(out_dir / "leaderboard.html",
                                      render_html(rows, plots, header))
    return paths
