"""How a task's prompts reach the model: as written (``raw``), in an Alpaca frame, or through the
tokenizer's chat template (``chat``, the way an instruct model was trained to be asked).

:class:`FormattedTask` wraps a task so that every prompt it hands out — demonstrations, preference
pairs, held-out prompts — is formatted, while its rewards still see the raw prompt (looked up from
the formatted one) and a free-form answer reduced to what the task grades
(:meth:`harness.data.tasks.base.Task.normalize_answer`: an instruct model answers "71 + 55 = 126",
the task grades "126"). The chat form asks :meth:`~harness.data.tasks.base.Task.instruction` of the
prompt, a natural-language question, as the user's message.

``auto`` (the default) is ``chat`` when the tokenizer has a chat template (pretrained instruct
models) and ``raw`` otherwise (the tokenizers the harness trains on a task), so toy runs are
unchanged.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from harness.data.tasks.base import Task
from harness.data.templates import FORMATS, alpaca_prompt

__all__ = ["FORMATS", "FormattedTask", "effective_format", "format_prompt"]


def effective_format(fmt: str, tokenizer: Any) -> str:
    """``auto`` resolved for ``tokenizer``: ``chat`` with a chat template, else ``raw``."""
    if fmt not in FORMATS:
        raise ValueError(f"prompt_format={fmt!r}: must be one of {list(FORMATS)}")
    if fmt == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("dataset.prompt_format=chat: the tokenizer has no chat template "
                         "(only pretrained instruct models bring one)")
    return fmt


def format_prompt(task: Any, prompt: str, fmt: str, tokenizer: Any) -> str:
    """``prompt`` as the model sees it under ``fmt`` (``raw`` | ``alpaca`` | ``chat``)."""
    if fmt == "raw":
        return prompt
    if fmt == "alpaca":
        return alpaca_prompt(task.instruction(prompt))
    return tokenizer.apply_chat_template([{"role": "user", "content": task.instruction(prompt)}],
                                         tokenize=False, add_generation_prompt=True)


class FormattedTask:
    """``task`` with its prompts formatted by ``fmt`` (not ``raw``: then use the task itself)."""

    def __init__(self, task: Any, fmt: str, tokenizer: Any) -> None:
        if fmt not in ("alpaca", "chat"):
            raise ValueError(f"FormattedTask: fmt={fmt!r} must be 'alpaca' or 'chat'")
        self.inner, self.prompt_format, self.tokenizer = task, fmt, tokenizer
        self._raw: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:  # name, config, fingerprint, has_gold_reward, ...
        return getattr(self.inner, name)

    def format(self, prompt: str) -> str:
        text = format_prompt(self.inner, prompt, self.prompt_format, self.tokenizer)
        self._raw[text] = prompt
        return text

    def raw(self, prompt: str) -> str:
        """The task's own prompt behind a formatted one (itself when it was never formatted)."""
        return self._raw.get(prompt, prompt)

    def _formatted(self, ds: Dataset) -> Dataset:
        prompts = [self.format(p) for p in ds["prompt"]]
        return ds.remove_columns("prompt").add_column("prompt", prompts)

    def sft_dataset(self, split: str = "train") -> Dataset:
        return self._formatted(self.inner.sft_dataset(split))

    def preference_dataset(self, split: str = "train") -> Dataset:
        return self._formatted(self.inner.preference_dataset(split))

    def eval_dataset(self) -> Dataset:
        return self._formatted(self.inner.eval_dataset())

    def reward(self, prompt: str, response: str) -> float:
        return self.inner.reward(self.raw(prompt), self.inner.normalize_answer(response))

    rewards = Task.rewards  # the task's batch form of reward(), over the formatted prompts
