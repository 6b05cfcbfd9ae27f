"""Run records: atomic writes under concurrency, tolerant loading, provenance helpers."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import warnings
from pathlib import Path

import pytest

from harness.evaluation.records import (
    config_hash,
    finished_record,
    git_commit,
    harness_version,
    load_records,
    new_record,
    new_run_id,
    record_text,
    validate_record,
    write_record,
)

N_PROCS = 8
N_PER_PROC = 20
N_OVERWRITES = 30


def _record(run_id: str, writer: int = 0, i: int = 0) -> dict:
    """A realistic record, padded so a torn write would be noticed."""
    return {
        "run_id": run_id,
        "status": "ok",
        "error": None,
        "method": "dpo",
        "model": "llama_small",
        "dataset": "toy",
        "seed": i,
        "group": "g",
        "metrics": {"eval/gold_reward": 0.5 + i / 100, "eval/kl": 0.1},
        "cost": {"cost/wall_s": 12.0},
        "cache_keys": {"sft": "abc", "rm": None},
        "config": {"writer": writer, "i": i, "pad": "x" * 20_000},
        "harness_version": "0.1.0",
        "git_commit": None,
        "created": "2026-11-24T00:00:00+00:00",
        "history": {"train/reward": [[s, s / 10] for s in range(200)]},
    }


def _writer(args: tuple[int, str]) -> tuple[int, int]:
    """Writes its own records, then tries the same run_id over and over: returns (writer, how
    many of those writes were refused)."""
    writer, runs_dir = args
    for i in range(N_PER_PROC):
        write_record(_record(f"w{writer}-r{i}", writer, i), Path(runs_dir))
    refused = 0
    for i in range(N_OVERWRITES):  # every process hammers the same run_id
        try:
            write_record(_record("shared", writer, i), Path(runs_dir))
        except FileExistsError:
            refused += 1
    return writer, refused


def _reader(runs_dir: str, stop: str, report: str) -> None:
    """Read every record over and over while the writers run; report torn reads."""
    reads, torn = 0, []
    while not Path(stop).exists():
        for path in Path(runs_dir).glob("*.json") if Path(runs_dir).is_dir() else []:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            reads += 1
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                torn.append(f"{path.name}: {exc}")
    Path(report).write_text(json.dumps({"reads": reads, "torn": torn}))


def test_concurrent_writers_lose_and_corrupt_nothing(tmp_path: Path) -> None:
    runs_dir = tmp_path / "results" / "runs"  # not yet created: write_record creates it
    ctx = mp.get_context("spawn")
    stop, report = tmp_path / "stop", tmp_path / "report.json"
    reader = ctx.Process(target=_reader, args=(str(runs_dir), str(stop), str(report)))
    reader.start()
    try:
        with ctx.Pool(N_PROCS) as pool:
            done = pool.map(_writer, [(w, str(runs_dir)) for w in range(N_PROCS)])
    finally:
        stop.touch()
        reader.join(timeout=60)
    assert sorted(w for w, _ in done) == list(range(N_PROCS))
    # one write of the shared id won; every other one was refused, none replaced it
    assert sum(n for _, n in done) == N_PROCS * N_OVERWRITES - 1
    seen = json.loads(report.read_text())
    assert seen["reads"] > 0 and seen["torn"] == [], "a reader saw a half-written record"

    files = sorted(p.name for p in runs_dir.iterdir())
    assert len(files) == N_PROCS * N_PER_PROC + 1, "temporary files left behind or records lost"
    assert not [f for f in files if f.startswith(".") or f.endswith(".tmp")]
    for path in runs_dir.iterdir():  # every file parses and is complete
        rec = json.loads(path.read_text())
        assert rec["run_id"] == path.stem
        assert len(rec["config"]["pad"]) == 20_000
        assert len(rec["history"]["train/reward"]) == 200

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unreadable
        records = load_records(runs_dir)
    assert len(records) == N_PROCS * N_PER_PROC + 1
    ids = {r["run_id"] for r in records}
    assert ids == {f"w{w}-r{i}" for w in range(N_PROCS) for i in range(N_PER_PROC)} | {"shared"}
    shared = next(r for r in records if r["run_id"] == "shared")
    assert shared["config"]["i"] == 0  # the first write of some writer won, whole


def test_load_records_skips_and_warns_about_bad_files(tmp_path: Path) -> None:
    write_record(_record("good"), tmp_path)
    (tmp_path / "truncated.json").write_text('{"run_id": "truncated", "sta')
    (tmp_path / "not_a_record.json").write_text("[1, 2, 3]")
    (tmp_path / "bad_status.json").write_text(json.dumps({**_record("bad_status"), "status": "?"}))
    (tmp_path / ".good.json.abc.tmp").write_text("{")  # an in-flight write: ignored silently
    (tmp_path / "notes.txt").write_text("not json")
    with pytest.warns(UserWarning, match="skipping unreadable run record") as caught:
        records = load_records(tmp_path)
    assert [r["run_id"] for r in records] == ["good"]
    assert len(caught) == 3
    assert any("truncated.json" in str(w.message) for w in caught)


def test_load_records_missing_dir_warns_and_returns_empty(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no runs folder"):
        assert load_records(tmp_path / "nope") == []


def test_write_record_roundtrip_and_never_replace(tmp_path: Path) -> None:
    rec = _record("run-1")
    rec["config"]["path"] = Path("/some/where")  # not JSON-native: converted
    rec["metrics"]["eval/nan_metric"] = float("nan")
    path = write_record(rec, tmp_path)
    assert path == tmp_path / "run-1.json"
    back = load_records(tmp_path)[0]
    assert back["config"]["path"] == "/some/where"
    assert back["metrics"]["eval/nan_metric"] != back["metrics"]["eval/nan_metric"]  # NaN
    with pytest.raises(FileExistsError):
        write_record({**rec, "status": "failed", "error": "boom"}, tmp_path)
    (back,) = load_records(tmp_path)
    assert back["status"] == "ok" and back["error"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_record_file_keeps_each_list_of_numbers_on_one_line(tmp_path: Path) -> None:
    rec = _record("run-2")
    rec["history"] = {"train/loss": [[0, 0.5], [1, 0.25]], "eval/gold_reward": [[2, 0.75, 64, 1.5]]}
    rec["per_prompt"] = {"split": "test", "gold_reward": [1.0, 0.0, 1.0]}
    rec["metrics"]["eval/inf_metric"] = float("inf")
    rec["config"]["nested"] = {"empty": {}, "none": [], "rows": [{"a": 1}, {"b": [1, 2]}]}
    text = (write_record(rec, tmp_path)).read_text()
    assert text == record_text(rec) and text.endswith("}\n")
    lines = text.splitlines()
    assert '    "train/loss": [[0, 0.5], [1, 0.25]],' in lines
    assert '    "eval/gold_reward": [[2, 0.75, 64, 1.5]]' in lines
    assert '    "gold_reward": [1.0, 0.0, 1.0]' in lines
    assert '      "empty": {},' in lines and '      "none": [],' in lines
    assert '        {"a": 1},' not in lines and '          "a": 1' in lines  # objects in a list: indented
    # the same values as the plain indented JSON the records were written as before
    plain = json.loads(json.dumps(rec, indent=2, default=str, allow_nan=True))
    assert json.loads(text) == plain and lines[0] == "{" and lines[1].startswith('  "')


@pytest.mark.parametrize("bad", [
    {"run_id": "../escape"}, {"run_id": ""}, {"run_id": ".hidden"}, {"run_id": "a/b"},
    {"status": "running"}, {"method": None}, {"metrics": [1, 2]},
])
def test_validate_record_rejects(bad: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_record({**_record("x"), **bad}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_new_record_fills_provenance() -> None:
    rec = new_record(run_id="dpo-s0", method="dpo", model="m", dataset="d", seed=0,
                     metrics={"eval/kl": 1}, history={"train/kl": [(0, 0.0), (1, 0.1)]})
    validate_record(rec)
    assert rec["harness_version"] and rec["created"].endswith("+00:00")
    assert rec["metrics"] == {"eval/kl": 1.0}
    assert rec["history"]["train/kl"] == [[0, 0.0], [1, 0.1]]


def test_git_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None  # not a repository
    assert git_commit(tmp_path / "does-not-exist") is None
    sha = git_commit(Path(__file__).parent)
    assert sha is None or re.fullmatch(r"[0-9a-f]{40}", sha)


def test_harness_version() -> None:
    version = harness_version()
    assert isinstance(version, str) and version


def test_win_rate_and_gold_accuracy_by_hand():
    from harness.evaluation.gold import Completions, win_rate

    # courier-style graded rewards: wins 1.0>0.5 and 0.0>-1.0, tie 0.5=0.5 (half), loss -1.0<1.0
    assert win_rate([1.0, 0.0, 0.5, -1.0], [0.5, -1.0, 0.5, 1.0]) == pytest.approx(2.5 / 4)
    done = Completions(["a"] * 4, ["r"] * 4, [1.0, 0.5, 1.0, -1.0])
    assert done.mean_reward == pytest.approx(0.375)
    assert done.accuracy(1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 0.0])


# ------------------------------------------------------------- folders that cannot be written
def test_a_folder_that_cannot_be_written_is_refused_naming_its_field(tmp_path: Path) -> None:
    from harness.config import ConfigError
    from harness.util.atomic import check_writable

    (tmp_path / "blocked").write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match=r"results_dir='.*blocked/runs': cannot write there"):
        check_writable(tmp_path / "blocked" / "runs", "results_dir")
    check_writable(tmp_path / "new" / "deeper", "cache_dir")  # created, probe removed
    assert list((tmp_path / "new" / "deeper").iterdir()) == []


def test_the_summary_is_written_when_the_record_cannot_be_and_the_run_fails(tmp_path: Path) -> None:
    from harness.pipeline.outputs import RecordNotWritten, write_outputs

    (tmp_path / "blocked").write_text("")
    summary = {"status": "ok", "method": "dpo", "model": "llama_tiny", "dataset": "arith", "seed": 0,
               "run_id": "dpo_llama_tiny_arith_s0_0123456789ab",
               "metrics": {"eval/gold_reward": 0.5},
               "config": {"results_dir": str(tmp_path / "blocked"), "group": "default"}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(RecordNotWritten, match="could not write the results record"):
        write_outputs(summary, run_dir)
    saved = json.loads((run_dir / "summary.json").read_text())  # written first, kept
    assert saved["metrics"] == {"eval/gold_reward": 0.5} and "record" not in saved
    assert saved["record_error"].startswith(("NotADirectoryError", "FileExistsError"))
    summary["config"]["results_dir"] = str(tmp_path / "results")  # and the ordinary case: both
    write_outputs(summary, run_dir)
    record = Path(json.loads((run_dir / "summary.json").read_text())["record"])
    assert record.name == "dpo_llama_tiny_arith_s0_0123456789ab.json" and record.is_file()
    # the same run id again: refused, and the record already there is left as it was
    before = record.read_bytes()
    summary["metrics"] = {"eval/gold_reward": 0.9}
    with pytest.raises(RecordNotWritten, match="FileExistsError"):
        write_outputs(summary, run_dir)
    assert record.read_bytes() == before


def test_run_ids_are_unique_and_file_name_safe_whatever_the_names() -> None:
    ids = {new_run_id("grpo", "llama_small", "arith", 0) for _ in range(200)}
    assert len(ids) == 200
    odd = new_run_id("dpo", "my model/α", "team data", 3)
    assert re.fullmatch(r"dpo_my-model--_team-data_s3_[0-9a-f]{12}", odd)


def test_the_config_hash_ignores_where_a_run_writes_and_nothing_else() -> None:
    cfg = {"seed": 0, "method": {"name": "grpo", "beta": 0.04}, "cache_dir": "a", "results_dir": "b",
           "logger": {"kind": "wandb"}, "log_level": "WARNING", "skip_done": True, "group": "g"}
    same = {**cfg, "cache_dir": "elsewhere", "results_dir": None, "logger": {"kind": "none"},
            "log_level": "INFO", "skip_done": False, "force_retrain": True}
    assert config_hash(cfg) == config_hash(same)
    for changed in ({"seed": 1}, {"method": {"name": "grpo", "beta": 0.05}}, {"group": "h"}):
        assert config_hash({**cfg, **changed}) != config_hash(cfg)


def test_the_config_hash_leaves_out_the_base_stages_a_run_does_not_build_on() -> None:
    """GRPO on the gold reward never reads the reward model: a new reward-model recipe keeps its
    hash (and its finished records); on the reward model, or in the reward model's own run, it
    does not. The SFT base is part of every one."""
    from omegaconf import OmegaConf

    from harness.bench.common import compose_config
    from harness.settings import validate

    def hashes(*overrides: str) -> tuple[str, str, str]:
        composed = compose_config(list(overrides))
        validate(composed)  # puts the method on its track, as a run does before its record
        cfg = OmegaConf.to_container(composed, resolve=True)
        rm_changed = {**cfg, "rm": {**cfg["rm"], "max_steps": cfg["rm"]["max_steps"] + 1}}
        sft_changed = {**cfg, "sft": {**cfg["sft"], "max_steps": cfg["sft"]["max_steps"] + 1}}
        return config_hash(cfg), config_hash(rm_changed), config_hash(sft_changed)

    base, rm, sft = hashes("method=grpo", "track=oracle")
    assert base == rm and base != sft
    for overrides in (("method=grpo", "track=preferences"), ("method=ppo", "track=preferences"),
                      ("method=rm",)):
        base, rm, sft = hashes(*overrides)
        assert base != rm and base != sft, overrides
    base, rm, sft = hashes("method=dpo")
    assert base == rm and base != sft


def test_a_finished_record_is_found_whatever_hash_it_stored(tmp_path: Path) -> None:
    """A record is matched by its config's hash computed now, not the one it stored: a record
    written before the hash's definition changed is still found."""
    cfg = {"seed": 0, "method": {"name": "grpo"}}
    rec = new_record(run_id="old", method="grpo", model="m", dataset="d", seed=0, status="ok",
                     config=cfg, platform=None)
    rec["config_hash"] = "0" * 64  # what an older definition stored
    done = write_record(rec, tmp_path)
    assert finished_record(tmp_path, cfg, None) == done
    assert finished_record(tmp_path, {**cfg, "seed": 1}, None) is None


