"""A byte-level BPE tokenizer trained locally on a task's text (nothing is downloaded).

Pre-tokenization splits every digit into its own piece (``Digits(individual_digits=True)``) before
the GPT-2 style ``ByteLevel`` split, so numbers are always read digit by digit; the ``ByteLevel``
decoder makes ``decode(encode(text)) == text`` for any text (spaces and newlines included).

Special tokens have fixed ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3. The tokenizer
adds *no* special tokens by itself; the collators (:mod:`harness.data.collate`) add BOS/EOS.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from harness.util.atomic import folder_damage, publish_dir, write_manifest

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
#: 256 byte symbols + the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
#: Bump when the recipe below changes, so cached tokenizers are rebuilt.
TOKENIZER_VERSION = 1


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training text (e.g. ``task.corpus()``).
        vocab_size: the largest vocabulary (special tokens and the 256 bytes included); the
            result is smaller when the text has fewer merges to offer. At least 260.
        model_max_length: stored on the tokenizer (the model's context length).

    Returns a tokenizer with right padding that does not add BOS/EOS; it round-trips text exactly
    and saves/loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least "
                         f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, special in enumerate(SPECIAL_TOKENS):  # the trainer puts them first, in this order
        if tok.token_to_id(special) != i:
            raise RuntimeError(f"special token {special} got id {tok.token_to_id(special)}, not {i}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side="right",
                                   model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | Path, model_max_length: int | None = None
                   ) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` (optionally overriding its max length)."""
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def tokenizer_key(task: Any, vocab_size: int) -> str:
    """Cache key of the tokenizer for ``task``: its data fingerprint, the vocabulary size, the
    recipe version."""
    blob = json.dumps({"task": task.name, "data": task.fingerprint, "vocab_size": vocab_size,
                       "version": TOKENIZER_VERSION}, sort_keys=True)
    return f"{task.name}-v{vocab_size}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def load_or_build_tokenizer(task: Any, cfg: Mapping[str, Any] | None = None,
                            cache_dir: str | Path | None = None,
                            model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The tokenizer for ``task``: loaded from ``cache_dir`` if built before, else trained on
    ``task.corpus()`` and saved there (atomically, so concurrent runs never see half a folder).

    Args:
        task: a :class:`harness.data.tasks.base.Task`.
        cfg: the dataset config; only ``vocab_size`` is read (default: the task config's).
        cache_dir: parent folder of the cached tokenizers (default ``~/.cache/harness/tokenizers``).
        model_max_length: set on the returned tokenizer (not part of the cache key).
    """
    vocab_size = int((cfg or {}).get("vocab_size") or task.config.vocab_size)
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache/harness/tokenizers"
    path = root / tokenizer_key(task, vocab_size)
    problem = folder_damage(path) if path.is_dir() else None
    if problem is not None:  # derived from the task: trained again, not trusted
        log.warning("tokenizer: cached %s is damaged (%s); training it again", path, problem)
    elif (path / "tokenizer.json").exists():
        log.debug("tokenizer: loading cached %s", path)
        return load_tokenizer(path, model_max_length)
    log.info("tokenizer: training a byte-level BPE (vocab_size=%d) on %s", vocab_size, task.name)
    tok = build_tokenizer(task.corpus(), vocab_size=vocab_size, model_max_length=model_max_length)

    def save(tmp: Path) -> None:
        tok.save_pretrained(str(tmp))
        write_manifest(tmp)

    publish_dir(path, save, replace=problem is not None)
    return load_tokenizer(path, model_max_length)
