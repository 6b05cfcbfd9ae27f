"""``sweeps/tune.sh``, the per-track tuning: which grid it runs for each method on each track (a
track's own grid where one exists, offline DPO on the preferences track only), and that every grid
it names gives each method the same budget: 3 KL coefficients x 3 learning rates x 2 seeds on the
validation split, group ``tune``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "tune.sh"
SWEEPS = ROOT / "conf" / "sweep"
TRACKS = {"oracle": {"ppo", "grpo", "rloo", "online_dpo"},
          "preferences": {"ppo", "grpo", "rloo", "online_dpo", "dpo"}}


def dry_run(*overrides: str, tracks: str | None = None) -> list[str]:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    if tracks is not None:
        env["TRACKS"] = tracks
    done = subprocess.run(["bash", str(SCRIPT), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def grid(name: str) -> dict:
    """The sweep file's settings with the sweep files it extends (its defaults) merged under it."""
    conf = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    merged: dict = {}
    for parent in conf.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            merged = grid(parent)
    params = {**merged.get("params", {}),
              **conf.get("hydra", {}).get("sweeper", {}).get("params", {})}
    out = {**merged, **{k: v for k, v in conf.items() if k not in ("defaults", "hydra")}}
    out["params"] = params
    return out


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_each_track_runs_its_methods_on_the_tracks_own_grid_where_there_is_one():
    lines = dry_run("model=moe_small", "logger=none")
    runs = [re.search(r"\+sweep=(\S+) track=(\S+)", line).groups() for line in lines]
    assert all(line.endswith("model=moe_small logger=none") for line in lines)  # overrides pass
    for track, methods in TRACKS.items():
        grids = [g for g, t in runs if t == track]
        assert len(grids) == len(methods)
        for method in methods:
            own = f"tune_{method}_{track}"
            want = own if (SWEEPS / f"{own}.yaml").exists() else f"tune_{method}"
            assert grids.count(want) == 1, (track, method, grids)
    assert ("tune_grpo_preferences", "preferences") in runs  # the preferences grids are used
    assert ("tune_dpo", "oracle") not in runs  # offline DPO learns from the pairs only


def test_tracks_picks_the_tracks_and_a_dry_run_runs_no_job():
    lines = dry_run(tracks="oracle")
    assert len(lines) == len(TRACKS["oracle"]) and all("track=oracle" in line for line in lines)


def test_every_grid_gives_each_method_the_same_budget():
    named = {re.search(r"\+sweep=(\S+)", line).group(1) for line in dry_run()}
    assert named == {p.stem for p in SWEEPS.glob("tune_*.yaml")}  # no grid left unused
    for name in named:
        conf = grid(name)
        sizes = {k: len(str(v).split(",")) for k, v in conf["params"].items()}
        assert sizes == {"method.beta": 3, "method.optim.lr": 3, "seed": 2}, (name, sizes)
        assert conf["group"] == "tune" and conf["eval"]["split"] == "validation", name
        if name.endswith("_preferences"):
            assert conf["track"] == "preferences", name
