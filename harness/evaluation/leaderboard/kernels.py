"""Does a difference hold on other CPU kernels? The same sweep re-run where the arithmetic rounds
differently (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``, another CPU, a GPU) gives
a second folder of records; its paired comparisons, matched pair by pair with the table's, decide
whether the answer section may claim a difference: only where the paired t-test separates it on
both (Holm-adjusted over each folder's own table), in the same direction.

Which seed "takes off" flips with the kernels (llama_small seed 2: 0.97 on AVX-512, 0.76-0.79 on
AVX2), so a difference seen on one set of kernels alone can be the rounding of a few seeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from harness.evaluation.stats import platform_identity


def kernels_name(records: Iterable[Mapping[str, Any]]) -> str:
    """What the ok records ran on, short: their CPU capabilities (``"AVX2"``) or GPU names,
    several joined by ``"/"``; ``"another platform"`` when no record says."""
    ids = {platform_identity(r.get("platform")) for r in records if r.get("status") == "ok"}
    names = {str(i[3] or i[2]) for i in ids if i is not None and (i[3] or i[2])}  # gpu, capability
    return "/".join(sorted(names)) or "another platform"


def _pair_key(c: Mapping[str, Any]) -> tuple:
    return (c["model"], c["dataset"], c["group"], c.get("track", ""), frozenset((c["a"], c["b"])))


def check_on(comparisons: Sequence[Mapping[str, Any]], others: Sequence[Mapping[str, Any]],
             name: str) -> list[dict[str, Any]]:
    """Each comparison (a dict of :func:`~harness.evaluation.leaderboard.comparisons.paired_comparisons`
    or ``information_effect``) with ``check_platform`` = ``name`` and ``check``: the same pair of
    the same (model, dataset, group, track) in ``others`` as ``{"n_seeds", "mean_diff", "t_lo",
    "t_hi", "significant", "holds"}``, its difference turned to this comparison's A − B (the two
    folders may order a pair differently), ``holds`` true when the other's t-test separates it
    (its ``significant``: Holm p < 0.05 in its own table) with the same sign as here; ``check``
    is ``None`` when ``others`` has no numbers for the pair."""
    index = {_pair_key(o): o for o in others if o.get("mean_diff") is not None}
    out = []
    for c in comparisons:
        o = index.get(_pair_key(c))
        check = None
        if o is not None:
            sign = 1.0 if o["a"] == c["a"] else -1.0
            d = sign * float(o["mean_diff"])
            lo, hi = o.get("t_lo"), o.get("t_hi")
            if lo is not None and hi is not None and sign < 0:
                lo, hi = -hi, -lo
            same_sign = c.get("mean_diff") is not None and d * float(c["mean_diff"]) > 0
            check = {"n_seeds": o["n_seeds"], "mean_diff": d, "t_lo": lo, "t_hi": hi,
                     "significant": bool(o["significant"]),
                     "holds": bool(o["significant"]) and same_sign}
        out.append({**c, "check_platform": name, "check": check})
    return out


def holds_everywhere(c: Mapping[str, Any]) -> bool:
    """A comparison's difference may be claimed: its t-test separates it here and, where it was
    checked on other kernels (:func:`check_on`), there too."""
    if not c.get("significant"):
        return False
    if "check_platform" not in c:
        return True
    return bool(c.get("check") and c["check"]["holds"])


__all__ = ["check_on", "holds_everywhere", "kernels_name"]
