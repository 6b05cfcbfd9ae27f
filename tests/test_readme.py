"""The README is a manual that works as written: its cheap commands run, its links resolve, and
it stays short (the reference material lives beside what it describes)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_commands() -> list[str]:
    """Every line of the README's ```bash blocks, without its trailing comment."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


CHEAP = [c for c in fenced_commands()
         if c.startswith("python -m harness") and ("--cfg job" in c or "--help" in c or "harness.params" in c)]


def test_the_readme_is_a_manual_of_at_most_15_kb():
    assert len(README.encode()) <= 15_000
    head = README[:README.index("## What a run does")]
    for must in ("## Set up", "## Run", "## Test", "pip install torch==2.13.0", "python -m harness\n",
                 "python -m pytest"):
        assert must in head, must  # set-up, the main job and the test command on the first screen


def test_the_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), target


def test_the_ci_runs_the_readmes_set_up_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    setup = next(c for c in fenced_commands() if c.startswith("python3 -m venv"))
    test = next(c for c in fenced_commands() if "pytest" in c)
    assert setup.replace("pip install ", "pip install -q ") in ci
    for part in test.split(" && "):
        assert part in ci


@pytest.mark.parametrize("command", CHEAP)
def test_the_readmes_cheap_commands_run_as_written(command):
    assert len(CHEAP) >= 3
    argv = shlex.split(command)
    out = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if "harness.params model=llama3_8b" in command:  # the README says what its last line is
        assert out.stdout.strip().splitlines()[-1] == "total 8030261248"
