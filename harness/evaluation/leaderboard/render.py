"""The leaderboard's renderers, each drawing the one list of sections
(:func:`harness.evaluation.leaderboard.sections.sections`): Markdown, a self-contained HTML page
(inline CSS and JS, plots embedded as ``data:`` URIs, fits a 1,400-pixel window; a click on a
main-table header sorts it), and the CSV files of the rows and of the paired differences."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.evaluation.leaderboard.columns import KEY_COLUMNS, columns
from harness.evaluation.leaderboard.sections import Section, Table, page_title, sections
from harness.util.atomic import write_text


# --------------------------------------------------------------------------- Markdown
def _md_escape(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in t.head) + " |", "|" + "|".join(t.align) + "|"]
    lines += ["| " + " | ".join(_md_escape(c.text) for c in row) + " |" for row in t.rows]
    return lines


def markdown(title: str, page: Sequence[Section]) -> str:
    """The sections as Markdown: ``title`` as the heading, every section in order."""
    lines = [f"# {title}", ""]
    for s in page:
        if s.title:
            lines += [f"## {s.title}", ""]
        for p in s.paragraphs:
            lines += [p, ""]
        if s.warnings:
            lines += ["**Warnings**", ""] + [f"- ⚠ {_md_escape(w)}" for w in s.warnings] + [""]
        for t in s.tables:
            if t.caption:
                lines += [f"**{t.caption[0]}** {t.caption[1]}", ""]
            lines += [*_md_table(t), ""]
        if s.note and not s.tables:
            lines += [f"_{s.note}_", ""]
        if s.bullets:
            lines += [f"- {_md_escape(b)}" for b in s.bullets] + [""]
        lines += [f"![{caption}]({target})" for caption, target in s.images.items()]
        if s.images:
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def render_markdown(rows: Sequence[Mapping[str, Any]], header_lines: Sequence[str] = (),
                    title: str | None = None, plots: Mapping[str, str] | None = None,
                    paired: Sequence[Mapping[str, Any]] | None = None,
                    warnings: Sequence[str] | None = None, n_boot: int = 10_000, seed: int = 0,
                    information: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The leaderboard as Markdown (:func:`sections`; ``plots``: {caption: relative path})."""
    return markdown(page_title(rows, title),
                    sections(rows, header_lines, plots, paired, information, warnings, n_boot, seed))


# --------------------------------------------------------------------------- HTML
_CSS = """
*{box-sizing:border-box}
html{font-size:13px}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:.8rem 1rem;
max-width:1400px;color:#222;line-height:1.35;overflow-wrap:anywhere}
h1{font-size:1.35rem;margin:.2rem 0 .5rem}h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
h3{font-size:.95rem;margin:.8rem 0 .2rem}
p{margin:.3rem 0}
code,pre{background:#f4f4f4;padding:.05rem .25rem;border-radius:3px;font-size:.9em;overflow-wrap:anywhere}
.box{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:11.5px;margin:.5rem 0;max-width:100%}
th,td{border:1px solid #ddd;padding:.2rem .35rem}
td{white-space:nowrap}
td.wrap{white-space:normal;min-width:8rem;max-width:22rem}
th{background:#f0f0f5;cursor:pointer;user-select:none;position:sticky;top:0;white-space:normal;
vertical-align:bottom;font-weight:600}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fdecec;color:#a33}
tr.first td{border-top:2px solid #999}
tr.sig td{font-weight:600}
tbody tr:hover td{background:#f7f7ff}
.note,.footer{color:#555;font-size:11.5px}
.footer{margin:.3rem 0 0 1rem;padding:0}.footer li{margin:.1rem 0}
.warn{background:#fff6e0;border:1px solid #f0c36d;border-radius:4px;padding:.4rem .8rem;margin:.6rem 0;
font-size:12px}
.warn ul{margin:.2rem 0 .2rem 1rem;padding:0}
figure{margin:.8rem 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555}
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


def _inline_code(line: str) -> str:
    """Escape a Markdown-ish line for HTML, turning `code` spans into <code>."""
    parts = line.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


def _html_table(t: Table) -> list[str]:
    esc = html.escape
    out = []
    if t.caption:
        out.append(f"<h3>{esc(t.caption[0])} <span class=\"note\">{esc(t.caption[1])}</span></h3>")
    ident = ' id="leaderboard"' if t.css == "sortable" else ""
    hint = " (click to sort)" if t.css == "sortable" else ""
    out.append(f'<div class="box"><table class="{t.css}"{ident}><thead><tr>'
               + "".join(f'<th title="{esc(tip)}{hint}">{esc(h)}</th>' for h, tip in zip(t.head, t.tips, strict=True))
               + "</tr></thead><tbody>")
    for row, cls in zip(t.rows, t.row_classes, strict=True):
        tds = []
        for c in row:
            attrs = "" if c.kind == "text" else f' class="{c.kind}"'
            if c.sort is not None:
                attrs += f' data-sort="{esc(c.sort)}"'
            if c.tip is not None:
                attrs += f' title="{esc(c.tip)}"'
            tds.append(f"<td{attrs}>{esc(c.text)}</td>")
        out.append((f'<tr class="{cls}">' if cls else "<tr>") + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def html_page(title: str, page: Sequence[Section]) -> str:
    """The sections as one self-contained HTML page; images are embedded (missing files skipped)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for s in page:
        figures = []
        for caption, path in s.images.items():
            p = Path(path)
            if p.is_file():
                data = base64.b64encode(p.read_bytes()).decode("ascii")
                figures.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{esc(caption)}</figcaption></figure>")
        if s.title and (s.tables or s.bullets or s.note or figures):
            out.append(f"<h2>{esc(s.title)}</h2>")
        out += [f"<p>{_inline_code(p)}</p>" for p in s.paragraphs]
        if s.warnings:
            out.append('<div class="warn"><b>Warnings</b><ul>'
                       + "".join(f"<li>⚠ {esc(w)}</li>" for w in s.warnings) + "</ul></div>")
        if s.note and not s.tables:
            out.append(f'<p class="note">{esc(s.note)}</p>')
        for t in s.tables:
            out += _html_table(t)
        if s.note and s.tables:
            out.append(f'<p class="note">{esc(s.note)}</p>')
        if s.bullets:
            items = [*s.bullets, *(["Click a column header to sort."] if s.sortable else [])]
            cls = "" if s.title == "Failed runs" else ' class="footer"'
            out.append(f"<ul{cls}>" + "".join(f"<li>{_inline_code(b)}</li>" for b in items) + "</ul>")
        out += figures
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"