def test_a_finished_record_is_found_by_config_and_platform(tmp_path: Path) -> None:
    cpu = {"torch": "2.13.0+cpu", "device": "cpu", "cpu_capability": "AVX512", "threads": 1,
           "gpu": None, "env": {}}
    cfg = {"seed": 0, "method": {"name": "grpo"}}

    def write(status: str, config: dict, platform: dict, name: str) -> Path:
        rec = new_record(run_id=name, method="grpo", model="m", dataset="d", seed=0, status=status,
                         config=config, platform=platform)
        return write_record(rec, tmp_path)

    write("failed", cfg, cpu, "a")
    write("ok", {**cfg, "seed": 1}, cpu, "b")
    write("ok", cfg, {**cpu, "env": {"ATEN_CPU_CAPABILITY": "avx2"}}, "c")
    assert finished_record(tmp_path, cfg, cpu) is None  # failed / other config / other kernels
    done = write("ok", cfg, {**cpu, "threads": 2}, "d")  # threads do not change the platform
    assert finished_record(tmp_path, cfg, cpu) == done


def test_a_run_started_outside_the_repository_records_the_codes_commit(tmp_path, monkeypatch):
    """The commit comes from where the harness's code is, not from the current directory."""
    from harness.pipeline.outputs import record_for

    monkeypatch.chdir(tmp_path)  # not a git repository
    summary = {"run_id": "grpo_m_arith_s0_000000000000", "method": "grpo", "model": "m",
               "dataset": "arith", "seed": 0, "status": "ok",
               "config": {"group": "g"}, "metrics": {}, "cost": {}}
    record = record_for(summary, tmp_path / "outputs" / "run")
    assert record["git_commit"] == git_commit(Path(__file__).parent)
    assert record["git_commit"] is not None


def test_a_run_waiting_for_a_stage_lock_says_who_holds_it(tmp_path: Path, caplog) -> None:
    """Two runs sharing a cache: the second waits on the first's stage lock, and says so (with the
    holder's pid and since when) instead of hanging in silence."""
    import logging
    import os
    import threading
    import time

    from harness.cache import StageCache

    cache = StageCache(tmp_path)
    caplog.set_level(logging.INFO, logger="harness")
    got = threading.Event()

    def second() -> None:
        with cache.lock("sft-abc"):
            got.set()

    with cache.lock("sft-abc"):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        assert not got.is_set()  # still waiting
    waiter.join(timeout=10)
    assert got.is_set()
    said = caplog.text
    assert f"stage sft-abc: waiting for its lock, held by pid {os.getpid()} on" in said
    assert "stage sft-abc: lock acquired after" in said


def test_a_file_system_without_hard_links_still_never_replaces(tmp_path: Path, monkeypatch) -> None:
    import os

    from harness.util.atomic import write_bytes

    def no_links(*_):
        raise PermissionError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    path = write_bytes(tmp_path / "r.json", b"first", replace=False)
    assert path.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        write_bytes(tmp_path / "r.json", b"second", replace=False)
    assert path.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
