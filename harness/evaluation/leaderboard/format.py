"""How the leaderboard writes numbers and cells: a mean with its interval, an IQM, a paired
difference, the seeds and status of a row, its costs, and the footer that defines them all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.evaluation.leaderboard.columns import COST_TABLE, TRACK_NOTE, Column
from harness.evaluation.leaderboard.table import SEED_BOOT
from harness.evaluation.stats import round_to_ci


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


def num(x: float) -> str:
    return f"{x:g}"


def setting_text(values: Sequence[float]) -> str:
    return "—" if not values else ", ".join(num(v) for v in values)


def seeds_text(row: Mapping[str, Any]) -> str:
    text = f"{row['n_seeds']}"
    if row["n_failed"]:
        text += f" (+{row['n_failed']} failed)"
    if row.get("n_duplicates"):
        text += f" ‡{row['n_duplicates']} dup"
    return text


def status_text(row: Mapping[str, Any], limit: int | None = 120) -> str:
    if row["status"] == "ok":
        return "ok"
    err = " ".join(str(row.get("error") or "").split())
    if limit is not None and len(err) > limit:
        err = err[: limit - 1] + "…"
    return f"failed: {err}" if err else "failed"


def cached_text(row: Mapping[str, Any], stage: str) -> str:
    """``"cached"`` when every seed loaded the stage from the cache, ``"cached k/n"`` for some."""
    cell = row["metrics"].get(f"cost/{stage}/cached") or {}
    if not cell.get("n") or cell.get("mean") is None:
        return ""
    k = round(cell["mean"] * cell["n"])
    return "" if k == 0 else "cached" if k == cell["n"] else f"cached {k}/{cell['n']}"


def cost_cells(row: Mapping[str, Any]) -> list[str]:
    cells = []
    for col in COST_TABLE:
        text = format_cell(row["metrics"].get(col.key), row["n_seeds"]).replace(" ± 0 ", " ").removesuffix(" ± 0")
        stage = col.key.split("/")[1] if col.key.count("/") == 2 else None
        if stage in ("sft", "rm") and (c := cached_text(row, stage)):
            text += f" ({c})"
        cells.append(text)
    return cells


def bound(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def p_text(p: float | None) -> str:
    """Three significant digits below 0.1 (so 0.0498 never reads as "0.050"), else two decimals."""
    return "—" if p is None else f"{p:.3g}" if p < 0.1 else f"{p:.2f}"


def interval(lo: float | None, hi: float | None, digits: int = 3) -> str:
    return "—" if lo is None or hi is None else f"[{bound(lo, digits)}, {bound(hi, digits)}]"


def paired_cells(c: Mapping[str, Any]) -> list[str]:
    if c["mean_diff"] is None:
        return [f"{c['a']} − {c['b']}", "—", "—", "—", "—", "—", "—", "—", "—", "—", "0", "0",
                f"skipped: {c['skipped']}"]
    mark = " ✓" if c["significant"] else ""
    poi = "—" if c.get("poi") is None else (
        f"{c['poi']:.2f} [{c['poi_lo']:.2f}, {c['poi_hi']:.2f}]")
    wins = "—" if c.get("wins") is None else f"{c['wins']}/{c['n_seeds']}"
    return [f"{c['a']} − {c['b']}", bound(c["mean_diff"]), interval(c.get("t_lo"), c.get("t_hi")),
            p_text(c.get("t_p")), p_text(c.get("holm_p")) + mark, wins, poi,
            interval(c["ci_lo"], c["ci_hi"]), p_text(c["p"]), p_text(c["sign_flip_p"]),
            str(c["n_seeds"]), str(c["n_prompts"]), c["skipped"] or ""]


PAIRED_HEAD = ("A − B", "Δ gold", "95% interval", "p", "Holm p", "A ahead", "P(A > B)",
               "bootstrap 95%", "bootstrap p", "sign-flip p", "seeds", "prompts", "note")


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
        "calibrated at any number of seeds when the D_s are roughly normal. Holm p: that p adjusted by "
        "Holm's step-down method over the pairs of one table (all pairs of methods of one model, task, "
        "group and track; the information effects of one model, task and group), so that the chance of "
        "any false claim in a table is at most 5%; ✓: Holm p < 0.05, the only statistic that decides a "
        "difference. A ahead: the seeds where A scores above B, of the seeds both ran (paired). "
        "P(A > B): the share of (seed of A, seed of B) pairs where "
        "A scores higher, ties half (Agarwal et al. 2021), with a stratified bootstrap 95% interval "
        f"({SEED_BOOT} replicates, each method's seeds resampled on their own). Bootstrap 95% and p: the "
        f"two-level paired bootstrap (B = {n_boot}: seeds with replacement, then prompts within each seed, "
        f"the same prompts for both methods; numpy seed {seed}), p = min(1, 2·min(P(Δ*≤0), P(Δ*≥0))) "
        "with P = (1 + count)/(B + 1): it sees only S seed values and is too narrow at 3 seeds, so it "
        "decides nothing. Sign-flip p: exact permutation test of the per-seed differences (its smallest "
        "value is 2/2^S: 0.25 with 3 seeds).",
    ]
    return lines
