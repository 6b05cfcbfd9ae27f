"""A regular (non-editable) install works outside the repository: the wheel ships ``conf/``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the build reads; copied so that the build leaves no build/ or egg-info in the repository
# and no stale build/lib file (a module renamed since the last build) can slip into the wheel
BUILD_INPUTS = ("pyproject.toml", "README.md", "harness", "conf")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _pip_wheel(src: Path, wheel_dir: Path) -> list[str]:
    """``pip wheel`` args: offline without build isolation when the venv has setuptools."""
    args = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(wheel_dir), "-q"]
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return args  # build isolation fetches setuptools from PyPI
    return [*args, "--no-build-isolation"]


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_outside_the_repository(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    wheel_dir = tmp_path / "wheels"
    _run(_pip_wheel(src, wheel_dir), cwd=tmp_path)
    (wheel,) = wheel_dir.glob("harness-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    shipped_conf = {n.removeprefix("harness/conf/") for n in names if n.startswith("harness/conf/")}
    repo_conf = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert repo_conf and "config.yaml" in repo_conf and "params.yaml" in repo_conf
    assert repo_conf <= shipped_conf, f"configs missing from the wheel: {sorted(repo_conf - shipped_conf)}"
    templates = {p.relative_to(ROOT).as_posix() for p in (ROOT / "harness/evaluation/tasks").glob("*.yaml.in")}
    assert templates and templates <= names, f"lm-eval templates missing: {sorted(templates - names)}"
    # every module of harness/ (pyproject.toml lists the subpackages explicitly: a new one must be added)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "harness").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, f"modules missing from the wheel (add the package to pyproject.toml): " \
                             f"{sorted(modules - names)}"
    assert not any(n.startswith("conf/") for n in names), "conf/ must ship inside the package, not top-level"

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site),
          str(wheel)], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    where = _run([sys.executable, "-c", "import harness, harness.util.conf_path as c; "
                  "print(harness.__file__); print(c.config_dir())"], cwd=work, env=env)
    package_file, conf_dir = (Path(line) for line in where.stdout.split())
    assert package_file.resolve() == (site / "harness" / "__init__.py").resolve()
    assert conf_dir.resolve() == (site / "harness" / "conf").resolve()
    assert ROOT not in package_file.resolve().parents

    job = _run([sys.executable, "-m", "harness", "--cfg", "job"], cwd=work, env=env)
    assert "model:" in job.stdout and "name: llama_small" in job.stdout, job.stdout

    params = _run([sys.executable, "-m", "harness.params", "model=llama3_8b"], cwd=work, env=env)
    assert params.stdout.strip().splitlines()[-1] == "total 8030261248", params.stdout

    # a whole (tiny) run of the installed package, lm-eval on its exported task included: the
    # configs, the stage modules and the lm-eval templates all come from the wheel
    _run([sys.executable, "-m", "harness", "method=sft", "model=llama_tiny", "sft.max_steps=4",
          "sft.val_every=2", "eval.limit=4", "eval.curve_points=0", "eval.lm_eval.limit=4",
          "logger=none", "dataset.n_train=200", "dataset.n_pairs=40", "dataset.n_eval=8",
          f"cache_dir={work / 'cache'}", f"results_dir={work / 'results'}",
          f"hydra.run.dir={work / 'run'}"], cwd=work, env=env)
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and "eval/harness_arith_gold/gold_reward" in summary["metrics"]
