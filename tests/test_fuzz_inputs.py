"""Fuzz the real entry point with bad input: every case stops before any work, names what is wrong,
exits non-zero and writes no results record, no summary and no cached stage.

The entry point runs in this process (``harness.__main__.entry`` with ``sys.argv`` set, Hydra's
global state cleared between cases), so the 40+ cases take seconds, not a process start each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

import harness.__main__ as entry_point

BAD_OVERRIDES: list[tuple[str, str]] = [  # (overrides, what the message must name)
    ("eval.limit=-3", "eval.limit=-3"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0"),
    ("eval.batch_size=0", "eval.batch_size=0"),
    ("eval.split=train", "eval.split"),
    ("eval.curve_points=-1", "eval.curve_points"),
    ("eval.lm_eval.batch_size=0", "eval.lm_eval.batch_size"),
    ("seed=-1", "seed=-1"),
    ("trainer.devices=0", "trainer.devices=0"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("logger.kind=tensorboard", "logger.kind"),
    ("logger.kind=wandb logger.offline=false", "logger.offline=False"),
    ("+method.foo=1 method=grpo", "method.foo"),
    ("+trainer.foo=1", "trainer.foo"),
    ("trainer.resume_every=-1", "trainer.resume_every"),
    ("trainer.strategy=fsdp trainer.accelerator=cpu", "trainer.strategy"),
    ("method=grpo method.foo=1", "method.foo"),
    ("sft.max_steps=0", "sft.max_steps"),
    ("sft.optim.lr=-1", "sft.optim.lr"),
    ("method=ppo rm.pooling=max", "rm.pooling"),
    ("model.n_heads=0", "model.n_heads"),
    ("model=hf", "model.pretrained"),
    ("sft.enabled=false", "sft.enabled"),
    ("model=hf model.pretrained=/nope/model", "model.pretrained"),
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("model=moe_small model.top_k=9", "model.top_k"),
    ("dataset.max_operand=0", "dataset.max_operand"),
    ("dataset.carry_fraction=1.5", "dataset.carry_fraction"),
    ("dataset.wrong_fraction=0.5", "dataset.wrong_fraction"),
    ("dataset.n_eval=0", "dataset.n_eval"),
    ("dataset.val_fraction=0.95", "dataset.val_fraction"),
    ("dataset=courier_unseen dataset.heldout_phrasings=0", "dataset.heldout_phrasings=0"),
    ("dataset=courier dataset.misroute_rate=2", "dataset.misroute_rate"),
    ("method=grpo method.group_size=1", "method.group_size"),
    ("method=rloo method.kl_penalty=both", "method.kl_penalty"),
    ("method=grpo method.optim.lr=-1", "method.optim.lr"),
    ("method=dpo method.beta=0", "method.beta"),
    ("method=dpo method.loss_type=hinge", "method.loss_type"),
    ("method=ppo method.beta=-1", "method.beta"),
    ("method=ppo method.kl_coef=0.1", "renamed to method.beta"),
    ("method.max_steps=5", "use sft.max_steps"),
    ("results_dir=/proc/version/results", "results_dir"),
    ("cache_dir=/proc/version/cache", "cache_dir"),
    ("method=nope", "method/nope"),
    ("method=grpo method.rollout.max_new_tokens=128", "method.rollout.max_new_tokens=128"),
    ("method=ppo method.max_len=8", "method.rollout.max_new_tokens"),
    ("sft.max_len=16", "eval.max_new_tokens=16"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.accelerator=tpu", "trainer.accelerator"),
    ("model.max_seq_len=16", "sft.max_len=128: must be <= model.max_seq_len=16"),
    ("method=dpo model.max_seq_len=64 sft.max_len=32 eval.max_new_tokens=8",
     "method.max_len=128: must be <= model.max_seq_len=64"),
    ("model.vocab_size=10", "model.vocab_size=10: smaller than the tokenizer's"),
    ("trainer.devices=[0]", "trainer.devices=[0]: a list of device ids needs GPUs"),
    # non-finite numbers (these trained the SFT base, then failed with a traceback) and a
    # vocabulary that aborted the tokenizer trainer (exit 134)
    ("method=grpo method.beta=inf", "method.beta=inf: must be a finite number"),
    ("sft.optim.lr=inf", "sft.optim.lr=inf: must be a finite number"),
    ("sft.optim.grad_clip=nan", "sft.optim.grad_clip=nan: must be a finite number"),
    ("sft.optim.beta1=nan", "sft.optim.beta1=nan: must be a finite number"),
    ("dataset.vocab_size=1099511627776", "dataset.vocab_size=1099511627776: must be <= 1048576"),
    ("method=dpo track=oracle", "track=oracle: method=dpo learns from the preference pairs"),
    ("method=ppo method.reward_source=gold method.critic_init=rm", "method.critic_init='rm'"),
    ("log_level=LOUD", "log_level='LOUD'"),
    ("model.max_seq_len=99999999999", "model.max_seq_len=99999999999: must be <= 1048576"),
]

GOOD_ROW = {"prompt": "Say yes.", "chosen": " yes", "rejected": " no"}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


BAD_FILES: list[tuple[str, bytes, str]] = [  # (file name, content, what the message must say)
    ("latin1.jsonl", _jsonl([GOOD_ROW] * 3) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
     "line 4, column 16: not UTF-8"),
    ("broken.jsonl", _jsonl([GOOD_ROW] * 3) + b'{"prompt": "a" "chosen": "b"}\n', "line 4, column 16: malformed JSON"),
    ("truncated.jsonl", _jsonl([GOOD_ROW] * 3) + b'{"prompt": "a", "cho', "line 4, column"),
    ("empty.jsonl", b"", "is empty"),
    ("no_rejected.jsonl", _jsonl([{"prompt": "a", "chosen": "b"}] * 4), "cannot detect the format"),
    ("empty_field.jsonl", _jsonl([GOOD_ROW] * 3 + [{**GOOD_ROW, "chosen": ""}]), "column 'chosen' is empty"),
    ("null_field.jsonl", _jsonl([GOOD_ROW] * 3 + [{**GOOD_ROW, "rejected": None}]), "column 'rejected' is NoneType"),
    ("number.jsonl", _jsonl([GOOD_ROW] * 3 + [{**GOOD_ROW, "prompt": 7}]), "column 'prompt' is int"),
    # the row is the file's own (reported once as row 0)
    ("late_number.jsonl", _jsonl([{**GOOD_ROW, "prompt": f"Say {i}."} for i in range(100)]
                                 + [{**GOOD_ROW, "prompt": 7}] + [GOOD_ROW] * 19),
     "row 100, column 'prompt' is int"),
    ("same.jsonl", _jsonl([{"prompt": f"p{i}", "chosen": "x", "rejected": "x"} for i in range(5)]),
     "chosen == rejected in all 5 pairs"),
    ("sft_only.jsonl", _jsonl([{"prompt": "a", "completion": "b"}] * 5), "has no preference pairs"),
    # one 1 MB line kept the tokenizer trainer busy past 200 s with no output
    ("long.jsonl", _jsonl([GOOD_ROW] * 3 + [{**GOOD_ROW, "chosen": "x" * 1_000_000}]),
     "row 3, column 'chosen' has 1,000,000 characters, more than dataset.max_chars=20,000"),
]


def _run(argv: list[str], tmp: Path, capsys) -> str:
    """Run the entry point with ``argv``; returns what it said. Asserts a non-zero exit."""
    GlobalHydra.instance().clear()
    old = sys.argv
    tiny = ["model=llama_tiny", "sft.max_steps=2", "eval.lm_eval.enabled=false", f"hydra.run.dir={tmp}/run",
            f"cache_dir={tmp}/cache", f"results_dir={tmp}/results"]
    given = {a.split("=")[0].lstrip("+") for a in argv}
    sys.argv = ["harness", *argv, *(a for a in tiny if a.split("=")[0] not in given)]
    try:
        with pytest.raises(SystemExit) as exited:
            entry_point.entry()
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()
    code = exited.value.code
    assert code not in (0, None), f"{argv}: exited 0"
    out = capsys.readouterr()
    return (code if isinstance(code, str) else "") + out.err + out.out


def _nothing_written(tmp: Path) -> None:
    assert not list((tmp / "results").glob("runs/*.json")), "a results record was written"
    assert not (tmp / "run" / "summary.json").exists(), "a summary was written"
    assert not list((tmp / "cache").glob("stages/*/stage.json")), "a stage was trained"


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.mark.parametrize(("overrides", "named"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_overrides_stop_before_work_naming_the_field(overrides, named, tmp_path, capsys,
                                                         no_wandb_key):
    said = _run(["logger=none", *overrides.split()] if "logger.kind" not in overrides
                else overrides.split(), tmp_path, capsys)
    assert named in said, said[-2000:]
    assert "Traceback" not in said
    _nothing_written(tmp_path)


@pytest.mark.parametrize(("name", "content", "says"), BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_bad_data_files_stop_before_work_naming_the_file(name, content, says, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    said = _run(["method=dpo", "logger=none", "dataset=preference", "dataset.path=json",
                 f"+dataset.data_files={{train: {path}}}", f"+dataset.hf_cache_dir={tmp_path}/hf"],
                tmp_path, capsys)
    assert said.startswith("data error: ") and str(path) in said and says in said, said[-2000:]
    _nothing_written(tmp_path)


def test_a_folder_given_as_a_data_file_is_named(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(_jsonl([GOOD_ROW] * 4))
    said = _run(["method=dpo", "logger=none", "dataset=preference", "dataset.path=json",
                 f"+dataset.data_files={{train: {folder}}}", f"+dataset.hf_cache_dir={tmp_path}/hf"],
                tmp_path, capsys)
    assert said.startswith("data error: ") and f"{str(folder)!r} is a folder, not a data file" in said
    _nothing_written(tmp_path)


def test_there_are_enough_cases():
    assert len(BAD_OVERRIDES) >= 30 and len(BAD_FILES) >= 10
