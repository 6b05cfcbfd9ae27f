"""``preference``: hub or local preference / SFT data through ``datasets.load_dataset``.

``path`` is a hub name (``Anthropic/hh-rlhf``) or a builder (``json``, ``csv``, ``parquet``) with
``data_files``. Formats (``format``, ``auto`` detects from the columns):

- ``pairs``: ``prompt_column``, ``chosen_column``, ``rejected_column`` (default
  ``prompt/chosen/rejected``);
- ``hh``: Anthropic HH, whose ``chosen`` / ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``. The prompt is everything up to and including the last
  ``"\\n\\nAssistant:"``; the responses are the remainders. The split is verified: rows whose chosen
  and rejected prompts differ (or that have no ``"\\n\\nAssistant:"``) are dropped and counted
  (:attr:`PreferenceTask.dropped`), and if every row of a split is bad it is a :class:`DataError`;
- ``sft``: ``prompt_column`` and ``response_column`` (default ``prompt/completion``), demonstrations
  only (no preference pairs).

``sft_dataset`` of pair data is prompt + chosen. Splits: ``train`` is ``train_split``;
``validation`` is ``validation_split`` if set, else the data's ``validation`` split if present, else
a seeded ``val_fraction`` carved out of ``train_split`` (and removed from train). ``eval_dataset``
takes up to ``n_eval`` distinct prompts (seeded shuffle) from ``eval_split``, falling back to the
validation split when the data has no such split. There is no gold reward: ``has_gold_reward`` is
False and :meth:`PreferenceTask.reward` raises :class:`NoGoldRewardError`; evaluation falls back to
preference accuracy on the eval pairs (``chosen`` / ``rejected`` are kept in ``eval_dataset``;
:func:`harness.pipeline.evaluation.evaluate_preferences`), and RL methods need ``reward_source=rm``.

Datasets are not saved again by the harness: ``datasets``' own cache keeps the downloaded or parsed
files (``hf_cache_dir``, default HF's).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from harness.data.errors import ConfigError, DataError, require_columns, require_nonempty
from harness.data.file_checks import check_local_file
from harness.data.tasks.base import Task, TaskConfig

log = logging.getLogger(__name__)

HH_ASSISTANT = "\n\nAssistant:"
FORMATS: tuple[str, ...] = ("auto", "pairs", "hh", "sft")


class NoGoldRewardError(NotImplementedError):
    """This task has no gold reward (evaluation falls back to preference accuracy)."""


@dataclasses.dataclass
class PreferenceConfig(TaskConfig):
    """Config of :class:`PreferenceTask` (the ``dataset`` group's ``preference.yaml``).

    Attributes:
        path: hub dataset name, or a builder (``json``, ``csv``, ``parquet``) for local files.
        data_files: for builders: a file, a list, or ``{split: file(s)}``.
        config_name: the hub dataset's configuration (``load_dataset(path, name=...)``), if any.
        format: ``auto`` | ``pairs`` | ``hh`` | ``sft``.
        prompt_column, chosen_column, rejected_column, response_column: column mapping.
        train_split: split used for training.
        validation_split: split used for validation (None: ``validation`` or carved from train).
        eval_split: split of the held-out prompts (falls back to the validation split).
        val_fraction: share of train carved out for validation when there is no such split.
        n_eval: held-out prompts (at most; distinct).
        max_train: keep at most this many training rows (seeded sample; None: all).
        corpus_size: texts sampled from train to fit the tokenizer.
        hf_cache_dir: ``datasets``' cache folder (None: HF's default).
        max_chars: the longest text a row's prompt or response may have (characters): a longer
            one is refused, naming its file, split, row and column (``long_rows: refuse``), or
            cut to it (``truncate``), before the tokenizer trains on it (one 1 MB line kept the
            tokenizer trainer busy for minutes).
        seed: drives the carving, the eval sample and ``max_train``.
        vocab_size: the tokenizer's vocabulary size (not part of the data).
    """

    name: str = "preference"
    seed: int = 0
    path: str = ""
    data_files: Any = None
    config_name: str | None = None
    format: str = "auto"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    response_column: str = "completion"
    train_split: str = "train"
    validation_split: str | None = None
    eval_split: str = "test"
    val_fraction: float = 0.05
    n_eval: int = 200
    max_train: int | None = None
    corpus_size: int = 20000
    hf_cache_dir: str | None = None
    vocab_size: int = 4096
    max_chars: int = 20_000
    long_rows: str = "refuse"       # refuse | truncate

    NON_DATA_FIELDS = (*TaskConfig.NON_DATA_FIELDS, "hf_cache_dir")

    def data_fields(self) -> dict[str, Any]:
        """The config fields plus (size, mtime) of local ``data_files``, so that editing a local
        file changes the fingerprint (and the cached tokenizer built from it)."""
        out = super().data_fields()
        files = self.data_files
        if files is not None:
            groups = files.values() if isinstance(files, Mapping) else [files]
            stats = []
            for group in groups:
                for f in [group] if isinstance(group, str | Path) else list(group or []):
                    p = Path(f)
                    if p.is_file():
                        st = p.stat()
                        stats.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
            out["local_files"] = stats
        return out

    def validate(self) -> None:
        super().validate()
        p = "dataset"
        if not self.path:
            raise ConfigError(f"{p}.path={self.path!r}: give a hub dataset name or a builder "
                              "such as 'json' with data_files")
        if self.format not in FORMATS:
            raise ConfigError(f"{p}.format={self.format!r}: must be one of {list(FORMATS)}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ConfigError(f"{p}.val_fraction={self.val_fraction}: must be in (0, 1)")
        if int(self.n_eval) < 1:
            raise ConfigError(f"{p}.n_eval={self.n_eval}: must be >= 1")
        if self.max_train is not None and int(self.max_train) < 1:
            raise ConfigError(f"{p}.max_train={self.max_train}: must be >= 1 or null")
        if int(self.max_chars) < 1:
            raise ConfigError(f"{p}.max_chars={self.max_chars}: must be >= 1")
        if self.long_rows not in ("refuse", "truncate"):
            raise ConfigError(f"{p}.long_rows={self.long_rows!r}: must be refuse or truncate")


# ---------------------------------------------------------------------- HH parsing
def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split an Anthropic HH pair into (prompt, chosen response, rejected response).

    The prompt is everything up to and including the last ``"\\n\\nAssistant:"`` of each dialogue;
    it must be the same for both, else None (as when either has no ``"\\n\\nAssistant:"``).
    """
    i, j = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if i < 0 or j < 0:
        return None
    cut_c, cut_r = i + len(HH_ASSISTANT), j + len(HH_ASSISTANT)
    if chosen[:cut_c] != rejected[:cut_r]:
        return None
    return chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]


