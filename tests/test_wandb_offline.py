"""Reading offline W&B runs back from disk: a real offline run written by wandb, read back."""

from __future__ import annotations

from pathlib import Path

import pytest
from wandb_offline import (
    OfflineRun,
    WandbFileError,
    _unwrap_config,
    find_runs,
    iter_records,
    read_run,
)

BIG = "x" * 100_000  # > 3 blocks of 32 KiB: forces FIRST/MIDDLE/LAST fragments


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Write one real offline run; returns (WANDB_DIR, the run's sync_dir)."""
    wandb = pytest.importorskip("wandb")
    wandb_dir = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(wandb_dir))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        mp.delenv("WANDB_API_KEY", raising=False)
        run = wandb.init(
            project="harness-test",
            group="dpo-llama_small-toy",
            job_type="align",
            tags=["dpo", "seed0"],
            name="dpo-s0",
            config={"method": {"name": "dpo", "beta": 0.1}, "model": {"d_model": 64},
                    "seed": 0, "big": BIG},
        )
        for step in range(4):
            run.log({"train/loss": 1.0 / (step + 1), "train/kl": 0.1 * step}, step=step)
        table = wandb.Table(columns=["prompt", "response", "reward"],
                            data=[["2+2=", "4", 1.0], ["3+3=", "7", 0.0]])
        run.log({"samples": table}, step=4)
        run.config.update({"late": "added"})
        run.summary["eval/gold_reward"] = 0.625
        run.summary["eval/win_rate"] = 0.75
        sync_dir = Path(run.settings.sync_dir)
        run.finish()
        wandb.teardown()
    return wandb_dir, sync_dir


def test_find_runs(offline_run: tuple[Path, Path]) -> None:
    wandb_dir, sync_dir = offline_run
    assert find_runs(wandb_dir) == [sync_dir]  # WANDB_DIR or ...
    assert find_runs(wandb_dir / "wandb") == [sync_dir]  # ... the wandb/ folder itself
    assert find_runs(wandb_dir / "missing") == []


def test_read_run_metadata_config_summary(offline_run: tuple[Path, Path]) -> None:
    _, sync_dir = offline_run
    run = read_run(sync_dir)
    assert isinstance(run, OfflineRun)
    assert run.complete and run.exit_code == 0
    assert run.project == "harness-test"
    assert run.group == "dpo-llama_small-toy"
    assert run.job_type == "align"
    assert run.name == "dpo-s0"
    assert run.tags == ["dpo", "seed0"]
    assert sync_dir.name.endswith(run.run_id)
    assert run.config == {"method": {"name": "dpo", "beta": 0.1}, "model": {"d_model": 64},
                          "seed": 0, "big": BIG, "late": "added"}
    assert run.summary["eval/gold_reward"] == 0.625
    assert run.summary["eval/win_rate"] == 0.75
    assert run.summary["train/loss"] == pytest.approx(0.25)
    assert "_wandb" not in run.summary


def test_read_run_history(offline_run: tuple[Path, Path]) -> None:
    run = read_run(offline_run[1])
    assert [row["_step"] for row in run.history] == [0, 1, 2, 3, 4]
    assert run.metric("train/loss") == [
        (0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3)), (3, 0.25)
    ]
    assert [v for _, v in run.metric("train/kl")] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert run.history[4]["samples"]["_type"] == "table-file"


def test_read_run_tables_and_files(offline_run: tuple[Path, Path]) -> None:
    run = read_run(offline_run[1])
    assert set(run.tables) == {"samples"}
    assert run.tables["samples"]["columns"] == ["prompt", "response", "reward"]
    assert run.tables["samples"]["data"] == [["2+2=", "4", 1.0], ["3+3=", "7", 0.0]]
    table_files = [f for f in run.files if f.startswith("media/table/")]
    assert len(table_files) == 1 and table_files[0].endswith(".table.json")


def test_truncated_file_reads_what_is_complete(offline_run: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    (src,) = offline_run[1].glob("run-*.wandb")
    data = src.read_bytes()
    assert len(data) > 3 * 32 * 1024  # the big config spans blocks
    full = list(iter_records(src))
    cut = tmp_path / "offline-run-x" / src.name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    partial = list(iter_records(cut))
    assert 0 < len(partial) < len(full)
    assert read_run(cut.parent).complete is False


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "run-abc.wandb"
    bad.write_bytes(b"not a wandb file at all")
    with pytest.raises(WandbFileError):
        list(iter_records(bad))
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "empty")


def test_unwrap_config() -> None:
    wrapped = {"lr": {"value": 0.1, "desc": None}, "model": {"value": {"d": {"value": 4}}},
               "plain": {"value": 1, "other": 2}}
    assert _unwrap_config(wrapped) == {"lr": 0.1, "model": {"d": 4},
                                       "plain": {"value": 1, "other": 2}}
