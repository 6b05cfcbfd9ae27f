"""The leaderboard: a pure function of the run records in ``results/runs/``.

``build_table`` aggregates the records into one row per (method, model, dataset, track) over
*distinct seeds*; ``paired_comparisons`` compares the methods of one track on the same (model,
dataset, group) prompt by prompt, ``information_effect`` each method across the two tracks;
``comparison_warnings`` says where a comparison is weak; ``sections`` lays the page out once, and
the renderers draw it as Markdown and a self-contained HTML page (inline CSS and JS, plots embedded
as ``data:`` URIs: the page can be mailed or opened from disk with no network), beside the CSV
files. ``build_leaderboard`` does it all for a folder::

    python -m harness.leaderboard --runs results/runs --out results [--group compare]

Modules: :mod:`.columns` (metric helpers, every column and its definition), :mod:`.table`
(selecting and aggregating), :mod:`.comparisons` (paired tests), :mod:`.diagnostics` (warnings),
:mod:`.format` (numbers and cells), :mod:`.sections` (the page as one list of sections),
:mod:`.render` (Markdown, HTML, CSV),
:mod:`.build` (the whole leaderboard from a folder, its header, the screenshot).

Conventions

* The main table uses the records of one group (``group=``; default ``"compare"`` when any record
  has it, else all records). The reward–KL plot uses every group (tuning sweeps supply its β grid).
* A row is a (method, model, dataset, track); a method that ran several settings (β, lr) in the
  chosen group gets a row per setting — runs at different settings are never averaged together.
* One sample per seed: repeated records of a seed are one sample, the latest by ``created``
  (whatever its status); the others are counted in ``n_duplicates`` and flagged.
* Cells are ``mean ± h`` with h the half-width of the Student-t 95 % interval over seeds,
  x̄ ± t(0.975, n − 1)·s/√n (s with ``ddof=1``), rounded so that h keeps two significant digits;
  a single seed shows a bare mean. A metric missing from some seeds is averaged over those that
  have it and marked ``(n=k)``.
* Failed runs never enter a mean; they are counted in ``n_failed`` and their errors listed. A row
  whose runs all failed has status ``"failed"`` and its error.
* Rows are sorted by dataset, model, track, then gold reward (descending); all-failed rows last.
* An empty (or missing) runs folder is not an error: every file is still written, with an empty
  table and a note saying that no records were found. Files that are not valid records are
  listed on the page and counted nowhere.
"""

from harness.evaluation.leaderboard.build import (
    HEADER_FILE,
    build_leaderboard,
    header_settings,
    reproduce_command,
    take_screenshot,
)
from harness.evaluation.leaderboard.columns import (
    AVERAGE,
    COST_COLUMNS,
    GAIN,
    HEADLINE_COLUMNS,
    Column,
    average_score,
    columns,
    is_task_metric,
    is_task_score,
    run_metrics,
    shown_columns,
)
from harness.evaluation.leaderboard.comparisons import information_effect, paired_comparisons
from harness.evaluation.leaderboard.diagnostics import comparison_warnings, table_platforms
from harness.evaluation.leaderboard.format import footer_lines, format_cell
from harness.evaluation.leaderboard.render import (
    render_html,
    render_markdown,
    write_csv,
    write_paired_csv,
)
from harness.evaluation.leaderboard.sections import sections
from harness.evaluation.leaderboard.table import (
    DEFAULT_GROUP,
    build_table,
    default_title,
    group_names,
    row_groups,
    select_group,
    setting_label,
)
from harness.evaluation.plots import plot_reward_kl, plot_training_curves

__all__ = [
    "AVERAGE", "COST_COLUMNS", "DEFAULT_GROUP", "GAIN", "HEADER_FILE", "HEADLINE_COLUMNS", "Column",
    "average_score", "build_leaderboard", "build_table", "columns", "comparison_warnings",
    "default_title", "footer_lines", "format_cell", "group_names", "header_settings",
    "information_effect", "is_task_metric", "is_task_score", "paired_comparisons",
    "plot_reward_kl", "plot_training_curves", "render_html", "render_markdown",
    "reproduce_command", "row_groups", "run_metrics", "sections", "select_group",
    "setting_label", "shown_columns", "table_platforms", "take_screenshot", "write_csv",
    "write_paired_csv",
]
