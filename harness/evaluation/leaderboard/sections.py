"""The leaderboard page as one list of sections, which every renderer (Markdown, HTML) draws from:
the header and warnings, the main table and its footer, the failed runs, the paired differences
within a track, the information effect across tracks, the cost and budget table, the plots.
A section holds text, tables of cells and images; how each renderer shows them is its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.evaluation.leaderboard.columns import COST_TABLE, KEY_COLUMNS, TRACK_NOTE, Column, shown_columns
from harness.evaluation.leaderboard.comparisons import INFORMATION_NOTE
from harness.evaluation.leaderboard.diagnostics import comparison_warnings
from harness.evaluation.leaderboard.table import SEED_BOOT, default_title, mean_of
from harness.evaluation.stats import round_to_ci


@dataclass
class Cell:
    """A table cell: its ``text``; for the HTML page a ``sort`` key (``data-sort``), a ``tip``
    (``title``) and a ``kind``: ``text``, ``num`` (right-aligned) or ``wrap`` (may wrap)."""

    text: str
    kind: str = "text"
    sort: str | None = None
    tip: str | None = None


@dataclass
class Table:
    """``head`` labels with their ``tips``, ``rows`` of cells with a CSS class each (``failed``,
    ``first``: a new model or dataset, ``sig``: a significant difference), the Markdown column
    alignment, the HTML table's class, and a ``caption`` (bold part, note part) above it."""

    head: list[str]
    tips: list[str]
    rows: list[list[Cell]]
    row_classes: list[str]
    align: list[str]
    css: str = ""
    caption: tuple[str, str] | None = None


@dataclass
class Section:
    """A part of the page: a ``title`` (none: the top), ``paragraphs`` (with `code` spans), a
    ``warnings`` box, a ``note`` (small print), ``tables``, ``bullets`` (a footer or a list),
    ``images`` ({caption: path}) and whether its tables sort on a click (``sortable``)."""

    title: str | None = None
    paragraphs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    note: str | None = None
    tables: list[Table] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    images: dict[str, Any] = field(default_factory=dict)
    sortable: bool = False


PAIRED_TIPS = ("A is the method with the higher mean gold", "mean over seeds and prompts of gold_A − gold_B",
               "Student-t 95% interval of the per-seed differences (the seeds are the replicates)",
               "two-sided paired t-test over seeds; ✓ p < 0.05 (what decides a difference)",
               "probability that a seed of A scores above a seed of B, ties half, with its stratified "
               "bootstrap 95% interval",
               "95% percentile interval of the two-level paired bootstrap (seeds, then prompts)",
               "two-sided p of the two-level bootstrap",
               "exact sign-flip test over per-seed mean differences",
               "seeds both methods ran on the same prompts", "held-out prompts per seed",
               "why seeds were left out")
KEY_TIPS = {"method": "the alignment method", "model": "the policy model", "dataset": "the task",
            "track": TRACK_NOTE}


# --------------------------------------------------------------------------- formatting
def format_cell(cell: Mapping[str, Any] | None, n_seeds: int) -> str:
    """``"0.600 ± 0.035"`` (mean ± 95 % half-width, rounded by
    :func:`harness.evaluation.stats.round_to_ci`); a bare mean for one value; ``"—"`` when
    missing; ``(n=k)`` when only ``k`` of the ``n_seeds`` seeds reported the metric."""
    if not cell or cell.get("mean") is None:
        return "—"
    mean, n = cell["mean"], cell.get("n", n_seeds)
    m, h = round_to_ci(mean, cell.get("half"))
    text = m if h is None else f"{m} ± {h}"
    if 0 < n < n_seeds:
        text += f" (n={n})"
    return text


def format_iqm(cell: Mapping[str, Any] | None) -> str:
    """``"0.850 [0.676, 0.966]"``: the IQM and its bootstrap interval; a bare IQM for one seed."""
    if not cell or cell.get("iqm") is None:
        return "—"
    if cell.get("n", 0) < 2:
        return f"{cell['iqm']:.3f}"
    return f"{cell['iqm']:.3f} [{cell['iqm_lo']:.3f}, {cell['iqm_hi']:.3f}]"


def _num(x: float) -> str:
    return f"{x:g}"


def _setting(values: Sequence[float]) -> str:
    return "—" if not values else ", ".join(_num(v) for v in values)


def _seeds_text(row: Mapping[str, Any]) -> str:
    text = f"{row['n_seeds']}"
    if row["n_failed"]:
        text += f" (+{row['n_failed']} failed)"
    if row.get("n_duplicates"):
        text += f" ‡{row['n_duplicates']} dup"
    return text


