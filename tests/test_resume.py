"""Resume after a kill: the loader's position, the RNG states, and killed runs that, rerun with the
same command, reach the same final metrics as an uninterrupted run with the same seed."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_methods import TINY_SFT, composed
from torch.utils.data import RandomSampler

from harness import resume
from harness.data.resumable import ResumableLoader
from harness.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the loader
def batches(loader, n: int | None = None) -> list[list[int]]:
    out = []
    for b in loader:
        out.append([int(x) for x in b])
        if n is not None and len(out) == n:
            break
    return out


def shuffled(seed: int = 3) -> ResumableLoader:
    return ResumableLoader(list(range(50)), batch_size=4, shuffle=True,
                           generator=torch.Generator().manual_seed(seed))


def test_the_loader_keeps_pytorchs_shuffle_order():
    plain = torch.utils.data.DataLoader(list(range(50)), batch_size=4, shuffle=True,
                                        generator=torch.Generator().manual_seed(3))
    ours = shuffled()
    for _ in range(3):  # three passes: every pass draws a new permutation from the generator
        assert batches(ours) == batches(plain)


@pytest.mark.parametrize("consumed", [0, 3, 12, 13])  # 13 = every batch of the pass
def test_the_loader_resumes_mid_pass_and_the_passes_after_it(consumed):
    a = shuffled()
    batches(a)                            # pass 1
    it = iter(a)                          # pass 2: `consumed` batches trained, one prefetched
    seen = [next(it) for _ in range(min(consumed + 1, len(a)))]
    a.mark_consumed(consumed)
    state = a.state_dict()
    rest = [[int(x) for x in b] for b in seen[consumed:]] + [[int(x) for x in b] for b in it]
    after = [rest] + [batches(a) for _ in range(2)]  # the rest of pass 2, then passes 3 and 4

    b = shuffled(seed=99)                 # a fresh process: its generator state is lost anyway
    b.load_state_dict(state)
    resumed = [batches(b) for _ in range(3)]
    if consumed == len(a):                # a finished pass resumes at the next one
        after = after[1:]
        resumed = resumed[:2]
    assert resumed == after


def test_the_loader_resumes_draws_with_replacement():
    def loader(seed):
        sampler = RandomSampler(list(range(30)), replacement=True, num_samples=40,
                                generator=torch.Generator().manual_seed(seed))
        return ResumableLoader(list(range(30)), batch_size=4, sampler=sampler, collate_fn=list)
    a = loader(5)
    it = iter(a)
    [next(it) for _ in range(4)]
    a.mark_consumed(3)                    # the 4th was only prefetched: it is drawn again
    b = loader(7)
    b.load_state_dict(a.state_dict())
    assert batches(b) == batches(loader(5))[3:]


def test_a_bad_loader_state_is_refused():
    with pytest.raises(ValueError, match="not a ResumableLoader state"):
        shuffled().load_state_dict({"rng": None})


# --------------------------------------------------------------------------- RNG states
def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    import random
    random.seed(1)
    torch.save(resume.rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()   # move every stream on
    resume.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


# --------------------------------------------------------------------------- killed runs
class Killed(RuntimeError):
    """Stands in for SIGKILL in-process: raised right after a resume checkpoint is written."""


def crash_after_checkpoint(monkeypatch, stage: str, at_batch: int) -> None:
    """Make the first resume checkpoint of ``stage`` at or after ``at_batch`` end the run, one
    batch later (so the resumed run must retrain a batch the killed one had trained)."""
    original = resume.ResumeCheckpoint.on_train_batch_end
    state = {"saved": False}

    def patched(self, trainer, pl_module, outputs, batch, batch_idx):
        done = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        if state["saved"] and self.dirpath.name.startswith(f"{stage}-"):
            raise Killed(f"killed in {stage} after batch {done}")
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        if self.dirpath.name.startswith(f"{stage}-") and done >= at_batch and self.path.exists():
            state["saved"] = True
    monkeypatch.setattr(resume.ResumeCheckpoint, "on_train_batch_end", patched)


BUDGETS = {
    "grpo": ["method.n_iterations=6", "method.group_size=4"],
    "rloo": ["method.n_iterations=6", "method.group_size=4", "method.update_epochs=2",
             "method.minibatch_size=8"],
    "ppo": ["method.n_iterations=6", "method.rollout.prompts_per_batch=8", "method.minibatch_size=4",
            "method.adaptive_kl=true"],
    "dpo": ["method.max_steps=8", "method.val_every=4"],
}


def comparable(summary: dict) -> dict:
    """What must not change with a resume: every metric but throughput, and the curves (the
    held-out gold curve's points are [step, gold, tokens, wall seconds]: all but the seconds)."""
    metrics = {k: v for k, v in summary["metrics"].items()
               if not k.endswith("tokens_per_s") and k != "train/resumed_from_batch"}
    history = {k: [p[:3] for p in v] if k == "eval/gold_reward" else v
               for k, v in summary["history"].items()}
    assert history, "no training curves to compare"
    return {"metrics": metrics, "history": history}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each method (computed once per module, on a cache of its own)."""
    done: dict[str, dict] = {}

    def get(method: str, overrides: list[str]) -> dict:
        if method not in done:
            out = tmp_path_factory.mktemp(f"whole-{method}")
            done[method] = run(composed([*overrides, f"cache_dir={out}/cache"]), out / "run")
        return done[method]
    return get


@pytest.mark.parametrize(("method", "killed_in"), [
    ("grpo", "grpo"),
    pytest.param("grpo", "sft", marks=pytest.mark.slow),
    pytest.param("ppo", "rm", marks=pytest.mark.slow),
    pytest.param("ppo", "ppo", marks=pytest.mark.slow),
    pytest.param("dpo", "dpo", marks=pytest.mark.slow),
    pytest.param("rloo", "rloo", marks=pytest.mark.slow),
])
def test_a_killed_stage_resumes_to_the_uninterrupted_result(method, killed_in, tmp_path,
                                                            monkeypatch, uninterrupted):
    overrides = [*TINY_SFT, f"method={method}", *BUDGETS[method], "trainer.resume_every=2",
                 "results_dir=null"]
    whole = uninterrupted(method, overrides)

    killed = [*overrides, f"cache_dir={tmp_path}/killed"]
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, killed_in, at_batch=2)
        with pytest.raises(Killed):
            run(composed(killed), tmp_path / "first")
    (left,) = (tmp_path / "killed" / "resume").glob(f"{killed_in}-*/resume.ckpt")
    assert not list((tmp_path / "killed" / "stages").glob(f"{killed_in}-*/stage.json"))
    assert json.loads((tmp_path / "first" / "summary.json").read_text())["status"] == "failed"

    again = run(composed(killed), tmp_path / "again")
    assert again["status"] == "ok"
    stage = again["stages"][killed_in]
    assert stage["metrics"]["train/resumed_from_batch"] == 2.0
    assert not left.parent.exists()  # the finished stage's resume folder is gone
    assert comparable(again) == comparable(whole)


def test_an_unreadable_resume_checkpoint_is_trained_over(tmp_path, caplog):
    overrides = [*TINY_SFT, "method=sft", "sft.max_steps=6", "results_dir=null"]
    whole = run(composed([*overrides, f"cache_dir={tmp_path}/w"]), tmp_path / "whole")
    # the key does not depend on the cache folder: a killed run's checkpoint would sit here
    bad = tmp_path / "c" / "resume" / whole["cache_keys"]["sft"] / "resume.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"cut short")
    with caplog.at_level("WARNING", logger="harness"):
        again = run(composed([*overrides, f"cache_dir={tmp_path}/c"]), tmp_path / "again")
    assert f"resume checkpoint {bad} cannot be read" in caplog.text
    assert "train/resumed_from_batch" not in again["stages"]["sft"]["metrics"]
    assert comparable(again) == comparable(whole)


@pytest.mark.slow
def test_kill_9_mid_stage_then_the_same_command_resumes(tmp_path):
    """The real thing: SIGKILL while GRPO trains, then the same command line again."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HARNESS_RUN_UID", None)
    common = ["method=grpo", "model=llama_tiny", "sft.max_steps=30", "method.n_iterations=12",
              "method.group_size=4", "eval.limit=16", "logger=none", "eval.lm_eval.enabled=false",
              "trainer.resume_every=3", "trainer.enable_progress_bar=false",
              f"results_dir={tmp_path}/results"]

    def cli(cache: str, wait_for: str | None = None) -> subprocess.CompletedProcess | None:
        cmd = [sys.executable, "-m", "harness", *common, f"cache_dir={tmp_path}/{cache}"]
        if wait_for is None:
            return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600, check=False)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while proc.poll() is None and not glob.glob(wait_for) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before its first GRPO resume checkpoint"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return None

    whole = cli("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "`weights_only` was not set" not in whole.stdout + whole.stderr  # no line per save
    cli("killed", wait_for=f"{tmp_path}/killed/resume/grpo-*/resume.ckpt")
    again = cli("killed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "GRPO stage: resuming from" in again.stdout + again.stderr
    a, b = (json.loads(p.read_text()) for p in sorted((tmp_path / "outputs").glob("*/*/summary.json"),
                                                      key=lambda p: p.stat().st_mtime))
    assert b["stages"]["grpo"]["metrics"]["train/resumed_from_batch"] >= 3
    assert comparable(b) == comparable(a)