# ---------------------------------------------------------------------- the task
class PreferenceTask(Task):
    """Generic preference / SFT data from the hub or local files (see the module docstring)."""

    name = "preference"
    config_class = PreferenceConfig
    config: PreferenceConfig
    has_gold_reward = False
    disk_cache = False

    def __init__(self, config: PreferenceConfig | Mapping[str, Any],
                 cache_dir: str | Path | None = None) -> None:
        super().__init__(config, cache_dir)
        self._raw: DatasetDict | None = None
        self._splits: dict[str, Dataset] | None = None
        self._format: str | None = None
        #: rows dropped per split by the HH shared-prefix check.
        self.dropped: dict[str, int] = {}

    # -- loading
    @property
    def where(self) -> str:
        files = f", data_files={self.config.data_files!r}" if self.config.data_files else ""
        return f"preference dataset {self.config.path!r}{files}"

    def raw(self) -> DatasetDict:
        """The data as loaded by ``datasets.load_dataset`` (errors become :class:`DataError`)."""
        if self._raw is None:
            c = self.config
            data_files = c.data_files
            if isinstance(data_files, Mapping):
                data_files = {k: v for k, v in data_files.items() if v is not None}
            self._check_local_files(data_files)
            try:
                loaded = load_dataset(c.path, name=c.config_name, data_files=data_files,
                                      cache_dir=c.hf_cache_dir)
            except Exception as exc:  # noqa: BLE001 - re-raised as a clear DataError
                empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(exc))
                if empty:  # a split whose files hold no rows (e.g. a CSV header only)
                    raise DataError(f"{self.where}: split {empty.group(1)!r} is empty "
                                    "(0 examples)") from exc
                raise DataError(f"{self.where}: could not load: {type(exc).__name__}: "
                                f"{exc}") from exc
            if isinstance(loaded, Dataset):
                loaded = DatasetDict({"train": loaded})
            self._raw = loaded
        return self._raw

    def _check_local_files(self, data_files: Any) -> None:
        """An existing but empty local file is an empty split, and a text file that is not UTF-8 or
        not valid JSON is named with its line: say so before ``datasets`` fails with a cryptic
        error."""
        if data_files is None:
            return
        by_split = data_files if isinstance(data_files, Mapping) else {"train": data_files}
        for split, files in by_split.items():
            for f in [files] if isinstance(files, str | Path) else list(files):
                p = Path(f)
                if p.is_dir():
                    raise DataError(f"{self.where}: split {split!r}: {str(p)!r} is a folder, "
                                    "not a data file; name the file(s) in it")
                if p.is_file() and p.stat().st_size == 0:
                    raise DataError(f"{self.where}: split {split!r} is empty (file {str(p)!r} "
                                    "has no data)")
                check_local_file(p, self.config.path, self.where)

    def _raw_split(self, split: str) -> Dataset:
        raw = self.raw()
        if split not in raw:
            raise DataError(f"{self.where}: no split {split!r}; splits present: {list(raw)}")
        return raw[split]

    @property
    def format(self) -> str:
        """The resolved format (``pairs`` / ``hh`` / ``sft``)."""
        if self._format is None:
            self._format = self._detect(self._raw_split(self.config.train_split))
        return self._format

    def _detect(self, ds: Dataset) -> str:
        c, cols = self.config, ds.column_names
        if c.format != "auto":
            return c.format
        has = set(cols).__contains__
        if has(c.chosen_column) and has(c.rejected_column):
            if has(c.prompt_column):
                return "pairs"
            sample = ds[0][c.chosen_column] if len(ds) else ""
            if isinstance(sample, str) and HH_ASSISTANT in sample:
                return "hh"
        if has(c.prompt_column) and has(c.response_column):
            return "sft"
        raise DataError(
            f"{self.where}: cannot detect the format from columns {cols}: expected "
            f"{c.prompt_column}/{c.chosen_column}/{c.rejected_column} (pairs), "
            f"{c.chosen_column}/{c.rejected_column} dialogues with '\\n\\nAssistant:' (hh) or "
            f"{c.prompt_column}/{c.response_column} (sft); set dataset.format and the *_column "
            "fields")

    def _normalize(self, ds: Dataset, split: str) -> Dataset:
        """Rename / parse ``ds`` to ``prompt, chosen, rejected`` or ``prompt, response``."""
        c, fmt = self.config, self.format
        where = f"{self.where} split {split!r}"
        require_nonempty(ds, split, self.where)
        if fmt == "sft":
            src = {"prompt": c.prompt_column, "response": c.response_column}
        elif fmt == "pairs":
            src = {"prompt": c.prompt_column, "chosen": c.chosen_column,
                   "rejected": c.rejected_column}
        else:
            src = {"chosen": c.chosen_column, "rejected": c.rejected_column}
        require_columns(ds, src.values(), where)
        cols = {dst: list(ds[col]) for dst, col in src.items()}
        cut = 0
        for dst, values in cols.items():
            for i, v in enumerate(values):
                if not isinstance(v, str):
                    raise DataError(f"{where}: row {i}, column {src[dst]!r} is "
                                    f"{type(v).__name__} ({v!r}), expected a string")
                if dst != "prompt" and not v.strip():
                    raise DataError(f"{where}: row {i}, column {src[dst]!r} is empty")
                if len(v) > c.max_chars:
                    if c.long_rows == "refuse":
                        raise DataError(f"{where}: row {i}, column {src[dst]!r} has {len(v):,} "
                                        f"characters, more than dataset.max_chars={c.max_chars:,}"
                                        " (dataset.long_rows=truncate cuts such texts)")
                    values[i], cut = v[:c.max_chars], cut + 1
        if cut:
            log.warning("%s: %d text(s) longer than dataset.max_chars=%d cut to it", where, cut,
                        c.max_chars)
        if "chosen" in cols:
            self._check_degenerate_pairs(cols["chosen"], cols["rejected"], where)
        if fmt == "hh":
            out: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
            bad = 0
            for ch, rj in zip(cols["chosen"], cols["rejected"], strict=True):
                parts = split_hh(ch, rj)
                if parts is None:
                    bad += 1
                    continue
                for key, val in zip(("prompt", "chosen", "rejected"), parts, strict=True):
                    out[key].append(val)
            self.dropped[split] = bad
            if bad:
                log.warning("%s: dropped %d of %d HH rows whose chosen/rejected do not share "
                            "the prompt up to the last '\\n\\nAssistant:'", where, bad, len(ds))
            if not out["prompt"]:
                raise DataError(f"{where}: no row splits into a shared HH prompt and two "
                                f"responses ({bad} rows checked); is this HH data?")
            cols = out
        return Dataset.from_dict(cols)

    @staticmethod
    def _check_degenerate_pairs(chosen: list[str], rejected: list[str], where: str) -> None:
        """Pairs whose chosen equals their rejected response carry no preference signal: a
        warning with their count and first rows, an error when every pair is one."""
        same = [i for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)) if c == r]
        if not same:
            return
        if len(same) == len(chosen):
            raise DataError(f"{where}: chosen == rejected in all {len(same)} pairs; DPO and the "
                            "reward model would learn nothing (wrong columns?)")
        log.warning("%s: chosen == rejected in %d of %d pairs (0-based rows %s%s); they carry no "
                    "preference signal", where, len(same), len(chosen),
                    ", ".join(map(str, same[:5])), ", ..." if len(same) > 5 else "")

    def splits(self) -> dict[str, Dataset]:
        """The normalized ``train`` / ``validation`` / ``eval`` datasets."""
        if self._splits is not None:
            return self._splits
        c, raw = self.config, self.raw()
        train = self._normalize(self._raw_split(c.train_split), c.train_split)
        if c.validation_split is not None:
            val = self._normalize(self._raw_split(c.validation_split), c.validation_split)
        elif "validation" in raw and c.train_split != "validation":
            val = self._normalize(raw["validation"], "validation")
        else:
            if len(train) < 2:
                raise DataError(f"{self.where}: split {c.train_split!r} has {len(train)} row(s); "
                                "need at least 2 to carve out a validation split")
            n_val = min(len(train) - 1, max(1, round(c.val_fraction * len(train))))
            parts = train.train_test_split(test_size=n_val, seed=c.seed, shuffle=True)
            train, val = parts["train"], parts["test"]
        if c.max_train is not None and len(train) > c.max_train:
            train = train.shuffle(seed=c.seed).select(range(c.max_train))
        if c.eval_split in raw and c.eval_split not in (c.train_split, c.validation_split):
            ev = self._normalize(raw[c.eval_split], c.eval_split)
        else:
            log.info("%s: no eval split %r; eval prompts come from the validation split",
                     self.where, c.eval_split)
            ev = val
        overlap = set(ev["prompt"]) & set(train["prompt"])
        if overlap:
            log.warning("%s: %d of the %d distinct held-out prompts are also training prompts "
                        "(e.g. %r): held-out scores there measure memory, not generalisation",
                        self.where, len(overlap), len(set(ev["prompt"])), sorted(overlap)[0][:80])
        self._splits = {"train": train, "validation": val, "eval": ev}
        return self._splits

    # -- the interface
    def _build_sft(self, split: str) -> Dataset:
        ds = self.splits()[split]
        if "response" in ds.column_names:
            return ds
        return Dataset.from_dict({"prompt": list(ds["prompt"]), "response": list(ds["chosen"])})

    def _build_pairs(self, split: str) -> Dataset:
        if self.format == "sft":
            raise DataError(f"{self.where}: format 'sft' (prompt/{self.config.response_column}) "
                            "has no preference pairs; methods that need pairs (rm, dpo, ppo) "
                            "need pairs or hh data")
        return self.splits()[split]

    def _build_eval(self) -> Dataset:
        ds = self.splits()["eval"]
        order = list(range(len(ds)))
        random.Random(f"preference/{self.config.seed}/eval").shuffle(order)
        prompts = list(ds["prompt"])
        seen: set[str] = set()
        keep: list[int] = []
        for i in order:
            if prompts[i] not in seen:
                seen.add(prompts[i])
                keep.append(i)
                if len(keep) == self.config.n_eval:
                    break
        return ds.select(keep)

    def reward(self, prompt: str, response: str) -> float:
        """Not available: raises :class:`NoGoldRewardError` (see ``has_gold_reward``)."""
        raise NoGoldRewardError(self._no_gold())

    def _no_gold(self) -> str:
        return (f"task 'preference' ({self.config.path}) has no gold reward "
                "(has_gold_reward=False); evaluation falls back to preference accuracy on the "
                "eval pairs")

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Not available: raises :class:`NoGoldRewardError`."""
        raise NoGoldRewardError(self._no_gold())

    def corpus(self) -> list[str]:
        """Up to ``corpus_size`` training examples' text (prompt + responses), seeded sample."""
        ds = self.splits()["train"]
        if len(ds) > self.config.corpus_size:
            ds = ds.shuffle(seed=self.config.seed).select(range(self.config.corpus_size))
        cols = [c for c in ("prompt", "chosen", "rejected", "response") if c in ds.column_names]
        return [text for row in ds.select_columns(cols) for text in row.values()]
