"""Encoding and collation: plain functions and small dataclasses (no Lightning).

**SFT layout** (:func:`encode_sft`)::

    input_ids = [bos] + prompt_ids + response_ids + [eos]
    labels    = [-100] * (1 + len(prompt_ids)) + response_ids + [eos]

Labels are aligned with ``input_ids`` (the loss shifts them): only response tokens and EOS are
learned. ``prompt_len`` = ``1 + len(prompt_ids)`` is the index of the first response token.

**Overflow policy** when the sequence is longer than ``max_len``:

- the response (EOS included) is cut from the right so that the prompt is kept whole;
- if even ``[bos] + prompt + one response token`` does not fit, the prompt is too long:
  ``overflow="skip"`` drops the example (the encoder returns None) and ``overflow="truncate"`` keeps
  the *last* ``max_len - 2`` prompt tokens (cut from the left) and one response token.

Truncated examples carry ``truncated=True``; :func:`tokenize_dataset` counts truncated and skipped
examples in :class:`TokenizeStats` for the caller to log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from datasets import Dataset

from harness.data.errors import DataError, require_columns

IGNORE_INDEX = -100
Overflow = Literal["truncate", "skip"]
Kind = Literal["sft", "pairs", "prompts"]
OVERFLOWS: tuple[str, ...] = ("truncate", "skip")
KIND_COLUMNS: dict[str, tuple[str, ...]] = {"sft": ("prompt", "response"),
                                            "pairs": ("prompt", "chosen", "rejected"),
                                            "prompts": ("prompt",)}


def _ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def _check(max_len: int, overflow: str) -> None:
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow={overflow!r}: must be one of {list(OVERFLOWS)}")
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: must be >= 2 (bos + one response token)")


def _without_bos(bos: int, prompt_ids: list[int]) -> list[int]:
    """The prompt ids without a leading BOS: a chat template may open with the token the collators
    add anyway (SmolLM2's ``<|im_start|>``), which must not appear twice."""
    return prompt_ids[1:] if prompt_ids[:1] == [bos] else prompt_ids


def _fit_prompt(prompt_ids: list[int], max_len: int, overflow: str) -> tuple[list[int], bool] | None:
    """The prompt ids kept so that bos + prompt + one response token fit (None: skip)."""
    room = max_len - 2
    if len(prompt_ids) <= room:
        return prompt_ids, False
    if overflow == "skip":
        return None
    return prompt_ids[len(prompt_ids) - room:], True


def _sft_from_ids(bos: int, eos: int, prompt_ids: list[int], response_ids: list[int],
                  max_len: int, overflow: str) -> dict[str, Any] | None:
    fitted = _fit_prompt(_without_bos(bos, prompt_ids), max_len, overflow)
    if fitted is None:
        return None
    p, truncated = fitted
    r = [*response_ids, eos]
    room = max_len - 1 - len(p)
    if len(r) > room:
        r, truncated = r[:room], True
    return {"input_ids": [bos, *p, *r], "labels": [IGNORE_INDEX] * (1 + len(p)) + r,
            "prompt_len": 1 + len(p), "truncated": truncated}


def encode_sft(tokenizer: Any, prompt: str, response: str, max_len: int,
               overflow: Overflow = "truncate") -> dict[str, Any] | None:
    """Encode one demonstration (layout and overflow policy in the module docstring).

    Returns ``{"input_ids", "labels", "prompt_len", "truncated"}`` or None when skipped.
    """
    _check(max_len, overflow)
    p, r = _ids(tokenizer, [prompt, response])
    return _sft_from_ids(tokenizer.bos_token_id, tokenizer.eos_token_id, p, r, max_len, overflow)


def encode_prompt(tokenizer: Any, prompt: str, max_len: int) -> list[int]:
    """``[bos] + prompt_ids`` for generation, keeping the last ``max_len - 1`` prompt tokens."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: must be >= 1")
    (p,) = _ids(tokenizer, [prompt])
    p = _without_bos(tokenizer.bos_token_id, p)
    keep = max_len - 1
    return [tokenizer.bos_token_id, *p[max(0, len(p) - keep):]] if keep else [tokenizer.bos_token_id]


def decode_responses(tokenizer: Any, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Sampled token ids [B, N] with their mask [B, N] -> strings, without EOS and padding."""
    texts = []
    for row, m in zip(response.tolist(), mask.tolist(), strict=True):
        toks = [t for t, keep in zip(row, m, strict=True) if keep and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return texts


def encode_prompts(tokenizer: Any, prompts: Sequence[str],
                   max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts ready for generation: :func:`encode_prompt` each, then :func:`left_pad_batch`.

    Returns (input_ids [B, P], attention_mask [B, P]) with P the longest encoded prompt.
    """
    return left_pad_batch([encode_prompt(tokenizer, p, max_len) for p in prompts],
                          tokenizer.pad_token_id)


def _pair_from_ids(bos: int, eos: int, p: list[int], c: list[int], r: list[int], max_len: int,
                   overflow: str) -> dict[str, Any] | None:
    chosen = _sft_from_ids(bos, eos, p, c, max_len, overflow)
    rejected = _sft_from_ids(bos, eos, p, r, max_len, overflow)
    if chosen is None or rejected is None:
        return None
    return {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
            "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
            "prompt_len": chosen["prompt_len"],
            "truncated": chosen["truncated"] or rejected["truncated"]}


def encode_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str, max_len: int,
                overflow: Overflow = "truncate") -> dict[str, Any] | None:
    """Encode a preference pair: both sides as in :func:`encode_sft`, with the same prompt.

    Returns ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
    "prompt_len", "truncated"}`` or None when skipped.
    """
    _check(max_len, overflow)
    p, c, r = _ids(tokenizer, [prompt, chosen, rejected])
    return _pair_from_ids(tokenizer.bos_token_id, tokenizer.eos_token_id, p, c, r, max_len,
                          overflow)


# ---------------------------------------------------------------------- datasets
@dataclasses.dataclass
class TokenizeStats:
    """What :func:`tokenize_dataset` did: examples in, out, truncated and skipped."""

    n_in: int
    n_out: int
    truncated: int
    skipped: int

    def __str__(self) -> str:
        return (f"{self.n_out}/{self.n_in} examples kept, {self.truncated} truncated, "
                f"{self.skipped} skipped")


def tokenize_dataset(ds: Dataset, tokenizer: Any, kind: Kind, max_len: int,
                     overflow: Overflow = "truncate", name: str = "dataset",
                     ) -> tuple[Dataset, TokenizeStats]:
    """Tokenize ``ds`` for ``kind`` with a batched ``ds.map``; returns the dataset and stats.

    Output columns: ``sft``: ``input_ids``, ``labels``, ``prompt_len``; ``pairs``:
    ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``,
    ``prompt_len``; ``prompts``: ``input_ids`` (left-truncated ``[bos] + prompt``), ``prompt``.
    Every kind also has ``truncated`` and ``index`` (the row's position in the output, e.g. for
    per-example caches such as DPO's reference log-probs). Raises :class:`DataError` for missing
    columns or when every example is skipped.
    """
    if kind not in KIND_COLUMNS:
        raise ValueError(f"kind={kind!r}: must be one of {list(KIND_COLUMNS)}")
    _check(max_len, overflow)
    require_columns(ds, KIND_COLUMNS[kind], name)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = [_without_bos(bos, p) for p in _ids(tokenizer, batch["prompt"])]
        if kind == "prompts":
            keep = max_len - 1
            return {"input_ids": [[bos, *p[max(0, len(p) - keep):]] if keep else [bos] for p in prompts],
                    "prompt": batch["prompt"],
                    "truncated": [len(p) > keep for p in prompts]}
        if kind == "sft":
            rows = [_sft_from_ids(bos, eos, p, r, max_len, overflow)
                    for p, r in zip(prompts, _ids(tokenizer, batch["response"]), strict=True)]
        else:
            rows = [_pair_from_ids(bos, eos, p, c, r, max_len, overflow) for p, c, r in
                    zip(prompts, _ids(tokenizer, batch["chosen"]), _ids(tokenizer, batch["rejected"]),
                        strict=True)]
        kept = [row for row in rows if row is not None]
        keys = ("input_ids", "labels") if kind == "sft" else (
            "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        return {k: [row[k] for row in kept] for k in (*keys, "prompt_len", "truncated")}

    out = ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True,
                 desc=f"tokenize {name}" if len(ds) > 5000 else None)
    if len(ds) and not len(out):
        raise DataError(f"{name}: all {len(ds)} examples were skipped (prompt longer than "
                        f"max_len={max_len} allows); raise max_len or use overflow='truncate'")
    stats = TokenizeStats(n_in=len(ds), n_out=len(out), truncated=int(sum(out["truncated"])),
                          skipped=len(ds) - len(out))
    out = out.add_column("index", list(range(len(out))))
    return out, stats


# ---------------------------------------------------------------------- collators
def pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad token lists to the longest: [B, T]."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def pad_left(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Left-pad token lists to the longest: [B, T]."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
    return out


def _mask(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    ones = [[1] * len(r) for r in rows]
    return pad_left(ones, 0) if left else pad_right(ones, 0)


def left_pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation -> (input_ids [B, P], attention_mask [B, P], 1 = real)."""
    return pad_left(rows, pad_id), _mask(rows, left=True)


def _index(features: Sequence[dict[str, Any]]) -> torch.Tensor:
    return torch.tensor([f.get("index", i) for i, f in enumerate(features)], dtype=torch.long)


@dataclasses.dataclass
class SFTCollator:
    """Right-pads SFT examples: ``input_ids`` (pad id), ``attention_mask``, ``labels`` (-100),
    ``prompt_len`` [B], ``index`` [B]."""

    pad_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        return {"input_ids": pad_right(ids, self.pad_id), "attention_mask": _mask(ids),
                "labels": pad_right([f["labels"] for f in features], IGNORE_INDEX),
                "prompt_len": torch.tensor([f["prompt_len"] for f in features]),
                "index": _index(features)}


@dataclasses.dataclass
class PairCollator:
    """Right-pads pairs: ``chosen_input_ids`` / ``chosen_attention_mask`` / ``chosen_labels`` and
    the same for ``rejected_*`` (each side padded to its own longest), ``prompt_len`` [B] (shared
    by both sides), ``index`` [B]."""

    pad_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            ids = [f[f"{side}_input_ids"] for f in features]
            out[f"{side}_input_ids"] = pad_right(ids, self.pad_id)
            out[f"{side}_attention_mask"] = _mask(ids)
            out[f"{side}_labels"] = pad_right([f[f"{side}_labels"] for f in features],
                                              IGNORE_INDEX)
        out["prompt_len"] = torch.tensor([f["prompt_len"] for f in features])
        out["index"] = _index(features)
        return out


@dataclasses.dataclass
class PromptCollator:
    """LEFT-pads prompts for generation: ``input_ids``, ``attention_mask`` [B, P], ``index`` [B]
    and ``prompts`` (the raw strings, a list)."""

    pad_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = left_pad_batch([f["input_ids"] for f in features], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "prompts": [f["prompt"] for f in features], "index": _index(features)}
