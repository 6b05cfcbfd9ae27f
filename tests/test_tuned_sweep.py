"""``sweeps/tuned.sh``, the comparison at each method's tuned setting: it runs every method of
each track at the setting that won its tuning on that track, and refuses, naming what is
missing, before any job when a method was not tuned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.evaluation.records import new_record, write_record

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "tuned.sh"
TRACKS = {"oracle": ("ppo", "grpo", "rloo", "online_dpo"),
          "preferences": ("ppo", "grpo", "rloo", "online_dpo", "dpo")}


def dry_run(results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
           "HARNESS_RESULTS_DIR": str(results), "SEEDS": "llama_small:range(0,2)"}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def tuning_record(results: Path, method: str, track: str, lr: float, gold: float) -> None:
    rec = new_record(run_id=f"{method}_{track}_{lr}", method=method, model="llama_small",
                     dataset="arith", seed=0, status="ok", group="tune",
                     config={"method": {"name": method, "beta": 0.1, "optim": {"lr": lr}}},
                     metrics={"eval/gold_reward": gold})
    rec.update(track=track, per_prompt={"split": "validation"})
    write_record(rec, results / "runs")


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_every_method_runs_at_its_tuned_setting_on_each_track(tmp_path):
    for track, methods in TRACKS.items():
        for method in methods:
            # the oracle track prefers the larger lr, the preferences track the smaller
            tuning_record(tmp_path, method, track, 1e-4, 0.5 if track == "preferences" else 0.3)
            tuning_record(tmp_path, method, track, 3e-4, 0.4)
    done = dry_run(tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "method=rm group=tracks_tuned model=llama_small seed=range(0,2)" in lines[0]
    jobs = lines[1:]
    assert len(jobs) == sum(map(len, TRACKS.values()))
    for track, methods in TRACKS.items():
        lr = "0.0001" if track == "preferences" else "0.0003"
        for method in methods:
            want = f"method={method} track={track} method.beta=0.1 method.optim.lr={lr} group=tracks_tuned"
            assert sum(want in job for job in jobs) == 1, want


def test_a_method_not_tuned_stops_the_script_before_any_job(tmp_path):
    for track, methods in TRACKS.items():
        for method in methods:
            if (method, track) != ("dpo", "preferences"):
                tuning_record(tmp_path, method, track, 3e-4, 0.4)
    done = dry_run(tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert "not tuned" in done.stderr and "dpo/llama_small/preferences" in done.stderr