def render_html(rows: Sequence[Mapping[str, Any]], plots: Mapping[str, Path | str],
                header_lines: Sequence[str] = (), title: str | None = None,
                paired: Sequence[Mapping[str, Any]] | None = None, warnings: Sequence[str] | None = None,
                n_boot: int = 10_000, seed: int = 0,
                information: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The leaderboard as a self-contained HTML page (:func:`sections`; ``plots``: {caption: PNG
    path}, embedded as base64 data URIs)."""
    return html_page(page_title(rows, title),
                     sections(rows, header_lines, plots, paired, information, warnings, n_boot, seed))


# --------------------------------------------------------------------------- CSV
def _csv_value(x: Any) -> Any:
    return "" if x is None else x


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Write the rows as CSV (atomically): key columns, status, n_seeds, n_failed, n_duplicates,
    groups, beta, lr, platforms, then ``<metric>_mean``, ``_std``, ``_ci_lo``, ``_ci_hi``, ``_n``
    for every key of :func:`columns` (full keys, full precision), then the gold reward's IQM and
    its bootstrap interval (``eval/gold_reward_iqm``, ``_iqm_lo``, ``_iqm_hi``), then the error."""
    cols = columns(rows)
    header = [*KEY_COLUMNS, "status", "n_seeds", "n_failed", "n_duplicates", "groups", "beta", "lr",
              "platforms"]
    for c in cols:
        header += [f"{c}_{s}" for s in ("mean", "std", "ci_lo", "ci_hi", "n")]
    header += [f"eval/gold_reward_{s}" for s in IQM_FIELDS]
    header.append("error")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = [row[k] for k in KEY_COLUMNS] + [row["status"], row["n_seeds"], row["n_failed"],
                                                   row.get("n_duplicates", 0), ";".join(row.get("groups", [])),
                                                   ";".join(map(repr, row.get("beta", []))),
                                                   ";".join(map(repr, row.get("lr", []))),
                                                   ";".join(row.get("platforms", []))]
        for c in cols:
            cell = row["metrics"].get(c) or {}
            values += [_csv_value(cell.get(s)) for s in ("mean", "std", "ci_lo", "ci_hi")] + [cell.get("n", 0)]
        gold = row["metrics"].get("eval/gold_reward") or {}
        values += [_csv_value(gold.get(s)) for s in IQM_FIELDS]
        values.append(_csv_value(row.get("error")))
        writer.writerow(values)
    return write_text(path, buf.getvalue())


IQM_FIELDS = ("iqm", "iqm_lo", "iqm_hi")
PAIRED_FIELDS = ("model", "dataset", "group", "track", "a", "b", "n_seeds", "n_prompts", "mean_diff",
                 "t_lo", "t_hi", "t_p", "holm_p", "wins", "poi", "poi_lo", "poi_hi", "ci_lo", "ci_hi", "p",
                 "sign_flip_p",
                 "significant", "skipped")


def write_paired_csv(paired: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """The paired differences as CSV (full precision), one line per pair; ``track`` is the
    track both ran on, or ``"oracle − preferences"`` for a line of the information effect."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PAIRED_FIELDS)
    for c in paired:
        writer.writerow([_csv_value(c.get(k)) for k in PAIRED_FIELDS])
    return write_text(path, buf.getvalue())