def _status_text(row: Mapping[str, Any], limit: int | None = 120) -> str:
    if row["status"] == "ok":
        return "ok"
    err = " ".join(str(row.get("error") or "").split())
    if limit is not None and len(err) > limit:
        err = err[: limit - 1] + "…"
    return f"failed: {err}" if err else "failed"


def _cached_text(row: Mapping[str, Any], stage: str) -> str:
    """``"cached"`` when every seed loaded the stage from the cache, ``"cached k/n"`` for some."""
    cell = row["metrics"].get(f"cost/{stage}/cached") or {}
    if not cell.get("n") or cell.get("mean") is None:
        return ""
    k = round(cell["mean"] * cell["n"])
    return "" if k == 0 else "cached" if k == cell["n"] else f"cached {k}/{cell['n']}"


def _cost_cells(row: Mapping[str, Any]) -> list[str]:
    cells = []
    for col in COST_TABLE:
        text = format_cell(row["metrics"].get(col.key), row["n_seeds"]).replace(" ± 0 ", " ").removesuffix(" ± 0")
        stage = col.key.split("/")[1] if col.key.count("/") == 2 else None
        if stage in ("sft", "rm") and (c := _cached_text(row, stage)):
            text += f" ({c})"
        cells.append(text)
    return cells


def _bound(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _p_text(p: float | None) -> str:
    """Three significant digits below 0.1 (so 0.0498 never reads as "0.050"), else two decimals."""
    return "—" if p is None else f"{p:.3g}" if p < 0.1 else f"{p:.2f}"


def _interval(lo: float | None, hi: float | None, digits: int = 3) -> str:
    return "—" if lo is None or hi is None else f"[{_bound(lo, digits)}, {_bound(hi, digits)}]"


def _paired_cells(c: Mapping[str, Any]) -> list[str]:
    if c["mean_diff"] is None:
        return [f"{c['a']} − {c['b']}", "—", "—", "—", "—", "—", "—", "—", "0", "0",
                f"skipped: {c['skipped']}"]
    mark = " ✓" if c["significant"] else ""
    poi = "—" if c.get("poi") is None else (
        f"{c['poi']:.2f} [{c['poi_lo']:.2f}, {c['poi_hi']:.2f}]")
    return [f"{c['a']} − {c['b']}", _bound(c["mean_diff"]), _interval(c.get("t_lo"), c.get("t_hi")),
            _p_text(c.get("t_p")) + mark, poi, _interval(c["ci_lo"], c["ci_hi"]), _p_text(c["p"]),
            _p_text(c["sign_flip_p"]), str(c["n_seeds"]), str(c["n_prompts"]), c["skipped"] or ""]


PAIRED_HEAD = ("A − B", "Δ gold", "95% interval", "p", "P(A > B)", "bootstrap 95%", "bootstrap p",
               "sign-flip p", "seeds", "prompts", "note")


def footer_lines(cols: Sequence[Column], rows: Sequence[Mapping[str, Any]] = (), n_boot: int = 10_000,
                 seed: int = 0) -> list[str]:
    """The footer: how cells are computed, every shown column's label, metric key and definition,
    the seeds column, and the paired test's method."""
    lines = [
        "Cells: mean ± half-width of the 95% confidence interval over distinct seeds, Student-t: "
        "mean ± t(0.975, n−1)·s/√n with s the sample standard deviation (ddof=1); rounded so the "
        "half-width keeps two significant digits. A bare number is a single seed (no interval); (n=k): "
        "only k seeds reported the metric. The CSV has every metric at full precision (mean, std, ci_lo, "
        "ci_hi, n).",
        f"track: {TRACK_NOTE}.",
        "β, lr: the method's KL coefficient (config.method.beta; config.method.kl_coef in PPO records "
        "written before the rename) and learning rate (config.method.optim.lr) of the rows' runs.",
    ]
    for col in cols:
        key = col.key
        if col.pattern:
            concrete = sorted({k for r in rows if (k := col.resolve(r))})
            if concrete:
                key += " (here: " + ", ".join(concrete) + ")"
        lines.append(f"{col.label}: {key}: {col.definition}.")
    lines += [
        "seeds: distinct seeds of ok runs; repeated records of one seed are one sample, the latest by "
        "created (‡k dup: k older records dropped); +k failed: seeds whose run failed, excluded from "
        "every mean.",
        "A seed's score is its mean gold reward over the held-out prompts (with a 0/1 reward, the "
        "share of the prompts it answers right); the seeds are the replicates, the prompts a second "
        "level under them.",
        f"Paired differences: Δ gold = mean over seeds s and held-out prompts i of gold_A[s,i] − gold_B[s,i], "
        "over the seeds both methods ran on the same prompts (equal per_prompt.prompts_sha256). 95% interval "
        "and p: the paired t-test of the per-seed differences D_s (Student-t, S − 1 degrees of freedom), "
        "calibrated at any number of seeds when the D_s are roughly normal; ✓: p < 0.05, the only "
        "statistic that decides a difference. P(A > B): the share of (seed of A, seed of B) pairs where "
        "A scores higher, ties half (Agarwal et al. 2021), with a stratified bootstrap 95% interval "
        f"({SEED_BOOT} replicates, each method's seeds resampled on their own). Bootstrap 95% and p: the "
        f"two-level paired bootstrap (B = {n_boot}: seeds with replacement, then prompts within each seed, "
        f"the same prompts for both methods; numpy seed {seed}), p = min(1, 2·min(P(Δ*≤0), P(Δ*≥0))) "
        "with P = (1 + count)/(B + 1): it sees only S seed values and is too narrow at 3 seeds, so it "
        "decides nothing. Sign-flip p: exact permutation test of the per-seed differences (its smallest "
        "value is 2/2^S: 0.25 with 3 seeds).",
    ]
    return lines




def _by_cell(paired: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for c in paired:
        out.setdefault((c["model"], c["dataset"], c["group"], c.get("track", "")), []).append(c)
    return out


def _difference(c: Mapping[str, Any]) -> str:
    """``"GRPO − PPO +0.012 [−0.030, +0.054], P(GRPO > PPO) = 0.56, 3 seeds"``."""
    a, b = c["a"].upper(), c["b"].upper()
    text = f"{a} − {b} {_bound(c['mean_diff'])} {_interval(c.get('t_lo'), c.get('t_hi'))}"
    if c.get("poi") is not None:
        text += f", P({a} > {b}) = {c['poi']:.2f}"
    return text + f", {c['n_seeds']} seed{'s' if c['n_seeds'] != 1 else ''}"


def answer(paired: Sequence[Mapping[str, Any]], information: Sequence[Mapping[str, Any]] = ()
           ) -> list[str]:
    """What the comparison shows, one sentence per (track, model, dataset) and one per
    information effect, written from the comparisons alone: the differences the paired t-test
    over seeds separates (✓), then those it does not. Nothing is said that the records do not
    support."""
    out = []
    for (model, dataset, group, track), cell in _by_cell(paired).items():
        done = [c for c in cell if c["mean_diff"] is not None]
        if not done:
            continue
        held = [c for c in done if c["significant"]]
        where = f"On the {track or 'no'} track, {model} · {dataset} (group {group}): "
        text = where + ("; ".join(_difference(c) for c in held) + " (p < 0.05)" if held
                        else "no difference between methods is separable")
        rest = [c for c in done if not c["significant"]]
        if held and rest:
            text += ". Not separable: " + "; ".join(_difference(c) for c in rest)
        out.append(text + ".")
    for (model, dataset, group, _), cell in _by_cell(information).items():
        for c in cell:
            if c["mean_diff"] is None:
                continue
            verdict = "separable (p < 0.05)" if c["significant"] else "not separable"
            out.append(f"Information effect, {model} · {dataset} (group {group}): "
                       f"{_difference(c)}: {verdict}.")
    return out


def main_cells(row: Mapping[str, Any], cols: Sequence[Column]) -> list[Cell]:
    """One row of the main table: its key columns, β and lr, one cell per shown column (mean ±
    half-width, sortable by the mean), the seeds and the status."""
    failed = row["status"] == "failed"
    cells = [Cell(str(row[k])) for k in KEY_COLUMNS]
    cells += [Cell(_setting(row["beta"])), Cell(_setting(row["lr"]))]
    for col in cols:
        key = col.resolve(row)
        mean = None if failed or key is None else mean_of(row, key)
        cell = row["metrics"].get(key) if key else None
        if col.stat == "iqm":
            mean = None if failed or not cell or cell.get("iqm") is None else cell["iqm"]
            text = "failed" if failed else format_iqm(cell)
        else:
            text = "failed" if failed else format_cell(cell, row["n_seeds"])
        tip = f"{key or col.key}" + (f" (n={row['metrics'][key]['n']})" if mean is not None else "")
        cells.append(Cell(text, "num", "" if mean is None else repr(mean), tip))
    cells.append(Cell(_seeds_text(row), "num", str(row["n_seeds"])))
    cells.append(Cell(_status_text(row), "wrap", tip=_status_text(row, limit=None)))
    return cells


def main_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[Column]) -> Table:
    head = [*KEY_COLUMNS, "β", "lr", *(c.label for c in cols), "seeds", "status"]
    tips = [*(KEY_TIPS[k] for k in KEY_COLUMNS),
            "KL coefficient: config.method.beta (kl_coef in older PPO records)",
            "learning rate: config.method.optim.lr", *(f"{c.key}: {c.definition}" for c in cols),
            "distinct ok seeds (+failed, ‡duplicates dropped)", "ok or failed"]
    classes, previous = [], None
    for row in rows:
        first = previous is not None and (row["model"], row["dataset"]) != previous
        previous = (row["model"], row["dataset"])
        classes.append(("failed" if row["status"] == "failed" else "ok") + (" first" if first else ""))
    align = [":---"] * len(KEY_COLUMNS) + ["---:"] * (len(cols) + 3) + [":---"]
    return Table(head, tips, [main_cells(r, cols) for r in rows], classes, align, css="sortable")


def paired_table(items: Sequence[Mapping[str, Any]], caption: tuple[str, str]) -> Table:
    rows = []
    for c in items:
        cells = _paired_cells(c)
        rows.append([Cell(cells[0]), *(Cell(x, "num") for x in cells[1:-1]), Cell(cells[-1], "wrap")])
    return Table(list(PAIRED_HEAD), list(PAIRED_TIPS), rows,
                 ["sig" if c["significant"] else "" for c in items],
                 [":---"] + ["---:"] * (len(PAIRED_HEAD) - 2) + [":---"], css="paired", caption=caption)


def cost_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    body = [[*(Cell(str(r[k])) for k in KEY_COLUMNS), *(Cell(x, "num") for x in _cost_cells(r))]
            for r in rows]
    return Table([*KEY_COLUMNS, *(c.label for c in COST_TABLE)],
                 [*(KEY_TIPS[k] for k in KEY_COLUMNS), *(f"{c.key}: {c.definition}" for c in COST_TABLE)],
                 body, [""] * len(body), [":---"] * len(KEY_COLUMNS) + ["---:"] * len(COST_TABLE),
                 css="cost")


def sections(rows: Sequence[Mapping[str, Any]], header_lines: Sequence[str] = (),
             plots: Mapping[str, Any] | None = None,
             paired: Sequence[Mapping[str, Any]] | None = None,
             information: Sequence[Mapping[str, Any]] | None = None,
             warnings: Sequence[str] | None = None, n_boot: int = 10_000,
             seed: int = 0) -> list[Section]:
    """The page, top to bottom, as every renderer draws it: the header lines and the
    ``warnings`` (default: computed from the rows), the main table and its footer, the failed
    runs, the paired differences within a track, the information effect
    (:func:`~harness.evaluation.leaderboard.comparisons.information_effect`), the cost and budget
    table, then ``plots`` ({caption: image}, as the renderer links or embeds them)."""
    cols = shown_columns(rows)
    warnings = comparison_warnings(rows) if warnings is None else warnings
    out = [Section(paragraphs=list(header_lines))]
    said = answer(paired or (), information or ())
    if said:
        out.append(Section("What this comparison shows", bullets=said,
                            note="Each difference: A − B, Δ gold over seeds and prompts, the 95% "
                                 "t-interval over seeds, P(A > B) over seeds (footer)."))
    out.append(Section(warnings=list(warnings)))
    if not rows:
        out.append(Section(note="No run records found: the table is empty."))
    out.append(Section(tables=[main_table(rows, cols)], bullets=footer_lines(cols, rows, n_boot, seed),
                       sortable=True))
    failures = [(row, f) for row in rows for f in row["failed_runs"]]
    if failures:
        out.append(Section("Failed runs", bullets=[
            f"`{f.get('run_id')}` ({row['method']}, {row['model']}, {row['dataset']}, seed "
            f"{f.get('seed')}): {' '.join(str(f.get('error') or 'unknown error').split())}"
            for row, f in failures]))
    for title, items in (("Paired differences (within a track)", paired),
                         (f"Information effect ({INFORMATION_NOTE})", information)):
        if items:
            tables = [paired_table(cell, (f"{model} · {dataset} · {track or 'no track'}",
                                          f"(group {group})"))
                      for (model, dataset, group, track), cell in _by_cell(items).items()]
            out.append(Section(title, tables=tables,
                               note="Bold and ✓: p < 0.05. See the footer above for the method."))
    ok_rows = [r for r in rows if r["status"] == "ok"]
    if ok_rows:
        out.append(Section("Cost", tables=[cost_table(ok_rows)], bullets=[
            *(f"{c.label}: {c.key}: {c.definition}." for c in COST_TABLE),
            "(cached): the stage was loaded from the cache in every seed (cached k/n: in k of n); "
            "its time is the time it took when it was trained."]))
    if plots:
        out.append(Section("Plots", images=dict(plots)))
    return out


def page_title(rows: Sequence[Mapping[str, Any]], title: str | None) -> str:
    return title or default_title(rows)


__all__ = ["Cell", "Section", "Table", "format_cell", "footer_lines", "page_title", "sections"]
