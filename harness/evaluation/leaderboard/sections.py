"""The leaderboard page as one list of sections, which every renderer (Markdown, HTML) draws from:
the header and warnings, the main table and its footer, the failed runs, the paired differences
within a track, the information effect across tracks, the cost and budget table, the plots.
A section holds text, tables of cells and images; how each renderer shows them is its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.evaluation.leaderboard.columns import COST_TABLE, KEY_COLUMNS, TRACK_NOTE, Column, shown_columns
from harness.evaluation.leaderboard.comparisons import INFORMATION_NOTE, checks_reference
from harness.evaluation.leaderboard.diagnostics import comparison_warnings
from harness.evaluation.leaderboard.format import (
    PAIRED_HEAD,
    bound,
    cost_cells,
    footer_lines,
    format_cell,
    format_iqm,
    interval,
    p_text,
    paired_cells,
    seeds_text,
    setting_text,
    status_text,
)
from harness.evaluation.leaderboard.kernels import holds_everywhere
from harness.evaluation.leaderboard.table import default_title, mean_of


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
               "two-sided paired t-test over seeds",
               "the t-test's p adjusted by Holm's method over the pairs of this table; ✓ Holm p < 0.05 "
               "(what decides a difference)",
               "seeds where A scores above B, of the seeds both ran",
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
def _by_cell(paired: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for c in paired:
        out.setdefault((c["model"], c["dataset"], c["group"], c.get("track", "")), []).append(c)
    return out


def _difference(c: Mapping[str, Any]) -> str:
    """``"GRPO − PPO +0.012 [−0.030, +0.054], Holm p 0.41, P(GRPO > PPO) = 0.56, GRPO ahead in 2 of
    3 seeds"``, then what the
    same pair showed on other kernels when it was checked there (:func:`_elsewhere`)."""
    a, b = c["a"].upper(), c["b"].upper()
    text = f"{a} − {b} {bound(c['mean_diff'])} {interval(c.get('t_lo'), c.get('t_hi'))}"
    if c.get("holm_p") is not None:
        text += f", Holm p {p_text(c['holm_p'])}"
    if c.get("poi") is not None:
        text += f", P({a} > {b}) = {c['poi']:.2f}"
    seeds = f"{c['n_seeds']} seed{'s' if c['n_seeds'] != 1 else ''}"
    if c.get("wins") is not None:
        seeds = f"{a} ahead in {c['wins']} of {seeds}"
    return text + ", " + seeds + _elsewhere(c)


def _elsewhere(c: Mapping[str, Any]) -> str:
    """``" (holds on AVX2: +0.010 [+0.002, +0.018], 10 seeds)"``, ``" (not on AVX2: …)"`` or
    ``" (not run on AVX2)"`` for a comparison checked on other kernels (:func:`check_on`); ``""``
    for one that was not, or one the t-test does not separate here."""
    if "check_platform" not in c or not c.get("significant"):
        return ""
    where, o = c["check_platform"], c.get("check")
    if o is None:
        return f" (not run on {where})"
    verdict = "holds" if o["holds"] else "not"
    return (f" ({verdict} on {where}: {bound(o['mean_diff'])} {interval(o['t_lo'], o['t_hi'])}, "
            f"{o['n_seeds']} seed{'s' if o['n_seeds'] != 1 else ''})")


def answer(paired: Sequence[Mapping[str, Any]], information: Sequence[Mapping[str, Any]] = ()
           ) -> list[str]:
    """What the comparison shows, one sentence per (track, model, dataset) and one per
    information effect, written from the comparisons alone: the differences the paired t-test
    over seeds separates (Holm-adjusted p < 0.05 over the comparisons of the table) — and, where
    the comparisons were checked on other kernels
    (:func:`~harness.evaluation.leaderboard.kernels.check_on`), separates there too in the same
    direction — then those it does not; then, per table, whether each reference implementation
    (TRL's trainer, :func:`~harness.evaluation.leaderboard.comparisons.is_reference`) agrees with
    the harness's method. Nothing is said that the records do not support."""
    out, references = [], []
    for (model, dataset, group, track), cell in _by_cell(paired).items():
        done = [c for c in cell if c["mean_diff"] is not None]
        for c in done:
            if checks_reference(c):
                verdict = "they differ (Holm p < 0.05)" if c["significant"] else "not separable"
                references.append(f"Reference implementation, {track or 'no'} track, {model} · "
                                  f"{dataset} (group {group}): {_difference(c)}: {verdict}.")
        done = [c for c in done if not checks_reference(c)]
        if not done:
            continue
        held = [c for c in done if holds_everywhere(c)]
        both = " on both kernels" if any("check_platform" in c for c in done) else ""
        where = f"On the {track or 'no'} track, {model} · {dataset} (group {group}): "
        rest = [c for c in done if not holds_everywhere(c)]
        if held:
            text = where + "; ".join(_difference(c) for c in held) + f" (Holm p < 0.05{both})"
            if rest:
                text += ". Not separable" + both + ": " + "; ".join(_difference(c) for c in rest)
        else:  # naming what one set of kernels alone separates, with what the other showed
            text = where + "no difference between methods is separable" + both
            alone = [c for c in rest if c["significant"]]
            if alone:
                text += ": " + "; ".join(_difference(c) for c in alone)
        out.append(text + ".")
    for (model, dataset, group, _), cell in _by_cell(information).items():
        for c in cell:
            if c["mean_diff"] is None:
                continue
            checked = " on both kernels" if "check_platform" in c else ""
            verdict = (f"separable (Holm p < 0.05{checked}){_elsewhere(c)}" if holds_everywhere(c)
                       else f"not separable{checked}{_elsewhere(c)}" if c["significant"]
                       else "not separable")
            method = c["a"].removesuffix(" · oracle").upper()
            holm = "" if c.get("holm_p") is None else f", Holm p {p_text(c['holm_p'])}"
            poi = "" if c.get("poi") is None else f", P(oracle > preferences) = {c['poi']:.2f}"
            seeds = (f"{c['n_seeds']} seeds" if c.get("wins") is None
                     else f"ahead on the oracle track in {c['wins']} of {c['n_seeds']} seeds")
            out.append(f"Information effect, {model} · {dataset} (group {group}): {method} on the "
                       f"oracle track − on the preferences track {bound(c['mean_diff'])} "
                       f"{interval(c.get('t_lo'), c.get('t_hi'))}{holm}{poi}, {seeds}: "
                       f"{verdict}.")
    return out + references


def main_cells(row: Mapping[str, Any], cols: Sequence[Column]) -> list[Cell]:
    """One row of the main table: its key columns, β and lr, one cell per shown column (mean ±
    half-width, sortable by the mean), the seeds and the status."""
    failed = row["status"] == "failed"
    cells = [Cell(str(row[k])) for k in KEY_COLUMNS]
    cells += [Cell(setting_text(row["beta"])), Cell(setting_text(row["lr"]))]
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
    cells.append(Cell(seeds_text(row), "num", str(row["n_seeds"])))
    cells.append(Cell(status_text(row), "wrap", tip=status_text(row, limit=None)))
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
        cells = paired_cells(c)
        rows.append([Cell(cells[0]), *(Cell(x, "num") for x in cells[1:-1]), Cell(cells[-1], "wrap")])
    return Table(list(PAIRED_HEAD), list(PAIRED_TIPS), rows,
                 ["sig" if c["significant"] else "" for c in items],
                 [":---"] + ["---:"] * (len(PAIRED_HEAD) - 2) + [":---"], css="paired", caption=caption)


def cost_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    body = [[*(Cell(str(r[k])) for k in KEY_COLUMNS), *(Cell(x, "num") for x in cost_cells(r))]
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
                                 "t-interval over seeds, the paired t-test's p adjusted by Holm's "
                                 "method over the pairs of its table (what decides), P(A > B) over "
                                 "seeds, and the seeds where A is ahead (footer)."))
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
                               note="Bold and ✓: Holm p < 0.05 (the t-test's p adjusted over the "
                                    "pairs of the table). See the footer above for the method."))
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


__all__ = ["Cell", "Section", "Table", "answer", "page_title", "sections"]
