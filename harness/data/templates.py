"""Prompt templates. The Alpaca template follows the lecture (SFT: "Apply prompt style template")."""

from __future__ import annotations

FORMATS = ("auto", "raw", "alpaca", "chat")
"""How prompts reach the model (``dataset.prompt_format``; :mod:`harness.data.prompt_format`)."""

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    r"""The Alpaca-style prompt for ``instruction`` (and ``input``), ending where the response starts.

    Layout (``<preamble>`` = :data:`ALPACA_PREAMBLE`)::

        <preamble>\n\n### Instruction:\n<instruction>\n\n[### Input:\n<input>\n\n]### Response:\n

    The ``### Input:`` section appears only when ``input`` is given (not None, not empty).
    """
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n"
    if input:
        text += f"### Input:\n{input}\n\n"
    return text + "### Response:\n"
