"""Build the whole leaderboard from a runs folder: the tables, the paired comparisons, the page in
Markdown, CSV and HTML, the plots and a screenshot, with a header kept across rebuilds::

    python -m harness.leaderboard --runs results/runs --out results [--group compare]
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.evaluation.leaderboard.comparisons import information_effect, paired_comparisons
from harness.evaluation.leaderboard.diagnostics import comparison_warnings, table_platforms
from harness.evaluation.leaderboard.kernels import check_on, kernels_name
from harness.evaluation.leaderboard.render import render_html, render_markdown, write_csv, write_paired_csv
from harness.evaluation.leaderboard.table import build_table, group_names, select_group
from harness.evaluation.plots import plot_reward_kl, plot_training_curves
from harness.evaluation.records import load_records
from harness.evaluation.seed_figures import plot_overoptimisation, plot_seed_strips
from harness.evaluation.tuning import best_settings, keep_tuned
from harness.util.atomic import write_bytes, write_text

SCREENSHOT_WIDTH = 1400


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def take_screenshot(html_path: Path | str, png_path: Path | str, width: int = SCREENSHOT_WIDTH,
               height: int = 2400, timeout_s: float = 90.0) -> Path | None:
    """A PNG of ``html_path`` as headless Chromium renders it in a ``width``×``height`` window
    (written atomically to ``png_path``), or ``None`` when Chromium is not installed or fails."""
    exe = _chromium()
    if exe is None:
        return None
    html_path = Path(html_path).resolve()
    with tempfile.TemporaryDirectory(prefix="leaderboard-shot-") as tmp:
        shot = Path(tmp) / "shot.png"
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu",
               f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               f"--screenshot={shot}", html_path.as_uri()]
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        if not shot.is_file() or shot.stat().st_size == 0:
            return None
        return write_bytes(png_path, shot.read_bytes())


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


HEADER_FILE = "leaderboard_header.json"
HEADER_KEYS = ("command", "note", "group", "check_runs", "tuned_by")


def header_settings(out_dir: Path, command: str | None, note: str | None,
                    group: str | None = None, check_runs: str | None = None,
                    tuned_by: str | None = None,
                    ) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    """The header's ``command``, ``note``, the tables' ``group``, the ``check_runs`` folder
    (records of the same sweep on other kernels) and ``tuned_by`` (the tuning group whose winners
    the rows keep), kept across rebuilds in ``out_dir/leaderboard_header.json``.

    A value given (even ``""``) replaces the stored one and is written back; a value not given
    (``None``) is read from the file, so ``python -m harness.leaderboard`` with no ``--note``
    rebuilds the same header it wrote last time. Raises ``ValueError`` naming the file when it is
    not a JSON object of strings.
    """
    path = Path(out_dir) / HEADER_FILE
    stored: dict[str, str] = {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err}); delete it or fix it") from err
        if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
            raise ValueError(f"{path}: expected a JSON object of strings "
                             '{"command": "...", "note": "..."}; delete it or fix it')
    given = {k: v for k, v in (("command", command), ("note", note), ("group", group),
                               ("check_runs", check_runs), ("tuned_by", tuned_by)) if v is not None}
    if given:
        merged = {**{k: v for k, v in stored.items() if k in HEADER_KEYS}, **given}
        if merged != stored:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(merged, indent=1, ensure_ascii=False) + "\n")
        stored = merged
    return (stored.get("command") or None, stored.get("note") or None,
            stored.get("group") or None, stored.get("check_runs") or None,
            stored.get("tuned_by") or None)


def build_leaderboard(runs_dir: Path | str, out_dir: Path | str, command: str | None = None, *,
                      group: str | None = None, note: str | None = None, screenshot: bool = True,
                      n_boot: int = 10_000, seed: int = 0,
                      check_runs: Path | str | None = None,
                      tuned_by: str | None = None) -> dict[str, Path]:
    """Read the records in ``runs_dir`` and write, atomically, into ``out_dir``:
    ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard_paired.csv``, ``leaderboard.html``,
    ``reward_kl.png``, ``seeds.png``, ``overoptimisation.png``, ``training_curves.png`` and, with
    ``screenshot`` and Chromium installed,
    ``leaderboard.png`` (the HTML in a 1,400-pixel window). Returns ``{"markdown", "csv",
    "paired_csv", "html", "reward_kl", "seeds", "overoptimisation", "training_curves"[,
    "screenshot"]}`` → path.

    The tables use the records of ``group`` (comma-separated for several; default: the one given
    last time, else ``"compare"`` when any record has it, else all); the reward–KL plot uses all
    records. ``note`` is shown in the header (e.g. "β and lr
    tuned on the validation split"). ``command`` is the command that reproduces the runs; by
    default a multirun command is derived from the records. Both are kept for later rebuilds in
    ``out_dir/leaderboard_header.json`` (see :func:`header_settings`), as is ``check_runs``: a
    folder of records of the same sweep run on other kernels (e.g. ``results/avx2/runs``), whose
    paired comparisons decide with the table's which differences the answer section claims
    (:mod:`~harness.evaluation.leaderboard.kernels`; kept relative to ``out_dir``; ``""`` clears
    it; a kept folder that is gone is a ``ValueError``). ``tuned_by`` (kept too; ``""`` clears it)
    names a tuning group in ``runs_dir``: each tuned method's rows then keep only the records at the
    setting that won its tuning (:func:`harness.evaluation.tuning.at_tuned_settings`), so runs at a winner
    that a later grid extension replaced drop out of the tables. ``n_boot`` and ``seed`` set the
    paired bootstrap. An empty or missing ``runs_dir`` is not an error: all files are written
    with an empty table and a note.
    """
    runs_dir, out_dir = _shown(Path(runs_dir)), _shown(Path(out_dir))
    if check_runs is not None and str(check_runs) and not Path(check_runs).is_dir():
        # before it is kept in the header: a typo must not break every later rebuild
        raise ValueError(f"check_runs {check_runs}: no such folder (nothing written)")
    # the check folder is kept relative to out_dir, so a rebuild from any directory finds it
    given_check = None if check_runs is None else \
        os.path.relpath(Path(check_runs).resolve(), out_dir.resolve()) if str(check_runs) else ""
    command, note, group, stored_check, tuned_by = header_settings(
        out_dir, command, note, group, given_check, tuned_by)
    check = None if not stored_check else _shown((out_dir / stored_check).resolve())
    rejected: list[tuple[Path, str]] = []
    all_records = load_records(runs_dir, rejected)
    records, chosen = select_group(all_records, group)
    superseded, tuned = 0, None
    if tuned_by:
        if not any(r.get("group") == tuned_by for r in all_records):
            raise ValueError(f"tuned_by {tuned_by}: no record in {runs_dir} has that group "
                             "(--tuned-by '' forgets it)")
        tuned = best_settings(all_records, tuned_by)  # picked once, for the check folder too
        records, superseded = keep_tuned(records, tuned)
    rows = build_table(records)
    paired = paired_comparisons(records, n_boot=n_boot, seed=seed)
    information = information_effect(records, n_boot=n_boot, seed=seed)
    if check:
        if not check.is_dir():
            raise ValueError(f"check_runs {check}: no such folder (--check-runs '' forgets it)")
        check_records, _ = select_group(load_records(check), chosen)
        if tuned is not None:  # the tuning of this runs folder decides the check folder's rows too
            check_records, _ = keep_tuned(check_records, tuned)
        name = kernels_name(check_records)
        paired = check_on(paired, paired_comparisons(check_records, n_boot=n_boot, seed=seed), name)
        information = check_on(
            information, information_effect(check_records, n_boot=n_boot, seed=seed), name)
    warnings = comparison_warnings(rows, records)
    if rejected:
        warnings.insert(0, f"{len(rejected)} file(s) in the runs folder are not valid records and "
                           "are left out of every count: "
                        + "; ".join(f"{p.name}: {why}" for p, why in rejected) + ".")

    command = command or reproduce_command(records)
    n_failed = sum(r.get("status") != "ok" for r in records)
    versions = sorted({str(r.get("harness_version")) for r in records if r.get("harness_version")})
    commits = sorted({str(r.get("git_commit"))[:12] for r in records if r.get("git_commit")})
    rebuild = f"python -m harness.leaderboard --runs {shlex.quote(str(runs_dir))} " \
              f"--out {shlex.quote(str(out_dir))}" + (f" --group {shlex.quote(group)}" if group else "") \
              + (f" --check-runs {shlex.quote(str(check))}" if check else "") \
              + (f" --tuned-by {shlex.quote(tuned_by)}" if tuned_by else "")
    header = []
    if command:
        header.append(f"Reproduce the runs: `{command}`")
    header.append(f"Rebuild this leaderboard: `{rebuild}`")
    if all_records:
        prov = f"{len(records)} run records ({n_failed} failed) from `{runs_dir}`"
        if chosen is not None:
            others = defaultdict(int)
            shown = group_names(chosen)
            for r in all_records:
                if r.get("group") not in shown:
                    others[str(r.get("group"))] += 1
            prov += f", group{'s' if len(shown) > 1 else ''} " \
                    + ", ".join(f"`{g}`" for g in sorted(shown))
            if others:
                prov += " (other groups, used only in the reward–KL plot: " \
                        + ", ".join(f"`{g}` {n}" for g, n in sorted(others.items())) + ")"
        if versions:
            prov += f"; harness {', '.join(versions)}"
        if commits:
            prov += f"; commits {', '.join(commits)}"
        header.append(prov + ".")
        where = f"the `{chosen}` sweep" if chosen and "," not in chosen else "their runs"
        if tuned_by:
            left = f"; {superseded} record{'s' if superseded != 1 else ''} at a setting a later " \
                   "grid extension replaced left out" if superseded else ""
            header.append(f"Methods are shown at the setting that won their tuning "
                          f"(`python -m harness.tuning --group {tuned_by}` over the same records"
                          f"{left}; columns β and lr)" + (f": {note}" if note else "") + ".")
        else:
            header.append(f"Methods are shown at the setting {where} ran (columns β and lr)"
                          + (f": {note}" if note else "") + ".")
        platforms = table_platforms(records)
        header.append(("Platform: " if len(platforms) <= 1 else "Platforms: ")
                      + ("; ".join(platforms) if platforms else "— (not recorded)") + ".")
        if check:
            header.append(f"Differences are claimed only where they hold on both kernels: checked "
                          f"against {len(check_records)} records of the same groups in `{check}` "
                          f"({name}).")
    else:
        header.append(f"No run records found in `{runs_dir}`.")
        if note:
            header.append(note)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "reward_kl": plot_reward_kl(all_records, out_dir / "reward_kl.png"),
        "seeds": plot_seed_strips(records, out_dir / "seeds.png"),
        "overoptimisation": plot_overoptimisation(all_records, out_dir / "overoptimisation.png")[0],
        "training_curves": plot_training_curves(records, out_dir / "training_curves.png"),
    }
    plots = {"Seeds: every seed's held-out gold (dots) and the IQM (bar), per track": paths["seeds"],
             "Reward–KL frontier per track: mean held-out gold vs KL per sequence at each β, 95% "
             "intervals, test split (all groups)": paths["reward_kl"],
             "Reward over-optimisation (Gao et al. 2022): gold gain vs √KL of the runs trained on the "
             "reward model, over β and over training, with the fitted d(α − β log d) (all groups)":
                 paths["overoptimisation"],
             "Training curves: held-out gold vs trained tokens, train/kl, reward-model score (EMA; raw faint)":
                 paths["training_curves"]}
    paths["markdown"] = write_text(
        out_dir / "leaderboard.md",
        render_markdown(rows, header, plots={c: p.name for c, p in plots.items()}, paired=paired,
                        warnings=warnings, n_boot=n_boot, seed=seed, information=information))
    paths["csv"] = write_csv(rows, out_dir / "leaderboard.csv")
    paths["paired_csv"] = write_paired_csv([*paired, *information],
                                           out_dir / "leaderboard_paired.csv")
    paths["html"] = write_text(out_dir / "leaderboard.html",
                                      render_html(rows, plots, header, paired=paired, warnings=warnings,
                                                  n_boot=n_boot, seed=seed, information=information))
    if screenshot:
        shot = take_screenshot(paths["html"], out_dir / "leaderboard.png")
        if shot is not None:
            paths["screenshot"] = shot
    return paths



