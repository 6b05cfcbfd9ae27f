"""Prompt formats (raw, Alpaca, chat template) and free-form answers of instruct models."""

from __future__ import annotations

import pytest

from harness.data.collate import encode_prompt, encode_sft
from harness.data.prompt_format import FormattedTask, effective_format, format_prompt
from harness.data.tasks import build_task
from harness.data.tokenizer import build_tokenizer
from harness.models.architecture import ConfigError

# a ChatML template like SmolLM2's: the conversation opens with the token the collators use as BOS
CHATML = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def task_and_tokenizers(tmp_path_factory):
    task = build_task({"name": "arith", "seed": 0, "n_train": 200, "n_pairs": 32, "n_eval": 16},
                      cache_dir=tmp_path_factory.mktemp("data"))
    plain = build_tokenizer(task.corpus(), vocab_size=300)
    chat = build_tokenizer(task.corpus(), vocab_size=300)
    chat.chat_template = CHATML
    return task, plain, chat


def test_arith_asks_in_words_and_grades_the_last_number(task_and_tokenizers):
    task, _, _ = task_and_tokenizers
    assert task.instruction("071+055=") == "What is 71+55? Answer with the number only."
    assert task.normalize_answer("71 + 55 = 126") == "126"          # the question echoed
    assert task.normalize_answer("59+63 is 1,220.") == "1220"
    assert task.normalize_answer("I don't know") == ""
    assert task.reward("071+055=", task.normalize_answer("71 + 55 = 126")) == 1.0
    assert task.reward("071+055=", "71 + 55 = 126") == 0.0             # raw prompts stay strict


def test_auto_is_chat_only_with_a_template(task_and_tokenizers):
    _, plain, chat = task_and_tokenizers
    assert effective_format("auto", plain) == "raw"
    assert effective_format("auto", chat) == "chat"
    assert effective_format("alpaca", plain) == "alpaca"
    with pytest.raises(ValueError, match="prompt_format=chat: the tokenizer has no chat template"):
        effective_format("chat", plain)
    with pytest.raises(ConfigError, match="dataset.prompt_format='jinja'"):
        build_task({"name": "arith", "prompt_format": "jinja"})


def test_a_formatted_task_formats_every_prompt_and_rewards_the_raw_one(task_and_tokenizers):
    task, _, chat = task_and_tokenizers
    ft = FormattedTask(task, "chat", chat)
    raw = task.eval_dataset()["prompt"][0]
    shown = ft.eval_dataset()["prompt"][0]
    assert shown == f"<bos>user\n{task.instruction(raw)}<eos>\n<bos>assistant\n"
    assert shown == format_prompt(task, raw, "chat", chat)
    assert ft.raw(shown) == raw and ft.name == task.name and ft.config is task.config
    assert all(p.endswith("<bos>assistant\n") for p in ft.sft_dataset("train")["prompt"][:5])
    assert ft.preference_dataset("train")["prompt"][0].startswith("<bos>user\n")
    a, b = (int(x) for x in raw.rstrip("=").split("+"))
    assert ft.rewards([shown, shown], [f"{a} + {b} = {a + b}", f"{a + b + 1}"]) == [1.0, 0.0]
    alpaca = FormattedTask(task, "alpaca", chat).eval_dataset()["prompt"][0]
    assert "### Instruction:\nWhat is" in alpaca and alpaca.endswith("### Response:\n")


def test_a_template_that_opens_with_bos_does_not_get_a_second_one(task_and_tokenizers):
    task, _, chat = task_and_tokenizers
    shown = format_prompt(task, "071+055=", "chat", chat)
    ids = encode_prompt(chat, shown, max_len=64)
    assert ids[0] == chat.bos_token_id and ids[1] != chat.bos_token_id
    sft = encode_sft(chat, shown, "126", max_len=64)
    assert sft["input_ids"][:len(ids)] == ids and sft["prompt_len"] == len(ids)


def test_a_prompt_longer_than_half_the_room_is_kept_whole(task_and_tokenizers):
    """Regression: ``p[len(p) - keep:]`` with len(p) < keep is a negative start that kept only
    the prompt's last ``keep - len(p)`` tokens whenever the prompt filled over half the room."""
    _, plain, _ = task_and_tokenizers
    prompt = "12+34=" * 8
    n = len(plain(prompt, add_special_tokens=False)["input_ids"])
    ids = encode_prompt(plain, prompt, max_len=n + 5)        # room for every prompt token
    assert len(ids) == 1 + n
    assert len(encode_prompt(plain, prompt, max_len=n - 3)) == n - 3   # left-truncated to fit
